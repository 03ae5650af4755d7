"""The paper's evaluation figures, drawn with matplotlib's Agg canvas (no display, no pyplot state).

* Fig. 9 (Appendix A): fidelity vs controllability, x = -ln(FID / 100), y = text-guided
  alignment, circle area proportional to the trainable parameters (`fidelity_control_scatter`);
  records aggregated over seeds (`ccp.evaluation.intervals`) get 95% error bars on both axes.
* Fig. 8a (§5.4): ours sampled on a grid of concept weight (rows) x control weight (columns),
  same seed in every cell (`sample_weight_grid`, `weight_grid_figure`); its ControlNet version
  puts the prior's canny ControlNet term in place of the text control term
  (`sample_spatial_weight_grid`, `spatial_weight_grid_figure`).
* Fig. 8b / Fig. 10 (§5.4, Appendix B): a baseline sampled with its own unconditional
  prediction vs the prior's (GCFG rectification: the same terms, only the unconditional source
  changes to ``Source("prior", Condition(prompt=""))``), same seeds (`rectified_guidance`,
  `sample_rectification`, `rectification_figure`).

Each image figure is written twice: ``<name>.png`` with axis labels (matplotlib) and
``<name>_grid.png``, the bare tiles at their exact pixel size (``tile + gap`` spacing), which is
what tests compare pixel by pixel.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ccp.evaluation.tables import METHOD_ORDER, PAPER, method_label, ordered_methods, row_labels
from ccp.guidance import Condition, GuidanceSpec, Source
from ccp.io import write_atomic
from ccp.methods.export import TrainedModel
from ccp.pipelines.sampling import sample_images

# Numeric #param of the paper's Table 1 (its "<1K" drawn as 1,000), for the reference points.
PAPER_PARAMS: dict[str, float] = {"textual_inversion": 1e3, "dreambooth": 859e6, "custom_diffusion": 44e6,
                                  "oft": 23e6, "ours": 859e6}
GAP = 4  # pixels between tiles in the bare grids


def _save_figure(fig: Figure, path: Path, dpi: int) -> tuple[int, int]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    write_atomic(path, lambda tmp: (fig.savefig(tmp, format="png", dpi=dpi), os.chmod(tmp, 0o644)))
    return int(round(fig.get_figwidth() * dpi)), int(round(fig.get_figheight() * dpi))


def _save_image(image: PIL.Image.Image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: (image.save(tmp, format="PNG"), os.chmod(tmp, 0o644)))


# --- Fig. 9 ------------------------------------------------------------------------------------
def fidelity(fid: float) -> float:
    """Fig. 9's x axis: -ln(FID / 100) (higher is better; FID 100 -> 0)."""
    if fid is None or not fid > 0:
        raise ValueError(f"FID must be positive to place a method on Fig. 9, got {fid!r}")
    return -math.log(float(fid) / 100.0)


@dataclass
class ScatterResult:
    path: Path
    size: tuple[int, int]  # (width, height) in pixels
    points: dict[str, tuple[float, float]]  # method -> (x, y) as plotted (read back from the artist)
    areas: dict[str, float]  # method -> marker area in points^2 as plotted
    paper_points: dict[str, tuple[float, float]]
    # method -> {"x": (low, high), "y": (low, high)} as drawn (read back from the error bar artists)
    errorbars: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    figure: Figure | None = None


def scatter_points(records: Sequence[Mapping[str, Any]], dataset: str = "face") -> dict[str, tuple[float, float, float]]:
    """method -> (x = -ln(FID/100), y = text alignment, #params) for the records of `dataset`
    that have all three."""
    out = {}
    for r in records:
        if r.get("dataset") != dataset:
            continue
        if r.get("fid") is None or r.get("text_alignment") is None or r.get("params") is None:
            continue
        out[r["method"]] = (fidelity(r["fid"]), float(r["text_alignment"]), float(r["params"]))
    # the tables' row order: a variant row (DreamBooth (long)) next to its method
    return {m: out[m] for m in ordered_methods(r for r in records if r["method"] in out)}


