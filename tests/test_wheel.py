"""The Hydra configs ship inside the package, and the console scripts work from a non-editable install.

A wheel is built from a copy of the project (nothing is written into the repository) and must hold
``ccp/conf``. It is then installed, without its dependencies and without the network, into a fresh
virtual environment that sees the outer environment's third-party packages but not its editable
``ccp``; ``ccp-tiny-prior``, ``ccp-sample`` and ``ccp-train`` then run from a folder outside the
repository, so they can only find their configs through the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cmd` in `cwd`; a non-zero exit fails the test with the tail of its stderr (and stdout)."""
    cmd = [str(c) for c in cmd]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {result.returncode}\n"
            f"--- stderr (tail) ---\n{result.stderr[-4000:]}\n--- stdout (tail) ---\n{result.stdout[-2000:]}"
        )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of pyproject.toml, README.md and ccp/ (so the repo stays untouched)."""
    root = tmp_path_factory.mktemp("wheel-build")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "ccp", src / "ccp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
        cwd=root)
    wheels = sorted(dist.glob("ccp-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("ccp/conf/train.yaml", "ccp/conf/sample.yaml", "ccp/conf/reproduce.yaml"):
        assert name in names, f"{name} missing from {wheel.name}"
    methods = [n for n in names if n.startswith("ccp/conf/method/") and n.endswith(".yaml")]
    assert methods, f"no ccp/conf/method/*.yaml in {wheel.name}"
    # Every config of the checkout ships (nested groups such as method_training/dreambooth_prior/ included).
    in_repo = {f"ccp/{p.relative_to(REPO / 'ccp').as_posix()}" for p in (REPO / "ccp" / "conf").rglob("*.yaml")}
    assert in_repo <= names, sorted(in_repo - names)


def test_console_scripts_run_from_a_non_editable_install(wheel, tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv-root") / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=venv.parent)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=venv.parent).stdout.strip())
    # The outer third-party packages, without processing the outer .pth files (so no editable ccp).
    (site / "outer-site-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the outer site-packages (now visible) holds the editable ccp's dist-info,
    # which pip would otherwise take for an installed ccp 0.1.0 and try (and refuse) to uninstall.
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
         "--disable-pip-version-check", wheel], cwd=venv.parent)

    work = tmp_path_factory.mktemp("outside-repo")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")

    out = run([python, "-c", "import ccp, ccp.config; print(ccp.__file__); print(ccp.config.CONF_DIR)"],
              cwd=work, env=env).stdout.split()
    ccp_file, conf_dir = Path(out[-2]).resolve(), Path(out[-1]).resolve()
    assert ccp_file == (site / "ccp" / "__init__.py").resolve(), ccp_file
    assert REPO not in ccp_file.parents
    assert conf_dir == (site / "ccp" / "conf").resolve() and (conf_dir / "train.yaml").is_file(), conf_dir

    run([bin_dir / "ccp-tiny-prior", "prior", "--with-controlnet"], cwd=work, env=env)
    assert (work / "prior" / "unet").is_dir()

    run([bin_dir / "ccp-sample", "prior.path=prior", "sampling.num_images=2", "sampling.batch_size=2",
         "sampling.steps=2", "device=cpu", "hydra.run.dir=sample_out"], cwd=work, env=env)
    for name in ("images/00000.png", "images/00001.png", "grid.png"):
        assert (work / "sample_out" / name).is_file(), name

    imgs = work / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(imgs / f"{i}.png")
    run([bin_dir / "ccp-train", "experiment=tiny/ours", "prior.path=prior", "data.path=imgs",
         "trainer.max_steps=2", "hydra.run.dir=train_out"], cwd=work, env=env)
    export = json.loads((work / "train_out" / "export" / "ccp_export.json").read_text())
    assert export["step"] == 2 and export["method"] == "ours", export
    assert (work / "train_out" / "checkpoints" / "last.ckpt").is_file()
