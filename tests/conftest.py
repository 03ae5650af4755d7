"""Shared fixtures: one tiny SD-shaped prior per test session, built offline from config."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
# One thread: on a shared 2-core machine, two threads made the tiny models ~40x slower. Also one per
# pytest-xdist worker (make test runs -n 2 on 2 cores): a worker with 2 threads would oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# pytest-xdist (make test: -n 2 --dist loadfile). Every test file runs whole on one worker, so a module-scoped
# fixture (a training, a pipeline) is built once, not once per worker. Some files share one scope, run one
# after another on one worker:
# "multiprocess": each test starts 2+ processes of its own (DDP ranks, torchrun nodes, gloo groups), already
#   filling the 2 cores; two at once would run 4+ busy processes against each other's collectives and
#   elapsed-time bounds.
# "measure": peak RSS of fresh processes, and a throughput count (votes in 12 s): one at a time, so at most one
#   neighbour (a single-process test) runs beside them.
# (Not xdist_group marks with --dist loadgroup: xdist 3.8 puts the group into item._nodeid, which pytest 9 no
# longer reads, so marked tests were still spread over both workers.)
XDIST_GROUPS = {
    "test_training_ddp.py": "multiprocess",
    "test_ddp_everything.py": "multiprocess",
    "test_multinode.py": "multiprocess",
    "test_distributed.py": "multiprocess",
    "test_memory.py": "measure",
    "test_sampling_memory.py": "measure",
    "test_study_server.py": "measure",
}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist never calls it
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling

    class FilesAndGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return XDIST_GROUPS.get(file.rsplit("/", 1)[-1], file)

    return FilesAndGroups(config, log)


@pytest.fixture(autouse=True)
def _fresh_master_port():
    """Lightning's ddp_spawn launcher writes the free port it drew into this process's MASTER_PORT, and every
    later DDP test in the process reuses it. Dropping it before each test draws a fresh free port per test, so
    a port drawn early cannot be taken meanwhile (by the other xdist worker's connections) and reused later."""
    os.environ.pop("MASTER_PORT", None)
    yield


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
