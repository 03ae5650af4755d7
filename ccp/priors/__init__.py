from ccp.priors.loading import PriorNotFoundError, check_prior_folder, load_controlnet, load_prior, resolve_dtype
from ccp.priors.tiny import build_tiny_controlnet, build_tiny_prior, save_tiny_prior
from ccp.priors.tokenizer import build_clip_tokenizer

__all__ = [
    "PriorNotFoundError",
    "build_clip_tokenizer",
    "build_tiny_controlnet",
    "build_tiny_prior",
    "check_prior_folder",
    "load_controlnet",
    "load_prior",
    "resolve_dtype",
    "save_tiny_prior",
]
