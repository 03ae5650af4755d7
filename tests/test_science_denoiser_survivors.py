"""The denoiser wrappers (ccp/models/denoisers.py) pinned where the last mutation run
(benchmarks/results/mutation/report.md) showed no test would notice a change.

Expected values come from diffusers' ControlNetModel and UNet2DConditionModel called directly with
explicit arguments, or from recording stand-ins whose outputs are worked out by hand."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from ccp.models.denoisers import (
    BatchedCondition,
    ConceptDenoiser,
    ControlNetDenoiser,
    LoRADenoiser,
    TextUNetDenoiser,
)
from ccp.priors.tiny import TINY_UNET_CONFIG, build_tiny_controlnet

B, SIZE = 2, 64


# --- BatchedCondition -----------------------------------------------------------------------------------
def test_added_cond_kwargs_is_none_only_without_both_sdxl_parts():
    pooled, ids = torch.ones(2, 3), torch.zeros(2, 6)
    assert BatchedCondition().added_cond_kwargs() is None
    assert BatchedCondition(prompt_embeds=torch.ones(2, 4, 5)).added_cond_kwargs() is None
    both = BatchedCondition(pooled_embeds=pooled, time_ids=ids).added_cond_kwargs()
    assert both.keys() == {"text_embeds", "time_ids"} and both["text_embeds"] is pooled and both["time_ids"] is ids
    only_pooled = BatchedCondition(pooled_embeds=pooled).added_cond_kwargs()
    assert only_pooled == {"text_embeds": pooled, "time_ids": None}
    only_ids = BatchedCondition(time_ids=ids).added_cond_kwargs()
    assert only_ids == {"text_embeds": None, "time_ids": ids}


@pytest.mark.parametrize("several", [False, True])
def test_to_casts_every_floating_condition_tensor_and_keeps_those_already_in_dtype(several):
    f32 = lambda *shape: torch.rand(*shape)  # noqa: E731
    image = (f32(2, 3, 8, 8), f32(2, 3, 8, 8).double()) if several else f32(2, 3, 8, 8)
    scale = torch.tensor([0.5, 2.0])
    cond = BatchedCondition(prompt_embeds=f32(2, 4, 5), control_image=image, control_scale=scale,
                            uniform_control_scale=0.5, pooled_embeds=f32(2, 3), time_ids=f32(2, 6))
    out = cond.to(torch.float64)
    for name in ("prompt_embeds", "pooled_embeds", "time_ids"):
        got, src = getattr(out, name), getattr(cond, name)
        assert got.dtype == torch.float64, name
        assert torch.equal(got, src.double()), name
    images = out.control_image if several else (out.control_image,)
    sources = cond.control_image if several else (cond.control_image,)
    assert isinstance(out.control_image, tuple) == several
    for got, src in zip(images, sources):
        assert got.dtype == torch.float64 and torch.equal(got, src.double())
    if several:  # already float64: the very same tensor, no copy
        assert out.control_image[1] is cond.control_image[1]
    # the strengths are not part of the cast
    assert out.control_scale is scale and out.uniform_control_scale == 0.5
    # nothing to do: every tensor is kept as it is
    same = cond.to(torch.float32)
    assert same.prompt_embeds is cond.prompt_embeds and same.pooled_embeds is cond.pooled_embeds
    assert same.time_ids is cond.time_ids
    if not several:
        assert same.control_image is cond.control_image
    # None stays None
    empty = BatchedCondition().to(torch.float16)
    assert empty.prompt_embeds is None and empty.control_image is None and empty.time_ids is None


# --- ControlNetDenoiser against diffusers called directly ----------------------------------------------
@pytest.fixture(scope="module")
def parts():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    nets = [build_tiny_controlnet(unet, seed=3), build_tiny_controlnet(unet, seed=11)]
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(B, 4, 8, 8, generator=g)
    text = torch.randn(B, 7, 32, generator=g)
    images = [torch.rand(B, 3, SIZE, SIZE, generator=g) for _ in nets]
    return unet, nets, latents, text, images


def _reference(unet, nets, latents, t, text, images, scales):
    """sum_i s_i * ControlNet_i residuals (s_i per sample), then the UNet with those residuals."""
    down, mid = None, None
    with torch.no_grad():
        for net, image, s in zip(nets, images, scales):
            d, m = net(latents, t, encoder_hidden_states=text, controlnet_cond=image, conditioning_scale=1.0,
                       return_dict=False)
            w = torch.as_tensor(s, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(latents.shape[0], 1, 1, 1)
            d = [x * w for x in d]
            m = m * w
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]


def _run(denoiser, latents, t, cond):
    with torch.no_grad():
        return denoiser(latents, t, cond)


T = torch.tensor(500)


def test_the_controlnet_residuals_are_not_zero(parts):
    unet, nets, latents, text, images = parts
    with torch.no_grad():
        plain = unet(latents, T, encoder_hidden_states=text, return_dict=False)[0]
    ref = _reference(unet, nets[:1], latents, T, text, images[:1], [1.0])
    assert (ref - plain).abs().max() > 1e-3


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64])
def test_one_controlnet_with_a_different_strength_per_sample(parts, scale_dtype):
    unet, nets, latents, text, images = parts
    scale = torch.tensor([0.3, 1.7], dtype=scale_dtype)
    cond = BatchedCondition(prompt_embeds=text, control_image=images[0], control_scale=scale)
    got = _run(ControlNetDenoiser(unet, nets[0]), latents, T, cond)
    assert got.dtype == torch.float32 and got.shape == latents.shape
    torch.testing.assert_close(got, _reference(unet, nets[:1], latents, T, text, images[:1], [[0.3, 1.7]]))


def test_one_controlnet_with_a_uniform_strength(parts):
    unet, nets, latents, text, images = parts
    cond = BatchedCondition(prompt_embeds=text, control_image=images[0], control_scale=torch.full((B,), 0.6),
                            uniform_control_scale=0.6)
    got = _run(ControlNetDenoiser(unet, nets[0]), latents, T, cond)
    torch.testing.assert_close(got, _reference(unet, nets[:1], latents, T, text, images[:1], [0.6]))


@pytest.mark.parametrize("uniform", [None, 0.25])
def test_no_strength_means_full_strength(parts, uniform):
    unet, nets, latents, text, images = parts
    cond = BatchedCondition(prompt_embeds=text, control_image=images[0], control_scale=None,
                            uniform_control_scale=uniform)
    got = _run(ControlNetDenoiser(unet, nets[0]), latents, T, cond)
    torch.testing.assert_close(got, _reference(unet, nets[:1], latents, T, text, images[:1], [1.0]))


def test_several_controlnets_sum_their_per_sample_scaled_residuals_in_order(parts):
    unet, nets, latents, text, images = parts
    multi = MultiControlNetModel(list(nets))
    scales = (torch.tensor([0.3, 1.7]), torch.tensor([1.4, 0.5]))
    cond = BatchedCondition(prompt_embeds=text, control_image=tuple(images), control_scale=scales,
                            uniform_control_scale=(None, None))
    got = _run(ControlNetDenoiser(unet, multi), latents, T, cond)
    expected = _reference(unet, nets, latents, T, text, images, [[0.3, 1.7], [1.4, 0.5]])
    torch.testing.assert_close(got, expected)
    # mixed: the first net uniform (0.8), the second per sample, a third entry without strength (1.0)
    multi3 = MultiControlNetModel([nets[0], nets[1], nets[0]])
    images3 = (images[0], images[1], images[1])
    cond = BatchedCondition(prompt_embeds=text, control_image=images3,
                            control_scale=(torch.full((B,), 0.8), torch.tensor([1.4, 0.5]), None),
                            uniform_control_scale=(0.8, None, None))
    got = _run(ControlNetDenoiser(unet, multi3), latents, T, cond)
    expected = _reference(unet, list(multi3.nets), latents, T, text, images3, [0.8, [1.4, 0.5], 1.0])
    torch.testing.assert_close(got, expected)


# --- the exact calls each denoiser makes (recording stand-ins, outputs worked out by hand) -------------
class Recorder:
    def __init__(self, result):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result(*args, **kwargs)


class FakeUNet(Recorder):
    """Returns (sample + residual sums,) as a tuple, as a UNet with return_dict=False does."""

    def __init__(self):
        super().__init__(self._forward)
        self.adapter_log = []

    @staticmethod
    def _forward(sample, t, **kw):
        out = sample.clone()
        if kw.get("down_block_additional_residuals") is not None:
            out = out + sum(d for d in kw["down_block_additional_residuals"]) + kw["mid_block_additional_residual"]
        return (out,)

    def enable_adapters(self):
        self.adapter_log.append("enable")

    def set_adapter(self, name):
        self.adapter_log.append(("set", name))

    def disable_adapters(self):
        self.adapter_log.append("disable")


class FakeNet(Recorder):
    """A 'ControlNet' whose residuals are conditioning_scale * (level, image) for two down levels."""

    def __init__(self, level):
        super().__init__(lambda x, t, **kw: (
            [kw["conditioning_scale"] * (self.level + kw["controlnet_cond"])] * 2,
            kw["conditioning_scale"] * (10 * self.level + kw["controlnet_cond"]),
        ))
        self.level = level


def test_text_unet_and_lora_denoisers_call_the_unet_with_the_prompt_and_sdxl_parts():
    x, t = torch.zeros(2, 1, 1, 1), torch.tensor(3)
    text, pooled, ids = torch.ones(2, 4, 5), torch.ones(2, 3), torch.ones(2, 6)
    cond = BatchedCondition(prompt_embeds=text, pooled_embeds=pooled, time_ids=ids)
    for make in (TextUNetDenoiser, lambda u: LoRADenoiser(u, "style")):
        unet = FakeUNet()
        assert _run(make(unet), x, t, cond) is not None
        (args, kwargs), = unet.calls
        assert args[0] is x and args[1] is t
        assert kwargs.keys() == {"encoder_hidden_states", "added_cond_kwargs", "return_dict"}
        assert kwargs["encoder_hidden_states"] is text and kwargs["return_dict"] is False
        assert kwargs["added_cond_kwargs"] == {"text_embeds": pooled, "time_ids": ids}
    assert unet.adapter_log == ["enable", ("set", "style"), "disable"]


def test_concept_denoiser_calls_the_unet_without_text_and_with_only_the_time_ids():
    x, t = torch.zeros(2, 1, 1, 1), torch.tensor(3)
    ids = torch.ones(2, 6)
    for cond, added in ((BatchedCondition(prompt_embeds=torch.ones(2, 4, 5)), None),
                        (BatchedCondition(prompt_embeds=torch.ones(2, 4, 5), pooled_embeds=torch.ones(2, 3),
                                          time_ids=ids), {"time_ids": ids})):
        unet = FakeUNet()
        _run(ConceptDenoiser(unet), x, t, cond)
        (args, kwargs), = unet.calls
        expected = {"encoder_hidden_states": None, "return_dict": False}
        if added is not None:
            expected["added_cond_kwargs"] = added
        assert kwargs == expected


def test_controlnet_denoiser_calls_each_net_then_the_unet_as_diffusers_expects():
    x, t = torch.zeros(2, 1, 1, 1), torch.tensor(3)
    text, pooled, ids = torch.ones(2, 4, 5), torch.ones(2, 3), torch.ones(2, 6)
    a, b = FakeNet(1.0), FakeNet(2.0)
    unet = FakeUNet()
    den = ControlNetDenoiser(unet, a)
    img = torch.full((2, 1, 1, 1), 0.5)
    cond = BatchedCondition(prompt_embeds=text, control_image=img, control_scale=torch.tensor([2.0, 3.0]),
                            pooled_embeds=pooled, time_ids=ids)
    out = _run(den, x, t, cond)
    (_, net_kw), = a.calls
    assert net_kw == {"encoder_hidden_states": text, "controlnet_cond": img, "conditioning_scale": 1.0,
                      "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}, "return_dict": False}
    (_, unet_kw), = unet.calls
    assert unet_kw.keys() == {"encoder_hidden_states", "down_block_additional_residuals",
                              "mid_block_additional_residual", "added_cond_kwargs", "return_dict"}
    assert unet_kw["return_dict"] is False and unet_kw["encoder_hidden_states"] is text
    assert unet_kw["added_cond_kwargs"] == {"text_embeds": pooled, "time_ids": ids}
    # per sample s: 2 down residuals s*1.5 and mid s*10.5 -> s*13.5
    torch.testing.assert_close(out.flatten(), torch.tensor([2.0, 3.0]) * 13.5)

    # two nets, uniform 0.5 on the first, per-sample on the second
    a, b, unet = FakeNet(1.0), FakeNet(2.0), FakeUNet()
    den = ControlNetDenoiser(unet, MultiControlNetModel([torch.nn.Identity(), torch.nn.Identity()]))
    den.nets = [a, b]
    cond = BatchedCondition(prompt_embeds=text, control_image=(img, img),
                            control_scale=(torch.full((2,), 0.5), torch.tensor([2.0, 3.0])),
                            uniform_control_scale=(0.5, None))
    out = _run(den, x, t, cond)
    assert a.calls[0][1]["conditioning_scale"] == 0.5 and b.calls[0][1]["conditioning_scale"] == 1.0
    assert a.calls[0][1]["added_cond_kwargs"] is None
    # net a: 0.5 * (1.5*2 + 10.5) = 6.75; net b: s * (2.5*2 + 20.5) = s * 25.5
    torch.testing.assert_close(out.flatten(), 6.75 + torch.tensor([2.0, 3.0]) * 25.5)
