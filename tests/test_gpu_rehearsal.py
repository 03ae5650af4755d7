"""make gpu-rehearsal (the GPU machine's versions on this CPU) without running it: what `make -n` says it
installs, and that benchmarks/gpu_machine_versions.txt with the GPU_WHEELS wheels covers what those wheels need.
The rehearsal itself downloads, so it runs before a GPU window, not here."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ROOT / "benchmarks" / "gpu_machine_versions.txt"
# diffusers lists it without a marker but uses the standard library's on Python >= 3.8 (the Makefile says so)
NOT_NEEDED = {"importlib-metadata"}
# the GPU machine's Python; the platform is this machine's (Linux x86_64, as there)
GPU_MACHINE = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.1", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_wheels() -> dict[str, str]:
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(l for l in makefile.splitlines() if l.startswith("GPU_WHEELS"))
    return dict(req.split("==") for req in line.split(":=", 1)[1].split())


def machine_versions() -> dict[str, str | None]:
    """name -> pinned version, or None where the GPU machine's version was not read."""
    out = {}
    for line in VERSIONS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins = [s.version for s in req.specifier if s.operator == "=="]
            assert not req.extras and len(req.specifier) == len(pins) <= 1, line  # a pin or nothing
            out[norm(req.name)] = pins[0] if pins else None
    return out


def requirements(name: str) -> set[str] | None:
    """What a distribution needs on the GPU machine (no extras), from its metadata here; None if not installed."""
    try:
        listed = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    reqs = [Requirement(r) for r in listed]
    return {norm(r.name) for r in reqs if r.marker is None or r.marker.evaluate(GPU_MACHINE)}


