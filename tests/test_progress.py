"""StepProgressBar: total = max_steps and the count starts at the resumed step."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from ccp.training.progress import StepProgressBar


class Spy(StepProgressBar):
    seen: list

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        bar = self.train_progress_bar
        self.seen.append((bar.total, bar.n, bar.desc.rstrip(": ")))


def fit(tmp_path, max_steps, ckpt_path=None):
    bar = Spy()
    bar.seen = []
    # checkpoints written mid-epoch, as ccp-train's are
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, callbacks=[bar, checkpoints], logger=False,
                        default_root_dir=tmp_path, enable_model_summary=False, accelerator="cpu", limit_train_batches=1000)
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return trainer, bar.seen


def test_bar_counts_steps_and_resumes_part_way(tmp_path):
    _, seen = fit(tmp_path, 3)
    assert seen[0] == (3, 0, "training to step 3")
    _, seen = fit(tmp_path, 5, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert seen[0] == (5, 2, "training to step 5")
