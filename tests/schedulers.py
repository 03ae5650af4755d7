"""The scheduler families ccp-sample offers (``sampling.scheduler``), for the comparisons with
diffusers: schedulers differ in how they use the timestep they are given (DDIM and DPM-Solver++
index alphas by it, Euler scales the model input by its sigma and steps by index, PNDM keeps a
history), so every comparison runs with each of them."""

from __future__ import annotations

from typing import Any

from diffusers import DPMSolverMultistepScheduler

from ccp.pipelines.run import resolve_scheduler, scheduler_for

# dpmsolver++: the paper's; prior: the prior's own (PNDM for the tiny SD v1.5 prior, DDIM for SD 2.x, Euler for SDXL)
FAMILIES = ("dpmsolver++", "DDIMScheduler", "EulerDiscreteScheduler", "prior")


def ccp_scheduler(family: str, prior) -> Any:
    """What ccp-sample passes `GCFGPipeline.from_prior` for ``sampling.scheduler=family``."""
    return scheduler_for(resolve_scheduler(family), prior)


def reference_scheduler(family: str, prior) -> Any:
    """A scheduler of the same class and config for the diffusers pipeline compared with, its own
    instance (with ``prior``, ccp's pipeline shares the prior's)."""
    cls = {"dpmsolver++": DPMSolverMultistepScheduler, "prior": type(prior.scheduler)}.get(family) or resolve_scheduler(family)
    return cls.from_config(prior.scheduler.config)


def gcfg_with(prior, family: str, **models):
    """ccp's pipeline on `prior` with the `family` scheduler (and `models`: concept_unet, controlnet)."""
    from ccp.pipelines.gcfg import GCFGPipeline

    pipe = GCFGPipeline.from_prior(prior, scheduler=ccp_scheduler(family, prior), **models)
    pipe.set_progress_bar_config(disable=True)
    return pipe
