"""Jobs submitted to a real Ray cluster with the job server (`ray start --head` + the
JobSubmissionClient that `ray job submit` uses), with the documented runtime_env: training joins
the cluster, a re-submitted job resumes, evaluate reads its model, storage on a local S3 server
with credentials passed in the runtime_env, and a job the cluster cannot hold fails with a clear
message instead of waiting forever."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from orchestrator import storage

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV = ROOT / "infra" / "runtime_env" / "cluster_image.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
JOB_DEADLINE_S = 900  # only against a hung cluster; nothing here is a timing assertion


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class JobCluster:
    """A `ray start --head` cluster on 127.0.0.1 with its own temp dir and ports, so that it
    neither joins nor disturbs any other Ray instance of the machine (in-process test clusters
    included: `ray stop` would kill those too, so teardown ends this cluster's processes only)."""

    def __init__(self, num_cpus: int = 2):
        # short: Ray's unix socket paths under the temp dir must fit in 107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="ucgm-rj-", dir="/tmp")
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = Path(sys.executable).parent
        # what a cluster node looks like: the project's environment first on PATH (as in its
        # image), no storage credentials (jobs bring their own), no address of another cluster
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
        environment.update(
            PATH=f"{bin_dir}{os.pathsep}{environment.get('PATH', '')}",
            # Ray 2.60 turns token authentication on when ~/.ray/auth_token exists; this cluster
            # listens on 127.0.0.1 only, and the client here must not depend on that file
            RAY_AUTH_MODE="disabled",
            # Ray's state API inside actors finds its cluster by address; with several clusters
            # on one machine (parallel test sessions) it would otherwise refuse to guess
            RAY_ADDRESS=f"127.0.0.1:{self.gcs_port}",
        )
        command = [
            str(bin_dir / "ray"), "start", "--head", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--num-cpus", str(num_cpus), "--temp-dir", self.temp_dir,
            *(arg for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                               "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
              for arg in (flag, str(_free_port()))),
        ]
        # its own session: every daemon `ray start` leaves behind shares this process group
        starter = subprocess.Popen(command, env=environment, cwd=self.temp_dir, start_new_session=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.process_group = starter.pid
        output, _ = starter.communicate(timeout=300)
        if starter.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{output[-3000:]}")

        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(self.dashboard)

    def submit(self, verb: str, spec: str, *overrides: str, env_vars: dict[str, str] | None = None, entrypoint: str | None = None) -> str:
        """Submit `python -m orchestrator <verb> <spec> <overrides>` as `ray job submit` would,
        with the documented runtime_env (working_dir = the repository)."""
        runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
        runtime_env["working_dir"] = str(ROOT)
        if env_vars:
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
        entrypoint = entrypoint or shlex.join(["python", "-m", "orchestrator", verb, spec, *overrides])
        return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    def wait(self, job_id: str) -> tuple[str, str]:
        """(final status, logs) of a submitted job."""
        deadline = time.monotonic() + JOB_DEADLINE_S
        while (status := str(self.client.get_job_status(job_id).value)) not in TERMINAL:
            if time.monotonic() > deadline:
                self.client.stop_job(job_id)
                raise AssertionError(f"job {job_id} still {status} after {JOB_DEADLINE_S} s:\n{self.client.get_job_logs(job_id)[-4000:]}")
            time.sleep(0.5)
        return status, self.client.get_job_logs(job_id)

    def run(self, verb: str, spec: str, *overrides: str, env_vars: dict[str, str] | None = None) -> tuple[str, str]:
        return self.wait(self.submit(verb, spec, *overrides, env_vars=env_vars))

    def stop(self) -> None:
        """End this cluster's processes (the `ray start` group and everything they started, job
        drivers and workers live in sessions of their own), by process id."""
        import psutil

        members = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == self.process_group:
                    members.append(process)
            except (ProcessLookupError, psutil.Error):
                continue
        everything = {p.pid: p for p in members}
        for process in members:
            try:
                everything.update({c.pid: c for c in process.children(recursive=True)})
            except psutil.Error:
                continue
        for process in everything.values():
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(everything.values()), timeout=3)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def job_cluster():
    cluster = JobCluster(num_cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def _common(output_dir: str, tmp: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={output_dir}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
        "distributed.cpus_per_worker=1",
        "train.log_every=10",
        "train.checkpoint_every=10",
        "train.sample_every=100000",
        "evaluation.num_samples=50",
        "sampler.steps=4",  # the closing score's samples: cheap
        *extra,
    ]


def _summary(run_dir: str) -> dict:
    return json.loads(storage.read_bytes(f"{run_dir}/summary.json"))


def _training_workers_of(cluster: JobCluster) -> int:
    from ray.util.state import list_actors

    return len(list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], raise_on_missing_output=False))


