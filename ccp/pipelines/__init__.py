"""Sampling pipelines: GCFG on SD v1.x/2.x priors (`gcfg`) and on SDXL priors (`gcfg_xl`).

Importing the package registers every family's pipeline, so `GCFGPipeline.from_prior` picks
`GCFGXLPipeline` for an SDXL prior."""

from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.gcfg_xl import GCFGXLPipeline

__all__ = ["GCFGPipeline", "GCFGXLPipeline"]
