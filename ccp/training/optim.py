"""The optimiser of the training loop (``optim.name``) and what its state costs in memory.

``adamw``      torch's AdamW: two fp32 moments per parameter, 8 bytes of state per parameter. On a
               GPU the fused kernel is used (the default multi-tensor path allocates a temporary
               as large as all parameters during each step); on a CPU torch's own default.
``adamw8bit``  bitsandbytes' ``AdamW8bit``: the two moments stored in 8 bits with one fp32 scale
               per block of 256 values, about 2 bytes of state per parameter; tensors smaller than
               4,096 values keep fp32 moments, as in bitsandbytes. Works on CPU and CUDA tensors.
               Needs ``pip install 'ccp[memory]'`` (bitsandbytes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from ccp.config import ConfigError
from ccp.methods import params as estimates
from ccp.methods.params import OPTIMIZERS

INSTALL_HINT = "pip install 'ccp[memory]' (or pip install bitsandbytes), or set optim.name=adamw"


class OptimizerConfigError(ConfigError, ValueError):
    """An ``optim.name`` that cannot be built here; the message says what to change."""


def check_optimizer_name(name: str) -> str:
    """`name` if it is a known optimiser, else `OptimizerConfigError` listing the choices. For
    ``adamw8bit`` also checks that bitsandbytes can be imported (before any weights load)."""
    if name not in OPTIMIZERS:
        raise unknown_optimizer(name)
    if name == "adamw8bit":
        _bitsandbytes()
    return name


def unknown_optimizer(name: str) -> OptimizerConfigError:
    return OptimizerConfigError(f"optim.name={name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")


def _bitsandbytes():
    # bitsandbytes' CPU backend logs a warning at import when an optional 4-bit kernel package is
    # missing; 4-bit matmuls are not used here, so that warning is noise.
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:
        raise OptimizerConfigError(f"optim.name=adamw8bit needs bitsandbytes, which cannot be imported ({err}); "
                                   f"{INSTALL_HINT}") from None
    finally:
        quiet.setLevel(level)
    return bitsandbytes


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adamw", lr: float = 1e-5,
                    betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimiser ``optim.name`` over `params` (see the module docstring); ccp-train has checked
    the name before any weights loaded (`check_optimizer_name`)."""
    params = list(params)
    betas = tuple(float(b) for b in betas)
    if name == "adamw8bit":
        devices = {p.device.type for p in params}
        if not devices <= {"cpu", "cuda"}:  # where the parameters live is known only now
            raise OptimizerConfigError(f"optim.name=adamw8bit runs on CPU and CUDA tensors, not on {sorted(devices)}; "
                                       "set optim.name=adamw")
        bnb = _bitsandbytes()
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name != "adamw":
        raise unknown_optimizer(name)
    fused = all(p.device.type == "cuda" and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                             **({"fused": True} if fused else {}))


def optimizer_state_bytes_per_param(name: str) -> float:
    """Bytes of optimiser state per parameter of a large tensor: 8 for ``adamw``, 2.03 for
    ``adamw8bit`` (`ccp.methods.params.optimizer_state_bytes` counts tensor by tensor)."""
    if name not in OPTIMIZERS:  # estimates need no bitsandbytes
        raise unknown_optimizer(name)
    return estimates.optimizer_state_bytes_per_param(name)


def optimizer_state_bytes(shapes: Iterable[torch.Size | tuple[int, ...] | int], name: str) -> int:
    """Bytes of optimiser state for trainable tensors of these shapes (or element counts)."""
    optimizer_state_bytes_per_param(name)
    return estimates.optimizer_state_bytes(shapes, name)
