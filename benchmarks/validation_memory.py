"""Peak memory of training steps of ours with and without validation grids, each in its own process.

Ours trains from cached latents under bf16 autocast with its fp32 master weights; the prior's parts
(bf16) stay on the CPU and a validation grid moves what it samples with to the device for the grid
only (`ccp.training.callbacks.sampling_on`). Peak memory is `torch.cuda.max_memory_allocated` on a
GPU and the process's peak RSS on the CPU.

    python benchmarks/validation_memory.py --size tiny                         # CPU
    python benchmarks/validation_memory.py --size sd15 --device cuda --batch 8 --resolution 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from training import build_prior, max_rss_bytes  # noqa: E402


def run_variant(size: str, device_name: str, resolution: int, batch: int, steps: int, grid_every: int,
                grid_steps: int) -> dict:
    import lightning as L
    from diffusers import DDPMScheduler
    from torch.utils.data import DataLoader, Dataset

    from ccp.methods import PromptTemplate, build_method
    from ccp.training.callbacks import ValidationGrid
    from ccp.training.module import PersonalizationModule

    device = torch.device(device_name)
    prior = build_prior(size).to(torch.bfloat16)  # frozen parts in bf16, as prior.dtype=bfloat16
    method = build_method("ours", prior, PromptTemplate(), definition="value_mean")
    module = PersonalizationModule(method, DDPMScheduler.from_config(prior.scheduler.config), prior=prior)  # optim.lr's default, 1e-5
    latent_hw = resolution // prior.vae_scale_factor

    class Latents(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"latents": torch.randn(4, latent_hw, latent_hw, generator=torch.Generator().manual_seed(i))}

    with tempfile.TemporaryDirectory() as grids:
        callbacks = [ValidationGrid(grids, every_n_steps=grid_every, num_images=4, steps=grid_steps,
                                    control_prompt="wearing glasses", resolution=resolution)] if grid_every else []
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                            max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=callbacks)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.fit(module, DataLoader(Latents(), batch_size=batch))
        grids_written = len(list(Path(grids).glob("*.png")))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()
    return {"validation_every": grid_every, "grids": grids_written, "peak_gb": peak / 2**30,
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
            "prior_unet_device_after": str(next(prior.unet.parameters()).device)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="pixels; default 64 (tiny) or 512 (sd15)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grid-steps", type=int, default=4, help="denoising steps per validation grid")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolution = args.resolution or (64 if args.size == "tiny" else 512)
    if args.child:
        print(json.dumps(run_variant(args.size, args.device, resolution, args.batch, args.steps, int(args.child),
                                     args.grid_steps)))
        return Path()
    rows = []
    for every in (0, 1):  # without, then with a grid after every step
        cmd = [sys.executable, __file__, "--child", str(every), "--size", args.size, "--device", args.device,
               "--resolution", str(resolution), "--batch", str(args.batch), "--steps", str(args.steps),
               "--grid-steps", str(args.grid_steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    payload = {"benchmark": "validation_memory", "machine": machine(torch.device(args.device)), "size": args.size,
               "resolution": resolution, "batch": args.batch, "steps": args.steps, "grid_steps": args.grid_steps,
               "results": rows, "with_over_without": rows[1]["peak_gb"] / rows[0]["peak_gb"]}
    name = f"validation_memory_{args.size}_{torch.device(args.device).type}_{resolution}px.json"
    return write_json(args.out, name, payload)


if __name__ == "__main__":
    main()
