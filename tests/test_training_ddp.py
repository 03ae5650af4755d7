"""Two CPU processes (gloo DDP): ranks read different data and finish with identical weights."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from torch.utils.data import Dataset

from ccp.methods.base import PromptTemplate
from ccp.methods.ours import NullTextConcept
from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig
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
    module = PersonalizationModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), vae=tiny_prior.vae,
                                   config=TrainingConfig(optim=OptimConfig(lr=1e-3)))
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


class CountEncodes:
    """A picklable forward hook: each rank appends a line per VAE encoder call to its own file."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def __call__(self, module, args, output):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(f"{self.out_dir}/encodes{rank}.txt", "a") as f:
            f.write(f"{args[0].shape[0]}\n")


def test_ddp_ranks_build_the_latent_cache_in_parallel_then_train_on_it(tiny_prior, tmp_path):
    import numpy as np
    import PIL.Image

    from ccp.training.data import ConceptDataModule
    from ccp.training.latent_cache import LatentCache

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    data = ConceptDataModule(
        images, resolution=64, batch_size=2, num_workers=0, cache_dir=tmp_path / "cache",
        latent_cache={"enabled": True, "shard_size": 2, "dtype": "float32", "batch_size": 2, "output": "posterior"},
    )
    vae = copy.deepcopy(tiny_prior.vae)  # the hook must not reach the shared fixture
    vae.encoder.register_forward_hook(CountEncodes(tmp_path))
    method = NullTextConcept(tiny_prior, PromptTemplate(), definition="value_mean")
    module = PersonalizationModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), vae=vae,
                                   config=TrainingConfig(optim=OptimConfig(lr=1e-3)))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=data)
    encoded = [sum(int(n) for n in (tmp_path / f"encodes{r}.txt").read_text().split()) for r in (0, 1)]
    # 8 images x 2 flips = 16 encodes, split evenly: each rank built its own 2 of the 4 shards,
    # and training itself never ran the VAE (no more encodes than the cache needed)
    assert encoded == [8, 8]
    folders = list((tmp_path / "cache" / "latents").iterdir())
    assert len(folders) == 1 and (folders[0] / "manifest.json").is_file()
    assert len(LatentCache(folders[0])) == 8


class NaNOnRankOne(NullTextConcept):
    """Ours, except that rank 1's prediction turns NaN from its third micro-step on."""

    calls = 0

    def predict_noise(self, noisy_latents, timesteps):
        out = super().predict_noise(noisy_latents, timesteps)
        self.calls += 1
        if torch.distributed.get_rank() == 1 and self.calls >= 3:
            out = out * float("nan")
        return out


class RecordingModule(PersonalizationModule):
    """Writes down, per rank, the error its own check raised (spawned ranks report no callbacks)."""

    def __init__(self, *args, out_dir, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_dir = str(out_dir)

    def on_before_optimizer_step(self, optimizer):
        try:
            super().on_before_optimizer_step(optimizer)
        except Exception as err:
            with open(f"{self.out_dir}/error{self.global_rank}.json", "w") as f:
                json.dump({"type": type(err).__name__, "message": str(err), "step": self.global_step,
                           "finite": all(bool(torch.isfinite(p).all()) for p in self.method.parameters())}, f)
            raise


# The hang this test guards against (rank 0 waiting in a collective for the NaN rank that stopped) would last the
# collective timeout, 30 minutes by default; timeout(600) fails it long before that. An elapsed-time assertion
# would add nothing (a rank that timed out in a collective records no NonFiniteLossError at step 2, asserted
# below), and the old `elapsed < 120` failed at 139 s on a loaded 2-core machine: 600 s is >4x that.
@pytest.mark.timeout(600)
def test_nan_on_one_rank_stops_every_rank_before_the_update(tiny_prior, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    method = NaNOnRankOne(tiny_prior, PromptTemplate(), definition="value_mean")
    module = RecordingModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), vae=tiny_prior.vae,
                             config=TrainingConfig(optim=OptimConfig(lr=1e-3)), out_dir=tmp_path)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)],
    )
    with pytest.raises(Exception, match="NonFiniteLossError|non-finite"):
        trainer.fit(module, datamodule=Data())
    errors = [json.loads((tmp_path / f"error{r}.json").read_text()) for r in (0, 1)]
    # both ranks stopped by themselves (rank 0 saw a finite loss), at the same step, before its update
    assert [e["type"] for e in errors] == ["NonFiniteLossError"] * 2
    assert [e["step"] for e in errors] == [2, 2]
    assert [e["finite"] for e in errors] == [True, True]  # NaN gradients never reached the weights
    assert "non-finite loss on 1 of 2 rank(s) before optimizer step 3" in errors[0]["message"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class SaveWeightsAndMetrics(L.Callback):
    def __init__(self, out_dir, metrics):
        self.out_dir, self.metrics = str(out_dir), metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rank = trainer.global_rank
        with open(f"{self.out_dir}/metrics{rank}.json", "w") as f:
            json.dump(self.metrics.last, f)
        if rank == 0:
            torch.save(pl_module.method.trainable_state_dict(), f"{self.out_dir}/weights.pt")


@pytest.mark.timeout(600)
def test_sample_fid_is_shared_over_ranks_and_equals_one_process(tiny_prior, tmp_path):
    from ccp.evaluation.callbacks import SampleMetrics
    from ccp.evaluation.fid import FeatureStats, RandomConvFeatures, extract_features

    extractor = RandomConvFeatures()
    real = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    real_stats = FeatureStats.from_features(extract_features(extractor, real))

    def metrics():
        return SampleMetrics(every_n_steps=1, num_samples=6, real_stats=real_stats, feature_extractor=RandomConvFeatures(),
                             steps=2, batch_size=2, resolution=32)

    sample_metrics = metrics()
    method = NullTextConcept(tiny_prior, PromptTemplate(), definition="value_mean")
    module = PersonalizationModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), vae=tiny_prior.vae,
                                   prior=tiny_prior, config=TrainingConfig(optim=OptimConfig(lr=1e-3)))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[sample_metrics, SaveWeightsAndMetrics(tmp_path, sample_metrics)],
    )
    trainer.fit(module, datamodule=Data())
    per_rank = [json.loads((tmp_path / f"metrics{r}.json").read_text())["eval/fid"] for r in (0, 1)]
    assert per_rank[0] == per_rank[1]

    # one process, the same weights: the same FID (each image depends on its index only)
    single = NullTextConcept(tiny_prior, PromptTemplate(), definition="value_mean")
    single.load_state_dict(torch.load(tmp_path / "weights.pt"), strict=False)
    alone = PersonalizationModule(single, DDPMScheduler.from_config(tiny_prior.scheduler.config), prior=tiny_prior)
    expected = metrics().measure(alone)["eval/fid"]
    assert per_rank[0] == pytest.approx(expected, rel=1e-4)
