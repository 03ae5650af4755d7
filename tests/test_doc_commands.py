"""The README and docs/ are executable: every shell block runs as written against stand-ins
(`tests/doc_commands.py` says which, and lists every change a CPU needs in one table), or says on
the line before its fence why the CI cannot run it.

`make test` checks the markers and the rewriting (fast); `make test-docs` (CI runs it after
`make test`) runs the blocks, in file order, in one working folder."""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import PIL.Image
import pytest

from doc_commands import REPO, SHRINK, Block, logical_lines, script, shell_blocks, shrink, split_comment

BLOCKS = shell_blocks()


def test_every_shell_block_runs_or_says_why_it_cannot():
    assert BLOCKS, "no shell blocks found"
    for block in BLOCKS:
        if block.skip is not None:
            assert len(block.skip) >= 10, f"{block.name}: say why the CI cannot run this block"
    run = [b for b in BLOCKS if b.skip is None or b.skip_prefix]
    # the README's own first block (setup, the main job) and its real-model path are among those run
    assert any(b.path == "README.md" and "make demo" in b.body for b in run)
    assert any(b.path == "README.md" and "ccp-train experiment=table1 dataset=face method=ours" in b.body for b in run)


def test_a_new_unmarked_block_is_run_and_a_marker_needs_a_reason(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n```bash\nccp-train experiment=x\n```\n\n<!-- not run in CI: needs a SLURM cluster -->\n"
                   "```sh\nsbatch job.sh\n```\n\n```python\nprint(1)\n```\n\n"
                   '<!-- not run in CI: "make test": the suite itself -->\n```bash\nmake setup\nmake test\n```\n')
    blocks = shell_blocks([doc])
    assert [(b.line, b.lang, b.skip, b.skip_prefix) for b in blocks] == [
        (3, "bash", None, None), (8, "sh", "needs a SLURM cluster", None), (17, "bash", "the suite itself", "make test")]
    assert "make test" not in script(blocks[2]) and "Makefile VENV=" in script(blocks[2])


def test_commands_get_the_cpu_overrides_after_their_own():
    line = 'ccp-sample prior.path=sd-v1-5 guidance.terms.control.prompt="wearing sunglasses" sampling.steps=100  # GCFG'
    shrunk = shrink(line)
    command, comment = split_comment(shrunk)
    assert comment == "# GCFG"
    assert command.startswith('ccp-sample prior.path=sd-v1-5 guidance.terms.control.prompt="wearing sunglasses" '
                              "sampling.steps=100 ")
    assert command.endswith(" ".join(SHRINK["ccp-sample"]))  # appended: the last sampling.steps wins
    assert shrink("  ccp-eval metric=fid fid.shard_dir=out/${run#face_}").endswith(" ".join(SHRINK["ccp-eval"]))
    assert "range(1.0,1.5,0.25)" in shrink("ccp-eval -m guidance.control_weight='range(1.0,7.75,0.25)'")
    make = shrink("make reproduce-tables SCALE=full")
    assert make.startswith(f"make -f {REPO / 'Makefile'} VENV={REPO / '.venv'} -o ") and "SCALE=full" in make
    assert "'ARGS=device=cpu" in make
    assert shrink("ccp-null-text sd-v1-5 concept-init") == "ccp-null-text sd-v1-5 concept-init"
    assert logical_lines("a \\\n  b\nc") == ["a    b", "c"]


