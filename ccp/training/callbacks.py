"""Callbacks of the training loop: EMA, SIGTERM-safe `last`, validation grids."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import lightning as L
import PIL.Image
import torch
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ccp.guidance import GuidancePlan, GuidanceSpec
from ccp.pipelines.sampling import sample_images


log = logging.getLogger(__name__)


class EMACallback(L.Callback):
    """EMA of the method's trainable weights (diffusers' EMAModel), saved in checkpoints and
    swapped in for validation and export.

    ``device="cpu"`` keeps the shadow weights in host memory (4 bytes per trainable parameter off
    the GPU); each update then streams the weights over one tensor at a time. Swapping exchanges
    storage in place (same device) or tensor by tensor (CPU shadow): no second copy of the weights.
    """

    def __init__(self, decay: float = 0.9999, update_after_step: int = 0, use_ema_warmup: bool = False,
                 power: float = 2 / 3, device: str | None = None):
        self.kwargs = dict(decay=decay, update_after_step=update_after_step, use_ema_warmup=use_ema_warmup, power=power)
        if device not in (None, "cpu"):
            from ccp.config import ConfigError

            raise ConfigError(f"ema.device={device!r}: use null (beside the weights) or cpu")
        self.device = device
        self.ema: EMAModel | None = None
        self._pending_state: dict | None = None

    def _params(self, pl_module) -> list[torch.nn.Parameter]:
        return list(pl_module.method.trainable_parameters())

    def setup(self, trainer, pl_module, stage):
        if self.ema is None:
            self.ema = EMAModel(self._params(pl_module), **self.kwargs)
        if self._pending_state is not None:
            self.ema.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_fit_start(self, trainer, pl_module):
        self.ema.to(device=self.device or pl_module.device)

    @property
    def on_host(self) -> bool:
        return self.device == "cpu"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # EMA's own step counter is checkpointed with it: one update per optimizer step, also
        # across a resume that lands mid-accumulation.
        if trainer.global_step > self.ema.optimization_step:
            params = self._params(pl_module)
            if self.on_host and params and params[0].device.type != "cpu":
                self._step_on_host(params)
            else:
                self.ema.step(params)

    @torch.no_grad()
    def _step_on_host(self, params) -> None:
        """`EMAModel.step` with the shadow on the CPU, one weight tensor at a time on the host."""
        ema = self.ema
        ema.optimization_step += 1
        decay = ema.get_decay(ema.optimization_step)
        ema.cur_decay_value = decay
        one_minus_decay = 1 - decay
        for shadow, param in zip(ema.shadow_params, params):
            host = param.detach().to(shadow.device, dtype=shadow.dtype)
            if param.requires_grad:
                shadow.sub_(one_minus_decay * (shadow - host))
            else:
                shadow.copy_(host)

    def state_dict(self) -> dict:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.ema is None:
            self._pending_state = state_dict
        else:
            self.ema.load_state_dict(state_dict)

    @torch.no_grad()
    def _swap(self, params) -> None:
        for param, shadow in zip(params, self.ema.shadow_params):
            if param.device == shadow.device and param.dtype == shadow.dtype:
                param.data, shadow.data = shadow.data, param.data  # storage exchanged, nothing copied
            else:
                held = param.detach().to(shadow.device, dtype=shadow.dtype)
                param.copy_(shadow)
                shadow.copy_(held)

    @contextlib.contextmanager
    def swapped_in(self, pl_module) -> Iterator[None]:
        """Temporarily put the EMA weights into the method (validation, export)."""
        params = self._params(pl_module)
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)


class FileCheckpointIO(TorchCheckpointIO):
    """Checkpoints written by `torch.save` straight into a temporary file beside the target, then
    renamed over it. Lightning's default first serialises the whole checkpoint into an in-memory
    buffer: one more copy of the weights, optimizer state and EMA at every save (at SD v1.5 size
    with fp32 AdamW, about 9 GiB of host memory). Remote paths keep Lightning's writer."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class SaveLastOnSigterm(L.Callback):
    """Preemptible VMs send SIGTERM: Lightning stops at the next batch; write `last.ckpt` first."""

    def __init__(self, checkpoint_dir: str | Path):
        self.path = Path(checkpoint_dir) / "last.ckpt"

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            log.warning("SIGTERM received at step %d: saving %s and exiting", trainer.global_step, self.path)
            trainer.save_checkpoint(self.path)