def test_a_submitted_training_job_runs_on_the_cluster_resumes_when_resubmitted_and_evaluate_reads_its_model(job_cluster, tmp_path):
    out = tmp_path / "runs"
    common = _common(str(out), tmp_path)
    status, logs = job_cluster.run("train", "jobs/digits.yaml", *common, "train.steps=20")
    assert status == "SUCCEEDED", logs[-4000:]
    # distributed.ray_address is null: the driver joined the job server's cluster instead of
    # starting one of its own, and the training workers ran there
    assert re.search(rf"joined the Ray cluster at \S+:{job_cluster.gcs_port}\b", logs)
    assert _training_workers_of(job_cluster) >= 1
    first = _summary(f"{out}/digits")
    assert (first["steps"], first["resumed_from"]) == (20, 0)

    # the same job submitted again, asking for more steps, continues from its newest checkpoint
    status, logs = job_cluster.run("train", "jobs/digits.yaml", *common, "train.steps=30")
    assert status == "SUCCEEDED", logs[-4000:]
    second = _summary(f"{out}/digits")
    assert (second["steps"], second["resumed_from"]) == (30, 20)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert f"resuming {out}/digits from step 20" in logs

    # reference statistics, then evaluate on the model that training wrote, in one submitted job
    reference = shlex.join(["python", "-m", "orchestrator", "reference", "jobs/digits.yaml", *common])
    evaluate = shlex.join(["python", "-m", "orchestrator", "evaluate", "jobs/digits.yaml", *common, "num_samples=100"])
    status, logs = job_cluster.wait(job_cluster.submit("", "", entrypoint=f"{reference} && {evaluate}"))
    assert status == "SUCCEEDED", logs[-4000:]
    evaluation = json.loads((out / "digits" / "evaluation" / "summary.json").read_text())
    assert evaluation["model_file"] == str(out / "digits" / "model.pt")
    assert evaluation["results"][0]["count"] == 100 and evaluation["results"][0]["distance"] > 0