# --- running them ---------------------------------------------------------------------------------
def _env(workdir) -> dict[str, str]:
    """A user's shell: ccp's commands on PATH, offline, the torch hub cache in the working folder."""
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "TORCH_HOME": str(workdir / "torch-home"), "CCP_CACHE_DIR": str(workdir / "cache")}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _images(folder, n, size=64, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        PIL.Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the blocks run in, with the stand-ins at the paths the docs name."""
    from stand_ins import write_stand_in_clip, write_stand_in_inception

    from ccp.priors.tiny import build_tiny_controlnet, save_tiny_prior

    root = tmp_path_factory.mktemp("docs")
    save_tiny_prior(root / "sd-v1-5", seed=0, with_controlnet=True)
    save_tiny_prior(root / "sdxl-base", seed=0, family="sdxl")
    for name, seed in (("sd-controlnet-canny", 1), ("sd-controlnet-depth", 2)):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(root / "sd-v1-5" / "unet")
        build_tiny_controlnet(unet, seed=seed).save_pretrained(root / name)
    for name, seed in (("ffhq", 0), ("afhqv2", 1), ("celeba_hq", 2)):
        _images(root / "data" / name, 8, seed=seed)
    for name, seed in (("photo", 3), ("edges", 4), ("depth", 5)):
        _images(root / "tmp", 1, seed=seed)
        (root / "tmp" / "00.png").rename(root / f"{name}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    PIL.Image.fromarray(mask).save(root / "mask.png")
    write_stand_in_inception(root / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    # where FID looks when fid.inception_weights is not given (the README's study command)
    write_stand_in_inception(root / "torch-home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    write_stand_in_clip(root / "checkpoints" / "clip" / "ViT-L-14.pt")
    return root


@pytest.mark.docs
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip is None or b.skip_prefix], ids=lambda b: b.name)
def test_block_runs_as_written(block: Block, workdir):
    start = time.monotonic()
    done = subprocess.run(["bash", "-c", script(block)], cwd=workdir, env=_env(workdir), capture_output=True, text=True)
    seconds = time.monotonic() - start
    print(f"{block.name}: {seconds:.0f} s")
    assert done.returncode == 0, f"{block.name} failed after {seconds:.0f} s:\n{done.stderr[-6000:]}"


# --- the rest of the full recipe: what a lab does after the documented commands ran -------------------
def _run(command: str, workdir, expect_ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{command}"], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True)
    if expect_ok:
        assert done.returncode == 0, f"{command}\n{done.stderr[-6000:]}"
    return done


def _vote_as_raters(workdir) -> int:
    """Every invited rater of a small table1 study answers every pair (ours, when ours is shown)."""
    import re

    from fastapi.testclient import TestClient

    from ccp.config import compose
    from ccp.study.app import create_app
    from ccp.study.run import prepare

    cfg = compose("study", ["study=table1", f"samples={workdir / 'outputs' / 'study_samples'}",
                            f"db={workdir / 'outputs' / 'study' / 'table1' / 'study.sqlite'}", "study.raters=3",
                            "study.pairs_per_rater=8", "study.attention_checks=1"])
    state = prepare(cfg)
    client = TestClient(create_app(state["db"], state["design"].question), follow_redirects=False)
    votes = 0
    for invite in state["invites"]:
        while True:
            page = client.get(f"/r/{invite.token}")
            found = re.search(r'name="pair_id" value="(\d+)"', page.text)
            if not found:
                break
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text).group(1)
            client.post(f"/r/{invite.token}/vote", data={"pair_id": found.group(1), "csrf": csrf, "choice": "left"})
            votes += 1
    return votes


@pytest.mark.docs
@pytest.mark.timeout(1800)
def test_full_recipe_goes_on_to_the_pref_column_the_dashboard_and_the_launchers(workdir):
    """After the documented blocks (README's trainings, docs/evaluation.md's `ccp-train -m` of the ten
    table1 rows and `make reproduce-tables SCALE=full`, docs/study.md's kept FID samples): the tables
    and figures are there, raters vote, `ccp-study analyze` fills Table 1's Pref. column in a rerun
    that reuses every finished cell, `ccp-dashboard` writes its spec, and `ccp-launch` renders every
    job with the weight files it needs (and refuses one without them). Sizes: `SHRINK`."""
    import json

    results = workdir / "results"  # scale=full's results_dir, beside the commands (docs/evaluation.md)
    table1, table2 = (results / "table1.md").read_text(), (results / "table2.md").read_text()
    for label in ("Textual Inversion", "DreamBooth", "Custom Diffusion", "OFT", "Ours"):
        assert label in table1 and label in table2
    assert "KID" in table1 and "STAND-IN" in table1.upper()  # stand-in weights: labelled, numbers mean nothing
    assert {"fig8a_weight_grid.png", "fig8b_rectification.png", "fig9_fidelity_controllability.png"} <= \
        {p.name for p in results.glob("fig*.png")}

    assert _vote_as_raters(workdir) > 0
    _run("ccp-study analyze study=table1", workdir)
    analysis = workdir / "outputs" / "study" / "table1" / "analysis.json"
    assert json.loads(analysis.read_text())["pref"]
    before = (results / "table1.md").stat().st_mtime
    _run(shrink(f"ccp-reproduce scale=full +preference.face={analysis}"), workdir)
    assert (results / "table1.md").stat().st_mtime > before
    assert "Face Pref.: ours preferred (%)" in (results / "table1.md").read_text()
    summary = json.loads((results / "reproduce_summary.json").read_text())
    assert not summary.get("trained"), "the rerun trained again instead of reusing the exports"

    _run("ccp-dashboard", workdir)
    spec = json.loads((workdir / "outputs" / "dashboard" / "report.json").read_text())
    assert "Table 1" in json.dumps(spec)

    inception = workdir / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    clip = workdir / "checkpoints" / "clip" / "ViT-L-14.pt"
    weights = {"fid": f"weights.inception={inception}", "text": f"weights.clip={clip}",
               "reproduce": f"weights.inception={inception} weights.clip={clip}"}
    for target in ("slurm", "vertex", "gke"):
        storage = "storage.output_dir=/shared/ccp/outputs" if target == "slurm" else \
            "storage.output_dir=gs://my-bucket/ccp/outputs storage.data_dir=gs://my-bucket/ccp/data"
        for job in ("train", "fid", "text", "reproduce"):
            extra = {"fid": "fid.run=face_ours", "text": "text.run=face_ours"}.get(job, "")
            out = workdir / "outputs" / "launch" / f"{target}_{job}"
            command = f"ccp-launch target={target} job={job} {storage} {extra} out_dir={out}"
            if target == "vertex":
                command += " target.project=my-project"
            if job in weights:
                refused = _run(shrink(command), workdir, expect_ok=False)
                assert refused.returncode != 0 and "weights." in refused.stderr, (target, job, refused.stderr[-500:])
                command += " " + weights[job]
            _run(shrink(command), workdir)
            rendered = "\n".join(p.read_text() for p in out.rglob("*") if p.is_file())
            for path in ([inception] if "inception" in weights.get(job, "") else []) + \
                        ([clip] if "clip" in weights.get(job, "") else []):
                assert path.name in rendered, (target, job, path.name)
