"""The reproduction's figures: Fig. 9 from the records, Figs. 8a and 8b sampled from the cells'
models; an image figure is redrawn only when its exports or settings changed."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ccp.io import write_json_atomic
from ccp.reproduce.config import row_spec
from ccp.reproduce.records import Cell, weights_for


def draw_figures(cfg: DictConfig, records: list[dict], cells: dict[tuple[str, str], Cell], results_dir: Path,
                 controlnet=None) -> dict[str, Path]:
    """`controlnet`: the run's loader of its ControlNet (loaded once, shared with the spatial column)."""
    from ccp.evaluation.figures import (
        fidelity_control_scatter,
        rectification_figure,
        sample_rectification,
        sample_spatial_weight_grid,
        sample_weight_grid,
        spatial_weight_grid_figure,
        weight_grid_figure,
    )

    fig, s = cfg.figures, cfg.sampling
    out: dict[str, Path] = {}
    dataset = str(cfg.table2_dataset)
    if any(r["dataset"] == dataset and r.get("fid") and r.get("text_alignment") is not None for r in records):
        out["fig9"] = fidelity_control_scatter(records, results_dir / "fig9_fidelity_controllability.png", dataset).path

    def stamp_ok(name: str, settings: dict) -> bool:
        path = results_dir / f"{name}.json"
        settings = json.loads(json.dumps(settings))
        if path.is_file() and (results_dir / f"{name}.png").is_file() and json.loads(path.read_text()) == settings:
            return True
        return False

    grid = fig.weight_grid
    if grid.enabled and (grid.dataset, "ours") in cells:
        cell = cells[(grid.dataset, "ours")]
        settings = {"export": cell.stamp, "sampling": OmegaConf.to_container(s), "grid": OmegaConf.to_container(grid)}
        if not stamp_ok("fig8a_weight_grid", settings):
            images = sample_weight_grid(cell.model, str(grid.control_prompt), list(grid.concept_weights),
                                        list(grid.control_weights), int(grid.seed), int(s.steps), int(s.height),
                                        int(s.width))
            weight_grid_figure(images, list(grid.concept_weights), list(grid.control_weights),
                               results_dir / "fig8a_weight_grid.png", str(grid.control_prompt))
            write_json_atomic(results_dir / "fig8a_weight_grid.json", settings)
        out["fig8a"] = results_dir / "fig8a_weight_grid.png"

    spatial = fig.get("weight_grid_controlnet")
    if (spatial is not None and spatial.enabled and cfg.spatial_alignment.enabled and cfg.get("controlnet")
            and controlnet is not None and (spatial.dataset, "ours") in cells):  # its edge map is one of the spatial column's conditions
        from ccp.io import folder_stamp, list_image_files, load_rgb8

        cell = cells[(spatial.dataset, "ours")]
        condition = list_image_files(str(cfg.spatial_alignment.condition_dir))[int(spatial.condition)]
        settings = {"export": cell.stamp, "sampling": OmegaConf.to_container(s), "controlnet": folder_stamp(
            str(cfg.controlnet)), "condition": str(condition), "grid": OmegaConf.to_container(spatial)}
        if not stamp_ok("fig8a_weight_grid_controlnet", settings):
            edges, images = sample_spatial_weight_grid(
                cell.model, controlnet(), load_rgb8(condition),
                list(spatial.concept_weights), list(spatial.control_weights), int(spatial.seed), int(s.steps),
                int(s.height), int(s.width))
            spatial_weight_grid_figure(edges, images, list(spatial.concept_weights), list(spatial.control_weights),
                                       results_dir / "fig8a_weight_grid_controlnet.png")
            write_json_atomic(results_dir / "fig8a_weight_grid_controlnet.json", settings)
        out["fig8a_controlnet"] = results_dir / "fig8a_weight_grid_controlnet.png"

    rect = fig.rectification
    chosen = [m for m in rect.methods if (rect.dataset, m) in cells]
    if rect.enabled and chosen:
        settings = {"exports": {m: cells[(rect.dataset, m)].stamp for m in chosen},
                    "sampling": OmegaConf.to_container(s), "rect": OmegaConf.to_container(rect)}
        if not stamp_ok("fig8b_rectification", settings):
            samples = {}
            for m in chosen:
                samples[m] = sample_rectification(cells[(rect.dataset, m)].model, list(rect.seeds), rect.control_prompt,
                                                  weights_for(cfg, m)["control_weight"], int(s.steps), int(s.height),
                                                  int(s.width))
            labels = {m: str(row_spec(cfg, m).get("label") or m) for m in chosen if row_spec(cfg, m) is not None}
            rectification_figure(samples, results_dir / "fig8b_rectification.png", seeds=list(rect.seeds), labels=labels)
            write_json_atomic(results_dir / "fig8b_rectification.json", settings)
        out["fig8b"] = results_dir / "fig8b_rectification.png"
    return out
