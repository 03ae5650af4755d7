"""Shared fixtures: one tiny SD-shaped prior per test session, built offline from config."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
# One thread: on a shared 2-core machine, two threads made the tiny models ~40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_prior_dir(tmp_path_factory):
    """A tiny prior folder (SD v1.5 layout) with a ControlNet in `controlnet/`."""
    from ccp.priors.tiny import save_tiny_prior

    return save_tiny_prior(tmp_path_factory.mktemp("tiny-prior"), seed=0, with_controlnet=True)


@pytest.fixture(scope="session")
def tiny_prior(tiny_prior_dir):
    """The tiny prior loaded through the same code path as SD v1.5 (treat as read-only)."""
    from ccp.priors.loading import load_prior

    return load_prior(tiny_prior_dir)


@pytest.fixture(scope="session")
def stand_in_inception(tmp_path_factory):
    """A stand-in ``weights-inception-2015-12-05-6726825d.pth`` (random FID InceptionV3 in the real
    format, marked: numbers measured with it are labelled), written once per session (~1 s, 96 MB)."""
    from stand_ins import write_stand_in_inception

    return write_stand_in_inception(tmp_path_factory.mktemp("stand-in-inception"))


@pytest.fixture(scope="session")
def stand_in_clip(tmp_path_factory):
    """A stand-in ``ViT-L-14.pt`` (random small CLIP as a TorchScript archive like OpenAI's, marked:
    numbers measured with it are labelled), written once per session (~1 s, 13 MB)."""
    from stand_ins import write_stand_in_clip

    return write_stand_in_clip(tmp_path_factory.mktemp("stand-in-clip"))
