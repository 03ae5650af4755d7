"""Several seeds of one reproduction: what a seed changes, where its files go, and the checks.

Run seed ``s`` (``seeds: [0, 1, 2]``) trains every method with training seed ``<its seed> + s`` and
draws every evaluation sample from seeds shifted by ``s * seed_stride`` (FID, the weight search,
text and spatial alignment, drift, and the prior's reference samples for drift), so two run seeds
never share a sample's noise. The concept data, its held-out split and the digit classifier (the
instruments) stay the same in every seed. ``prior_seeds: true`` also trains the toy (or writes the
tiny) prior per seed, with prior seed ``seed + s`` at ``<prior.path>-seed<s>``.

Folders: seed 0 is the single-seed run itself (``train_dir``, ``eval_dir``: a finished
``make reproduce-tables`` is seed 0 of ``make reproduce-seeds``); seed ``s > 0`` trains into
``<out_dir>/seeds/<s>/train`` and keeps its records in ``<out_dir>/seeds/<s>/eval``. With several
seeds each seed's tables go to ``<results_dir>/seeds/<s>/`` and the aggregate to ``results_dir``.
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ccp.reproduce.config import ReproduceConfigError

DEFAULT_SEED_STRIDE = 1_000_000  # sample i of run seed s: noise seed base + s * stride + i (stride > any sample count)
SAMPLING_SECTIONS = ("fid", "text_alignment", "spatial_alignment", "drift")


def run_seeds(cfg: DictConfig) -> list[int]:
    """The run seeds (``seeds``, default [0]), checked: a non-empty list of distinct integers >= 0."""
    seeds = cfg.get("seeds")
    if seeds is None:
        return [0]
    if isinstance(seeds, (int, str)) or not hasattr(seeds, "__iter__"):
        raise ReproduceConfigError(f"seeds={seeds!r}: give a list of run seeds, e.g. seeds=[0,1,2]")
    seeds = list(seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if not seeds or bad:
        raise ReproduceConfigError(f"seeds={seeds}: give a non-empty list of integers >= 0, e.g. seeds=[0,1,2]"
                                   + (f" ({bad} are not)" if bad else ""))
    if len(set(seeds)) != len(seeds):
        raise ReproduceConfigError(f"seeds={seeds}: a seed is listed twice; list each run seed once")
    return seeds


def check_seed_settings(cfg: DictConfig, seeds: list[int]) -> list[str]:
    """Problems with the multi-seed settings that need no model."""
    problems = []
    stride = cfg.get("seed_stride", DEFAULT_SEED_STRIDE)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        problems.append(f"seed_stride={stride}: must be a positive integer (larger than any sample count)")
    if cfg.get("prior_seeds") and not (cfg.prior.get("train_toy") or cfg.prior.get("write_tiny")):
        problems.append("prior_seeds=true trains the prior per seed, which only the toy and tiny priors do here; "
                        "set prior_seeds=false for a given prior (e.g. SD v1.5)")
    if len(seeds) > 1 and any(OmegaConf.select(cfg, f"exports.{d}") for d in cfg.datasets):
        problems.append("exports names one ccp-train export per cell, but each of several seeds trains its own; "
                        "drop the +exports.* overrides or run one seed (seeds=[0])")
    spread = cfg.get("sample_spread")
    if spread is not None:
        values = list(spread.get("sampling_seeds") or [])
        if (not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values)
                or len(set(values)) != len(values)):
            problems.append(f"sample_spread.sampling_seeds={values}: give distinct integers >= 0, e.g. [0, 1, 2, 3]")
        if spread.get("dataset") is not None and spread.dataset not in cfg.datasets:
            problems.append(f"sample_spread.dataset={spread.dataset}: not in datasets {list(cfg.datasets)}")
    return problems


def spread_enabled(cfg: DictConfig, multi: bool) -> bool:
    """Whether this (per-seed) config measures the FID spread over sampling seeds: ``enabled: null``
    means with several run seeds, on the first seed's models."""
    spread = cfg.get("sample_spread")
    if spread is None or not cfg.fid.enabled:
        return False
    enabled = spread.get("enabled")
    return multi if enabled is None else bool(enabled)


def seed_config(cfg: DictConfig, seed: int, multi: bool, first: bool = True) -> DictConfig:
    """The config of run seed `seed` (see the module docstring). Seed 0 alone is `cfg` itself."""
    if seed == 0 and not multi:
        return cfg
    out = copy.deepcopy(cfg)
    stride = int(cfg.get("seed_stride", DEFAULT_SEED_STRIDE))
    with_flag = OmegaConf.is_struct(out)
    OmegaConf.set_struct(out, False)
    out.run_seed = int(seed)
    for section in SAMPLING_SECTIONS:
        if out.get(section) is not None and out[section].get("seed") is not None:
            out[section].seed = int(cfg[section].seed) + seed * stride
    if seed != 0:
        root = Path(str(cfg.out_dir)) / "seeds" / str(seed)
        out.train_dir, out.eval_dir = str(root / "train"), str(root / "eval")
        if cfg.get("prior_seeds"):
            out.prior.path = f"{cfg.prior.path}-seed{seed}"
            out.prior.seed = int(cfg.seed) + seed
    if multi:
        out.results_dir = str(Path(str(cfg.results_dir)) / "seeds" / str(seed))
    if out.get("sample_spread") is not None:
        out.sample_spread.enabled = spread_enabled(cfg, multi) and first
    OmegaConf.set_struct(out, with_flag)
    return out
