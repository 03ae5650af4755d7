"""The ccp-sample job: sample images with Generalized Classifier-free Guidance from a config.

Everything that can be checked without weights (guidance terms against the configured
denoisers, weights, control images, init images and strength, model folders and single-file
checkpoints, scheduler) is checked before any model is loaded; a LoRA's shapes right after the
prior is loaded, before any denoising. Writes ``images/00000.png ...``, ``grid.png`` and the resolved ``config.yaml`` into the
output folder; image i is image i of ``sampling.seed`` (`ccp.pipelines.sampling`), so images do
not depend on the batch size or the device.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ccp.config import ConfigError, with_output_dir
from ccp.guidance import GuidanceSpec
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.memory import denoisers_in_use
from ccp.pipelines.sampling import sample_batches
from ccp.pipelines.validation import ImageInputError, check_control_inputs, check_guidance_against, check_init_inputs
from ccp.priors.loading import looks_like_path, load_controlnet, load_prior, resolve_dtype
from ccp.priors.single_file import SINGLE_FILE_SUFFIXES, SingleFileError, check_single_file, load_single_file_unet

log = logging.getLogger(__name__)

BUILTIN_SCHEDULERS = ("dpmsolver++", "prior")


class SampleConfigError(ConfigError, ValueError):
    """A sampling config that cannot run; the message says how to fix it."""


# --- checks that need no weights -----------------------------------------------------------
def check_required(cfg: DictConfig) -> None:
    """Name every `???` value still unset (skipping disabled guidance terms)."""
    disabled = {
        f"guidance.terms.{name}."
        for name, term in (cfg.guidance.get("terms") or {}).items()
        if term is not None and not term.get("enabled", True)
    }
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith(tuple(disabled)))
    if missing:
        hints = {"prior.path": "/path/to/sd-v1-5 (or an SD 2.x/SDXL folder, or one written by ccp-tiny-prior)"}
        fixes = " ".join(f"{key}={hints.get(key, '...')}" for key in missing)
        raise SampleConfigError(f"required value(s) not set: {', '.join(missing)}; pass {fixes}")


def configured_denoisers(cfg: DictConfig) -> dict[str, str]:
    """Denoiser name -> kind, as the pipeline will register them once the models are loaded."""
    kinds = {"prior": "unet"}
    if cfg.concept.path:
        kinds["concept"] = "concept"
    if cfg.controlnet.path:
        kinds["controlnet"] = "controlnet"
    for group, kind in (("denoiser_checkpoints", "unet"), ("controlnets", "controlnet"), ("loras", "unet")):
        for name in cfg.get(group) or {}:
            if name in kinds:
                raise SampleConfigError(
                    f"{group}.{name}: the name {name!r} is taken by another denoiser; pick another"
                )
            kinds[str(name)] = kind
    return kinds


def controlnet_counts(cfg: DictConfig) -> dict[str, int]:
    """ControlNet denoiser name -> how many ControlNets it sums (a list of folders: several)."""
    counts = {"controlnet": 1} if cfg.controlnet.path else {}
    for name, paths in (cfg.get("controlnets") or {}).items():
        counts[str(name)] = len(paths) if OmegaConf.is_list(paths) else 1
    return counts


def _references(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _references(v)]
    return [] if value is None else [str(value)]


def load_control_images(cfg: DictConfig) -> dict[str, PIL.Image.Image]:
    """Every control image the enabled terms use, keyed by how they refer to it (name or path)."""
    named = {str(k): str(v) for k, v in (cfg.control_images or {}).items()}
    wanted: dict[str, tuple[str, str]] = {}  # reference -> (config key to fix, file)
    for name, term in (cfg.guidance.get("terms") or {}).items():
        refs = [] if term is None or not term.get("enabled", True) else _references(
            OmegaConf.to_container(term, resolve=True).get("control_image"))
        for ref in refs:
            if ref in named:
                wanted[ref] = (f"control_images.{ref}", named[ref])
            else:
                wanted[ref] = (f"guidance.terms.{name}.control_image", ref)
    images = {}
    for ref, (key, file) in wanted.items():
        path = Path(file).expanduser()
        if not path.is_file():
            names = ""
            if named and key.startswith("guidance."):
                names = f" (or one of the control_images names {sorted(named)})"
            raise SampleConfigError(f"{key}: file {file} does not exist; set {key}=path/to/image.png{names}")
        try:
            images[ref] = PIL.Image.open(path).convert("RGB")
        except OSError as err:
            raise SampleConfigError(f"{key}: cannot read {file} as an image ({err})") from err
    return images


def build_guidance(cfg: DictConfig) -> GuidanceSpec:
    """The guidance spec, checked against the denoisers the config will load."""
    images = load_control_images(cfg)
    guidance = OmegaConf.to_container(cfg.guidance, resolve=True)
    counts = controlnet_counts(cfg)
    for term in (guidance.get("terms") or {}).values():
        # a denoiser over several ControlNets takes one image per ControlNet: a tuple (a list is one per output)
        if isinstance(term, dict) and counts.get(str(term.get("denoiser")), 1) > 1:
            for key in ("control_image", "control_scale"):
                if isinstance(term.get(key), list):
                    term[key] = tuple(term[key])
    spec = GuidanceSpec.from_config(guidance, control_images=images)
    check_guidance_against(spec, configured_denoisers(cfg))
    check_control_inputs(spec, counts, cfg.sampling.num_images)
    return spec


def load_init_images(cfg: DictConfig) -> tuple[Any, Any]:
    """(init image(s), mask(s)) for image to image and inpainting, read and checked: missing or
    unreadable files, counts that fit neither 1 nor sampling.num_images, sizes under init.size."""
    init = cfg.get("init") or {}
    image_ref, mask_ref = init.get("image"), init.get("mask")
    if image_ref is None and mask_ref is None:
        return None, None
    if image_ref is None:
        raise SampleConfigError("init.mask is set but init.image is not; inpainting needs init.image=photo.png")
    policy = init.get("size", "resize")
    if policy not in ("resize", "strict"):
        raise SampleConfigError(f"init.size={policy!r}: use resize (to sampling.height x width) or strict")
    loaded = []
    for key, ref in (("init.image", image_ref), ("init.mask", mask_ref)):
        if ref is None:
            loaded.append(None)
            continue
        refs = _references(OmegaConf.to_container(ref) if OmegaConf.is_list(ref) else ref)
        if len(refs) not in (1, cfg.sampling.num_images):
            raise SampleConfigError(
                f"{key}: {len(refs)} images for sampling.num_images={cfg.sampling.num_images}; give one image "
                "for all outputs or one per output"
            )
        images = []
        for file in refs:
            path = Path(file).expanduser()
            if not path.is_file():
                raise SampleConfigError(f"{key}: file {file} does not exist; set {key}=path/to/image.png")
            try:
                with PIL.Image.open(path) as opened:
                    images.append(opened.convert("RGB"))
            except OSError as err:
                raise SampleConfigError(f"{key}: cannot read {file} as an image ({err})") from None
        loaded.append(images if len(images) > 1 else images[0])
    if policy == "strict":
        s = cfg.sampling
        for key, value in (("init.image", loaded[0]), ("init.mask", loaded[1])):
            for image in value if isinstance(value, list) else ([] if value is None else [value]):
                wanted = (s.width or image.width, s.height or image.height)
                if image.size != wanted or image.width % 8 or image.height % 8:
                    raise SampleConfigError(
                        f"{key}: an image of {image.width}x{image.height} under init.size=strict, which needs exactly "
                        f"{wanted[0]}x{wanted[1]} (multiples of 8); resize it, or set init.size=resize"
                    )
    try:
        check_init_inputs(loaded[0], loaded[1], init.get("strength", 1.0), cfg.sampling.num_images, cfg.sampling.steps)
    except ImageInputError as err:
        raise SampleConfigError(f"init: {err}") from None
    return loaded[0], loaded[1]


def _config_class(folder: Path) -> str | None:
    """The ``_class_name`` diffusers wrote into `folder`/config.json (None: no such file)."""
    import json

    config = folder / "config.json"
    return json.loads(config.read_text()).get("_class_name", "") if config.is_file() else None


def concept_folder(path: str) -> str:
    """``concept.path`` as ccp-sample loads it: a null-text concept UNet folder, or a folder one level
    above it (ccp-train's ``<run>/export``, the folder ccp-eval takes, holds it as ``concept_unet/``).
    Anything else is refused with the folder or command that gives the right one."""
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    wanted = NullTextUNet2DConditionModel.__name__
    folder = Path(path).expanduser()
    found = _config_class(folder)
    if found == wanted:
        return path
    inside = sorted(sub for sub in folder.iterdir() if sub.is_dir() and _config_class(sub) == wanted)
    if len(inside) == 1:
        log.info("concept.path=%s: loading its concept UNet from %s", path, inside[0])
        return str(inside[0])
    if found is None:
        subfolders = sorted(sub.name + "/" for sub in folder.iterdir() if sub.is_dir())
        raise SampleConfigError(
            f"concept.path={path} holds no null-text concept UNet (no config.json of a {wanted} in it or in a subfolder"
            f"{'; it has ' + ', '.join(subfolders) if subfolders else ''}); point it at <run>/export of a ccp-train "
            "run of ours (the exports of other methods are sampled with ccp-eval export.path=...)")
    raise SampleConfigError(
        f"concept.path={path} holds a {found or 'model'} (config.json), not a null-text concept UNet; point it at "
        f"<run>/export of a ccp-train run of ours, or convert a prior first: ccp-null-text /path/to/prior {path}-null-text")


def check_model_folders(cfg: DictConfig) -> None:
    """Catch a wrong concept/ControlNet/checkpoint path now, not after the prior has loaded."""
    concept = cfg.concept.path
    if concept and looks_like_path(str(concept)) and Path(str(concept)).expanduser().is_dir():
        concept_folder(str(concept))
        concept = None  # checked
    folders = [
        ("concept.path", concept, ["config.json"]),
        ("controlnet.path", cfg.controlnet.path, ["config.json"]),
    ]
    for name, path in (cfg.denoiser_checkpoints or {}).items():
        if str(path).endswith(SINGLE_FILE_SUFFIXES) or Path(str(path)).expanduser().is_file():
            try:
                check_single_file(str(path), f"denoiser_checkpoints.{name}")
            except SingleFileError as err:
                raise SampleConfigError(str(err)) from None
        else:
            folders.append((f"denoiser_checkpoints.{name}", path, ["config.json", "unet/config.json"]))
    for name, paths in (cfg.get("controlnets") or {}).items():
        for path in (paths if OmegaConf.is_list(paths) else [paths]):
            folders.append((f"controlnets.{name}", path, ["config.json"]))
    for name, path in (cfg.get("loras") or {}).items():
        if looks_like_path(str(path)) and not Path(str(path)).expanduser().exists():
            raise SampleConfigError(f"loras.{name}: {path} does not exist; set loras.{name}=path/to/lora.safetensors")
    for key, path, configs in folders:
        if not path or not looks_like_path(str(path)):  # unset, or a hub id
            continue
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise SampleConfigError(f"{key}: folder {path} does not exist; set {key}=path/to/model_folder")
        if not any((folder / c).is_file() for c in configs):
            raise SampleConfigError(
                f"{key}: {path} is not a diffusers model folder (no {' or '.join(configs)}); "
                "point it at a folder written by save_pretrained"
            )


def resolve_scheduler(name: str) -> Any:
    """"dpmsolver++" / "prior" as GCFGPipeline.from_prior takes them, or a diffusers scheduler class."""
    if name in BUILTIN_SCHEDULERS:
        return name
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise SampleConfigError(
            f"sampling.scheduler={name!r} is not a diffusers scheduler; use dpmsolver++, prior, "
            "or a class name such as EulerDiscreteScheduler or DDIMScheduler"
        )
    return cls


def scheduler_for(scheduler: Any, prior) -> Any:
    """`resolve_scheduler`'s result as `GCFGPipeline.from_prior` takes it for `prior`: a diffusers
    class becomes an instance with the prior's schedule (betas, prediction type, timestep spacing)."""
    return scheduler.from_config(prior.scheduler.config) if isinstance(scheduler, type) else scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise SampleConfigError(f"device={name!r} is not a torch device; use auto, cpu or cuda[:N]") from err


def sampling_precision(dtype_name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for sampling on `device` (``prior.dtype``; auto: `auto_dtype`), with TF32
    matmuls and convolutions turned on for CUDA (what stays fp32 there runs on tensor cores too)."""
    try:
        dtype = resolve_dtype(dtype_name, device)
    except ValueError as err:
        raise SampleConfigError(f"prior.dtype: {err}") from None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dtype


def check_sampling(cfg: DictConfig) -> None:
    for key in ("num_images", "batch_size", "steps"):
        value = cfg.sampling[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SampleConfigError(f"sampling.{key} must be a positive integer, got {value!r}")
    for key in ("height", "width"):
        value = cfg.sampling[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
            raise SampleConfigError(f"sampling.{key} must be null or a positive multiple of 8 (e.g. 512), got {value!r}")


# --- models ----------------------------------------------------------------------------------
def load_unet_checkpoint(path: str, dtype: torch.dtype, prior: str | None = None, where: str = "checkpoint",
                         allow_download: bool = False):
    """A diffusers folder, or a single-file .safetensors checkpoint read with the prior's UNet config;
    a hub id (or the prior's config) from the local Hugging Face cache only, unless `allow_download`."""
    from diffusers import UNet2DConditionModel

    if Path(path).expanduser().is_file():
        try:
            return load_single_file_unet(path, prior, dtype, where=where, allow_download=allow_download)
        except SingleFileError as err:
            raise SampleConfigError(str(err)) from None
    subfolder = "unet" if (Path(path).expanduser() / "unet").is_dir() else None
    return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype,
                                                local_files_only=not allow_download)




def report_unused(spec: GuidanceSpec, cfg: DictConfig) -> set[str]:
    """Say which configured denoisers a weight of 0 leaves out (they are not loaded) and, when no
    term is left, that the images are the unconditional prediction; returns the denoisers in use."""
    used = denoisers_in_use(spec)
    zero = spec.zero_weight_terms
    unused = sorted(set(configured_denoisers(cfg)) - used)
    if zero:
        log.warning("guidance term(s) %s have weight 0 and are left out%s", ", ".join(zero),
                    f"; not loaded: {', '.join(unused)} (no term with a nonzero weight uses it)" if unused else "")
    elif unused:
        log.warning("configured but used by no guidance term, so not loaded: denoiser(s) %s; pick a guidance preset "
                    "that uses them (e.g. guidance=concept_control for concept.path) or add a term with "
                    "+guidance.terms.NAME='{denoiser: NAME, weight: 1.0}'", ", ".join(unused))
    if not spec.without_zero_weights().terms:
        u = spec.unconditional
        log.warning("every guidance term has weight 0: the images are the unconditional prediction alone "
                    "(denoiser %s, prompt %r), not guided by anything", u.denoiser, u.condition.prompt or "")
    return used


def load_pipeline(cfg: DictConfig, scheduler: Any, dtype: torch.dtype, device: torch.device,
                  used: set[str] | None = None) -> GCFGPipeline:
    """The prior and every configured denoiser in `used` (None: all of them)."""
    def wanted(name: str) -> bool:
        return used is None or name in used

    download = bool(cfg.prior.allow_download)
    prior = load_prior(cfg.prior.path, dtype=dtype, family=cfg.prior.get("family"), allow_download=download)
    controlnet = None
    if cfg.controlnet.path and wanted("controlnet"):
        controlnet = load_controlnet(cfg.controlnet.path, dtype=dtype, allow_download=download)
    concept_unet = None
    if cfg.concept.path and wanted("concept"):
        # Only sampling with a concept model needs the null-text UNet code.
        from ccp.models.null_text_unet import NullTextFeaturesMissingError, NullTextUNet2DConditionModel

        try:
            folder = concept_folder(str(cfg.concept.path)) if looks_like_path(str(cfg.concept.path)) else cfg.concept.path
            concept_unet = NullTextUNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype,
                                                                        local_files_only=not download)
        except NullTextFeaturesMissingError as err:
            raise SampleConfigError(f"concept.path: {err}") from None
    pipe = GCFGPipeline.from_prior(prior, concept_unet=concept_unet, controlnet=controlnet,
                                   scheduler=scheduler_for(scheduler, prior))
    for name, path in (cfg.denoiser_checkpoints or {}).items():
        if not wanted(str(name)):
            continue
        pipe.add_denoiser(str(name), load_unet_checkpoint(str(path), dtype, str(cfg.prior.path),
                                                          where=f"denoiser_checkpoints.{name}", allow_download=download))
    for name, paths in (cfg.get("controlnets") or {}).items():
        if not wanted(str(name)):
            continue
        if OmegaConf.is_list(paths):
            from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

            net = MultiControlNetModel([load_controlnet(str(p), dtype=dtype, allow_download=download) for p in paths])
        else:
            net = load_controlnet(str(paths), dtype=dtype, allow_download=download)
        pipe.add_denoiser(str(name), pipe.unet, controlnet=net.to(prior.device))
    for name, path in (cfg.get("loras") or {}).items():
        from ccp.priors.lora import LoRAShapeError

        if not wanted(str(name)):
            continue
        try:
            pipe.add_lora_denoiser(str(name), str(path))
        except LoRAShapeError as err:
            raise SampleConfigError(f"loras.{name}: {err}") from None
    pipe = pipe.to(device)  # every denoiser is a pipeline component, the extra ones too
    pipe.set_progress_bar_config(desc="steps", leave=False)
    return pipe


class _FirstOccurrence(logging.Filter):
    """Drops repeats: the pipeline encodes (and warns about) the prompts again for every batch."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextmanager
def _once_per_run(logger: logging.Logger):
    dedupe = _FirstOccurrence()
    logger.addFilter(dedupe)
    try:
        yield
    finally:
        logger.removeFilter(dedupe)


def save_grid(images: list[PIL.Image.Image], path: Path) -> None:
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import make_grid

    columns = math.ceil(math.sqrt(len(images)))
    grid = make_grid(torch.stack([pil_to_tensor(im) for im in images]), nrow=columns, padding=2, pad_value=255)
    to_pil_image(grid).save(path)


# --- the run ---------------------------------------------------------------------------------
def run_sampling(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Validate `cfg`, load the denoisers it names, sample, and write the outputs into `out_dir`."""
    cfg = with_output_dir(cfg, out_dir)
    check_required(cfg)
    check_sampling(cfg)
    spec = build_guidance(cfg)
    init_image, mask_image = load_init_images(cfg)
    check_model_folders(cfg)
    scheduler = resolve_scheduler(cfg.sampling.scheduler)
    device = resolve_device(str(cfg.device))
    dtype = sampling_precision(str(cfg.prior.dtype), device)

    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    used = report_unused(spec, cfg)
    log.info("loading %s on %s", cfg.prior.path, device)
    pipe = load_pipeline(cfg, scheduler, dtype, device, used)
    images_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    s = cfg.sampling
    grid_images: list[PIL.Image.Image] = []
    init = {} if init_image is None else dict(image=init_image, mask_image=mask_image, strength=float(cfg.init.strength))
    batches = sample_batches(pipe, spec, range(s.num_images), seed=s.seed, batch_size=s.batch_size,
                             num_inference_steps=s.steps, height=s.height, width=s.width, eta=s.eta, **init)
    with _once_per_run(logging.getLogger("ccp.pipelines.gcfg")):
        for indices, images in tqdm(batches, total=math.ceil(s.num_images / s.batch_size), desc="batches",
                                    unit="batch", disable=s.num_images <= s.batch_size):
            for i, image in zip(indices, images):
                image.save(images_dir / f"{i:05d}.png")
            grid_images += images[: max(0, cfg.output.grid_max_images - len(grid_images))]
    if grid_images:
        save_grid(grid_images, out_dir / "grid.png")
    log.info("wrote %d images to %s", s.num_images, out_dir)
    return out_dir