def scatter_intervals(records: Sequence[Mapping[str, Any]], dataset: str = "face"
                      ) -> dict[str, dict[str, tuple[float, float, float]]]:
    """For records aggregated over seeds (with ``per_seed`` values): method -> {"x": (mean, low,
    high), "y": (mean, low, high)}, each the 95% Student t interval over seeds. x is taken per seed,
    -ln(FID_s / 100), then averaged (an interval of FID itself may reach below 0, where the axis
    has no value); y is the text alignment. Empty for single-run records or a single seed."""
    from ccp.evaluation.intervals import t_interval

    out = {}
    for r in records:
        values = r.get("per_seed") or {}
        if r.get("dataset") != dataset or "fid" not in values or "text_alignment" not in values:
            continue
        x = t_interval(fidelity(v) for v in values["fid"].values())
        y = t_interval(values["text_alignment"].values())
        if x.low is None or y.low is None:
            continue
        out[r["method"]] = {"x": (x.mean, x.low, x.high), "y": (y.mean, y.low, y.high)}
    return out


def marker_areas(params: Sequence[float], max_area: float = 2000.0, min_area: float = 12.0) -> list[float]:
    """Marker areas (points^2) proportional to #params, the largest `max_area`; `min_area` is a
    floor so that a <1K-parameter method stays visible next to 859M ones."""
    top = max(params) if params else 1.0
    return [max(min_area, max_area * p / top) if top > 0 else min_area for p in params]


