"""Evaluation: FID of unconditional generation (Table 1; `ccp.evaluation.fid`, the distance and the
run, over Inception features of `ccp.evaluation.inception`, statistics of `ccp.evaluation.statistics`
and the sharded sampling of `ccp.evaluation.generation`; KID in `ccp.evaluation.kid`) and
text/spatial alignment (Table 2; `ccp.evaluation.alignment`)."""
