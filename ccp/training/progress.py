"""A progress bar that counts optimizer steps to max_steps, so it has an ETA on the endless epoch."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches
        return super().total_train_batches

    def _show_steps(self, trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(self.total_train_batches)
        done = trainer.global_step * trainer.accumulate_grad_batches  # resumed runs start part-way
        bar.initial = done
        bar.n = done
        bar.set_description(f"training to step {trainer.max_steps}")

    def on_train_start(self, trainer, *args):
        super().on_train_start(trainer, *args)
        # A run resumed mid-epoch gets no on_train_epoch_start: without this its bar had no total.
        self._show_steps(trainer)

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self._show_steps(trainer)
