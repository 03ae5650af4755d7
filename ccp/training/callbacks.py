"""Callbacks of the training loop: EMA, `last.ckpt` on Ctrl-C and SIGTERM, validation grids; the
checkpoint writer and its disk-space checks."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import lightning as L
import PIL.Image
import torch
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ccp.config import ConfigError
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
            # foreach: one fused update over all tensors, not a few kernel launches per tensor (~700 on SD's UNet)
            self.ema = EMAModel(self._params(pl_module), foreach=True, **self.kwargs)
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


class CheckpointSpaceError(OSError):
    """No room for a checkpoint: ``CheckpointSpaceError(errno.ENOSPC, message)``, the message naming
    the folder, the sizes and the fix; str() is the message alone."""

    def __str__(self) -> str:
        return self.strerror


SPACE_FIX = "Free space there, or point paths.log_dir at a disk with more room"
# What torch's zip writer raises when a write comes up short (a full disk among other causes).
SHORT_WRITE_MARKERS = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def size_text(num_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def free_bytes(folder: str | Path) -> int:
    """Free space for `folder`, measured at its nearest existing parent (it may not exist yet)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def tensor_bytes(obj) -> int:
    """Bytes of the tensor storages in a (nested) checkpoint, each storage once."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            storage = item.untyped_storage()
            key = (item.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


class FileCheckpointIO(TorchCheckpointIO):
    """Checkpoints written by `torch.save` straight into a temporary file beside the target, then
    renamed over it. Lightning's default first serialises the whole checkpoint into an in-memory
    buffer: one more copy of the weights, optimizer state and EMA at every save (at SD v1.5 size
    with fp32 AdamW, about 9 GiB of host memory). Remote paths keep Lightning's writer.

    A write that fails for want of space raises `CheckpointSpaceError` (torch reports a full disk
    as "unexpected pos" or "file write failed"); the previous file at the target is never touched."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            space_error = self._space_error(err, checkpoint, path, tmp)  # measured while the partial file still exists
            if space_error is None:
                raise
            raise space_error from err
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _space_error(err: BaseException, checkpoint, path: Path, tmp: Path) -> CheckpointSpaceError | None:
        size = tensor_bytes(checkpoint)
        try:
            free = free_bytes(path.parent)
            written = tmp.stat().st_size if tmp.exists() else 0
        except OSError:
            return None
        out_of_space = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(err, RuntimeError) and any(m in str(err) for m in SHORT_WRITE_MARKERS) and free < size - written)
        if not out_of_space:
            return None
        kept = f"The earlier {path.name} there is unchanged. " if path.exists() else ""
        moved = f" (resume={path} then continues from it)" if path.exists() else ""
        return CheckpointSpaceError(
            errno.ENOSPC,
            f"no space left on device for checkpoint {path.name} in {path.parent}: it takes {size_text(size)}, "
            f"{size_text(free)} was free there. {kept}{SPACE_FIX}{moved}.")


CHECKPOINT_OVERHEAD_BYTES = 1 << 20  # loop, scheduler, sampler and callback states, the zip directory
PER_TENSOR_OVERHEAD_BYTES = 512  # each tensor's zip record, alignment and pickle entry


def predicted_checkpoint_bytes(module, ema: bool) -> int:
    """A `PersonalizationModule` checkpoint's size: its state_dict (the method's trainable tensors
    and buffers, `PersonalizationModule.on_save_checkpoint`), the optimizer state of the trainable
    parameters, and with `ema` the EMA shadow (one copy of them), plus small overheads."""
    from ccp.methods.params import optimizer_state_bytes

    state = module.method.trainable_state_dict()
    trainable = list(module.method.trainable_parameters())
    total = tensor_bytes(state) + optimizer_state_bytes([p.shape for p in trainable], module.config.optim.name)
    tensors = len(state) + 3 * len(trainable)  # state_dict entries, two moments and a step counter per parameter
    if ema:
        total += sum(p.numel() * p.element_size() for p in trainable)
        tensors += len(trainable)
    return total + tensors * PER_TENSOR_OVERHEAD_BYTES + CHECKPOINT_OVERHEAD_BYTES


def check_checkpoint_space(module, checkpoint_dir: str | Path, callbacks=()) -> int:
    """Refuse to start training when the checkpoint folder has no room for two checkpoints (one is
    written beside `last.ckpt` before replacing it): better now than after the first interval's
    training. Returns the predicted size of one checkpoint."""
    ema = any(isinstance(cb, EMACallback) for cb in callbacks)
    size = predicted_checkpoint_bytes(module, ema)
    if "://" in str(checkpoint_dir):  # remote storage: no local disk to measure
        return size
    free = free_bytes(checkpoint_dir)
    if free < 2 * size:
        raise CheckpointSpaceError(
            errno.ENOSPC,
            f"not enough free space for checkpoints in {checkpoint_dir}: {size_text(free)} free, and each checkpoint "
            f"takes about {size_text(size)} (trainable weights, optimizer state{', EMA' if ema else ''}); room for two "
            f"is needed, since the new last.ckpt is written beside the old one before replacing it. {SPACE_FIX}.")
    return size


class TrainingInterrupted(SystemExit):
    """Ctrl-C stopped training once `last.ckpt` was saved: exit status 130 (128 + SIGINT), as a
    shell reports an interrupted command."""

    def __init__(self):
        super().__init__(128 + signal.SIGINT)


