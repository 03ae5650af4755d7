"""The study design (methods, comparisons, pairs per rater, checks, seed) and each rater's plan.

A pair shows image ``i`` of two methods: image ``i`` of seed ``s`` is the same noise for every
method (`ccp.pipelines.sampling`), so the two images differ only by the method. Samples are the
PNGs that ccp-eval keeps (``<shard_dir>/images/000123.png``) or ccp-sample writes
(``<run>/images/00123.png``): one folder per method under ``samples``.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ccp.config import ConfigError

COMPARISONS = ("ours_vs_each", "all_pairs")
_INDEX_NAME = re.compile(r"^(\d+)\.png$")
_RATER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class StudyDesign:
    name: str
    question: str
    ours: str
    methods: dict[str, str]  # method name -> its folder under the samples folder
    comparisons: str = "ours_vs_each"
    pairs_per_rater: int = 40
    attention_checks: int = 4
    seed: int = 0
    raters: tuple[str, ...] = field(default_factory=tuple)

    def method_pairs(self) -> list[tuple[str, str]]:
        names = list(self.methods)
        if self.comparisons == "ours_vs_each":
            return [(self.ours, m) for m in names if m != self.ours]
        return list(itertools.combinations(names, 2))

    def fingerprint(self) -> dict:
        """What fixes the pairs already planned: a database made with another one is refused."""
        d = asdict(self)
        d.pop("raters")
        return d


def design_from_config(node) -> StudyDesign:
    """A checked `StudyDesign` from the ``study`` config node (conf/study/*.yaml)."""
    from ccp.config import plain

    raw = plain(node)
    for key in ("name", "question", "ours", "methods"):
        if raw.get(key) in (None, "", {}):
            raise ConfigError(f"study.{key} is not set; set it in the study config (conf/study/table1.yaml shows every key)")
    methods = raw["methods"]
    if isinstance(methods, list):
        methods = {m: m for m in methods}
    if not isinstance(methods, dict) or len(methods) < 2:
        raise ConfigError("study.methods needs at least two methods (name: folder under samples)")
    methods = {str(k): str(v if v is not None else k) for k, v in methods.items()}
    if raw["ours"] not in methods:
        raise ConfigError(f"study.ours={raw['ours']!r} is not one of study.methods {sorted(methods)}; "
                          "set study.ours to the method whose preference Table 1 reports")
    comparisons = raw.get("comparisons", "ours_vs_each")
    if comparisons not in COMPARISONS:
        raise ConfigError(f"study.comparisons={comparisons!r}: use one of {', '.join(COMPARISONS)}")
    raters = raw.get("raters", 0)
    if isinstance(raters, int):
        raters = [f"rater{i + 1:02d}" for i in range(raters)]
    raters = tuple(str(r) for r in raters or ())
    bad = [r for r in raters if not _RATER_NAME.match(r)]
    if bad:
        raise ConfigError(f"study.raters: {bad} are not valid names; use letters, digits, '_', '.', '-' (at most 64)")
    if len(set(raters)) != len(raters):
        raise ConfigError("study.raters lists a name twice; give every rater one name")
    for key in ("pairs_per_rater", "attention_checks", "seed"):
        if not isinstance(raw.get(key, 0), int) or raw.get(key, 0) < 0:
            raise ConfigError(f"study.{key} must be a non-negative integer, got {raw.get(key)!r}")
    if raw.get("pairs_per_rater", 40) < 1:
        raise ConfigError("study.pairs_per_rater must be at least 1")
    return StudyDesign(name=str(raw["name"]), question=str(raw["question"]), ours=str(raw["ours"]),
                       methods=methods, comparisons=comparisons,
                       pairs_per_rater=int(raw.get("pairs_per_rater", 40)),
                       attention_checks=int(raw.get("attention_checks", 4)),
                       seed=int(raw.get("seed", 0)), raters=raters)


def find_samples(samples_dir: str | Path, design: StudyDesign) -> dict[str, dict[int, str]]:
    """Per method, sample index -> the PNG's path relative to `samples_dir` (``images/`` preferred)."""
    if samples_dir in (None, ""):
        raise ConfigError("samples is not set; pass samples=DIR, the folder with one sample folder per method")
    root = Path(samples_dir)
    if not root.is_dir():
        raise ConfigError(f"samples={samples_dir}: no such folder; pass the folder holding "
                          f"{', '.join(design.methods.values())}")
    root = root.resolve()
    found: dict[str, dict[int, str]] = {}
    for method, folder in design.methods.items():
        base = (root / folder).resolve()
        if not base.is_relative_to(root) or not base.is_dir():
            raise ConfigError(f"study.methods.{method}: folder {folder!r} is not a folder inside samples={samples_dir}; "
                              f"make samples/{folder} hold its images (images/000000.png ...)")
        images = base / "images" if (base / "images").is_dir() else base
        found[method] = {int(m.group(1)): (images / p.name).relative_to(root).as_posix()
                         for p in sorted(images.iterdir()) if (m := _INDEX_NAME.match(p.name)) and p.is_file()}
        if not found[method]:
            raise ConfigError(f"study.methods.{method}: no images named like 000123.png in {images}; "
                              "keep the samples with fid.keep_images=true (ccp-eval) or use ccp-sample's images/")
    return found


@dataclass(frozen=True)
class PlannedPair:
    position: int
    method_left: str
    method_right: str
    image_left: str
    image_right: str
    sample_index: int
    broken_side: str | None = None  # attention check: which side shows the broken image


def plan_rater(design: StudyDesign, samples: dict[str, dict[int, str]], rater: str) -> list[PlannedPair]:
    """The rater's pairs in showing order; a function of the design, the samples and the rater's name."""
    seed = int.from_bytes(hashlib.sha256(f"{design.seed}:{rater}".encode()).digest()[:8], "big")
    rng = random.Random(seed)
    method_pairs = design.method_pairs()
    common = {mp: sorted(set(samples[mp[0]]) & set(samples[mp[1]])) for mp in method_pairs}
    empty = [f"{a}/{b}" for (a, b), idx in common.items() if not idx]
    if empty:
        raise ConfigError(f"no sample index is shared by {', '.join(empty)}; sample both with the same seeds and indices")
    # Each method pair gets an equal share; indices without repeats until a method pair runs out.
    order = [method_pairs[i % len(method_pairs)] for i in range(design.pairs_per_rater)]
    rng.shuffle(order)
    pools = {mp: rng.sample(idx, len(idx)) for mp, idx in common.items()}
    used = {mp: 0 for mp in method_pairs}
    items: list[tuple[str, str, int, str | None]] = []
    for mp in order:
        pool = pools[mp]
        index = pool[used[mp] % len(pool)]
        used[mp] += 1
        a, b = mp if rng.random() < 0.5 else mp[::-1]
        items.append((a, b, index, None))
    for _ in range(design.attention_checks):
        method = rng.choice(list(design.methods))
        indices = sorted(samples[method])
        index = rng.choice(indices)
        side = rng.choice(("left", "right"))
        items.insert(rng.randrange(len(items) + 1), (method, method, index, side))
    return [PlannedPair(position=k, method_left=a, method_right=b, image_left=samples[a][i],
                        image_right=samples[b][i], sample_index=i, broken_side=side)
            for k, (a, b, i, side) in enumerate(items)]
