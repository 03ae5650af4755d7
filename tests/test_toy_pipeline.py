"""CI-sized toy pipeline, every real stage for a few steps: the toy prior trained from scratch
(ccp.toy.prior, 32 px), the toy/<method> experiments on both concept styles (five methods and the
long DreamBooth row), digit-classifier FID, toy text alignment, drift, tables and figures."""

from __future__ import annotations

import json
import math

from ccp.reproduce import compose_reproduce, reproduce
from ccp.priors.loading import load_prior
from ccp.toy.digits import split_indices

ROWS = ["textual_inversion", "dreambooth", "dreambooth_long", "custom_diffusion", "oft", "lora", "ours"]


def test_toy_scale_runs_every_stage(tmp_path):
    cfg = compose_reproduce([
        "scale=toy", f"out_dir={tmp_path}", f"results_dir={tmp_path}/results", f"prior.path={tmp_path}/prior",
        "++prior.toy_settings={copies: 1, vae_steps: 2, vae_batch_size: 8, steps: 2, batch_size: 8, warmup_steps: 0}",
        "++toy_controlnet.settings={steps: 2, batch_size: 8, check_maps: 2, check_samples: 1, check_steps: 2}",
        "train_settings.trainer.max_steps=2", "+train_settings.trainer.global_batch_size=4",
        "+train_settings.data.batch_size=4", "+train_settings.checkpoint.every_n_steps=2", "long_factor=2",
        "classifier.settings.epochs=1", "fid.num_samples=8", "fid.shard_size=8", "sampling.steps=2",
        "sampling.batch_size=8", "text_alignment.images_per_prompt=1", "drift.num_samples=4",
        "figures.weight_grid.concept_weights=[1.0,2.0]", "figures.weight_grid.control_weights=[1.0,5.0]",
        "figures.rectification.seeds=[0]", "datasets=[bold,outlined]",
        "spatial_alignment.num_conditions=2", "spatial_alignment.samples_per_condition=1",
        "figures.weight_grid_controlnet.concept_weights=[0.0,1.0]", "figures.weight_grid_controlnet.control_weights=[0.0,5.0]",
        "figures.weight_grid_controlnet.condition=1",
    ])
    assert list(cfg.methods) == ROWS  # the default rows: the paper's five methods, DreamBooth (long) and LoRA
    reproduce(cfg, progress=False)

    prior = load_prior(str(tmp_path / "prior"))
    # the toy ControlNet is built beside the prior on the first run, at the settings given
    assert json.loads((tmp_path / "prior-controlnet" / "ccp_toy_controlnet.json").read_text())["settings"]["steps"] == 2
    assert prior.unet.config.sample_size == 8 and prior.vae.config.scaling_factor != 1.0  # the trained toy VAE
    for d in ("bold", "outlined"):
        info = json.loads((tmp_path / "train" / f"{d}_dreambooth_long" / "export" / "ccp_export.json").read_text())
        assert info["step"] == 4 and info["prior"] == str(tmp_path / "prior")
    results = tmp_path / "results"
    rows1 = json.loads((results / "table1.json").read_text())["rows"]
    assert [r["method"] for r in rows1] == ROWS
    assert all(math.isfinite(r[f"fid_{d}"]) for r in rows1 for d in ("bold", "outlined"))
    rows2 = json.loads((results / "table2.json").read_text())["rows"]
    assert all(0.0 <= r["text_alignment"] <= 1.0 for r in rows2)
    # the spatial column through the toy ControlNet: every row, ours next to the prior's own ControlNet term
    assert all(0.0 <= r["spatial_alignment"] <= 1.0 for r in rows2)
    assert [r["method"] for r in rows2 if r["spatial_alignment_prior"] is not None] == ["ours"]
    conditions = tmp_path / "data" / "conditions"
    captions = [json.loads(line) for line in (conditions / "captions.jsonl").read_text().splitlines()]
    held_out = set(split_indices("held_out", 0).tolist())
    assert len(captions) == 2 and all(c["source"] in held_out for c in captions)  # never trained on
    for m in ROWS:
        spatial = json.loads((tmp_path / "eval" / f"bold_{m}" / "spatial_alignment.json").read_text())
        assert spatial["count"] == 2 and spatial["condition_dir"] == str(conditions)
    assert (results / "fig8a_weight_grid_controlnet.png").is_file()
    # the toy ControlNet's own check, from its folder into the results
    check = json.loads((results / "toy_controlnet_check.json").read_text())
    stored = json.loads((tmp_path / "prior-controlnet" / "ccp_toy_controlnet.json").read_text())
    assert check["quality"] == stored["quality"] and check["quality"]["controlnet"]["images"] == 2
    assert f"| prior + ControlNet | {stored['quality']['controlnet']['f1']:.3f} |" in (
        results / "toy_controlnet_check.md").read_text()
    # the VAE's round trip per style next to its held-out floor, measured on this prior's VAE
    round_trip = json.loads((results / "vae_round_trip.json").read_text())
    assert round_trip["prior"] == str(tmp_path / "prior") and set(round_trip["styles"]) == {"plain", "bold", "outlined"}
    for style, r in round_trip["styles"].items():
        # a VAE trained 2 steps cannot redraw digits: its round trip lies far above the floor
        assert r["fid_A_vs_vae_B"] > 2 * r["fid_floor_A_vs_B"] > 0 and r["images_per_half"] > 100
        assert f"| {style} | {r['fid_floor_A_vs_B']:.1f} | {r['fid_A_vs_vae_B']:.1f} |" in (
            results / "vae_round_trip.md").read_text()
    drift = json.loads((results / "table_drift.json").read_text())
    assert {r["method"] for r in drift["rows"]} == set(ROWS)
    assert len(list(results.glob("*.png"))) >= 3
