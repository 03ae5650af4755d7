"""Wrong input on the command line of a Hydra entry point: exit status 2 and one line
``<prog>: error: <problem>; <fix>`` on stderr, before anything loads (`ccp.config.check_command_line`).

The console-script tests run the entry points as a user does (``python -m ccp.cli.<x>``) with a prior
path that does not exist and a log folder of their own, so a run that loaded anything, or started
the job, would fail otherwise or leave its folder behind. The other cases call the check itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(entry: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", f"ccp.cli.{entry}", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, prog: str, *fragments: str) -> str:
    """Exit status 2 and one error line that holds every fragment, without a traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-3000:])
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def refusal(config_name: str, *argv: str) -> str:
    """The message `check_command_line` refuses `argv` with."""
    from ccp.config import ConfigError, check_command_line

    with pytest.raises(ConfigError) as refused:
        check_command_line(config_name, list(argv))
    message = str(refused.value)
    assert "\n" not in message, message
    return message


def accepts(config_name: str, *argv: str) -> None:
    from ccp.config import check_command_line

    check_command_line(config_name, list(argv))


@pytest.fixture
def user(tmp_path):
    """A working folder, a prior path that does not exist and a log folder not yet made."""
    return tmp_path, f"prior.path={tmp_path / 'no-prior'}", tmp_path / "logs"


# --- the console scripts -------------------------------------------------------------------------
def test_a_mistyped_key_is_refused_before_anything_loads_and_keys_that_code_reads_pass(user):
    cwd, prior, logs = user
    for typo in ("+trainer.max_step=3", "trainer.max_step=3"):
        result = run_cli("train", "experiment=tiny", "method=ours", prior, f"paths.log_dir={logs}", typo, cwd=cwd)
        assert_refused(result, "ccp-train", typo, "did you mean trainer.max_steps=3?")
    assert not logs.exists()  # no run folder: Hydra never started the job
    # the fix, with keys added that code reads: a setting read unset and a keyword of a `_target_`
    result = run_cli("train", "--cfg", "job", "experiment=tiny", "method=ours", prior, f"paths.log_dir={logs}",
                     "trainer.max_steps=3", "+logger.wandb.group=faces", "+callbacks.model_checkpoint.verbose=true",
                     cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f in result.stdout for f in ("max_steps: 3", "group: faces", "verbose: true"))


