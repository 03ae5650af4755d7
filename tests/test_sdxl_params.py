"""ccp-params on SDXL: the counts on SDXL base 1.0's architecture (meta device) against numbers
computed from its published layout, and the meta-device shortcuts against real construction; the
Table 1's rows with prior=sdxl compose to SDXL at 1024 px."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ccp.cli.params import main
from ccp.config import compose
from ccp.methods import build_method, method_class
from ccp.methods.params import _custom_diffusion_count, _null_text_count, sdxl_shaped_prior
from ccp.priors.tiny import build_tiny_prior

OFT_R = 4
CROSS = 2048  # CLIP-L 768 + bigG 1280 hidden states, concatenated
# SDXL's transformer blocks by width: down 2 x 2 @ 640, 2 x 10 @ 1280; mid 10 @ 1280; up 3 x 10 @ 1280, 3 x 2 @ 640
BLOCKS = [640] * (2 * 2 + 3 * 2) + [1280] * (2 * 10 + 10 + 3 * 10)
SDXL_UNET = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0's UNet


def _run(tmp_path, *args):
    out = tmp_path / "params.json"
    main([*args, "--json", str(out)])
    report = json.loads(out.read_text())
    return {row["label"]: row["trainable"] for row in report["rows"]}, report


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("params"), "--family", "sdxl")


def test_sdxl_architecture_is_sdxl_base(sdxl):
    _, report = sdxl
    assert len(BLOCKS) == 70
    assert report["unet_parameters"] == SDXL_UNET
    assert (report["text_encoder_hidden_size"], report["text_encoder_2_hidden_size"]) == (768, 1280)
    prior = sdxl_shaped_prior()
    assert prior.unet.device.type == "meta" and prior.text_encoder_2.device.type == "meta"
    # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers as SDXL ships them
    assert sum(p.numel() for p in prior.text_encoder.parameters()) == 123_060_480
    assert sum(p.numel() for p in prior.text_encoder_2.parameters()) == 694_659_840
    assert prior.text_encoder_2.config.projection_dim == prior.unet.config.projection_class_embeddings_input_dim - 6 * 256


def test_sdxl_counts_against_the_layout(sdxl):
    counts, report = sdxl
    kv = sum(2 * CROSS * h for h in BLOCKS)
    q_out = sum(2 * h * h + h for h in BLOCKS)
    attn2_norm2 = sum(h * h + 2 * CROSS * h + h * h + h + 2 * h for h in BLOCKS)
    # OFT: every attention's q, k, v, out; attn1 reads h everywhere, attn2's k/v read the 2048-d text
    oft = sum(OFT_R * b * (b - 1) // 2 for h in BLOCKS for b in [h // OFT_R] * 6 + [CROSS // OFT_R] * 2)
    assert counts["textual_inversion"] == 768 + 1280
    assert counts["dreambooth"] == SDXL_UNET
    assert counts["custom_diffusion"] == kv + 768 + 1280 == 340_789_248
    assert counts["custom_diffusion (train_q_out)"] == kv + q_out + 768 + 1280 == 545_672_448
    assert counts["oft"] == oft == 149_807_360
    assert counts["ours"] == SDXL_UNET - attn2_norm2 == 2_021_626_884
    # LoRA rank 4 on to_q/k/v/out.0: attn1 4 x r(h + h); attn2 q and out r(h + h), k and v r(2048 + h)
    assert counts["lora"] == sum(4 * (8 * h + 4 * h + 2 * (CROSS + h)) for h in BLOCKS) == 5_806_080
    assert all(row["paper"] is None for row in report["rows"]), "the paper's numbers are SD v1.5's"


def test_meta_shortcuts_equal_the_built_methods_on_tiny_sdxl(tmp_path):
    prior, meta = build_tiny_prior(0, family="sdxl"), build_tiny_prior(0, family="sdxl")
    meta.unet.to("meta")
    assert _null_text_count(meta, "ours", {}).trainable == build_method("ours", prior).num_trainable_parameters()
    for kwargs in ({}, {"train_q_out": True}):
        built = build_method("custom_diffusion", prior, **kwargs).num_trainable_parameters()
        assert _custom_diffusion_count(meta, "custom_diffusion", kwargs).trainable == built, kwargs
    counts, report = _run(tmp_path, "--tiny", "--family", "sdxl")
    assert report["architecture"] == "tiny_sdxl"
    assert counts["textual_inversion"] == 32 + 32
    assert counts["dreambooth"] == sum(p.numel() for p in prior.unet.parameters())


def test_memory_on_sdxl_architecture_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--family", "sdxl", "--memory"])
    assert "meta device" in capsys.readouterr().err


# --- Table 1 rows on SDXL (prior=sdxl) -----------------------------------------------------------
ROWS = [f"dataset={d} method={m}" for d in ("face", "animal")
        for m in ("custom_diffusion", "dreambooth", "dreambooth_prior", "lora", "oft", "ours", "textual_inversion")]


@pytest.mark.parametrize("row", ROWS)
def test_table1_sdxl_row_composes_to_sdxl_at_1024(row):
    cfg = compose("train", ["experiment=table1", *row.split(), "prior=sdxl"])
    sd15 = compose("train", ["experiment=table1", *row.split()])
    assert cfg.data.resolution == 1024 and sd15.data.resolution == 512
    assert cfg.prior.family == "sdxl" and "xl" in cfg.prior.path
    assert (cfg.prior.dtype, cfg.trainer.precision, cfg.speed.gradient_checkpointing) == ("bfloat16", "bf16-mixed", True)
    assert cfg.data.latent_cache.encode_dtype == "float32"  # SDXL's VAE overflows in fp16
    # the SD v1.5 row's recipe otherwise: method, data, template, optimiser, global batch, steps
    for key in ("method", "template", "optim", "trainer.global_batch_size", "trainer.max_steps", "data.path",
                "prior_preservation", "validation.control_prompt", "dataset_name"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(sd15, key), key
    # its own run folder: resume=auto must never pick up the SD v1.5 row's checkpoints
    assert cfg.run_name == f"{sd15.run_name}_sdxl"
    settings = {k: v for k, v in OmegaConf.to_container(cfg.method.module, resolve=True).items() if not k.startswith("_")}
    method_class(cfg.method.name).check_prior("sdxl", **settings)  # the method trains on SDXL