def closure(roots) -> set[str]:
    seen, todo = set(), [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(requirements(name) or ())  # one not installed here counts without its dependencies
    return seen


def test_the_versions_file_says_where_it_comes_from_and_pins_what_was_read():
    header = VERSIONS.read_text().split("\n\n")[0]
    assert "GPU machine" in header and "2026-11" in header and "3.12" in header
    versions = machine_versions()
    assert versions["torch"] == "2.11.0" and versions["torchvision"] == "0.26.0"
    assert versions["transformers"] == "5.17.0" and versions["numpy"] == "2.5.2"
    assert {"lightning", "torchmetrics", "huggingface-hub", "safetensors", "accelerate", "peft"} <= set(versions)


def test_the_versions_file_lists_every_package_the_gpu_wheels_do_not_carry():
    """Each GPU_WHEELS wheel goes in with --no-deps: what it needs must travel with it or be on the machine already
    (a versions-file package or one of their dependencies, which pip installed there with them). Dependencies are
    read from this environment, whose versions are ccp's pins (some newer than the machine's): a quick stand-in for
    the rehearsal, which installs the machine's own."""
    carried = {norm(n) for n in gpu_wheels()}
    on_machine = closure(machine_versions())
    assert {"filelock", "packaging", "regex"} <= on_machine  # dependencies the file does not name were read
    needed = {(wheel, dep) for wheel in carried for dep in requirements(wheel) or ()}
    assert all(requirements(wheel) is not None for wheel in carried)  # the test env has every GPU wheel
    missing = sorted((wheel, dep) for wheel, dep in needed if dep not in carried | on_machine | NOT_NEEDED)
    assert not missing, f"(wheel, what it needs) neither in GPU_WHEELS nor on the GPU machine: {missing}"


SEPARATORS = {"&&", "||", ";", "|", "{", "}", "then", "else", "do", "done", "fi", "if"}


def rehearsal_commands() -> list[list[str]]:
    """`make -n gpu-rehearsal` (sub-makes included) as simple commands: `a && b`, `if c; then d; fi` split."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "gpu-rehearsal"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    commands = []
    for line in done.stdout.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in SEPARATORS:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [without_redirections(c) for c in commands if c]


def without_redirections(tokens: list[str]) -> list[str]:
    out, skip = [], False
    for i, token in enumerate(tokens):
        if skip or (token.isdigit() and tokens[i + 1:i + 2] in ([">"], [">&"], [">>"])):
            skip = False
        elif token in {">", ">&", ">>", "<"}:
            skip = True
        else:
            out.append(token)
    return out


def program(tokens: list[str]) -> list[str]:
    """The command without its leading VAR=value assignments."""
    return tokens[next((i for i, t in enumerate(tokens) if not re.match(r"^\w+=", t)), len(tokens)):]


def pip_calls(commands, verb: str) -> list[list[str]]:
    """The arguments after `pip VERB` (or `python -m pip VERB`) of each command that runs it."""
    calls = []
    for tokens in map(program, commands):
        rest = tokens[1:] if tokens and tokens[0].endswith("/pip") else tokens[3:] if tokens[1:3] == ["-m", "pip"] else []
        if rest[:1] == [verb]:
            calls.append(rest[1:])
    return calls


WITH_VALUE = {"-r", "-c", "-d", "-w", "--target", "--extra-index-url", "--index-url", "--retries", "--python-version",
              "--implementation", "--platform"}


def split_args(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    options, positional, it = {}, [], iter(args)
    for arg in it:
        if arg in WITH_VALUE:
            options.setdefault(arg, []).append(next(it))
        elif arg.startswith("-"):
            options.setdefault(arg, [])
        else:
            positional.append(arg)
    return options, positional


def test_make_n_installs_exactly_the_gpu_wheels_and_the_versions_file_pins():
    commands = rehearsal_commands()
    wheels = {f"{n}=={v}" for n, v in gpu_wheels().items()}
    versions = machine_versions()

    installs = [split_args(call) for call in pip_calls(commands, "install")]
    assert len(installs) == 3, installs
    (torch_opts, torch_reqs), (rest_opts, rest_reqs), (site_opts, site_reqs) = installs
    # 1. torch and its siblings at the machine's versions, alone (the CPU build: its own index, no CUDA deps)
    torch_pins = {f"{n}=={versions[n]}" for n in ("torch", "torchvision", "torchaudio")}
    assert set(torch_reqs) == torch_pins and "--no-deps" in torch_opts and "-c" not in torch_opts
    # 2. the rest of the versions file, with dependencies, as the machine got them; not ccp's own pins
    assert rest_reqs == [] and rest_opts == {"-q": [], "-r": [str(VERSIONS.relative_to(ROOT))]}
    # 3. the wheels as make gpu-check installs them: only .whl/, no index, no deps, into a folder on PYTHONPATH
    assert site_reqs == [".whl/*.whl"] and {"--no-index", "--no-deps", "--target"} <= set(site_opts)
    site = site_opts["--target"][0]

    # .whl holds exactly what make gpu-wheels fetches: every GPU_WHEELS pin, one at a time, nothing else
    loop = next(tokens for tokens in commands if tokens[:3] == ["for", "req", "in"])
    assert set(loop[3:]) == wheels
    for verb in ("download", "wheel"):
        calls = pip_calls(commands, verb)
        assert calls and all(call[-1] == "$req" and "--no-deps" in call for call in calls)
    assert not any("-e" in tokens or "constraints.txt" in tokens for tokens in commands)  # ccp runs from the checkout

    # gpu_check --smoke and each entry point: the venv's python, the wheel folder then the checkout on PYTHONPATH
    venv_python = next(t[0] for t in commands if t[0].endswith("/bin/pip")).replace("/bin/pip", "/bin/python")
    runs = [tokens for tokens in commands if program(tokens)[:1] == [venv_python] and program(tokens)[1:3] != ["-m", "pip"]]
    for tokens in runs:
        pythonpath = [t.split("=", 1)[1] for t in tokens if t.startswith("PYTHONPATH=")]
        assert pythonpath == [f"{site}:."], tokens
    checks = [program(tokens)[2:] for tokens in runs if program(tokens)[1:2] == ["benchmarks/gpu_check.py"]]
    smoke = [args for args in checks if "--smoke" in args]
    assert len(smoke) == 1, checks  # the one run of gpu_check's sections (others: --preflight-only)
    outs = [smoke[0][i + 1] for i, t in enumerate(smoke[0]) if t == "--out"]
    assert outs[-1:] == ["outputs/gpu-rehearsal"]  # argparse: the last --out wins
    modules = [program(tokens)[2] for tokens in runs if program(tokens)[1:2] == ["-m"]]
    assert {"ccp.cli.tiny_prior", "ccp.cli.train"} <= set(modules)
    train = next(tokens for tokens in runs if "ccp.cli.train" in tokens)
    assert "trainer=cpu" in train and "trainer.max_steps=2" in train
