"""Two CPU processes (gloo DDP): ranks read different data and finish with identical weights."""

from __future__ import annotations

import json

import lightning as L
import torch
from diffusers import DDPMScheduler
from torch.utils.data import Dataset

from ccp.methods.base import PromptTemplate
from ccp.methods.ours import NullTextConcept
from ccp.training.module import PersonalizationModule
from ccp.training.sampler import resumable_loader


class Indexed(Dataset):
    def __init__(self, n=8, size=64):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "index": torch.tensor(i)}


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return resumable_loader(Indexed(), batch_size=2, trainer=self.trainer, seed=1)


class Record(L.Callback):
    """Each rank writes the sample indices it trained on and its final weights' checksum."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)
        self.indices = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices += batch["index"].tolist()

    def on_train_end(self, trainer, pl_module):
        state = pl_module.method.trainable_state_dict()
        checksum = {k: float(v.double().sum()) for k, v in state.items()}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"indices": self.indices, "checksum": checksum, "world": trainer.world_size}, f)


def test_two_process_ddp_shards_data_and_keeps_ranks_in_sync(tiny_prior, tmp_path):
    method = NullTextConcept(tiny_prior, PromptTemplate(), definition="value_mean")
    initial = {k: float(v.double().sum()) for k, v in method.trainable_state_dict().items()}
    module = PersonalizationModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), vae=tiny_prior.vae, lr=1e-3)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[Record(tmp_path)],
    )
    trainer.fit(module, datamodule=Data())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    seen = [r["indices"] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 6
    # the first pass over the 8 images is split between the ranks, none read twice
    assert sorted(seen[0][:4] + seen[1][:4]) == list(range(8))
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the replicas identical
    assert ranks[0]["checksum"] != initial  # and they did train
