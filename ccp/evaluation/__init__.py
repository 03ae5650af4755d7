"""Evaluation: FID of unconditional generation (Table 1; `ccp.evaluation.fid` over the sharded
sampling of `ccp.evaluation.generation`) and text/spatial alignment (Table 2; `ccp.evaluation.alignment`)."""