def test_a_submitted_job_stores_on_s3_with_credentials_from_the_runtime_env_and_never_prints_them(job_cluster, s3_server, s3_bucket, tmp_path):
    secret = f"secret-{uuid.uuid4().hex}"
    credentials = {
        "AWS_ACCESS_KEY_ID": f"key-{uuid.uuid4().hex[:8]}",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    output = f"{s3_bucket}/runs"
    # MLflow is covered above; here only storage and credentials matter
    common = _common(output, tmp_path, "train.checkpoint_every=5", "train.log_every=5", "tracking.enabled=false")
    status, logs = job_cluster.run("train", "jobs/digits.yaml", *common, "train.steps=10", env_vars=credentials)
    assert status == "SUCCEEDED", logs[-4000:]
    status, logs_again = job_cluster.run("train", "jobs/digits.yaml", *common, "train.steps=15", env_vars=credentials)
    assert status == "SUCCEEDED", logs_again[-4000:]

    summary = _summary(f"{output}/digits")  # read here with the pytest process's own credentials
    assert (summary["steps"], summary["resumed_from"]) == (15, 10)
    names = storage.list_names(f"{output}/digits")
    assert {"checkpoint_00000010", "checkpoint_00000015", "model.pt"} <= set(names)
    assert secret not in logs + logs_again


def test_a_job_the_cluster_cannot_hold_fails_with_a_clear_message_instead_of_waiting(job_cluster, tmp_path):
    common = _common(str(tmp_path / "runs"), tmp_path, "tracking.enabled=false")
    too_many_cpus = job_cluster.submit("train", "jobs/digits.yaml", *common, "distributed.num_workers=8", "distributed.cpus_per_worker=4")
    a_gpu = job_cluster.submit("train", "jobs/digits.yaml", *common, "distributed.gpus_per_worker=1")
    status, logs = job_cluster.wait(too_many_cpus)
    assert status == "FAILED"
    assert "8 training workers (distributed.num_workers) need 32 CPUs (8 x 4) but the Ray cluster has 2" in logs
    assert "Traceback" not in logs
    status, logs = job_cluster.wait(a_gpu)
    assert status == "FAILED"
    assert "need 1 GPUs (1 x 1) but the Ray cluster has 0" in logs


def test_a_relative_output_dir_is_refused_in_a_submitted_job_before_any_work(job_cluster):
    status, logs = job_cluster.run("train", "jobs/digits.yaml", "tracking.enabled=false")
    assert status == "FAILED"
    assert "output_dir: 'outputs' is relative" in logs and "s3://bucket/prefix" in logs


@pytest.mark.slow  # two more submitted jobs; train/reference/evaluate above cover the submission path
def test_generate_and_encode_run_as_submitted_jobs_and_skip_finished_shards_when_resubmitted(job_cluster, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from sampling_helpers import write_tiny_model_file

    model = write_tiny_model_file(tmp_path / "model.pt")
    generate = ["tracking.enabled=false", f"model_file={model}", f"out={tmp_path / 'generated'}", "num_samples=20",
                "evaluation.generation.shard_size=10", "sampler.steps=4"]
    for written in (2, 0):
        status, logs = job_cluster.run("generate", "jobs/digits.yaml", *generate)
        assert status == "SUCCEEDED", logs[-4000:]
        assert f'"shards_written": {written}' in logs

    torch.manual_seed(0)  # a tiny random VAE; what it encodes to is test_encode.py's business
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, latent_channels=4, norm_num_groups=4).save_pretrained(tmp_path / "vae")
    encode = ["tracking.enabled=false", f"vae={tmp_path / 'vae'}", f"out={tmp_path / 'latents'}", "data.image_size=16",
              "data.limit=40", "encode.shard_size=20"]
    for written in (2, 0):
        status, logs = job_cluster.run("encode", "jobs/digits.yaml", *encode)
        assert status == "SUCCEEDED", logs[-4000:]
        assert f'"shards_written": {written}' in logs


@pytest.mark.parametrize("name", ["cluster_image.yaml", "pip.yaml"])
def test_the_documented_runtime_envs_are_valid_and_leave_local_state_behind(name):
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load((RUNTIME_ENV.parent / name).read_text())
    RuntimeEnv(**runtime_env)  # Ray's own validation of every field
    assert {".venv", ".git", "outputs", "mlruns"} <= set(runtime_env["excludes"])


def test_the_pip_runtime_env_installs_what_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    def name(requirement: str) -> str:
        return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()

    declared = {name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    packages = {name(r) for r in yaml.safe_load((RUNTIME_ENV.parent / "pip.yaml").read_text())["pip"]["packages"]}
    assert packages == declared - {"ray"}  # ray comes with the cluster's image


def test_relative_outputs_are_refused_only_inside_a_submitted_job(monkeypatch, tmp_path):
    from orchestrator.cluster import check_outputs_outlive_the_job as check
    from orchestrator.config import load_job
    from orchestrator.errors import ConfigError

    spec = ROOT / "jobs" / "digits.yaml"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    check(load_job(spec), "train")  # on a laptop outputs/ and ./mlruns are where they belong

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what the job server sets for its drivers
    with pytest.raises(ConfigError, match=r"output_dir: 'outputs' is relative(.|\n)*tracking.tracking_uri"):
        check(load_job(spec), "train")
    check(load_job(spec, [f"output_dir={tmp_path}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]), "evaluate")
    check(load_job(spec, ["output_dir=s3://bucket/runs", "tracking.tracking_uri=http://mlflow:5000"]), "train")
    # a verb writing to its own location needs only that one to be absolute
    check(load_job(spec, ["encode.out=s3://bucket/latents"]), "encode")
    check(load_job(spec, [f"evaluation.generation.out={tmp_path}"]), "generate")
    with pytest.raises(ConfigError, match="evaluation.generation.out: 'samples' is relative"):
        check(load_job(spec, ["evaluation.generation.out=samples"]), "generate")


def test_the_resource_check_can_be_left_to_ray_on_clusters_that_grow_beyond_what_they_publish(monkeypatch):
    from orchestrator.cluster import check_fits

    # no cluster is needed: with the check off nothing is asked of Ray and nothing is refused
    monkeypatch.setenv("UCGM_RESOURCE_CHECK", "off")
    check_fits(64, {"GPU": 1.0, "CPU": 8.0}, "64 training workers (distributed.num_workers)", "lower distributed.num_workers")
