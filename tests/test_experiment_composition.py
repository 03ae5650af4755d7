"""Experiments are compositions: ``experiment=table1 dataset=animal method=oft prior=sdxl`` states a
Table 1 row once, and every experiment name of earlier versions (one file per row, e.g.
``table1_sdxl/animal_oft``) still composes, to the same config.

"The same" is the whole resolved config, key by key and in key order: a run folder is reused only
while its saved config text is unchanged (``ccp.training.runs.trained_with``), so a reordered key
would retrain the toy reproduction. Nothing is left out of the comparison. The recipe of each old
name is also pinned to the values its own file gave (`recipe`), so an edit of a shared file that
changes a row shows here by name.
"""

from __future__ import annotations

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from ccp.config import ConfigError, compose, experiment_overrides, old_experiment_names, with_experiments_composed

METHODS = ("custom_diffusion", "dreambooth", "dreambooth_prior", "lora", "oft", "ours", "textual_inversion")
# Every experiment name of the one-file-per-row layout, and what it is written as now.
NEW_FORMS = {
    **{f"table1/{d}_{m}": f"experiment=table1 dataset={d} method={m}" for d in ("face", "animal") for m in METHODS},
    **{f"table1_sdxl/{d}_{m}": f"experiment=table1 dataset={d} method={m} prior=sdxl"
       for d in ("face", "animal") for m in METHODS},
    **{f"tiny/{m}": f"experiment=tiny method={m}" for m in METHODS},
    **{f"toy/{m}": f"experiment=toy method={m}" for m in METHODS},
    "toy/prior": "experiment=toy_prior",
    "table1_sdxl/sdxl": "prior=sdxl",  # SDXL's part of the rows, which named no run of its own: now the prior
}


def resolved(node: DictConfig, prefix: str = "") -> list[tuple[str, object]]:
    """Every leaf as (dotted key, resolved value), in the config's key order; a value that has none
    outside a run (``???``, ``${hydra:...}`` or a path to them) as its raw text."""
    out: list[tuple[str, object]] = []
    for key in node.keys():
        child, path = node._get_node(key), f"{prefix}{key}"
        if isinstance(child, DictConfig) and len(child) and not (child._is_none() or child._is_interpolation()):
            out.extend(resolved(child, path + "."))
            continue
        try:
            value = OmegaConf.to_container(node[key], resolve=True) if isinstance(child, DictConfig | ListConfig) \
                else node[key]
        except Exception:  # noqa: BLE001 - no value outside a run; compared as written
            value = f"<unresolved {child._value()}>"
        out.append((path, value))
    return out


def test_every_old_name_is_known_and_written_as_expected():
    assert old_experiment_names() == sorted(NEW_FORMS)
    assert {name: " ".join(experiment_overrides(name)) for name in NEW_FORMS} == NEW_FORMS


# --- the recipes, as their one-file-per-row versions gave them --------------------------------------
TABLE1 = {"trainer.max_steps": 100000, "trainer.global_batch_size": 32, "trainer.strategy": "ddp",
          "trainer.precision": "bf16-mixed", "optim.lr": 1e-5, "checkpoint.every_n_steps": 2000,
          "validation.every_n_steps": 2000, "prior.path": "stable-diffusion-v1-5/stable-diffusion-v1-5",
          "prior.family": "auto", "prior.dtype": "float32", "data.resolution": 512, "data.batch_size": 4,
          "speed.gradient_checkpointing": False}
SDXL = {"prior.path": "stabilityai/stable-diffusion-xl-base-1.0", "prior.family": "sdxl", "prior.dtype": "bfloat16",
        "data.resolution": 1024, "data.batch_size": 2, "data.latent_cache.encode_dtype": "float32",
        "speed.gradient_checkpointing": True}
DATASETS = {
    "face": {"dataset_name": "face", "data.path": "data/ffhq", "template.template": "a photo of {token} face",
             "template.placeholder": "<ffhq>", "validation.control_prompt": "wearing glasses"},
    "animal": {"dataset_name": "animal", "data.path": "data/afhqv2", "template.template": "a photo of {token} animal face",
               "template.placeholder": "<afhq>", "validation.control_prompt": "a white and black dog"},
}
TINY = {"dataset_name": "tiny", "prior.path": "<unresolved ???>", "data.resolution": 64, "data.batch_size": 2,
        "trainer.max_steps": 2, "trainer.global_batch_size": 4, "trainer.precision": "32-true",
        "checkpoint.every_n_steps": 1, "validation.every_n_steps": 2, "logger.wandb.enabled": False}
TOY = {"dataset_name": "bold", "prior.path": "outputs/toy/prior", "data.resolution": 32, "data.batch_size": 32,
       "trainer.max_steps": 400, "trainer.global_batch_size": 32, "optim.lr": 3e-4, "ema.decay": 0.999,
       "template.template": "a {token} digit", "validation.control_prompt": "a red digit 3", "validation.every_n_steps": 0}
