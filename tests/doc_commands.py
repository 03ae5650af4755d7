"""The shell command blocks of README.md and docs/*.md, run as written against stand-ins.

Every ```bash / ```sh block runs, in file order (README first, then docs/ alphabetically), in one
working folder that holds stand-ins at the paths the docs use:

    sd-v1-5/, sdxl-base/                 tiny SD v1.x and SDXL priors (random weights)
    sd-controlnet-canny/, sd-controlnet-depth/   tiny ControlNets
    data/ffhq/, data/afhqv2/, data/celeba_hq/    8 small random images each
    checkpoints/weights-inception-2015-12-05-6726825d.pth, checkpoints/clip/ViT-L-14.pt
                                         stand-in weight files (tests/stand_ins.py): numbers mean nothing
    photo.png, mask.png, edges.png, depth.png    inputs of the translation examples

A block the CI cannot run says why on the line before its fence:
``<!-- not run in CI: REASON -->``; ``<!-- not run in CI: "PREFIX": REASON -->`` leaves out only the
block's lines that start with PREFIX. What must change on a CPU is appended to each command and
listed here, in `SHRINK`, and nowhere else: sizes, steps and sample counts, the device, and
`dry_run=true` for ccp-launch. A Hydra sweep over `range(a,b,s)` keeps its first two points.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SKIP = re.compile(r'^<!--\s*not run in CI:\s*(?:"(?P<prefix>[^"]+)":)?\s*(?P<reason>.*?)\s*-->\s*$')

_SAMPLING = ["sampling.height=64", "sampling.width=64", "sampling.steps=2"]
# The overrides appended to each command on a CPU (Hydra: the last value of a key wins).
SHRINK: dict[str, list[str]] = {
    "ccp-train": ["trainer=cpu", "trainer.max_steps=2", "trainer.global_batch_size=2", "data.batch_size=2",
                  "data.resolution=64", "data.num_workers=0", "prior.dtype=float32", "checkpoint.every_n_steps=2",
                  "validation.every_n_steps=0"],
    "ccp-sample": [*_SAMPLING, "sampling.num_images=2", "sampling.batch_size=2", "device=cpu"],
    "ccp-eval": [*_SAMPLING, "sampling.batch_size=2", "device=cpu", "fid.num_samples=4", "fid.shard_size=2",
                 "fid.num_workers=0", "text.images_per_prompt=1", "spatial.num_conditions=2",
                 "spatial.samples_per_condition=1"],
    "ccp-reproduce": ["device=cpu", "prior.dtype=float32", *_SAMPLING, "sampling.batch_size=2", "fid.resolution=64",
                      "fid.num_samples=4",
                      "fid.shard_size=2", "fid.num_workers=0", "text_alignment.images_per_prompt=1",
                      "spatial_alignment.num_conditions=2", "spatial_alignment.samples_per_condition=1"],
    "ccp-launch": ["dry_run=true"],
}
# make targets that pass ARGS to one of the commands above
MAKE_ARGS = {"reproduce-tables": "ccp-reproduce"}


@dataclass(frozen=True)
class Block:
    path: str   # relative to the repository
    line: int   # of the opening fence
    lang: str
    body: str
    skip: str | None  # the reason it is not run, from the marker line
    skip_prefix: str | None = None  # only lines starting with this are not run (for `skip`)

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line}"


def shell_blocks(paths: list[Path] | None = None) -> list[Block]:
    """Every shell block of README.md and docs/*.md, in run order."""
    paths = paths or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = []
    for path in paths:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)\s*$", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if fence.group(1) in SHELL_LANGS:
                marker = SKIP.match(lines[i - 1]) if i else None
                name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
                blocks.append(Block(name, i + 1, fence.group(1), "\n".join(lines[i + 1:end]),
                                    marker.group("reason") if marker else None,
                                    marker.group("prefix") if marker else None))
            i = end + 1
    return blocks


def logical_lines(body: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, current = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            out.append(current + line)
            current = ""
    if current:
        out.append(current)
    return out


def split_comment(line: str) -> tuple[str, str]:
    """(command, trailing comment) of a shell line: a # after whitespace, outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def _two_points(match: re.Match) -> str:
    start, step = float(match.group(1)), float(match.group(3))
    return f"range({match.group(1)},{start + 2 * step:g},{match.group(3)})"


def shrink(line: str, repo: Path = REPO) -> str:
    """`line` as the CI runs it: the command's `SHRINK` overrides appended, make pointed at the
    repository's Makefile and environment, sweeps over ranges cut to two points."""
    command, comment = split_comment(line)
    words = command.split()
    if not words:
        return line
    program = words[0]
    command = re.sub(r"range\(([-\d.]+),([-\d.]+),([-\d.]+)\)", _two_points, command)
    if program in SHRINK:
        command += " " + " ".join(shlex.quote(o) for o in SHRINK[program])
    elif program == "make":
        venv = repo / ".venv"
        target = next((w for w in words[1:] if not w.startswith("-") and "=" not in w), None)
        prefix = f"make -f {shlex.quote(str(repo / 'Makefile'))} VENV={shlex.quote(str(venv))} " \
                 f"-o {shlex.quote(str(venv / 'bin' / 'ccp-sample'))}"
        command = prefix + command[len("make"):]
        if target in MAKE_ARGS:
            if any(w.startswith("ARGS=") for w in words):
                raise ValueError(f"{line!r}: a documented make command with ARGS= is not shrunk yet")
            command += " " + shlex.quote("ARGS=" + " ".join(SHRINK[MAKE_ARGS[target]]))
    return f"{command}  {comment}".rstrip()


def script(block: Block, repo: Path = REPO) -> str:
    """The bash script the CI runs for `block`: stop at the first failing command, echo each."""
    lines = [shrink(line, repo) for line in logical_lines(block.body)
             if not (block.skip_prefix and line.lstrip().startswith(block.skip_prefix))]
    return "set -euo pipefail\nset -x\n" + "\n".join(lines) + "\n"