def resume_command() -> str | None:
    """The command line of this process when it is a Hydra command (ccp-train, ccp-reproduce):
    run again as it is, it resumes (resume=auto). None elsewhere (a Python caller)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # python -m ccp.cli.train
        program = [Path(sys.executable).name, "-m", spec.name.removesuffix(".__main__")]
    else:  # the console script
        program = [Path(sys.argv[0]).name]
    from ccp.config import TYPED_ARGV

    return shlex.join([*program, *(TYPED_ARGV or sys.argv)[1:]])


class SaveLastOnInterrupt(Checkpoint):
    """Ctrl-C (SIGINT) or SIGTERM (preemptible VMs, batch schedulers): save `last.ckpt` at the
    current step, say what was kept and the command that resumes, and stop.

    SIGINT only sets a flag; when the optimizer step under way is done (under DDP: the next step that is
    a multiple of `agree_every_n_steps`), every rank learns whether any rank got one (one all-reduce
    there, no collective in between) and all save together (rank 0 writes), then stop at
    the next batch, after that step's metrics are logged, with exit status 130. As a `Checkpoint`,
    Lightning runs this after the other callbacks: the EMA has taken the step before it is saved.
    A second Ctrl-C (after `SAME_CTRL_C_S`) stops at once, without saving. SIGTERM keeps
    Lightning's handling (it stops after the batch under way): the save happens on its exception.
    """

    SAME_CTRL_C_S = 1.0  # torchrun passes the terminal's SIGINT on to its workers, which also got it

    def __init__(self, checkpoint_dir: str | Path, agree_every_n_steps: int = 10):
        if isinstance(agree_every_n_steps, bool) or not isinstance(agree_every_n_steps, int) or agree_every_n_steps < 1:
            raise ConfigError(f"callbacks.save_last_on_interrupt.agree_every_n_steps={agree_every_n_steps!r} must be a "
                              "positive integer (e.g. 10)")
        self.path = Path(checkpoint_dir) / "last.ckpt"
        self.agree_every_n_steps = agree_every_n_steps
        self._requested_at: float | None = None
        self._saved_step: int | None = None
        self._step_seen: int | None = None
        self._handler_pid: int | None = None
        self._previous_handler = None
        self._speaks = False

    # --- the SIGINT handler ----------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        self._requested_at = self._saved_step = None
        self._speaks = trainer.is_global_zero
        # before the data loader's workers fork: they inherit the handler, and it ignores SIGINT
        # there (the main process stops them), so a Ctrl-C does not kill the data mid-step
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.getsignal(signal.SIGINT)
            self._handler_pid = os.getpid()
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self._handler_pid is None:  # not training (Lightning restores the handlers it saw when a fit ends)
            return self._call_previous(signum, frame)
        if os.getpid() != self._handler_pid:
            return  # a data loader worker
        now = time.monotonic()
        if self._requested_at is None:
            self._requested_at = now
            if self._speaks:
                os.write(2, b"\nCtrl-C: saving last.ckpt when the step under way ends, then stopping "
                            b"(Ctrl-C again to stop at once, without saving)\n")
        elif now - self._requested_at >= self.SAME_CTRL_C_S:
            self._restore_handler()
            signal.default_int_handler(signum, frame)

    def _call_previous(self, signum, frame):
        previous = self._previous_handler
        if callable(previous) and previous is not self._on_sigint:
            return previous(signum, frame)
        if previous != signal.SIG_IGN:
            signal.default_int_handler(signum, frame)

    def _restore_handler(self) -> None:
        if self._handler_pid == os.getpid() and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
        self._handler_pid = None

    def on_fit_end(self, trainer, pl_module):
        self._restore_handler()

    # --- stopping at a step boundary -------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step_seen:
            return  # mid-accumulation: the optimizer step is not done
        self._step_seen = trainer.global_step
        requested = self._requested_at is not None
        if trainer.world_size > 1:
            # ranks may see the signal at different steps: they agree in one collective, every N optimizer steps
            # (each one a host sync), at the same steps on every rank so the collectives match up
            if trainer.global_step % self.agree_every_n_steps:
                return
            stop = trainer.strategy.reduce_boolean_decision(requested, all=False)
        else:
            stop = requested
        if not stop or self._saved_step is not None:
            return
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the run ends here anyway, with its own last.ckpt and export
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._saved_step is not None:
            raise TrainingInterrupted()

    def on_exception(self, trainer, pl_module, exception):
        self._restore_handler()
        if isinstance(exception, TrainingInterrupted):
            self._report(trainer, "Ctrl-C", self._saved_step)
        elif isinstance(exception, SIGTERMException):
            if trainer.is_global_zero:
                log.warning("SIGTERM received at step %d: saving %s and exiting", trainer.global_step, self.path)
            trainer.save_checkpoint(self.path)
            self._report(trainer, "SIGTERM", trainer.global_step)
        elif isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            log.warning("Stopped at once by Ctrl-C at step %d, without saving: a rerun of the same command resumes "
                        "from the latest checkpoint in %s.", trainer.global_step, self.path.parent)

    def _report(self, trainer, cause: str, step: int) -> None:
        if not trainer.is_global_zero:
            return
        command = resume_command()
        log.warning("Interrupted by %s at step %d: saved the training state of step %d to %s.\nTo resume from step %d, run "
                    "the same command again (resume=auto continues from last.ckpt)%s", cause, step, step, self.path, step,
                    f":\n  {command}" if command else ".")


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