def fidelity_control_scatter(records: Sequence[Mapping[str, Any]], out_path: str | Path, dataset: str = "face",
                             show_paper: bool = True, title: str | None = None, dpi: int = 100,
                             figsize: tuple[float, float] = (6.4, 4.8)) -> ScatterResult:
    """Fig. 9: one filled circle per measured method; with `show_paper`, the paper's Table 1/2
    numbers as hollow circles (same area rule, the paper's parameter counts)."""
    points = scatter_points(records, dataset)
    labels = row_labels(records)
    if not points:
        raise ValueError(f"no record of dataset {dataset!r} has fid, text_alignment and params")
    spans = scatter_intervals(records, dataset)
    for m, span in spans.items():  # over seeds: the point is the mean of the per-seed x
        points[m] = (span["x"][0], span["y"][0], points[m][2])
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    names = list(points)
    xs = [points[m][0] for m in names]
    ys = [points[m][1] for m in names]
    areas = marker_areas([points[m][2] for m in names])
    measured = ax.scatter(xs, ys, s=areas, alpha=0.6, c=[f"C{i}" for i in range(len(names))], edgecolors="k",
                          label="this run" if not spans else "mean over seeds, 95% interval")
    bars: dict[str, Any] = {}
    for i, m in enumerate(names):
        if m in spans:
            (x, xlo, xhi), (y, ylo, yhi) = spans[m]["x"], spans[m]["y"]
            bars[m] = ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt="none",
                                  ecolor=f"C{i}", elinewidth=1.2, capsize=3)
    for i, (m, x, y) in enumerate(zip(names, xs, ys)):  # labels staggered: tiny-scale points overlap
        ax.annotate(labels[m], (x, y), textcoords="offset points", xytext=(8, 22 - 11 * i), fontsize=9,
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"})  # which point a staggered label names
    paper_points: dict[str, tuple[float, float]] = {}
    pnames = [m for m in METHOD_ORDER if m in PAPER and dataset in PAPER[m].fid]  # none for toy datasets
    if show_paper and pnames:
        for m in pnames:
            paper_points[m] = (fidelity(PAPER[m].fid[dataset]), PAPER[m].text_alignment)
        ax.scatter([paper_points[m][0] for m in pnames], [paper_points[m][1] for m in pnames],
                   s=marker_areas([PAPER_PARAMS[m] for m in pnames]), facecolors="none", edgecolors="grey",
                   linestyles="--", label="paper (Tables 1-2)")
        for m in pnames:
            ax.annotate(f"{method_label(m)} (paper)", paper_points[m], textcoords="offset points", xytext=(6, -12),
                        fontsize=7, color="grey")
    ax.set_xlabel("fidelity: -ln(FID / 100)")
    ax.set_ylabel("controllability: text-guided alignment")
    ax.set_title(title or f"Fig. 9: fidelity vs controllability ({dataset}); area ∝ #params"
                 + ("\nerror bars: 95% Student t interval over seeds" if spans else ""), fontsize=10)
    legend = ax.legend(loc="best", fontsize=8)
    for handle in legend.legend_handles:
        handle.set_sizes([40])
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    size = _save_figure(fig, Path(out_path), dpi)
    plotted = np.asarray(measured.get_offsets(), dtype=np.float64)
    errorbars = {}
    for m, container in bars.items():
        xbar, ybar = container.lines[2]  # (x LineCollection, y LineCollection)
        (x0, _), (x1, _) = xbar.get_segments()[0]
        (_, y0), (_, y1) = ybar.get_segments()[0]
        errorbars[m] = {"x": (float(min(x0, x1)), float(max(x0, x1))), "y": (float(min(y0, y1)), float(max(y0, y1)))}
    return ScatterResult(
        path=Path(out_path),
        size=size,
        points={m: (float(plotted[i, 0]), float(plotted[i, 1])) for i, m in enumerate(names)},
        areas={m: float(a) for m, a in zip(names, measured.get_sizes())},
        paper_points=paper_points,
        errorbars=errorbars,
        figure=fig,
    )


# --- image grids ---------------------------------------------------------------------------------
@dataclass
class GridResult:
    path: Path  # labelled figure
    grid_path: Path  # bare tiles
    rows: int
    cols: int
    tile: tuple[int, int]  # (width, height) of one image
    grid_size: tuple[int, int]  # (width, height) of the bare grid
    size: tuple[int, int]  # (width, height) of the labelled figure


def tile_grid(images: Sequence[Sequence[PIL.Image.Image]], gap: int = GAP, background: int = 255) -> PIL.Image.Image:
    """Rows of equally sized images -> one image; tile (r, c) at (c * (w + gap), r * (h + gap))."""
    rows, cols = len(images), len(images[0])
    if any(len(row) != cols for row in images):
        raise ValueError("every row of the grid needs the same number of images")
    w, h = images[0][0].size
    grid = PIL.Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), (background,) * 3)
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            if image.size != (w, h):
                raise ValueError(f"image ({r}, {c}) is {image.size}, expected {(w, h)}")
            grid.paste(image.convert("RGB"), (c * (w + gap), r * (h + gap)))
    return grid


