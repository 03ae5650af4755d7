"""What the run needs before any method: the prior (the random tiny one, or the trained toy one and
its toy ControlNet),
the data folders (tiny scale's random images and condition images, toy scale's digit concept
folders) and the toy digit classifier. Each is made once, atomically, and reused."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ccp.config import plain
from ccp.io import dir_complete, write_dir_atomic
from ccp.reproduce.config import fid_real_path
from ccp.reproduce.tiny import write_toy_images


def prepare_inputs(cfg: DictConfig, progress: bool = False) -> None:
    """The prior (tiny random, or the trained toy prior) and the data folders, when absent: tiny
    scale's toy images and condition images, toy scale's digit concept folders (train and held out)."""
    seed = int(cfg.prior.get("seed", cfg.seed))  # prior_seeds: each run seed's own prior (`ccp.reproduce.seeds`)
    if cfg.prior.get("write_tiny", False) and not dir_complete(str(cfg.prior.path)):
        from ccp.priors.tiny import save_tiny_prior

        family = cfg.prior.get("family") or "auto"
        family = "sd1" if family == "auto" else family  # the tiny prior's shape: sd1 (default), sd2 or sdxl
        write_dir_atomic(Path(str(cfg.prior.path)),
                         lambda tmp: save_tiny_prior(tmp, seed=seed, with_controlnet=True, family=family))
    elif cfg.prior.get("train_toy", False):
        from ccp.toy.prior import ensure_toy_prior

        settings = plain(cfg.prior.get("toy_settings"))
        cfg.prior.path = str(ensure_toy_prior(str(cfg.prior.path), seed=seed, progress=progress, **settings))
        toy_controlnet = cfg.get("toy_controlnet")
        if toy_controlnet and toy_controlnet.get("train_toy", False):
            from ccp.toy.controlnet import ensure_toy_controlnet

            cfg.controlnet = str(ensure_toy_controlnet(cfg.prior.path, toy_controlnet.get("path"), seed=seed, progress=progress,
                                                       **plain(toy_controlnet.get("settings"))))
        spatial = cfg.spatial_alignment
        if spatial.enabled and not dir_complete(str(spatial.condition_dir)):
            from ccp.toy.controlnet import prior_identity, write_conditions

            toy = prior_identity(cfg.prior.path)["settings"]  # held out from the prior's own data split
            write_dir_atomic(Path(str(spatial.condition_dir)), lambda tmp: write_conditions(
                tmp, int(toy["data_seed"]), int(toy["resolution"]), int(spatial.num_conditions)))
    for d in cfg.datasets:
        spec = cfg.data[d].get("digits")
        if not spec:
            continue
        from ccp.toy.digits import write_concept_dataset

        for split, folder in (("train", cfg.data[d].path), ("held_out", fid_real_path(cfg, d))):
            if not dir_complete(str(folder)):
                write_dir_atomic(Path(str(folder)), lambda tmp: write_concept_dataset(
                    tmp, style=str(spec.style), split=split, seed=int(spec.seed), resolution=int(spec.resolution)))
    if not cfg.toy_data:
        return
    for i, d in enumerate(cfg.datasets):
        folder = Path(str(cfg.data[d].path))
        if not dir_complete(folder):
            spec = cfg.data[d].toy
            write_toy_images(folder, int(spec.count), int(spec.resolution), int(spec.seed), tuple(spec.tint))
    spatial = cfg.spatial_alignment
    folder = Path(str(spatial.condition_dir))
    if spatial.enabled and not dir_complete(folder):
        write_toy_images(folder, int(spatial.num_conditions), int(cfg.sampling.height), int(cfg.seed) + 100,
                         shapes=2)


def digit_classifier(cfg: DictConfig):
    """The toy `DigitClassifier` at ``classifier.path``, trained there once with ``classifier.settings``."""
    from ccp.toy.instruments import ensure_digit_classifier

    return ensure_digit_classifier(Path(str(cfg.classifier.path)), plain(cfg.classifier.get("settings")))