def test_an_earlier_experiment_name_runs_as_its_composition_and_says_so_once(user):
    cwd, prior, logs = user
    result = run_cli("train", "--cfg", "job", "experiment=table1_sdxl/animal_oft", prior, f"paths.log_dir={logs}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f in result.stdout for f in ("dataset_name: animal", "name: oft", "family: sdxl", "resolution: 1024"))
    notice = "experiment=table1_sdxl/animal_oft is written experiment=table1 dataset=animal method=oft prior=sdxl now"
    assert result.stderr.count(notice) == 1


def test_mistyped_group_choices_name_the_closest_and_list_the_options(user):
    cwd, prior, logs = user
    # an earlier experiment name, mistyped: the suggestion is what it is written now
    line = assert_refused(run_cli("train", "experiment=table1/face_our", prior, f"paths.log_dir={logs}", cwd=cwd),
                          "ccp-train", "did you mean experiment=table1 dataset=face method=ours?")
    assert "table1, tiny, toy, toy_controlnet, toy_prior" in line  # the options: recipes, composed with dataset, method, prior
    assert_refused(run_cli("reproduce", "scale=ful", f"paths.log_dir={logs}", cwd=cwd),
                   "ccp-reproduce", "did you mean scale=full?", "full, tiny, toy")
    assert_refused(run_cli("sample", "guidance=concpt", prior, f"paths.log_dir={logs}", cwd=cwd),
                   "ccp-sample", "did you mean guidance=concept?", "concept_control")
    assert not logs.exists()


def test_a_mistyped_guidance_term_is_refused_with_the_terms_of_the_preset(user):
    cwd, prior, logs = user
    result = run_cli("sample", "guidance=concept_control", "guidance.terms.concpt.weight=0", prior,
                     f"paths.log_dir={logs}", cwd=cwd)
    assert_refused(result, "ccp-sample", "guidance.terms has: concept, control",
                   "did you mean guidance.terms.concept.weight=0?")
    assert not logs.exists()


def test_an_unwritable_log_dir_names_the_key_to_change(user):
    cwd, prior, _ = user
    read_only = cwd / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        # root writes into a 0o555 folder anyway; nobody creates a folder under a file
        log_dir = cwd / "a-file" / "logs" if os.access(read_only, os.W_OK) else read_only / "logs"
        (cwd / "a-file").write_text("")
        result = run_cli("train", "experiment=tiny", prior, f"paths.log_dir={log_dir}", cwd=cwd)
        assert_refused(result, "ccp-train", f"paths.log_dir={log_dir}",
                       "set paths.log_dir to a folder you can write to")
        assert not log_dir.exists()
    finally:
        read_only.chmod(0o755)


def test_a_config_error_inside_the_job_exits_with_status_2(tmp_path):
    result = run_cli("launch", "target=slurm", "nodes=0", "dry_run=true", f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_refused(result, "ccp-launch", "nodes=0")


# --- the check itself ----------------------------------------------------------------------------
def test_every_entry_point_checks_its_own_config():
    assert "did you mean fid.num_samples=10?" in refusal("eval", "+fid.num_sample=10")
    assert "did you mean storage.output_dir=x?" in refusal("launch", "storage.output_dri=x")
    assert "did you mean title=x?" in refusal("dashboard", "titel=x")
    assert "study has no option nosuch" in refusal("study", "study=nosuch")
    assert "did you mean logger.wandb.mode=online?" in refusal("reproduce", "+logger.wandb.mod=online")


def test_sweeps_are_checked_at_every_choice_and_their_keys_at_the_first_value():
    assert "did you mean method=dreambooth?" in refusal("train", "-m", "method=ours,dreambooht")
    assert "did you mean trainer.max_steps=range(1,3)?" in refusal("train", "-m", "+trainer.max_step=range(1,3)")
    assert "did you mean guidance.terms.concept.weight=1,2?" in refusal(
        "sample", "-m", "guidance=concept_control,concept", "guidance.terms.concpt.weight=1,2")
    assert "did you mean prior=sd15?" in refusal("train", "prior=sd5")
    assert "did you mean ~trainer.max_steps?" in refusal("train", "~trainer.max_stps")


def test_keys_without_a_reader_are_refused_where_a_node_takes_no_new_keys():
    assert "logger.wandb takes no new keys" in refusal("train", "+logger.wandb.tags=[a]")
    assert "did you mean guidance.terms.concept.weight=2?" in refusal(
        "sample", "guidance=concept_control", "++guidance.terms.concept.wieght=2")
    assert "data.bold takes no new keys" in refusal("reproduce", "scale=toy", "+data.bold.foo=1")
    assert "add the entry with +loras.style=x.safetensors" in refusal("sample", "loras.style=x.safetensors")


def test_open_nodes_target_keywords_group_choices_and_hydra_flags_pass():
    accepts("train", "experiment=table1", "dataset=animal", "method=oft", "prior=sdxl",
            "+callbacks.model_checkpoint.save_weights_only=false")
    accepts("train", "+logger.wandb.group=faces", "hydra/launcher=basic", "hydra.job.chdir=false")
    accepts("sample", "+loras.style=s.safetensors", "+control_images.edges=e.png",
            "+guidance.terms.edges={denoiser: prior, weight: 2.0}", "guidance.terms.edges.weight=3")
    accepts("reproduce", "scale=toy", "+rows.long.method=dreambooth", "+exports.bold.ours=/x",
            "++prior.toy_settings={steps: 3}", "+train_settings.trainer.global_batch_size=4")
    accepts("launch", "target=gke", "+target.gpu_types.nvidia-b200.gpus=8")
    accepts("train", "--help", "+trainer.max_step=3")  # Hydra's own flags: Hydra answers
    accepts("train", "-m", "method=glob(*)", "trainer.max_steps=interval(1,3)")


def test_a_job_folder_under_a_file_names_the_key_it_comes_from(tmp_path):
    (tmp_path / "a-file").write_text("")
    under_file = tmp_path / "a-file" / "x"
    assert "paths.log_dir=" in refusal("sample", f"paths.log_dir={under_file}")
    assert "set hydra.run.dir to a folder" in refusal("train", f"hydra.run.dir={under_file}")
    assert "set hydra.sweep.dir to a folder" in refusal("eval", "-m", f"hydra.sweep.dir={under_file}")
    assert "set out_dir to a folder" in refusal("launch", f"out_dir={under_file}")
    accepts("train", "--cfg", "job", f"paths.log_dir={under_file}")  # shows the config, writes nothing
