"""The four baselines and the registry: trainable sets, training touches only them, the prior stays
as it was, export -> load_export reproduces the trained prediction, prompts and guidance as in
Appendix D.2, and ccp-params' counts against independently computed facts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ccp.guidance import Condition, Source
from ccp.methods import METHODS, CustomDiffusion, DreamBooth, NullTextConcept, PromptTemplate, build_method
from ccp.methods.custom_diffusion import add_custom_diffusion_processors, load_custom_diffusion_processors
from ccp.models.denoisers import BatchedCondition
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.priors.tiny import SD15_SCHEDULER_CONFIG

BASELINES = ["dreambooth", "textual_inversion", "custom_diffusion", "oft"]
LR = {"dreambooth": 1e-3, "textual_inversion": 5e-2, "custom_diffusion": 1e-2, "oft": 1e-2}
STEPS = 3
OFT_R = 4


# --- helpers -----------------------------------------------------------------------------------
def snapshot(module: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in module.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in module.named_modules()],
        "processors": {k: type(v).__name__ for k, v in getattr(module, "attn_processors", {}).items()},
    }


def assert_same(module: torch.nn.Module, before: dict, what: str) -> None:
    after = snapshot(module)
    assert after["modules"] == before["modules"], f"{what}: module structure changed"
    assert after["processors"] == before["processors"], f"{what}: attention processors changed"
    assert after["requires_grad"] == before["requires_grad"], f"{what}: requires_grad flags changed"
    assert after["state"].keys() == before["state"].keys(), f"{what}: state dict keys changed"
    changed = [k for k, v in before["state"].items() if not torch.equal(after["state"][k], v)]
    assert not changed, f"{what}: tensors changed: {changed[:5]}"


def fixed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([150, 650])
    noisy = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).add_noise(latents, noise, timesteps)
    return noisy, noise, timesteps


def train(method, steps: int, lr: float) -> list[float]:
    """The training loop's step, written out: predict, MSE to the noise, AdamW, hook."""
    noisy, noise, timesteps = fixed_batch()
    opt = torch.optim.AdamW(list(method.trainable_parameters()), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(method.predict_noise(noisy, timesteps).float(), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_after_optimizer_step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(F.mse_loss(method.predict_noise(noisy, timesteps).float(), noise).item())
    return losses


def cross_attentions(unet):
    return [m for n, m in unet.named_modules() if n.endswith("attn2")]


def attentions(unet):
    return [m for n, m in unet.named_modules() if n.endswith(("attn1", "attn2"))]


def oft_count(unet, r: int) -> int:
    """peft OFT: per targeted linear layer, r blocks of b = in/r with b(b-1)/2 free entries each."""
    total = 0
    for attn in attentions(unet):
        for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            b = layer.in_features // r
            total += r * b * (b - 1) // 2
    return total


def expected_trainable(name: str, prior) -> int:
    unet, hidden = prior.unet, prior.text_encoder.config.hidden_size
    if name == "dreambooth":
        return sum(p.numel() for p in unet.parameters())
    if name == "textual_inversion":
        return hidden
    if name == "custom_diffusion":
        return sum(a.to_k.weight.numel() + a.to_v.weight.numel() for a in cross_attentions(unet)) + hidden
    if name == "oft":
        return oft_count(unet, OFT_R)
    raise KeyError(name)


# --- one trained method per baseline, shared by the tests below ----------------------------------
@pytest.fixture(scope="module", params=BASELINES)
def trained(request, tiny_prior, tmp_path_factory):
    name = request.param
    prior_before = {part: snapshot(getattr(tiny_prior, part)) for part in ("unet", "text_encoder", "vae")}
    tokenizer_len = len(tiny_prior.tokenizer)
    method = build_method(name, tiny_prior)
    initial = {k: v.detach().clone() for k, v in method.trainable_state_dict().items()}
    frozen_before = {k: snapshot(m) for k, m in method._frozen.items()}
    noisy, _, timesteps = fixed_batch(seed=3)
    with torch.no_grad():
        untrained_prediction = method.predict_noise(noisy, timesteps)
    losses = train(method, STEPS, LR[name])
    out_dir = tmp_path_factory.mktemp(f"export-{name}")
    method.export(out_dir)
    pipe, denoiser = type(method).load_export(tiny_prior, out_dir)
    return dict(
        name=name, method=method, prior=tiny_prior, prior_before=prior_before, tokenizer_len=tokenizer_len,
        initial=initial, frozen_before=frozen_before, untrained_prediction=untrained_prediction, losses=losses, out_dir=out_dir, pipe=pipe, denoiser=denoiser,
    )


def test_trainable_set_is_exactly_the_methods_own(trained):
    name, method, prior = trained["name"], trained["method"], trained["prior"]
    trainable = dict((n, p) for n, p in method.named_parameters() if p.requires_grad)
    assert method.num_trainable_parameters() == expected_trainable(name, prior)
    assert set(method.trainable_state_dict()) == set(trainable), "checkpoint must hold exactly the trainable tensors"
    if name == "dreambooth":
        assert set(trainable) == {f"unet.{n}" for n, _ in prior.unet.named_parameters()}
    elif name == "textual_inversion":
        assert list(trainable) == ["token_embeds.weight"]
        assert trainable["token_embeds.weight"].shape == (1, prior.text_encoder.config.hidden_size)
    elif name == "custom_diffusion":
        token = {"token_embeds.weight"}
        kv = set(trainable) - token
        assert token <= set(trainable)
        assert kv and all(n.endswith(("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")) for n in kv)
        assert all("attn2" in n for n in kv), "only cross-attention layers train k/v"
    elif name == "oft":
        assert all(".oft_R." in n.replace("__", ".") for n in trainable)
    # nothing frozen sits in the module tree (frozen prior parts live in method._frozen) and
    # nothing in the frozen parts trains unless it is the method's own
    assert all(p.requires_grad for p in method.parameters())
    own = {id(p) for p in method.parameters()}
    stray = [n for m in method._frozen.values() for n, p in m.named_parameters() if p.requires_grad and id(p) not in own]
    assert not stray, f"trainable tensors outside the method's module tree: {stray[:5]}"


def test_untrained_method_predicts_as_the_prior(trained):
    """Every baseline starts from the prior: DreamBooth's copy, identity OFT rotations, Custom
    Diffusion's k/v copied from the prior, and the placeholder initialised as "face" (so the
    token prompt reads "a photo of face face")."""
    method, prior = trained["method"], trained["prior"]
    prompt = "a photo of face face" if method.trains_token else "a photo of face"
    pipe = GCFGPipeline.from_prior(prior)
    noisy, _, timesteps = fixed_batch(seed=3)
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt).repeat(2, 1, 1)
        expected = prior.unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(trained["untrained_prediction"], expected, atol=1e-5, rtol=1e-4)


def test_initial_trainable_values_come_from_the_prior(trained):
    name, prior, initial = trained["name"], trained["prior"], trained["initial"]
    if name == "dreambooth":
        assert all(torch.equal(initial[f"unet.{k}"], v) for k, v in prior.unet.state_dict().items())
    elif name in ("textual_inversion", "custom_diffusion"):
        face = prior.tokenizer.encode("face", add_special_tokens=False)
        assert len(face) == 1
        row = prior.text_encoder.get_input_embeddings().weight[face[0]]
        assert torch.equal(initial["token_embeds.weight"][0], row)
    if name == "custom_diffusion":
        for n, a in prior.unet.named_modules():
            if n.endswith("attn2"):
                key = "processors." + f"{n}.processor".replace(".", "__")
                assert torch.equal(initial[f"{key}.to_k_custom_diffusion.weight"], a.to_k.weight)
                assert torch.equal(initial[f"{key}.to_v_custom_diffusion.weight"], a.to_v.weight)
    if name == "oft":
        assert all(not v.any() for v in initial.values()), "OFT starts at the identity rotation"


def test_training_lowers_the_loss_and_changes_only_trainable_weights(trained):
    method, losses, initial = trained["method"], trained["losses"], trained["initial"]
    assert losses[-1] < losses[0], f"{trained['name']}: loss did not go down: {losses}"
    after = method.trainable_state_dict()
    unchanged = [k for k, v in initial.items() if torch.equal(after[k], v)]
    assert not unchanged, f"trainable tensors that did not move: {unchanged[:5]}"
    # The frozen copies the method runs: every tensor that is not one of its trainable ones is bit-identical.
    own = {p.data_ptr() for p in method.trainable_parameters()}
    for key, module in method._frozen.items():
        before = trained["frozen_before"][key]
        state = module.state_dict()
        changed = [k for k, v in before["state"].items() if state[k].data_ptr() not in own and not torch.equal(state[k], v)]
        assert not changed, f"frozen {key} changed: {changed[:5]}"


def test_prior_is_unchanged(trained):
    prior = trained["prior"]
    for part, before in trained["prior_before"].items():
        assert_same(getattr(prior, part), before, f"prior.{part}")
    assert len(prior.tokenizer) == trained["tokenizer_len"], "the prior's tokenizer got a new token"
    assert trained["method"].template.placeholder not in prior.tokenizer.get_vocab()


def test_export_loads_and_reproduces_the_trained_prediction(trained):
    method, pipe, denoiser = trained["method"], trained["pipe"], trained["denoiser"]
    assert isinstance(pipe, GCFGPipeline) and denoiser in pipe.denoisers
    noisy, _, timesteps = fixed_batch(seed=1)
    with torch.no_grad():
        expected = method.predict_noise(noisy, timesteps)
        # The loaded model under the sampling pipeline's own encoding of the training prompt.
        embeds = pipe.encode_prompt(method.training_prompt).repeat(2, 1, 1)
        got = pipe.denoisers[denoiser](noisy, timesteps, BatchedCondition(prompt_embeds=embeds))
        untrained = pipe.denoisers["prior"](noisy, timesteps, BatchedCondition(prompt_embeds=embeds))
        if trained["name"] == "textual_inversion":  # the untrained baseline: the prior on the initializer word
            untrained = pipe.denoisers["prior"](noisy, timesteps, BatchedCondition(
                prompt_embeds=pipe.encode_prompt(method.template.prompt(with_token=False)).repeat(2, 1, 1)))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (got - untrained).abs().max() > 1e-4, "the loaded model predicts as the untrained prior"


def test_export_samples_with_the_papers_guidance(trained):
    method, pipe, denoiser = trained["method"], trained["pipe"], trained["denoiser"]
    spec = type(method).default_guidance(denoiser, method.template, control_prompt="wearing glasses", control_weight=3.0)
    images = pipe(guidance=spec, num_images=1, height=64, width=64, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(torch.as_tensor(images)).all()


def test_checkpoint_round_trip(trained, tiny_prior):
    """What the loop checkpoints (trainable_state_dict) restores the trained model into a fresh one."""
    method = trained["method"]
    fresh = build_method(trained["name"], tiny_prior)
    missing, unexpected = fresh.load_state_dict(method.trainable_state_dict(), strict=False)
    assert not unexpected and not (set(method.trainable_state_dict()) & set(missing))
    noisy, _, timesteps = fixed_batch(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict_noise(noisy, timesteps), method.predict_noise(noisy, timesteps))


@pytest.mark.parametrize("trained", ["textual_inversion"], indirect=True)
def test_textual_inversion_keeps_original_rows_and_exports_diffusers_format(trained):
    import safetensors.torch

    method, prior, pipe = trained["method"], trained["prior"], trained["pipe"]
    table = method._frozen["text_encoder"].get_input_embeddings()
    original = prior.text_encoder.get_input_embeddings().weight
    assert torch.equal(table.base.weight, original), "an original embedding row changed"
    assert torch.equal(table.weight[: original.shape[0]], original)
    # diffusers' textual-inversion file: {placeholder: [1, hidden]}
    saved = safetensors.torch.load_file(str(trained["out_dir"] / "learned_embeds.safetensors"))
    assert list(saved) == ["<ffhq>"] and saved["<ffhq>"].shape == (1, original.shape[1])
    # ... which GCFGPipeline.load_textual_inversion reads: the loaded row is the trained vector
    token_id = pipe.tokenizer.convert_tokens_to_ids("<ffhq>")
    loaded = pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.equal(loaded, method.learned_embedding.detach()[0])
    assert not torch.equal(loaded, trained["initial"]["token_embeds.weight"][0]), "the vector did not train"
    # and a second load_export works: the prior's tokenizer was not given the token
    type(method).load_export(prior, trained["out_dir"])


# --- cheap checks without training ----------------------------------------------------------------
def test_registry():
    assert set(METHODS) == {"ours", "dreambooth", "textual_inversion", "custom_diffusion", "oft", "lora"}
    assert METHODS["ours"] is NullTextConcept
    assert all(cls.name == name for name, cls in METHODS.items())
    with pytest.raises(ValueError, match="unknown method 'loha'.*dreambooth"):
        build_method("loha", None)


@pytest.mark.parametrize(
    "name, prompt",
    [
        ("dreambooth", "a photo of face"),
        ("oft", "a photo of face"),
        ("textual_inversion", "a photo of <ffhq> face"),
        ("custom_diffusion", "a photo of <ffhq> face"),
    ],
)
def test_prompts_and_guidance_follow_appendix_d2(name, prompt):
    cls, template = METHODS[name], PromptTemplate()
    assert template.prompt(with_token=cls.trains_token) == prompt
    spec = cls.default_guidance("den", template, control_prompt="wearing glasses", control_weight=7.5)
    assert spec.unconditional == Source("den", Condition(prompt=""))
    assert [(t.source, t.weight) for t in spec.terms] == [(Source("den", Condition(prompt=f"{prompt}, wearing glasses")), 7.5)]
    plain = cls.default_guidance("den", template)
    assert [t.source.condition.prompt for t in plain.terms] == [prompt]
    other = PromptTemplate(template="a photo of {token} animal face", placeholder="<afhq>")
    expected = "a photo of <afhq> animal face" if cls.trains_token else "a photo of animal face"
    assert other.prompt(with_token=cls.trains_token) == expected


def test_training_prompts_on_built_methods(tiny_prior):
    assert DreamBooth(tiny_prior, PromptTemplate()).training_prompt == "a photo of face"
    assert CustomDiffusion(tiny_prior, PromptTemplate()).training_prompt == "a photo of <ffhq> face"


def test_dreambooth_prompt_cache_equals_encoding_every_step(tiny_prior):
    cached = DreamBooth(tiny_prior, PromptTemplate())
    every = DreamBooth(tiny_prior, PromptTemplate(), encode_prompt_every_step=True)
    assert "prompt_embeds" not in cached.state_dict() and "prompt_embeds" not in cached.trainable_state_dict()
    noisy, _, t = fixed_batch()
    with torch.no_grad():
        assert torch.equal(cached.predict_noise(noisy, t), every.predict_noise(noisy, t))


def test_custom_diffusion_train_q_out_and_diffusers_weight_layout(tiny_prior, tmp_path):
    method = CustomDiffusion(tiny_prior, PromptTemplate(), train_q_out=True)
    hidden = tiny_prior.text_encoder.config.hidden_size
    extra = sum(a.to_q.weight.numel() + a.to_out[0].weight.numel() + a.to_out[0].bias.numel()
                for a in cross_attentions(tiny_prior.unet))
    assert method.num_trainable_parameters() == expected_trainable("custom_diffusion", tiny_prior) + extra
    assert hidden > 0
    # Our loader reads what diffusers' own save_attn_procs writes (the .bin of its example script).
    unet = copy.deepcopy(tiny_prior.unet)
    for p in add_custom_diffusion_processors(unet).values():
        torch.nn.init.normal_(p.to_k_custom_diffusion.weight, std=0.1)
    unet.save_attn_procs(tmp_path, weight_name="pytorch_custom_diffusion_weights.bin", safe_serialization=False)
    loaded = copy.deepcopy(tiny_prior.unet)
    state = torch.load(tmp_path / "pytorch_custom_diffusion_weights.bin", weights_only=True)
    load_custom_diffusion_processors(loaded, state)
    noisy, _, t = fixed_batch()
    embeds = torch.randn(2, 77, hidden)
    with torch.no_grad():
        torch.testing.assert_close(loaded(noisy, t, embeds).sample, unet(noisy, t, embeds).sample)
    with pytest.raises(ValueError, match="matches no attention layer"):
        load_custom_diffusion_processors(copy.deepcopy(tiny_prior.unet), {"nope.processor.to_k_custom_diffusion.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["textual_inversion", "custom_diffusion", "oft"])
def test_move_frozen_casts_frozen_parts_only(tiny_prior, name):
    method = build_method(name, tiny_prior)
    method.move_frozen(torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in method.trainable_parameters()} == {torch.float32}
    frozen = {t.dtype for m in method._frozen.values() for t in m.parameters() if not t.requires_grad}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in tiny_prior.unet.parameters()} == {torch.float32}, "moving the method moved the prior"
    noisy, noise, t = fixed_batch()
    F.mse_loss(method.predict_noise(noisy, t).float(), noise).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters())


# --- ccp-params ---------------------------------------------------------------------------------
def _run_params(tmp_path, *args):
    from ccp.cli.params import main

    out = tmp_path / "params.json"
    main([*args, "--json", str(out)])
    report = json.loads(out.read_text())
    return {row["label"]: row["trainable"] for row in report["rows"]}, report


def _ours_count(unet) -> int:
    """UNet parameters minus attn2 and norm2 of every transformer block."""
    dropped = 0
    for n, m in unet.named_modules():
        if n.endswith((".attn2", ".norm2")) and ".transformer_blocks." in n:
            dropped += sum(p.numel() for p in m.parameters())
    return sum(p.numel() for p in unet.parameters()) - dropped


def test_ccp_params_tiny(tmp_path, capsys):
    from ccp.priors.tiny import build_tiny_prior

    counts, report = _run_params(tmp_path, "--tiny")
    assert "paper #param" in capsys.readouterr().out
    prior = build_tiny_prior(0)
    for name in BASELINES:
        assert counts[name] == expected_trainable(name, prior), name
    assert counts["ours"] == _ours_count(prior.unet)
    assert report["unet_parameters"] == sum(p.numel() for p in prior.unet.parameters())


@pytest.mark.slow
def test_ccp_params_sd15(tmp_path):
    """On SD v1.5's shapes (~70 s, 8 GB): counts from the architecture's published numbers."""
    counts, _ = _run_params(tmp_path)
    hidden, cross = 768, 768
    blocks = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3  # 16 transformer blocks
    kv = sum(2 * cross * h for h in blocks)
    q_out = sum(2 * h * h + h for h in blocks)
    attn2_norm2 = sum(2 * h * h + h + 2 * cross * h + 2 * h for h in blocks)
    oft = sum(OFT_R * b * (b - 1) // 2 for h in blocks for b in [h // OFT_R] * 6 + [cross // OFT_R] * 2)
    assert counts["textual_inversion"] == hidden == 768
    assert counts["dreambooth"] == 859_520_964  # SD v1.5's UNet
    assert counts["custom_diffusion"] == kv + hidden == 19_170_048
    assert counts["custom_diffusion (train_q_out)"] == kv + q_out + hidden
    assert counts["oft"] == oft
    assert counts["ours"] == 859_520_964 - attn2_norm2
