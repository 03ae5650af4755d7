"""ccp-launch renders SLURM, Vertex AI and GKE jobs offline (dry_run), checks bad input before submitting.

Every target is rendered for 2 nodes x 8 GPUs: world size 16, torchrun flags and the scheduler env they
read, restart policy, storage paths. GKE manifests are validated against the vendored JobSet CRD schema
(jsonschema) and their Job template against Kubernetes' batch/v1 Job schema (kubernetes-validate).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

from ccp.config import ConfigError, compose
from ccp.launch import LaunchConfigError, run_launch
from ccp.launch import gke, slurm, vertex
from ccp.launch.run import render_files
from ccp.launch.spec import spec_from_config

REPO = Path(__file__).resolve().parents[1]
BUCKET = "gs://test-bucket/ccp"
LOG_DIR = "/gcs/test-bucket/ccp/outputs"
SUBMITTERS = (slurm, vertex, gke)
INCEPTION = "weights-inception-2015-12-05-6726825d.pth"
# the weights in a bucket of their own: GKE must mount it too
WEIGHTS = ("weights.inception=gs://weights-bucket/ckpt/" + INCEPTION, "weights.clip=gs://weights-bucket/ckpt/ViT-L-14.pt")
INCEPTION_IN_CONTAINER = f"/gcs/weights-bucket/ckpt/{INCEPTION}"
CLIP_IN_CONTAINER = "/gcs/weights-bucket/ckpt/ViT-L-14.pt"


def config(tmp_path, target, *overrides):
    return compose("launch", [f"target={target}", "nodes=2", "gpus_per_node=8", f"out_dir={tmp_path / target}",
                              f"storage.output_dir={BUCKET}/outputs", f"storage.data_dir={BUCKET}/data",
                              "dry_run=true", *overrides])


@pytest.fixture
def no_submit(monkeypatch):
    calls = []
    for module in SUBMITTERS:
        monkeypatch.setattr(module, "submit", lambda spec, folder, m=module: calls.append(m.__name__))
    return calls


def torchrun_flags(script: str) -> dict[str, str]:
    line = next(x for x in script.splitlines() if "torchrun --" in x)
    words = shlex.split(line[line.index("torchrun --"):], posix=False)
    return dict(w[2:].split("=", 1) for w in words[1:] if w.startswith("--") and "=" in w)


def check_train_argv(argv):
    assert argv[0] == "ccp-train"
    assert {"trainer.num_nodes=2", "trainer.devices=8", f"paths.log_dir={LOG_DIR}",
            "paths.data_dir=/gcs/test-bucket/ccp/data"} <= set(argv)


# --- the three targets, 2 nodes x 8 GPUs ---------------------------------------------------------
def test_slurm_train(tmp_path, no_submit, capsys):
    spec = run_launch(config(tmp_path, "slurm"))
    assert no_submit == [] and "nothing submitted" in capsys.readouterr().out
    (job,) = spec.jobs
    assert job.world_size == 16
    check_train_argv(job.argv)
    script = (tmp_path / "slurm" / f"00_{job.name}.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gres=gpu:8" in script and "#SBATCH --partition=a3" in script
    assert "#SBATCH --requeue" in script and re.search(r"#SBATCH --signal=B:TERM@\d+", script)
    assert "trap forward_term TERM" in script and 'kill -TERM "$SRUN_PID"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "srun --nodes=2 --ntasks-per-node=1" in script
    assert "CCP_WORLD_SIZE=16" in script
    flags = torchrun_flags(script)
    assert flags["nnodes"] == "2" and flags["nproc_per_node"] == "8"
    assert flags["node_rank"] == '"$SLURM_NODEID"' and flags["master_addr"] == '"$MASTER_ADDR"'
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert f"paths.log_dir={LOG_DIR}" in script and f"mkdir -p {LOG_DIR}/train/face_ours" in script
    subprocess.run(["bash", "-n", str(tmp_path / "slurm" / f"00_{job.name}.sbatch")], check=True)
    subprocess.run(["bash", "-n", str(tmp_path / "slurm" / "submit.sh")], check=True)
    summary = json.loads((tmp_path / "slurm" / "launch.json").read_text())
    assert summary["world_size"] == 16 and summary["jobs"][0]["world_size"] == 16


def test_vertex_train(tmp_path, no_submit):
    spec = run_launch(config(tmp_path, "vertex"))
    assert no_submit == []
    (job,) = spec.jobs
    body = json.loads((tmp_path / "vertex" / f"00_{job.name}.json").read_text())
    pools = body["job_spec"]["worker_pool_specs"]
    assert [p["replica_count"] for p in pools] == [1, 1]  # chief + (nodes - 1) workers
    for pool in pools:
        assert pool["machine_spec"] == {"machine_type": "a3-highgpu-8g", "accelerator_type": "NVIDIA_H100_80GB",
                                        "accelerator_count": 8}
        env = {e["name"]: e["value"] for e in pool["container_spec"]["env"]}
        assert env["CCP_WORLD_SIZE"] == "16"
        assert pool["container_spec"]["command"][:2] == ["bash", "-c"]
    assert sum(p["replica_count"] * p["machine_spec"]["accelerator_count"] for p in pools) == 16
    assert body["job_spec"]["scheduling"] == {"strategy": "SPOT", "restart_job_on_worker_restart": True}
    assert body["job_spec"]["base_output_directory"]["output_uri_prefix"].startswith(f"{BUCKET}/outputs/")
    script = pools[0]["container_spec"]["command"][2]
    flags = torchrun_flags(script)
    assert flags["nnodes"] == "2" and flags["nproc_per_node"] == "8"
    assert flags["node_rank"] == '"${RANK:-0}"' and flags["master_addr"] == '"${MASTER_ADDR:-localhost}"'
    assert flags["master_port"] == '"${MASTER_PORT:-29500}"'
    check_train_argv(job.argv)
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_gke_train_validates_against_schemas(tmp_path, no_submit):
    spec = run_launch(config(tmp_path, "gke", "target.queue=team-a"))
    assert no_submit == []
    (job,) = spec.jobs
    manifest = yaml.safe_load((tmp_path / "gke" / f"00_{job.name}.yaml").read_text())
    assert manifest["kind"] == "JobSet" and manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert manifest["spec"]["network"]["enableDNSHostnames"] is True
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 10
    (rjob,) = manifest["spec"]["replicatedJobs"]
    job_spec = rjob["template"]["spec"]
    assert rjob["replicas"] == 1 and job_spec["completionMode"] == "Indexed"
    assert job_spec["parallelism"] == job_spec["completions"] == 2 and job_spec["backoffLimit"] == 0
    pod = job_spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] * job_spec["parallelism"] == 16
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                                   "cloud.google.com/gke-spot": "true"}
    assert {"name": "gcs-test-bucket", "mountPath": "/gcs/test-bucket"} in container["volumeMounts"]
    flags = torchrun_flags(container["command"][2])
    assert flags["nnodes"] == "2" and flags["nproc_per_node"] == "8"
    assert flags["node_rank"] == '"$JOB_COMPLETION_INDEX"'
    assert flags["master_addr"] == f"{job.name}-workers-0-0.{job.name}"
    check_train_argv(job.argv)

    import jsonschema
    import kubernetes_validate

    schema = json.loads((REPO / "gcp" / "schemas" / "jobset.x-k8s.io_jobsets.v1alpha2.json").read_text())
    jsonschema.validate(manifest, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**manifest, "spec": {**manifest["spec"], "failurePolicy": {"maxRestarts": "ten"}}}, schema)
    as_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job.name}, "spec": job_spec}
    kubernetes_validate.validate(as_job, "1.30", strict=True)


def test_fid_spreads_over_all_gpus_of_all_nodes(tmp_path, no_submit):
    spec = run_launch(config(tmp_path, "gke", "job=fid", "fid.run=animal_ours", "fid.dataset=afhqv2", *WEIGHTS))
    (job,) = spec.jobs
    assert job.world_size == 16 and job.argv[0] == "ccp-eval"
    assert {"metric=fid", "fid.num_samples=50000", f"export.path={LOG_DIR}/train/animal_ours/export",
            "fid.real_path=/gcs/test-bucket/ccp/data/afhqv2",
            f"fid.shard_dir={LOG_DIR}/eval/animal_ours_fid/fid_shards",
            f"fid.inception_weights={INCEPTION_IN_CONTAINER}"} <= set(job.argv)
    script = yaml.safe_load((tmp_path / "gke" / f"00_{job.name}.yaml").read_text())[
        "spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"][2]
    flags = torchrun_flags(script)
    assert flags["nnodes"] == "2" and flags["nproc_per_node"] == "8"  # ccp-eval joins torchrun's group
    assert "--no-python ccp-eval" in script
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_reproduce_is_trainings_then_evaluation(tmp_path, no_submit):
    spec = run_launch(config(tmp_path, "slurm", "job=reproduce", *WEIGHTS))
    *trainings, evaluate = spec.jobs
    assert len(trainings) == 10 and all(j.world_size == 16 and j.argv[0] == "ccp-train" for j in trainings)
    assert evaluate.argv[0] == "ccp-reproduce" and "scale=full" in evaluate.argv
    assert f"train_dir={LOG_DIR}/train" in evaluate.argv
    assert set(evaluate.after) == {j.name for j in trainings}
    submit = (tmp_path / "slurm" / "submit.sh").read_text()
    assert "--dependency=afterok:$JOB_0:$JOB_1" in submit and submit.count("sbatch --parsable") == 11


def test_vertex_without_sdk_names_the_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_google(name, *args, **kwargs):
        if name.startswith("google.cloud"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_google)
    with pytest.raises(LaunchConfigError, match="pip install google-cloud-aiplatform"):
        run_launch(config(tmp_path, "vertex", "dry_run=false"))


# --- model weights: the container has none ------------------------------------------------------
@pytest.mark.parametrize("target", ["slurm", "vertex", "gke"])
@pytest.mark.parametrize("job, given, key, names", [
    ("fid", (), "weights.inception", (INCEPTION, "torch-fidelity/releases")),
    ("text", (WEIGHTS[0],), "weights.clip", ("ViT-L-14.pt", "openaipublic.azureedge.net/clip/models/")),
    ("reproduce", (WEIGHTS[1],), "weights.inception", (INCEPTION, "torch-fidelity/releases")),
    ("reproduce", (WEIGHTS[0],), "weights.clip", ("ViT-L-14.pt", "openaipublic.azureedge.net/clip/models/")),
    ("train", ("eval.every_n_steps=1000",), "weights.inception", (INCEPTION,)),  # FID during training
])
def test_evaluation_without_its_weights_is_refused(tmp_path, no_submit, target, job, given, key, names):
    overrides = [f"job={job}", *given]
    if job == "train":
        overrides = ["job=train", "command='ccp-train experiment=table1/face_ours data.batch_size=2 "
                     + " ".join(given) + "'"]
    with pytest.raises(ConfigError) as err:
        run_launch(config(tmp_path, target, "dry_run=true", *overrides))
    message = str(err.value)
    assert "\n" not in message and f"{key}=gs://<bucket>/" in message, message
    for name in names:
        assert name in message, message
    assert no_submit == [] and not (tmp_path / target).exists()  # nothing rendered


def _rendered_text(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.iterdir()) if p.name != "launch.json")


@pytest.mark.parametrize("target", ["slurm", "vertex", "gke"])
@pytest.mark.parametrize("job, expected", [
    ("fid", [f"fid.inception_weights={INCEPTION_IN_CONTAINER}"]),
    ("text", [f"text.clip_weights={CLIP_IN_CONTAINER}"]),
    ("reproduce", [f"fid.inception_weights={INCEPTION_IN_CONTAINER}", f"text_alignment.clip_weights={CLIP_IN_CONTAINER}"]),
])
def test_weights_reach_the_rendered_job(tmp_path, no_submit, target, job, expected):
    spec = run_launch(config(tmp_path, target, f"job={job}", *WEIGHTS))
    evaluate = spec.jobs[-1]
    assert set(expected) <= set(evaluate.argv)
    i = len(spec.jobs) - 1
    path = tmp_path / target / {"slurm": f"{i:02d}_{evaluate.name}.sbatch", "vertex": f"{i:02d}_{evaluate.name}.json",
                                "gke": f"{i:02d}_{evaluate.name}.yaml"}[target]
    if target == "slurm":
        script = path.read_text()
    elif target == "vertex":
        script = json.loads(path.read_text())["job_spec"]["worker_pool_specs"][0]["container_spec"]["command"][2]
    else:
        manifest = yaml.safe_load(path.read_text())
        pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        script = pod["containers"][0]["command"][2]
        # the weights' bucket is mounted where the command reads it
        assert {"name": "gcs-weights-bucket", "mountPath": "/gcs/weights-bucket"} in pod["containers"][0]["volumeMounts"]
        assert {v["csi"]["volumeAttributes"]["bucketName"] for v in pod["volumes"] if "csi" in v} == {
            "test-bucket", "weights-bucket"}
    words = shlex.split(script[script.index("torchrun --"):].split("\n")[0].rstrip("'"))
    assert set(expected) <= set(words), script
    for other in spec.jobs[:-1]:  # the trainings of job=reproduce load no weights
        assert not any("weights=" in a for a in other.argv)


def test_weights_on_a_shared_filesystem_pass_unchanged(tmp_path, no_submit):
    spec = run_launch(config(tmp_path, "slurm", "job=fid", f"weights.inception=/shared/ckpt/{INCEPTION}"))
    assert f"fid.inception_weights=/shared/ckpt/{INCEPTION}" in spec.jobs[0].argv
    assert f"fid.inception_weights=/shared/ckpt/{INCEPTION}" in _rendered_text(tmp_path / "slurm")


def test_training_with_fid_gets_the_inception_weights(tmp_path, no_submit):
    spec = run_launch(config(tmp_path, "gke", "job=train", "command='ccp-train experiment=table1/face_ours "
                             "data.batch_size=2 eval.every_n_steps=1000'", *WEIGHTS))
    assert f"eval.inception_weights={INCEPTION_IN_CONTAINER}" in spec.jobs[0].argv


def test_text_runs_on_one_gpu(tmp_path, no_submit):
    """Text alignment is not split over ranks: more GPUs would repeat it."""
    spec = run_launch(config(tmp_path, "vertex", "job=text", "text.run=animal_ours", *WEIGHTS))
    (job,) = spec.jobs
    assert (job.nodes, job.nproc_per_node) == (1, 1) and job.argv[:2] == ("ccp-eval", "metric=text")
    assert f"export.path={LOG_DIR}/train/animal_ours/export" in job.argv
    (pool,) = json.loads((tmp_path / "vertex" / f"00_{job.name}.json").read_text())["job_spec"]["worker_pool_specs"]
    assert pool["machine_spec"]["accelerator_count"] == 1 and pool["machine_spec"]["machine_type"] == "a3-highgpu-1g"
    assert torchrun_flags(pool["container_spec"]["command"][2])["nproc_per_node"] == "1"


# --- bad input: raised before anything is rendered or submitted --------------------------------
@pytest.mark.parametrize("overrides, match", [
    (["nodes=0"], "nodes=0"),
    (["gpu_type=NVIDIA_TESLA_K80"], "not offered by target=vertex"),
    (["gpus_per_node=16"], "has 8 GPUs"),
    (["storage.output_dir=gs://"], "has no bucket"),
    (["storage.data_dir=gs:///data"], "has no bucket"),
    (["command='python train.py'"], "not a ccp entry point"),
    (["command='ccp-tiny-prior out'"], "not a ccp entry point"),
    (["command='ccp-train experiment=table1/face_ours'"], "not divisible"),   # 32 % (4 x 2 x 8)
    (["command='ccp-train experiment=table1/face_ours data.batch_size=2 trainer.devices=4'"], "launcher sets it"),
    (["job=fid", "fid.num_samples=oops"], "fid.num_samples"),
    (["job=fid", 'fid.overrides=["no_such_key=1"]'], "does not compose"),
    (["job=fid", f'fid.overrides=["fid.inception_weights=/gcs/b/{INCEPTION}"]'], "give the file as weights.inception"),
    (["job=text", *WEIGHTS, 'text.overrides=["text.clip_weights=/x/ViT-L-14.pt"]'], "give the file as weights.clip"),
    (["job=fid", f"weights.inception=checkpoints/{INCEPTION}"], "weights.inception=.* is relative"),
    (["job=fid", "weights.inception=gs://weights-bucket"], "names no file in a bucket"),
])
def test_bad_input_raises_before_submission(tmp_path, no_submit, overrides, match):
    cfg = config(tmp_path, "vertex", "dry_run=false", *overrides)
    with pytest.raises(LaunchConfigError, match=match) as err:
        run_launch(cfg)
    assert isinstance(err.value, ConfigError)
    assert no_submit == [] and not (tmp_path / "vertex").exists()


def test_submits_when_not_dry_run(tmp_path, no_submit):
    run_launch(config(tmp_path, "gke", "dry_run=false"))
    assert no_submit == ["ccp.launch.gke"]


def test_cli_dry_run(tmp_path):
    exe = shutil.which("ccp-launch") or str(Path(__import__("sys").executable).parent / "ccp-launch")
    out = subprocess.run([exe, "target=slurm", "dry_run=true", f"out_dir={tmp_path}"], capture_output=True,
                         text=True, cwd=tmp_path, check=True).stdout
    assert "nothing submitted" in out and sorted(p.name for p in tmp_path.iterdir())[-2:] == ["launch.json",
                                                                                           "submit.sh"]
    bad = subprocess.run([exe, "target=slurm", "nodes=0", f"out_dir={tmp_path}/bad"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("ccp-launch: error: nodes=0")


# --- committed examples and the Dockerfile ------------------------------------------------------
@pytest.mark.parametrize("target", ["slurm", "vertex", "gke"])
def test_committed_examples_are_current(tmp_path, target):
    """gcp/examples/<target> is `make gcp-examples` output (job=reproduce with the shipped defaults and the
    Makefile's GCP_EXAMPLES_ARGS)."""
    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")
    args = shlex.split(next(x for x in makefile.splitlines() if x.startswith("GCP_EXAMPLES_ARGS")).split(":=", 1)[1])
    cfg = compose("launch", [f"target={target}", "job=reproduce", *args, "dry_run=true", f"out_dir={tmp_path}"])
    files = render_files(spec_from_config(cfg))
    folder = REPO / "gcp" / "examples" / target
    committed = {p.name: p.read_text() for p in folder.iterdir()} if folder.exists() else {}
    stale = sorted(n for n in set(files) | set(committed) if n != "launch.json" and files.get(n) != committed.get(n))
    assert not stale, f"gcp/examples/{target} is stale ({stale}): run make gcp-examples"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_dockerfile_installs_with_the_constraints():
    text = (REPO / "gcp" / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"^ENTRYPOINT \[\"torchrun\"\]", text, re.M)
    installs = [line for line in text.splitlines() if re.search(r"pip install", line)]
    final = [line for line in installs if "ccp-*.whl" in line]
    assert len(final) == 1, installs
    copied = re.findall(r"^COPY\s+constraints\.txt\s+(\S+)", text, re.M)
    assert copied, "the Dockerfile must COPY constraints.txt"
    pins = _constraints()
    for line in installs:
        words = shlex.split(line.split("pip install", 1)[1].split("&&")[0])
        constraint = words[words.index("-c") + 1]
        assert Path(constraint).name == "constraints.txt" and constraint in copied + ["constraints.txt"], line
        for word in words:
            if "==" in word:
                name, version = word.split("==", 1)
                assert pins.get(re.sub(r"[-_.]+", "-", name).lower()) == version, f"{word} != constraints.txt"
    base = re.search(r"^ARG BASE=pytorch/pytorch:(\d+\.\d+\.\d+)-", text, re.M)
    assert base and base.group(1) == pins["torch"], "the base image's torch should match the torch pin"


# ccp config option -> the ccp check that imports the option's optional package (a ConfigError when it
# cannot). The extras an option needs are found by blocking each extra's packages and calling the check.
OPTION_CHECKS = {"optim.name": "ccp.training.optim:check_optimizer_name"}


def _flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}


