"""Import rules of the `ccp` package, checked by reading the source with `ast`.

Layers, lowest first. A module may import only modules of its own package or of
packages LOWER in this list (the top-level `ccp/__init__.py` may import anything
below `ccp.cli`):

     0 ccp.hardware     5 ccp.priors       10 ccp.training    15 ccp.dashboard
     1 ccp.io           6 ccp.guidance     11 ccp.evaluation  16 ccp.launch
     2 ccp.distributed  7 ccp.models       12 ccp.study       17 ccp.cli
     3 ccp.config       8 ccp.pipelines    13 ccp.toy
     4 ccp.tracking     9 ccp.methods      14 ccp.reproduce

Every import counts, including those inside functions and `if TYPE_CHECKING:`.
`ccp/conf/` holds only YAML and is ignored. Also checked: nothing outside
`ccp/cli` imports `ccp.cli`, there are no import cycles between modules, and the
CLI files stay thin (under 80 lines each).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["ccp.hardware", "ccp.io", "ccp.distributed", "ccp.config", "ccp.tracking", "ccp.priors", "ccp.guidance", "ccp.models",
          "ccp.pipelines", "ccp.methods", "ccp.training", "ccp.evaluation", "ccp.study",
          "ccp.toy", "ccp.reproduce", "ccp.dashboard", "ccp.launch", "ccp.cli"]
CLI_MAX_LINES = 80


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root/ccp (not ccp/conf)."""
    mods = {}
    for path in sorted((root / "ccp").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[:2] == ("ccp", "conf"):
            continue
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(root: Path) -> list[tuple[str, str, int, str]]:
    """(importing module, file path, line, imported ccp module) for every import of ccp."""
    mods = _modules(root)
    out = []
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against the file's package
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    names.append(sub if sub in mods else base)
            out += [(mod, rel, node.lineno, n) for n in names if n == "ccp" or n.startswith("ccp.")]
    return out


def _layer(name: str) -> int | None:
    """Index of the longest layer prefix of a dotted name, or None (e.g. plain `ccp`)."""
    hits = [i for i, p in enumerate(LAYERS) if name == p or name.startswith(p + ".")]
    return max(hits, key=lambda i: len(LAYERS[i]), default=None)


def cli_imports(root: Path) -> list[str]:
    """Imports of ccp.cli from outside ccp/cli."""
    return [f"{rel}:{line} -> {name}" for mod, rel, line, name in _imports(root)
            if _layer(name) == LAYERS.index("ccp.cli") and _layer(mod) != LAYERS.index("ccp.cli")]


def upward_imports(root: Path) -> list[str]:
    """Imports of a layer above the importing module's own layer."""
    bad = []
    for mod, rel, line, name in _imports(root):
        own = LAYERS.index("ccp.cli") - 1 if mod == "ccp" else _layer(mod)
        target = _layer(name)
        if own is not None and target is not None and target > own:
            bad.append(f"{rel}:{line} -> {name}")
    return bad


def import_cycles(root: Path) -> list[str]:
    """One line per module cycle (strongly connected component of > 1 module)."""
    mods, edges = _modules(root), {}
    for mod, rel, line, name in _imports(root):
        while name and name not in mods:  # `import ccp.a.b.attr`: nearest enclosing module
            name = name.rpartition(".")[0]
        if name and name != mod:
            edges.setdefault(mod, {}).setdefault(name, f"{rel}:{line} -> {name}")
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []
    for start in mods:  # iterative Tarjan
        if start in index:
            continue
        work = [(start, iter(edges.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start), on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = {stack.pop()}
                    while node not in scc:
                        scc.add(stack.pop())
                    on_stack -= scc
                    sccs.append(scc)
            elif nxt not in index:
                index[nxt] = low[nxt] = len(index)
                stack.append(nxt), on_stack.add(nxt)
                work.append((nxt, iter(edges.get(nxt, ()))))
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
    return [f"cycle {sorted(scc)}: " + "; ".join(
                sorted(where for m in scc for n, where in edges.get(m, {}).items() if n in scc))
            for scc in sccs if len(scc) > 1]


def unplaced_modules(root: Path) -> list[str]:
    """Modules of ccp outside every layer: a new package must be given its place in LAYERS."""
    return [f"{path.relative_to(root).as_posix()}: {mod}" for mod, path in _modules(root).items()
            if mod != "ccp" and _layer(mod) is None]


def long_cli_files(root: Path) -> list[str]:
    return [f"{p.relative_to(root).as_posix()}: {n} lines"
            for p in sorted((root / "ccp" / "cli").glob("*.py"))
            if p.name != "__init__.py" and (n := len(p.read_text().splitlines())) >= CLI_MAX_LINES]


def _report(what: str, bad: list[str]) -> str:
    return f"{len(bad)} {what}:\n  " + "\n  ".join(bad)


def test_nothing_outside_cli_imports_cli():
    bad = cli_imports(ROOT)
    assert not bad, _report("import(s) of ccp.cli from outside ccp/cli", bad)


def test_no_layer_imports_a_higher_layer():
    bad = upward_imports(ROOT)
    assert not bad, _report("upward import(s), see the layer table in tests/test_layers.py", bad)


def test_no_import_cycles():
    bad = import_cycles(ROOT)
    assert not bad, _report("import cycle(s)", bad)


def test_every_module_has_a_layer():
    bad = unplaced_modules(ROOT)
    assert not bad, _report("module(s) in no layer; add their package to LAYERS", bad)


def test_cli_files_are_thin():
    bad = long_cli_files(ROOT)
    assert not bad, _report(f"ccp/cli file(s) of {CLI_MAX_LINES} lines or more", bad)


def test_checker_finds_violations(tmp_path):
    files = {
        "ccp/__init__.py": "",
        "ccp/conf/ignored.py": "import ccp.cli\n",
        "ccp/cli/__init__.py": "",
        "ccp/cli/main.py": "import ccp.toy\n",
        "ccp/toy/__init__.py": "",
        "ccp/toy/y.py": "def f():\n    from ccp import cli\n",
        "ccp/evaluation/__init__.py": "",
        "ccp/evaluation/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ccp.toy.y\n",
        "ccp/evaluation/a.py": "from . import b\nfrom .a import f\n",
        "ccp/evaluation/b.py": "def g():\n    from ccp.evaluation.a import f\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cli_imports(tmp_path) == ["ccp/toy/y.py:2 -> ccp.cli"]
    assert sorted(upward_imports(tmp_path)) == [
        "ccp/evaluation/x.py:3 -> ccp.toy.y", "ccp/toy/y.py:2 -> ccp.cli"]
    assert import_cycles(tmp_path) == [
        "cycle ['ccp.evaluation.a', 'ccp.evaluation.b']: "
        "ccp/evaluation/a.py:1 -> ccp.evaluation.b; ccp/evaluation/b.py:2 -> ccp.evaluation.a"]
    assert long_cli_files(tmp_path) == []
    (tmp_path / "ccp" / "extras.py").write_text("")
    assert unplaced_modules(tmp_path) == ["ccp/extras.py: ccp.extras"]
