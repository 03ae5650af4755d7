"""The configs shipped inside the package (``ccp/conf``) and the one way to compose them.

Every entry point and every in-process run (reproduce, the toy prior, the demo, tests) composes
from `CONF_DIR`, so an installed wheel finds the same configs as a checkout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Absolute: Hydra would read a relative config_path as a Python package path when run as a module.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def by_gpus(on_cpu, one_gpu, many_gpus):
    """``${ccp.by_gpus:A,B,C}`` in a config: A without a CUDA device, B with one, C with several
    (``trainer=auto``: the hardware picks cpu, gpu or ddp settings; a value set on the command line wins)."""
    count = cuda_device_count()
    return on_cpu if count == 0 else one_gpu if count == 1 else many_gpus


OmegaConf.register_new_resolver("ccp.by_gpus", by_gpus, replace=True)

MAX_DIRNAME = 120  # file systems refuse names over 255 bytes; keep well below with the job number in front


def short_dirname(name) -> str:
    """``${ccp.dirname:...}``: a sweep point's folder name from its overrides, cut and made unique by a
    hash of the whole when it is long (many overrides gave "File name too long")."""
    import hashlib

    name = str(name)
    if len(name) <= MAX_DIRNAME:
        return name
    return f"{name[:MAX_DIRNAME - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"


OmegaConf.register_new_resolver("ccp.dirname", short_dirname, replace=True)


class ConfigError(Exception):
    """Bad input found before any long compute; the message names the problem and the fix.

    The CLIs turn it into a one-line ``<prog>: error: ...`` exit."""


@contextlib.contextmanager
def exit_on_config_error(prog: str) -> Iterator[None]:
    """A `ConfigError` becomes ``<prog>: error: <message>`` and exit status 1, without a traceback."""
    try:
        yield
    except ConfigError as err:
        raise SystemExit(f"{prog}: error: {err}") from None


def compose(config_name: str | None, overrides: Sequence[str] = ()) -> DictConfig:
    """`config_name` of the packaged configs with Hydra `overrides`; also inside a running Hydra
    app (ccp-reproduce composes a ccp-train config per table cell), whose state is kept."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance()
    running = outer.hydra
    outer.clear()  # Hydra allows one initialisation at a time
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.set_instance(outer)
        outer.hydra = running


def with_output_dir(cfg: DictConfig, output_dir: str | Path) -> DictConfig:
    """A copy of `cfg` whose ``paths.output_dir`` is `output_dir` (outside Hydra it has no value)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, "paths.output_dir", str(output_dir), force_add=True)
    return cfg


def plain(node) -> dict:
    """A config mapping (possibly empty or absent) as a plain dict: an empty DictConfig is falsy,
    so ``node or {}`` would hand OmegaConf a plain dict."""
    return {} if node is None else OmegaConf.to_container(node, resolve=True)