def _pyproject_extras() -> dict[str, set[str]]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {extra: {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group(0)).lower() for r in reqs}
            for extra, reqs in extras.items()}


def _extras_needed(option: str, value) -> set[str]:
    """The extras (but `test`) without whose packages the option's check in ccp fails."""
    module, name = OPTION_CHECKS[option].split(":")
    check = getattr(importlib.import_module(module), name)
    check(value)  # with everything installed it passes: a failure below is the missing package
    modules = {}
    for module_name, dists in packages_distributions().items():
        for dist in dists:
            modules.setdefault(re.sub(r"[-_.]+", "-", dist).lower(), []).append(module_name)
    needed = set()
    for extra, dists in _pyproject_extras().items():
        if extra == "test":
            continue
        with pytest.MonkeyPatch.context() as mp:
            for dist in dists:
                for module_name in modules.get(dist, []):
                    mp.setitem(sys.modules, module_name, None)  # import -> ImportError
            try:
                check(value)
            except ConfigError:
                needed.add(extra)
    return needed


def _dockerfile_extras() -> set[str]:
    text = (REPO / "gcp" / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if "pip install" in x and "ccp-*.whl" in x]
    match = re.search(r"ccp-\*\.whl\)?\[([^\]]*)\]", line)
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def test_dockerfile_installs_every_extra_a_config_needs():
    """Presets and the experiments a launch runs: each option with an optional package needs its extra."""
    installed = _dockerfile_extras()
    assert installed <= set(_pyproject_extras()) - {"test"}, installed
    needs = {}
    groups = ("preset", "experiment", "dataset", "prior_training", "method_training")  # the global ones a run composes
    configs = [path for group in groups for path in (REPO / "ccp" / "conf" / group).rglob("*.yaml")]
    for path in sorted(configs):
        assert path.read_text().startswith("# @package _global_"), path  # keys below are global
        flat = _flatten(yaml.safe_load(path.read_text()) or {})
        for option in OPTION_CHECKS.keys() & flat.keys():
            if extras := _extras_needed(option, flat[option]):
                needs[str(path.relative_to(REPO))] = extras
    assert "memory" in needs.get("ccp/conf/preset/gpu_24gb.yaml", set())  # optim.name=adamw8bit: bitsandbytes
    missing = {config: sorted(extras - installed) for config, extras in needs.items() if extras - installed}
    assert not missing, f"gcp/Dockerfile must install ccp[{','.join(sorted(set().union(*needs.values())))}]: {missing}"

