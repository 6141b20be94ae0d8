"""Jobs submitted to a real Ray cluster with the job server (`ray start --head` + the
JobSubmissionClient that `ray job submit` uses), with the documented runtime_env: training joins
the cluster, `ray job stop` leaves a checkpoint at the step reached, a re-submitted job resumes
from it, evaluate reads its model, storage on a local S3 server
with credentials passed in the runtime_env, and a job the cluster cannot hold fails with a clear
message instead of waiting forever.

The cluster runs with Ray's token authentication, as every cluster in infra/ does: `ray job
submit` with the token runs a job, without it or with a wrong one it is refused before anything
runs, and the token shows up in no log, MLflow record or output of a job."""

from __future__ import annotations

import json
import os
import re
import secrets
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
RAY_BIN = Path(sys.executable).parent


def _without_ray_settings(environment: dict[str, str]) -> dict[str, str]:
    """The environment minus every RAY_* variable, so that neither a cluster address nor an auth
    mode or token of this machine (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) leaks into a test."""
    return {k: v for k, v in environment.items() if not k.startswith("RAY_")}


def generate_token(home: Path) -> str:
    """The README's recipe: `ray get-auth-token --generate` writes a random token to
    ~/.ray/auth_token and prints it. HOME is a fresh folder, so the machine's own ~/.ray stays
    untouched (and its token, if any, unused)."""
    home.mkdir(parents=True)
    result = subprocess.run([str(RAY_BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, text=True, timeout=300,
                            env={**_without_ray_settings(os.environ), "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    token = (home / ".ray" / "auth_token").read_text()
    assert result.stdout == token and len(token) >= 32
    return token


def bearer(token: str) -> dict[str, str]:
    """The HTTP header Ray's clients send for a token (RAY_AUTH_MODE=token)."""
    return {"Authorization": f"Bearer {token}"}


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
        # the token and the homes of "machines" live apart from Ray's temp dir, whose every file
        # (logs, session data) a test searches for the token
        self.auth_dir = Path(tempfile.mkdtemp(prefix="ucgm-rj-auth-"))
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = generate_token(self.auth_dir / "head-home")
        # the submitting machine's copy of the token, handed over as the README says (a file)
        self.token_file = self.auth_dir / "submitter" / "auth_token"
        self.token_file.parent.mkdir(mode=0o700)
        self.token_file.write_text(self.token)
        # what a cluster node looks like: the project's environment first on PATH (as in its
        # image), no storage credentials (jobs bring their own), no address of another cluster
        environment = {k: v for k, v in _without_ray_settings(os.environ).items() if not k.startswith(("AWS_", "MLFLOW_"))}
        environment.update(
            PATH=f"{RAY_BIN}{os.pathsep}{environment.get('PATH', '')}",
            # token authentication the way KubeRay sets it on every Ray container: the mode and
            # the token itself in the environment of every process, job drivers included, which
            # is what a job could leak (a token file's path would tell nothing)
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            # Ray's state API inside actors finds its cluster by address; with several clusters
            # on one machine (parallel test sessions) it would otherwise refuse to guess
            RAY_ADDRESS=f"127.0.0.1:{self.gcs_port}",
        )
        command = [
            str(RAY_BIN / "ray"), "start", "--head", "--disable-usage-stats",
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

        # The submitting side reads its token file. Ray's own clients send it only when
        # RAY_AUTH_MODE=token was set before `import ray` (RayConfig is read once per process),
        # which this pytest process cannot promise, so it sends the same header explicitly;
        # `ray job submit` with the environment a user sets is what submit_as_user runs.
        self.auth_headers = bearer(self.token_file.read_text())
        self.client = JobSubmissionClient(self.dashboard, headers=self.auth_headers)

    @staticmethod
    def runtime_env(env_vars: dict[str, str] | None = None) -> dict:
        """The documented runtime_env, working_dir = the repository."""
        runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
        runtime_env["working_dir"] = str(ROOT)
        if env_vars:
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
        return runtime_env

    def submit(self, verb: str, spec: str, *overrides: str, env_vars: dict[str, str] | None = None, entrypoint: str | None = None) -> str:
        """Submit `python -m orchestrator <verb> <spec> <overrides>` as `ray job submit` would,
        with the documented runtime_env."""
        entrypoint = entrypoint or shlex.join(["python", "-m", "orchestrator", verb, spec, *overrides])
        return self.client.submit_job(entrypoint=entrypoint, runtime_env=self.runtime_env(env_vars))

    def submit_as_user(self, submission_id: str, argv: list[str], ray_settings: dict[str, str]) -> subprocess.Popen:
        """`ray job submit --no-wait` of `argv` from a machine whose only Ray settings are
        `ray_settings` (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, ...): a clean environment and an empty
        HOME, so neither this machine's ~/.ray/auth_token nor the cluster's token is found by
        accident. Started, not awaited, so that several run at once; output on stdout."""
        home = self.auth_dir / f"home-{submission_id}"
        home.mkdir()
        command = [str(RAY_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--no-wait", "--submission-id", submission_id,
                   "--runtime-env-json", json.dumps(self.runtime_env()), "--", *argv]
        return subprocess.Popen(command, env={**_without_ray_settings(os.environ), "HOME": str(home), **ray_settings}, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

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
        shutil.rmtree(self.auth_dir, ignore_errors=True)


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
    # list_actors() is StateApiClient(address).list(...) without a way to pass the token's header
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=cluster.dashboard, headers={"Content-Type": "application/json", **cluster.auth_headers})
    options = ListApiOptions(filters=[("class_name", "=", "RayTrainWorker")])
    return len(client.list(StateResource.ACTORS, options=options, raise_on_missing_output=False))


def test_a_submitted_training_job_runs_on_the_cluster_stops_with_a_checkpoint_on_ray_job_stop_resumes_when_resubmitted_and_evaluate_reads_its_model(job_cluster, tmp_path):
    out = tmp_path / "runs"
    common = _common(str(out), tmp_path)
    # `ray job stop` once step 10 is logged: SIGTERM to the driver, which checkpoints at the step
    # it reached and exits before the SIGKILL that follows RAY_JOB_STOP_WAIT_TIME_S
    job_id = job_cluster.submit("train", "jobs/digits.yaml", *common, "train.steps=30", env_vars={"RAY_JOB_STOP_WAIT_TIME_S": "120"})
    metrics = out / "digits" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_DEADLINE_S
    while not (metrics.exists() and metrics.read_text().strip()):
        assert str(job_cluster.client.get_job_status(job_id).value) not in TERMINAL, job_cluster.client.get_job_logs(job_id)[-4000:]
        assert time.monotonic() < deadline, "no interval was logged"
        time.sleep(0.2)
    job_cluster.client.stop_job(job_id)
    status, logs = job_cluster.wait(job_id)
    assert status == "STOPPED", logs[-4000:]
    # distributed.ray_address is null: the driver joined the job server's cluster instead of
    # starting one of its own, and the training workers ran there
    assert re.search(rf"joined the Ray cluster at \S+:{job_cluster.gcs_port}\b", logs)
    assert _training_workers_of(job_cluster) >= 1
    stopped = re.search(r"stopped: stopped on SIGTERM at step (\d+)", logs)
    assert stopped, logs[-4000:]
    step = int(stopped.group(1))
    assert 10 <= step < 30 and storage.exists(f"{out}/digits/checkpoint_{step:08d}/ucgm_state.pt")
    assert not storage.exists(f"{out}/digits/summary.json")

    # the same job submitted again continues from the checkpoint the stop wrote, in the same MLflow run
    status, logs = job_cluster.run("train", "jobs/digits.yaml", *common, "train.steps=30")
    assert status == "SUCCEEDED", logs[-4000:]
    second = _summary(f"{out}/digits")
    assert (second["steps"], second["resumed_from"]) == (30, step)
    assert f"resuming {out}/digits from step {step}" in logs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [second["mlflow_run_id"]] and runs[0].info.status == "FINISHED"

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
    # (resuming from S3 is test_train_ray's; one run shows the job reads and writes there)
    status, logs = job_cluster.run("train", "jobs/digits.yaml", *common, "train.steps=10", env_vars=credentials)
    assert status == "SUCCEEDED", logs[-4000:]

    summary = _summary(f"{output}/digits")  # read here with the pytest process's own credentials
    assert (summary["steps"], summary["resumed_from"]) == (10, 0)
    names = storage.list_names(f"{output}/digits")
    assert {"checkpoint_00000005", "checkpoint_00000010", "model.pt"} <= set(names)
    assert secret not in logs


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


def _files_holding(text: str, *folders: Path) -> list[str]:
    needle = text.encode()
    return [str(path) for folder in folders for path in folder.rglob("*")
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes()]


def _mlflow_records_holding(text: str, tracking_uri: str) -> list[str]:
    """Params and tags (names and values) of every MLflow run under tracking_uri that hold text;
    fails if there is no run, which would make the search pointless."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert runs and all(run.data.params for run in runs), f"no MLflow run with params under {tracking_uri}"
    return [f"{run.info.run_id}: {key}" for run in runs for key, value in [*run.data.params.items(), *run.data.tags.items()]
            if text in key or text in str(value)]


@pytest.mark.slow
def test_only_a_holder_of_the_token_can_use_the_cluster_and_no_job_writes_the_token_down(job_cluster, tmp_path):
    """Submitting machines as users set them up (README: RAY_AUTH_MODE=token and the head's token
    file) run a real training; a machine without the token or with another one is refused by the
    job server before it registers anything, and so is a driver joining through the GCS port. The
    refused attempts run while the training does, so they cost no time of their own."""
    out, refused = tmp_path / "runs", tmp_path / "refused"

    def train(output: Path) -> list[str]:
        return ["python", "-m", "orchestrator", "train", "jobs/digits.yaml", *_common(str(output), tmp_path), "train.steps=10"]

    attempts = {  # who submits: (the only Ray settings of their machine, what they submit)
        "holder": ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(job_cluster.token_file)}, train(out)),
        "stranger": ({}, train(refused)),  # never heard of the token: Ray's defaults, an empty ~/.ray
        "guesser": ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}, train(refused)),
    }
    ids = {who: f"auth-{who}-{uuid.uuid4().hex[:8]}" for who in attempts}
    started = {who: job_cluster.submit_as_user(ids[who], argv, settings) for who, (settings, argv) in attempts.items()}
    stranger_home = job_cluster.auth_dir / f"home-driver-{uuid.uuid4().hex[:8]}"
    stranger_home.mkdir()
    driver = subprocess.Popen([sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{job_cluster.gcs_port}'); print('joined')"],
                              env={**_without_ray_settings(os.environ), "HOME": str(stranger_home)}, cwd=stranger_home,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    said = {who: process.communicate(timeout=300)[0] for who, process in started.items()}
    assert started["holder"].returncode == 0, said["holder"]
    assert started["stranger"].returncode != 0 and "Authentication required: Unauthorized" in said["stranger"], said["stranger"]
    assert started["guesser"].returncode != 0 and "Authentication failed: Forbidden" in said["guesser"], said["guesser"]
    listed = {job.submission_id: job for job in job_cluster.client.list_jobs()}  # asked with the token
    assert ids["holder"] in listed and not {ids["stranger"], ids["guesser"]} & set(listed)
    assert not [job.submission_id for job in listed.values() if str(refused) in job.entrypoint]

    # the rest of the dashboard's API is closed the same way (the job server is one of its modules)
    import requests

    for endpoint in ("/api/jobs/", "/api/v0/actors", "/api/cluster_status"):
        url = job_cluster.dashboard + endpoint
        assert requests.get(url, timeout=60).status_code == 401, endpoint
        assert requests.get(url, headers=bearer(secrets.token_hex(32)), timeout=60).status_code == 403, endpoint
        assert requests.get(url, headers=job_cluster.auth_headers, timeout=60).status_code == 200, endpoint

    status, logs = job_cluster.wait(ids["holder"])
    assert status == "SUCCEEDED", logs[-4000:]
    assert _summary(f"{out}/digits")["steps"] == 10
    assert not refused.exists()
    joined, _ = driver.communicate(timeout=300)
    assert driver.returncode != 0 and "InvalidAuthToken" in joined and "joined" not in joined.splitlines(), joined[-3000:]

    # Every process of the job had the token in its environment (as on KubeRay); none wrote it
    # into its log, MLflow (params, tags; artifacts and the database are files under tmp_path),
    # its outputs, or anything else in the cluster's temp dir (worker logs, session files).
    assert job_cluster.token not in logs
    assert _mlflow_records_holding(job_cluster.token, f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}") == []
    assert _files_holding(job_cluster.token, tmp_path, Path(job_cluster.temp_dir)) == []


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
    from orchestrator.job_checks import check_outputs_outlive_the_job as check
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