class ValidationGrid(L.Callback):
    """Every N steps, a fixed-seed sample grid of the current (EMA) model, saved as PNG and logged.

    Rows: the unconditional the method samples with, the concept alone, and concept + control
    prompt (for ours: prior unconditional, concept, concept + text); column i is image i of
    `seed` (`ccp.pipelines.sampling`), so every grid of a run shows the same noise.
    ``every_n_steps=0`` turns it off.
    """

    def __init__(self, out_dir: str | Path, every_n_steps: int = 500, at_start: bool = False, num_images: int = 4,
                 steps: int = 25, control_prompt: str | None = "wearing glasses", concept_weight: float = 1.0,
                 control_weight: float = 5.0, resolution: int | None = None, seed: int = 0):
        self.out_dir = Path(out_dir)
        self.every_n_steps, self.at_start = int(every_n_steps), bool(at_start)
        self.num_images, self.steps, self.seed = int(num_images), int(steps), int(seed)
        self.control_prompt = control_prompt
        self.concept_weight, self.control_weight = float(concept_weight), float(control_weight)
        self.resolution = resolution
        self._done = -1

    def rows(self, model) -> list:
        """The grid's guidance specs, one per row, for a `ccp.methods.export.TrainedModel`."""
        alone = model.guidance(None, self.concept_weight, self.control_weight)
        control = model.guidance(self.control_prompt, self.concept_weight, self.control_weight)
        return [GuidanceSpec(unconditional=alone.unconditional), alone, control]

    def render(self, pl_module) -> PIL.Image.Image:
        model = pl_module.trained_model()
        model.pipe.set_progress_bar_config(disable=True)
        rows = self.rows(model)
        images = []
        with sampling_on(model, pl_module.device, rows):
            for spec in rows:
                images += sample_images(model.pipe, spec, range(self.num_images), seed=self.seed,
                                        batch_size=self.num_images, num_inference_steps=self.steps,
                                        height=self.resolution, width=self.resolution)
        return make_image_grid(images, rows=len(rows), cols=self.num_images)

    def _run(self, trainer, pl_module):
        if trainer.global_rank != 0:
            return
        with evaluation_weights(trainer, pl_module):
            grid = self.render(pl_module)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step:07d}.png"
        grid.save(path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="validation/grid", images=[grid], step=trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        if self.every_n_steps and self.at_start:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and self._done != step:
            self._done = step  # also skips the extra micro-batches of one step under gradient accumulation
            self._run(trainer, pl_module)


@contextlib.contextmanager
def evaluation_weights(trainer, pl_module) -> Iterator[None]:
    """The weights to sample from during training: the EMA's when an `EMACallback` runs, in eval
    mode, without gradients; the training state is restored afterwards."""
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMACallback)), None)
    context = ema.swapped_in(pl_module) if ema is not None and ema.ema is not None else contextlib.nullcontext()
    was_training = pl_module.training
    pl_module.eval()
    try:
        with context, torch.no_grad():
            yield
    finally:
        pl_module.train(was_training)


@contextlib.contextmanager
def sampling_on(model, device: torch.device, specs: list[GuidanceSpec]) -> Iterator[None]:
    """What sampling `specs` with `model` (a `TrainedModel`) runs, on `device` for the duration:
    the denoisers the specs use, the text encoder and the VAE. Each module that was elsewhere
    (the prior's parts stay on the CPU during training) goes back afterwards, so no copy of the
    prior stays on the device between validations."""
    pipe = model.pipe
    denoisers = pipe.denoisers
    used = {call.denoiser for spec in specs for call in GuidancePlan.from_spec(spec).calls}
    modules = [pipe.text_encoder, pipe.vae] + [m for name in sorted(used) for m in denoisers[name].modules()]
    moved, seen = [], set()
    for module in modules:
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        where = next(module.parameters()).device
        if where != torch.device(device):
            module.to(device)
            moved.append((module, where))
    pipe.pin_execution_device(device)
    try:
        yield
    finally:
        pipe.pin_execution_device(None)
        for module, where in moved:
            module.to(where)
