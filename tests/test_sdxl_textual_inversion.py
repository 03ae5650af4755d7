"""Textual Inversion on the tiny SDXL prior: one trained row per text encoder, the condition GCFG
encodes, the clip_l/clip_g export that diffusers' SDXL pipeline loads, and the prior left alone."""

from __future__ import annotations

import safetensors.torch
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionXLPipeline
from torch import nn

from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.methods import PromptTemplate, TextualInversion, build_method
from ccp.methods.textual_inversion import EMBEDS_FILE, pipeline_with_token
from ccp.pipelines.gcfg_xl import GCFGXLPipeline
from ccp.priors.tiny import SDXL_SCHEDULER_CONFIG, build_tiny_prior

TOKEN = "<ffhq>"
PROMPT = "a photo of <ffhq> face"
SIZE, STEPS, LR = 64, 3, 5e-2
# a training image that was 80 x 96 before a crop at (4, 8): time ids unlike GCFG's default
TIME_IDS = torch.tensor([[80.0, 96.0, 4.0, 8.0, 64.0, 64.0]] * 2)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, before: dict, what: str) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys(), f"{what}: keys changed"
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, f"{what}: tensors changed: {changed[:5]}"


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([150, 650])
    return DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG).add_noise(latents, noise, timesteps), noise, timesteps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    prior = build_tiny_prior(0, family="sdxl")
    before = {part: state(getattr(prior, part)) for part in ("unet", "text_encoder", "text_encoder_2", "vae")}
    tokenizers = [(len(t), t.get_vocab()) for t in (prior.tokenizer, prior.tokenizer_2)]
    method = build_method("textual_inversion", prior)
    initial = {k: v.detach().clone() for k, v in method.trainable_state_dict().items()}
    noisy, noise, timesteps = batch()
    opt = torch.optim.AdamW(list(method.trainable_parameters()), lr=LR, weight_decay=0.0)
    for _ in range(2):
        loss = F.mse_loss(method.predict_noise(noisy, timesteps, time_ids=TIME_IDS).float(), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out_dir = tmp_path_factory.mktemp("ti-sdxl")
    path = method.export(out_dir)
    pipe, denoiser = TextualInversion.load_export(prior, out_dir)
    return dict(prior=prior, before=before, tokenizers=tokenizers, method=method, initial=initial,
                out_dir=out_dir, path=path, pipe=pipe, denoiser=denoiser)


def test_two_steps_train_both_rows_and_nothing_else(trained):
    method, prior = trained["method"], trained["prior"]
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert list(trainable) == ["token_embeds.weight", "token_embeds_2.weight"]
    hidden = (prior.text_encoder.config.hidden_size, prior.text_encoder_2.config.hidden_size)
    assert [tuple(p.shape) for p in trainable.values()] == [(1, hidden[0]), (1, hidden[1])]
    assert method.num_trainable_parameters() == sum(hidden)
    # initialised from "face" in each encoder, and both moved
    face = prior.tokenizer.convert_tokens_to_ids("face</w>")
    for name, encoder in (("token_embeds.weight", prior.text_encoder), ("token_embeds_2.weight", prior.text_encoder_2)):
        assert torch.equal(trained["initial"][name][0], encoder.get_input_embeddings().weight[face])
        assert (trainable[name] - trained["initial"][name]).abs().max() > 1e-4, f"{name} did not train"
    # the UNet, VAE and both encoders (every original row) are bit-identical to before
    for part, before in trained["before"].items():
        assert_same_state(getattr(prior, part), before, f"prior {part}")
    for i, encoder in enumerate(method._frozen["text_encoder"]):
        table = encoder.get_input_embeddings()
        original = (prior.text_encoder, prior.text_encoder_2)[i].get_input_embeddings().weight
        assert torch.equal(table.base.weight, original) and table.num_embeddings == original.shape[0] + 1
    assert all(not p.requires_grad for p in method.unet.parameters())


def test_condition_equals_gcfg_encode_text_with_the_token_loaded(trained):
    method, pipe = trained["method"], trained["pipe"]
    assert isinstance(pipe, GCFGXLPipeline) and trained["denoiser"] == "prior"
    with torch.no_grad():
        embeds, pooled = method.sdxl_condition(1, torch.float32)
        for name, gcfg in (("reloaded export", pipe), ("in-memory", method.sampling_pipeline(trained["prior"])[0])):
            text = gcfg.encode_text(PROMPT)
            assert torch.equal(text["prompt_embeds"], embeds), name
            assert torch.equal(text["pooled_embeds"], pooled), name
        # the UNet sees that text and, without time ids, GCFG's default ones for the latents' size
        noisy, _, t = batch(1)
        added = {"text_embeds": pooled.expand(2, -1),
                 "time_ids": pipe.image_conditions(SIZE, SIZE)["time_ids"].expand(2, -1)}
        expected = pipe.unet(noisy, t, encoder_hidden_states=embeds.expand(2, -1, -1), added_cond_kwargs=added).sample
        assert torch.equal(method.predict_noise(noisy, t), expected)
        assert (method.predict_noise(noisy, t, time_ids=TIME_IDS) - expected).abs().max() > 1e-5  # ids reach it
    # the token changes the conditioning in both encoders' halves and the pooled text
    d1 = trained["prior"].text_encoder.config.hidden_size
    plain = pipe.encode_text("a photo of face")
    assert (plain["prompt_embeds"][..., :d1] - embeds[..., :d1]).abs().max() > 1e-4
    assert (plain["prompt_embeds"][..., d1:] - embeds[..., d1:]).abs().max() > 1e-4


def test_export_loads_into_diffusers_sdxl_pipeline_as_gcfg_samples_it(trained):
    method, path = trained["method"], trained["path"]
    assert path.name == EMBEDS_FILE
    saved = safetensors.torch.load_file(str(path))
    assert set(saved) == {"clip_l", "clip_g"}
    assert torch.equal(saved["clip_l"], method.token_embeds.weight.detach())
    assert torch.equal(saved["clip_g"], method.token_embeds_2.weight.detach())
    # diffusers' documented SDXL loading, on a fresh copy of the prior
    fresh = build_tiny_prior(0, family="sdxl")
    components = {k: v for k, v in fresh.components.items() if k not in ("image_encoder", "feature_extractor")}
    ref = StableDiffusionXLPipeline(**{**components, "scheduler": DPMSolverMultistepScheduler.from_config(fresh.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(saved["clip_g"], token=TOKEN, text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    ref.load_textual_inversion(saved["clip_l"], token=TOKEN, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
    g = 6.0
    theirs = ref(PROMPT, guidance_scale=g, generator=torch.Generator().manual_seed(5), **kw).images

    pipe, denoiser = TextualInversion.load_export(trained["prior"], trained["out_dir"])
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    spec = GuidanceSpec(terms=(GuidanceTerm("prompt", Source(denoiser, Condition(prompt=PROMPT)), g),),
                        unconditional=Source(denoiser, Condition(prompt="")))
    ours = pipe(spec, generator=torch.Generator().manual_seed(5), **kw).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    without = ref("a photo of face", guidance_scale=g, generator=torch.Generator().manual_seed(5), **kw).images
    assert (without - theirs).abs().max() > 1e-4  # the token matters in the comparison


def test_multi_vector_tokens_expand_in_both_tokenizers(trained, tmp_path):
    """A 2-vector embedding (``<t>`` -> ``<t> <t>_1``) is expanded by GCFGXLPipeline.encode_text in
    each tokenizer: changing one encoder's second vector changes only that encoder's half."""
    prior = trained["prior"]
    g = torch.Generator().manual_seed(0)
    rows = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}

    def encode(rows):
        safetensors.torch.save_file(rows, str(tmp_path / EMBEDS_FILE), metadata={"token": "<t>"})
        return pipeline_with_token(prior, tmp_path).encode_text("a photo of <t> face")

    base = encode(rows)
    for key, half in (("clip_l", slice(0, 32)), ("clip_g", slice(32, 64))):
        other = dict(rows, **{key: torch.stack([rows[key][0], rows[key][1] + 1.0])})
        changed = encode(other)["prompt_embeds"] - base["prompt_embeds"]
        rest = slice(32, 64) if key == "clip_l" else slice(0, 32)
        assert changed[..., half].abs().max() > 1e-4, f"{key}'s second vector is not used"
        assert changed[..., rest].abs().max() == 0, f"{key}'s vector leaked into the other encoder"


def test_prior_tokenizers_unchanged_after_training_and_export(trained):
    prior = trained["prior"]
    for tokenizer, (length, vocab) in zip((prior.tokenizer, prior.tokenizer_2), trained["tokenizers"]):
        assert len(tokenizer) == length and tokenizer.get_vocab() == vocab
        assert TOKEN not in tokenizer.get_vocab()
    for encoder in (prior.text_encoder, prior.text_encoder_2):
        assert type(encoder.get_input_embeddings()) is nn.Embedding
        assert encoder.get_input_embeddings().num_embeddings == trained["tokenizers"][0][0]
    TextualInversion.load_export(prior, trained["out_dir"])  # a second load works: no token left behind


def test_sd_file_on_sdxl_prior_is_refused(trained, tmp_path):
    safetensors.torch.save_file({TOKEN: torch.zeros(1, 32)}, str(tmp_path / EMBEDS_FILE))
    with pytest.raises(ValueError, match="clip_l or clip_g"):
        pipeline_with_token(trained["prior"], tmp_path)


def test_placeholder_must_be_in_both_prompts():
    prior = build_tiny_prior(0, family="sdxl")
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        TextualInversion(prior, PromptTemplate(template="a photo of face", placeholder=TOKEN))
