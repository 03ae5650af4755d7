"""Write report.md from a finished (or interrupted) `mutmut run` (`make mutation`).

Reads mutmut's per-file results (mutants/**/*.py.meta) in WORKDIR, shows each surviving mutant's
diff, and takes the reason it survives from reasons.json beside this file (mutant name, or a glob pattern
over names, -> reason; the first match wins; an unreviewed survivor says so).

    python benchmarks/results/mutation/write_report.py WORKDIR benchmarks/results/mutation/report.md
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import os
import sys
import tomllib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "caught by type check",
          -11: "segfault", -9: "segfault", 2: "interrupted", None: "not checked"}
HERE = Path(__file__).resolve().parent


def load_results(workdir: Path) -> dict[str, dict[str, str]]:
    """{source file: {mutant name: status}}."""
    results = {}
    for meta in sorted((workdir / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        if codes:
            source = meta.relative_to(workdir / "mutants").as_posix()[: -len(".meta")]
            results[source] = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    return results


def reason_for(name: str, reasons: dict[str, str]) -> str | None:
    """The reason for mutant `name`: its own entry, else the first glob pattern that matches it."""
    if name in reasons:
        return reasons[name]
    return next((reason for pattern, reason in reasons.items() if fnmatch.fnmatchcase(name, pattern)), None)


def diffs(workdir: Path, names: list[str]) -> dict[str, str]:
    """Each mutant's diff, through mutmut's own `show` (run in WORKDIR, as mutmut expects)."""
    if not names:
        return {}
    from mutmut.__main__ import find_mutant, get_diff_for_mutant

    out, here = {}, os.getcwd()
    os.chdir(workdir)
    try:
        for name in names:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    diff = get_diff_for_mutant(name, path=find_mutant(name).path)
            except Exception as err:  # an unreadable mutant should not lose the report
                diff = f"(diff unavailable: {type(err).__name__}: {err})"
            lines = [l for l in diff.splitlines() if l.startswith(("-", "+")) and not l.startswith(("---", "+++"))]
            out[name] = "\n".join(lines[:6])
    finally:
        os.chdir(here)
    return out


def survivor_kind(reason: str | None) -> str:
    """The first words of a reason (before its colon): equivalent, device placement, cosmetic, not killed, ..."""
    if reason is None:
        return "not reviewed"
    head = reason.split(":", 1)[0].split(" (", 1)[0].strip()
    return next((kind for kind in ("equivalent", "device placement", "cosmetic", "not killed") if head.startswith(kind)), head)


def scope_lines(workdir: Path) -> list[str]:
    """What was mutated and which tests ran, from the `[tool.mutmut]` table the run used."""
    config_file = workdir / "pyproject.toml"
    if not config_file.is_file():
        return []
    config = tomllib.loads(config_file.read_text()).get("tool", {}).get("mutmut", {})
    mutated = ", ".join(f"`{p}`" for p in config.get("only_mutate", []))
    tests = config.get("pytest_add_cli_args_test_selection", [])
    return [f"Mutated: {mutated}. Each mutant runs against the tests of these {len(tests)} files that execute its "
            f"function: " + ", ".join(f"`{t}`" for t in tests) + ".", ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("--reasons", type=Path, default=HERE / "reasons.json")
    parser.add_argument("--scope-note", default="")
    args = parser.parse_args(argv)
    results = load_results(args.workdir)
    if not results:
        print(f"no mutmut results under {args.workdir}/mutants; run make mutation first", file=sys.stderr)
        return 1
    reasons = json.loads(args.reasons.read_text()) if args.reasons.is_file() else {}
    total = Counter(s for per in results.values() for s in per.values())
    survivors = sorted(n for per in results.values() for n, s in per.items() if s == "survived")
    shown = diffs(args.workdir, survivors)

    detected = total["killed"] + total["timeout"] + total["segfault"]
    judged = detected + total["survived"] + total["suspicious"]
    score = detected / judged if judged else float("nan")
    lines = [
        "# Mutation testing (`make mutation`)",
        "",
        f"mutmut over the core science modules, with the fast tests that pin them (pyproject `[tool.mutmut]`). "
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `benchmarks/results/mutation/write_report.py`.",
        "",
        f"**Mutation score: {detected} / {judged} = {score:.1%}** of the mutants that were run against at least one test "
        "(killed, including timeouts, over killed + survived + suspicious).",
        "",
    ]
    if args.scope_note:
        lines += [args.scope_note, ""]
    lines += scope_lines(args.workdir)
    lines += ["| file | mutants | killed | survived | timeout | suspicious | no tests | not checked |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for source, per in results.items():
        c = Counter(per.values())
        lines.append(f"| `{source}` | {len(per)} | {c['killed']} | {c['survived']} | {c['timeout']} | {c['suspicious']} "
                     f"| {c['no tests']} | {c['not checked']} |")
    lines.append(f"| **all** | {sum(total.values())} | {total['killed']} | {total['survived']} | {total['timeout']} "
                 f"| {total['suspicious']} | {total['no tests']} | {total['not checked']} |")
    lines += ["", "*no tests*: no selected test runs the mutated function (outside this suite's scope). "
              "*not checked*: not reached before the run was stopped.", "",
              f"## Survivors ({len(survivors)})", ""]
    unreviewed = 0
    for name in survivors:
        reason = reason_for(name, reasons)
        if reason is None:
            unreviewed += 1
            reason = "not reviewed yet"
        lines += [f"- `{name}`: {reason}", "", "  ```diff", *[f"  {l}" for l in shown.get(name, "").splitlines()],
                  "  ```", ""]
    kinds = Counter(survivor_kind(reason_for(name, reasons)) for name in survivors)
    lines.insert(6, "Survivors by reason: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) + ".\n")
    if unreviewed:
        lines.insert(6, f"{unreviewed} of the {len(survivors)} survivors are not reviewed yet (no entry in reasons.json).\n")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines) + "\n")
    print(f"mutation score {score:.1%} ({detected}/{judged}); {len(survivors)} survivors; wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
