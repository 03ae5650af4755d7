"""Callbacks of the training loop: EMA, SIGTERM-safe `last`, validation grids."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import lightning as L
import PIL.Image
import torch
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ccp.guidance import GuidanceSpec
from ccp.pipelines.sampling import sample_images


log = logging.getLogger(__name__)


class EMACallback(L.Callback):
    """EMA of the method's trainable weights (diffusers' EMAModel), saved in checkpoints and
    swapped in for validation and export."""

    def __init__(self, decay: float = 0.9999, update_after_step: int = 0, use_ema_warmup: bool = False, power: float = 2 / 3):
        self.kwargs = dict(decay=decay, update_after_step=update_after_step, use_ema_warmup=use_ema_warmup, power=power)
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
        self.ema.to(device=pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # EMA's own step counter is checkpointed with it: one update per optimizer step, also
        # across a resume that lands mid-accumulation.
        if trainer.global_step > self.ema.optimization_step:
            self.ema.step(self._params(pl_module))

    def state_dict(self) -> dict:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.ema is None:
            self._pending_state = state_dict
        else:
            self.ema.load_state_dict(state_dict)

    @contextlib.contextmanager
    def swapped_in(self, pl_module) -> Iterator[None]:
        """Temporarily put the EMA weights into the method (validation, export)."""
        params = self._params(pl_module)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)


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
        for spec in rows:
            images += sample_images(model.pipe, spec, range(self.num_images), seed=self.seed, batch_size=self.num_images,
                                    num_inference_steps=self.steps, height=self.resolution, width=self.resolution)
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