def grid_figure(images: Sequence[Sequence[PIL.Image.Image]], out_path: str | Path, row_labels: Sequence[str],
                col_labels: Sequence[str], ylabel: str, xlabel: str, title: str, col_groups: Sequence[str] = (),
                dpi: int = 100, cell_inches: float = 1.6) -> GridResult:
    """Write ``<out_path>`` (labelled) and ``<stem>_grid.png`` (bare tiles) for a grid of images."""
    out_path = Path(out_path)
    rows, cols = len(images), len(images[0])
    grid = tile_grid(images)
    grid_path = out_path.with_name(f"{out_path.stem}_grid.png")
    _save_image(grid, grid_path)

    fig = Figure(figsize=(1.4 + cols * cell_inches, 1.2 + rows * cell_inches + (0.3 if col_groups else 0)))
    ax = fig.add_axes((1.2 / fig.get_figwidth(), 0.5 / fig.get_figheight(),
                       cols * cell_inches / fig.get_figwidth(), rows * cell_inches / fig.get_figheight()))
    ax.imshow(np.asarray(grid), interpolation="nearest")
    w, h = images[0][0].size
    ax.set_xticks([c * (w + GAP) + w / 2 for c in range(cols)], list(col_labels), fontsize=8)
    ax.set_yticks([r * (h + GAP) + h / 2 for r in range(rows)], list(row_labels), fontsize=8)
    ax.tick_params(length=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if col_groups:
        span = cols // len(col_groups)
        for g, name in enumerate(col_groups):
            x = (g * span + span / 2) * (w + GAP)
            ax.text(x, -h * 0.12, name, ha="center", va="bottom", fontsize=9)
    fig.suptitle(title, fontsize=10)
    size = _save_figure(fig, out_path, dpi)
    return GridResult(out_path, grid_path, rows, cols, (w, h), grid.size, size)


def _sample(pipe: Any, spec: GuidanceSpec, seeds: Sequence[int], steps: int, height: int, width: int
            ) -> list[PIL.Image.Image]:
    # seed s of a figure = image s of seed 0: the noise diffusers gives for Generator().manual_seed(s)
    return sample_images(pipe, spec, seeds, seed=0, batch_size=max(1, len(seeds)), num_inference_steps=steps,
                         height=height, width=width)


# --- Fig. 8a -----------------------------------------------------------------------------------
def sample_weight_grid(model: TrainedModel, control_prompt: str, concept_weights: Sequence[float],
                       control_weights: Sequence[float],
                       seed: int = 0, steps: int = 100, height: int = 512, width: int = 512
                       ) -> list[list[PIL.Image.Image]]:
    """Fig. 8a's images: cell (i, j) = the method's guidance with concept weight
    `concept_weights[i]` and control weight `control_weights[j]`, every cell from seed `seed`."""
    grid = []
    for concept in concept_weights:
        row = []
        for control in control_weights:
            spec = model.guidance(control_prompt, float(concept), float(control))
            row += _sample(model.pipe, spec, [seed], steps, height, width)
        grid.append(row)
    return grid


def weight_grid_figure(images: Sequence[Sequence[PIL.Image.Image]], concept_weights: Sequence[float],
                       control_weights: Sequence[float], out_path: str | Path, control_prompt: str = "",
                       dpi: int = 100) -> GridResult:
    """Fig. 8a: concept weight on the vertical axis, control weight on the horizontal one."""
    if len(images) != len(concept_weights) or any(len(r) != len(control_weights) for r in images):
        raise ValueError("the grid must have one row per concept weight and one column per control weight")
    return grid_figure(images, out_path, [f"{w:g}" for w in concept_weights], [f"{w:g}" for w in control_weights],
                       ylabel="concept guidance weight", xlabel="control guidance weight",
                       title=f"Fig. 8a: decoupled guidance, control prompt {control_prompt!r}", dpi=dpi)


def sample_spatial_weight_grid(model: TrainedModel, controlnet: Any, condition_image: PIL.Image.Image,
                               concept_weights: Sequence[float], control_weights: Sequence[float], seed: int = 0,
                               steps: int = 100, height: int = 512, width: int = 512, control_prompt: str = "",
                               ) -> tuple[PIL.Image.Image, list[list[PIL.Image.Image]]]:
    """Fig. 8a's ControlNet version (the paper's Fig. 1 trade-off): cell (i, j) = ours' spatial
    guidance (Table 2's: concept term + the prior's ControlNet term on `condition_image`'s Canny
    edges) with concept weight `concept_weights[i]` and ControlNet-term weight `control_weights[j]`,
    every cell from seed `seed`. Returns the edge map the ControlNet sees and the grid."""
    from ccp.evaluation.alignment import SpatialAlignmentConfig, attach_controlnet, fit, spatial_guidance
    from ccp.evaluation.canny import canny_edges, edge_map_image

    edges = edge_map_image(canny_edges(fit(condition_image.convert("RGB"), width, height)))
    denoiser = attach_controlnet(model.pipe, model.denoiser, controlnet)
    takes_prompt = model.pipe.denoisers[model.denoiser].takes_prompt
    grid = []
    for concept in concept_weights:
        row = []
        for control in control_weights:
            config = SpatialAlignmentConfig(concept_weight=float(concept), control_weight=float(control),
                                            control_prompt=control_prompt)
            row += _sample(model.pipe, spatial_guidance(model, denoiser, edges, takes_prompt, config), [seed], steps,
                           height, width)
        grid.append(row)
    return edges, grid


def spatial_weight_grid_figure(edges: PIL.Image.Image, images: Sequence[Sequence[PIL.Image.Image]],
                               concept_weights: Sequence[float], control_weights: Sequence[float],
                               out_path: str | Path, dpi: int = 100) -> GridResult:
    """`sample_spatial_weight_grid`'s images, each row led by the edge map it follows."""
    if len(images) != len(concept_weights) or any(len(r) != len(control_weights) for r in images):
        raise ValueError("the grid must have one row per concept weight and one column per control weight")
    return grid_figure([[edges, *row] for row in images], out_path, [f"{w:g}" for w in concept_weights],
                       ["edges", *(f"{w:g}" for w in control_weights)], ylabel="concept guidance weight",
                       xlabel="ControlNet term weight",
                       title="Fig. 8a with a ControlNet: concept weight x the prior's ControlNet term", dpi=dpi)


# --- Fig. 8b / 10 ------------------------------------------------------------------------------
def rectified_guidance(spec: GuidanceSpec, prior: str = "prior") -> GuidanceSpec:
    """GCFG rectification (§5.4, Appendix B): the same terms and weights, but the unconditional
    prediction comes from the prior on the empty prompt instead of the customized model."""
    return replace(spec, unconditional=Source(prior, Condition(prompt="")))


def sample_rectification(model: TrainedModel, seeds: Sequence[int], control_prompt: str | None = None,
                         control_weight: float = 5.0,
                         steps: int = 100, height: int = 512, width: int = 512
                         ) -> tuple[list[PIL.Image.Image], list[PIL.Image.Image]]:
    """(own-unconditional images, prior-unconditional images) of one method, same seeds."""
    own = model.guidance(control_prompt, control_weight=control_weight)
    return (_sample(model.pipe, own, seeds, steps, height, width),
            _sample(model.pipe, rectified_guidance(own), seeds, steps, height, width))


def rectification_figure(samples: Mapping[str, tuple[Sequence[PIL.Image.Image], Sequence[PIL.Image.Image]]],
                         out_path: str | Path, seeds: Sequence[int] | None = None, dpi: int = 100,
                         labels: Mapping[str, str] | None = None) -> GridResult:
    """Fig. 8b/10: one row per method; left half its own unconditional (no GCFG), right half the
    prior's unconditional (GCFG), the same seed in column k of both halves. `labels`: row label
    per key of `samples` (default: the paper's method names)."""
    methods = list(samples)
    if not methods:
        raise ValueError("no methods to draw")
    n = len(samples[methods[0]][0])
    rows = []
    for m in methods:
        own, rect = samples[m]
        if len(own) != n or len(rect) != n:
            raise ValueError(f"{m}: expected {n} images in each half, got {len(own)} and {len(rect)}")
        rows.append(list(own) + list(rect))
    names = [(labels or {}).get(m) or method_label(m) for m in methods]
    columns = [f"seed {k}" for k in (seeds if seeds is not None else range(n))]
    return grid_figure(rows, out_path, names, columns + columns, ylabel="method",
                       xlabel="sample", title="Fig. 8b / 10: unconditional guidance rectification",
                       col_groups=("own unconditional (no GCFG)", "prior unconditional (GCFG)"), dpi=dpi)