PRESERVE = {"prior_preservation.enabled": True, "prior_preservation.prior_loss_weight": 1.0,
            "prior_preservation.num_class_images": 200, "prior_preservation.steps": 50}


def recipe(name: str) -> dict:
    """The values `name`'s own file set, before experiments were compositions."""
    folder, _, row = name.partition("/")
    if name == "toy/prior":
        return {"run_name": "toy_prior", "dataset_name": "toy", "method.name": "text_to_image", "data.batch_size": 64,
                "trainer.max_steps": 1000, "optim.lr": 1e-3, "optim.warmup_steps": 50, "ema.enabled": False,
                "data.captions": "captions.jsonl", "template.template": "a photo of {token} face"}
    if name == "table1_sdxl/sdxl":
        return {**SDXL, "trainer.precision": "bf16-mixed", "run_name": "face_ours_sdxl"}
    dataset, method = row.split("_", 1) if folder.startswith("table1") else (None, row)
    sdxl = folder == "table1_sdxl"
    want = {**TABLE1, **DATASETS[dataset], **(SDXL if sdxl else {})} if dataset else TINY if folder == "tiny" else TOY
    run_name = f"{want['dataset_name']}_{method}{'_sdxl' if sdxl else ''}"
    want = {**want, "run_name": run_name, "method.name": "dreambooth" if method == "dreambooth_prior" else method}
    if method != "dreambooth_prior":
        return {**want, "prior_preservation.enabled": False}
    template = want.get("template.template", "a photo of {token} face")
    want.update(PRESERVE, **{"prior_preservation.class_prompt": " ".join(template.replace("{token}", "").split())})
    if folder == "tiny":  # CPU-sized class images, and the text encoder tuned too
        want.update({"prior_preservation.num_class_images": 3, "prior_preservation.sample_batch_size": 2,
                     "prior_preservation.steps": 2, "method.module.train_text_encoder": True,
                     "method.module.text_encoder_lr": 1e-4})
    if folder == "toy":
        want["prior_preservation.steps"] = 25  # as the toy reproduction samples
    return want


@pytest.mark.parametrize("name", sorted(NEW_FORMS))
def test_old_name_composes_its_new_form_and_keeps_its_recipe(name):
    old = resolved(compose("train", [f"experiment={name}"]))
    new = resolved(compose("train", NEW_FORMS[name].split()))
    assert [k for k, _ in old] == [k for k, _ in new]  # the key order too: run reuse compares config text
    assert dict(old) == dict(new)
    want = recipe(name)
    assert {key: dict(new).get(key, "<absent>") for key in want} == want


# --- the command line ---------------------------------------------------------------------------
def test_a_sweep_of_old_names_over_one_dataset_becomes_a_sweep_of_methods(capsys, monkeypatch):
    monkeypatch.setattr("ccp.config._announced", set())
    line = "experiment=table1/face_ours,table1/face_dreambooth,table1/face_oft"
    assert with_experiments_composed(["-m", line, "data.batch_size=2"], announce=True) == [
        "-m", "experiment=table1", "dataset=face", "method=ours,dreambooth,oft", "data.batch_size=2"]
    assert "experiment=table1/face_oft is written experiment=table1 dataset=face method=oft now" in capsys.readouterr().err


def test_old_names_that_form_no_grid_are_refused_with_the_new_form():
    with pytest.raises(ConfigError, match="run one sweep per dataset"):
        with_experiments_composed(["experiment=table1/face_ours,table1/animal_oft"])
    with pytest.raises(ConfigError, match="no longer one group"):
        with_experiments_composed(["experiment=tiny/ours,table1/face_ours"])


def test_a_group_given_on_the_command_line_wins_over_the_old_name():
    """As a command-line choice won over the old file's ``override /method: ours``."""
    assert with_experiments_composed(["experiment=table1/face_ours", "method=lora"]) == [
        "experiment=table1", "dataset=face", "method=lora"]
    assert compose("train", ["experiment=table1_sdxl/face_ours", "method=lora"]).run_name == "face_lora_sdxl"


def test_new_names_and_other_overrides_pass_unchanged():
    line = ["experiment=table1", "dataset=animal", "experiment=tiny,toy", "+experiment=x", "data.path=tiny/ours"]
    assert with_experiments_composed(line) == line


def test_the_command_line_says_each_old_name_once(capsys, monkeypatch):
    monkeypatch.setattr("ccp.config._announced", set())
    for _ in range(3):
        with_experiments_composed(["experiment=toy/lora"], announce=True)
    with_experiments_composed(["experiment=toy/oft"])  # composed in-process (tests, the toy demo): silently
    assert capsys.readouterr().err.count(" is written ") == 1
