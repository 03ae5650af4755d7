"""Single-file checkpoints (the original Stable Diffusion layout community sites distribute) as UNets.

Loading is diffusers' ``from_single_file``, with the UNet config taken from the prior's folder
(no download). Writing the original layout is here because diffusers ships that conversion only
as a script outside the package (scripts/convert_diffusers_to_original_stable_diffusion.py); this
is the same key mapping, for any number of blocks and layers per block.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ccp.config import ConfigError

UNET_PREFIX = "model.diffusion_model."
SINGLE_FILE_SUFFIXES = (".safetensors",)


class SingleFileError(ConfigError, ValueError):
    """A single-file checkpoint that is missing, unreadable or of another architecture."""


def _resnet(hf: str, sd: str) -> list[tuple[str, str]]:
    pairs = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
             ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    return [(f"{hf}.{a}", f"{sd}.{b}") for a, b in pairs]


def original_prefixes(config) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for an SD-family UNet config, longest first."""
    layers = config.layers_per_block
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    blocks = len(config.block_out_channels)
    for i in range(blocks):
        for j in range(layers):
            pairs += _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{(layers + 1) * i + j + 1}.0")
            pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{(layers + 1) * i + j + 1}.1"))
        if i < blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(layers + 1) * (i + 1)}.0.op"))
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(layers + 1):
            pairs += _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{(layers + 1) * i + j}.0")
            pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{(layers + 1) * i + j}.1"))
        if i < blocks - 1:
            index = 2 if has_attention else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{(layers + 1) * i + layers}.{index}"))
    pairs += _resnet("mid_block.resnets.0", "middle_block.0") + _resnet("mid_block.resnets.1", "middle_block.2")
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    return sorted(pairs, key=lambda p: -len(p[0]))


def unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's weights under the original SD checkpoint's keys (``model.diffusion_model.*``)."""
    prefixes = original_prefixes(unet.config)
    converted = {}
    for key, tensor in unet.state_dict().items():
        for hf, sd in prefixes:
            if key.startswith(hf + "."):
                converted[UNET_PREFIX + sd + key[len(hf):]] = tensor.detach().contiguous()
                break
        else:
            raise SingleFileError(f"no original-layout name for UNet weight {key!r}; is this an SD v1.x-family UNet?")
    return converted


def save_unet_single_file(unet: UNet2DConditionModel, path: str | Path) -> Path:
    """Write `unet` as a single-file checkpoint in the original SD layout (.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(unet_to_original(unet), str(path))
    return path


def check_single_file(path: str | Path, where: str = "single-file checkpoint") -> Path:
    """An existing .safetensors file with an SD UNet in it; says what it is otherwise."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise SingleFileError(f"{where}: file {path} does not exist; pass a .safetensors checkpoint")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise SingleFileError(f"{where}: {path.name} is not a .safetensors file; convert it to .safetensors first")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise SingleFileError(f"{where}: {path} cannot be read as safetensors ({err})") from None
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise SingleFileError(
            f"{where}: {path.name} holds no Stable Diffusion UNet (no {UNET_PREFIX}* weights; first keys: "
            f"{keys[:3]}); pass a full SD v1.x-family checkpoint"
        )
    return path


def load_single_file_unet(
    path: str | Path, prior: str | Path, dtype: torch.dtype | None = None, where: str = "single-file checkpoint",
    allow_download: bool = False,
) -> UNet2DConditionModel:
    """The UNet of a single-file SD checkpoint, read by diffusers' ``from_single_file`` with the
    UNet config of `prior` (a diffusers folder, or a hub id read from the local Hugging Face cache
    unless `allow_download`: no original config is downloaded).
    A checkpoint of another architecture (SDXL, SD 2.x, another size) raises `SingleFileError`."""
    path = check_single_file(path, where)
    reference = UNet2DConditionModel.load_config(str(prior), subfolder="unet", local_files_only=not allow_download)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in UNet2DConditionModel.from_config(reference).state_dict().items()}
    try:
        unet = UNet2DConditionModel.from_single_file(str(path), config=str(prior), subfolder="unet", torch_dtype=dtype,
                                                     local_files_only=not allow_download)
    except (ValueError, KeyError, RuntimeError, IndexError) as err:
        raise SingleFileError(f"{where}: {path.name} is not a checkpoint of the prior's architecture ({err})") from None
    loaded = {k: v.shape for k, v in unet.state_dict().items()}
    wrong = [k for k in expected if loaded.get(k) != expected[k]]
    if wrong or set(loaded) != set(expected):
        raise SingleFileError(
            f"{where}: {path.name} is not a checkpoint of the prior's architecture ({len(wrong)} weights "
            f"differ, e.g. {wrong[:2]}); pass a checkpoint fine-tuned from this prior's family"
        )
    return unet.eval()


def main(argv=None) -> None:
    """``python -m ccp.priors.single_file MODEL_FOLDER OUT.safetensors``: a diffusers UNet (or a
    pipeline folder with ``unet/``) written as a single-file checkpoint in the original SD layout."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("model", help="diffusers UNet folder, or a pipeline folder with unet/")
    parser.add_argument("out", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    folder = Path(args.model)
    subfolder = "unet" if (folder / "unet").is_dir() else None
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder)
    print(save_unet_single_file(unet, args.out))


if __name__ == "__main__":
    main()
