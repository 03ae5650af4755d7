"""ccp: concept-centric personalization of diffusion priors (null-text concept models, GCFG)."""

import logging as _logging

# bitsandbytes (optim.name=adamw8bit; diffusers and peft import it when installed) logs at import
# that an optional 4-bit CPU kernel package is missing; ccp runs no 4-bit matmuls.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
