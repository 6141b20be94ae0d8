"""The deployment files in infra/, checked against what will read them, offline:

- KubeRay manifests (infra/kuberay/): RayCluster and RayJob against the ray.io/v1 schema the tests
  carry (tests/schemas/kuberay-ray.io-v1.schema.json), whose pod templates, metadata, env vars
  and resources are Kubernetes types validated against the Kubernetes JSON schemas bundled by
  the `kubernetes-validate` package (strict flavour: unknown fields are errors); Secret and
  ConfigMap against those Kubernetes schemas directly. Then what no schema knows: every RayJob
  runs a command the CLI accepts, its job fits the cluster it brings up, all pods share image,
  Ray version and credentials wiring, credentials only come from the Secret, and every cluster
  requires Ray's token (authOptions) and keeps its dashboard inside Kubernetes.
- The Ray cluster launcher config (infra/cluster-launcher/aws.yaml) against the JSON schema that
  ships inside the installed Ray (`ray/autoscaler/ray-schema.json`) and the checks `ray up` runs;
  every node starts Ray with token authentication, the token from outside the repository.
- The image definition (infra/Dockerfile): statically always; built only where a builder works.

Each schema check has a counterpart that feeds it a real mistake and expects it refused.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from referencing import Registry, Resource

from orchestrator.cli import main as cli_main
from orchestrator.cli import expand_shortcuts
from orchestrator.config import load_job
from orchestrator.job_checks import LOCATION_KEYS
from orchestrator.tune.spec import load_sweep
from test_job_specs import refused_keys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER_CONFIG = INFRA / "cluster-launcher" / "aws.yaml"
DOCKERFILE = INFRA / "Dockerfile"
KUBERAY_SCHEMA = Path(__file__).parent / "schemas" / "kuberay-ray.io-v1.schema.json"

# The manifests must hold for the oldest Kubernetes minor they are written for (or the oldest
# kubernetes-validate still bundles, if it dropped that one) and for the newest it bundles.
OLDEST_KUBERNETES = "1.29.0"
_BUNDLED = [v for v in kubernetes_validate.utils.all_versions() if Version(v) >= Version(OLDEST_KUBERNETES)]
KUBERNETES_VERSIONS = sorted({_BUNDLED[0], kubernetes_validate.latest_version()}, key=Version)

VERBS = {"train", "tune", "reference", "evaluate", "generate"}
SECRET_NAME = "ucgm-credentials"
SETTINGS_NAME = "ucgm-settings"
SECRET_LOOKING = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
# KubeRay (>= 1.5.1) turns authOptions into Ray token authentication only for a Ray that has it
OLDEST_RAY_WITH_TOKEN_AUTH = Version("2.52.0")


# --------------------------------------------------------------------------------------------- loading


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> dict[str, dict]:
    """Every Kubernetes object in infra/kuberay, by file (relative) and kind/name."""
    found = {}
    for path in sorted([*KUBERAY.rglob("*.yaml"), *KUBERAY.rglob("*.yaml.example")]):
        for doc in _documents(path):
            found[f"{path.relative_to(KUBERAY)}:{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


MANIFESTS = _manifests()


def _of_kind(kind: str) -> dict[str, dict]:
    return {key: doc for key, doc in MANIFESTS.items() if doc["kind"] == kind}


RAYJOBS = _of_kind("RayJob")
(RAYCLUSTER,) = _of_kind("RayCluster").values()
(SECRET,) = _of_kind("Secret").values()
(SETTINGS,) = _of_kind("ConfigMap").values()


def _kubernetes_definitions(version: str) -> dict:
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((schemas / f"v{version}-local-strict" / "_definitions.json").read_text())


@pytest.fixture(scope="module", params=KUBERNETES_VERSIONS, ids=lambda v: f"k8s-{v}")
def kubernetes_version(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def kuberay_registry(kubernetes_version) -> Registry:
    """Our ray.io/v1 schema plus the Kubernetes definitions it refers to, resolvable offline."""
    ours = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(ours)
    definitions = _kubernetes_definitions(kubernetes_version)
    return Registry().with_resources(
        [(ours["$id"], Resource.from_contents(ours)), (definitions["$id"], Resource.from_contents(definitions))]
    )


def schema_errors(doc: dict, registry: Registry, kubernetes_version: str) -> list[str]:
    """Every schema violation of one manifest, as 'path: message'."""
    if doc.get("apiVersion") == "ray.io/v1":
        ours = json.loads(KUBERAY_SCHEMA.read_text())
        validator = jsonschema.Draft202012Validator({"$ref": f"{ours['$id']}#/$defs/{doc['kind']}"}, registry=registry)
        errors = validator.iter_errors(doc)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))]
    try:
        kubernetes_validate.validate(doc, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"]
    return []


# --------------------------------------------------------------------------------------------- KubeRay: schemas


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_manifest_matches_the_kubernetes_and_kuberay_schemas(name, kuberay_registry, kubernetes_version):
    assert schema_errors(MANIFESTS[name], kuberay_registry, kubernetes_version) == []


def _rayjob() -> dict:
    return copy.deepcopy(RAYJOBS[next(key for key in RAYJOBS if "train" in key)])


def _head_container(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker_container(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _misspell_shutdown(job):
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")


def _quote_backoff_limit(job):
    job["spec"]["backoffLimit"] = "3"


def _drop_head_image(job):
    del _head_container(job)["image"]


def _misspell_worker_resources(job):
    container = _worker_container(job)
    container["resource"] = container.pop("resources")


def _unquote_num_cpus(job):
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _drop_secret_key(job):
    _worker_container(job)["env"] = copy.deepcopy(_worker_container(job)["env"])
    del _worker_container(job)["env"][0]["valueFrom"]["secretKeyRef"]["key"]


def _unknown_submission_mode(job):
    job["spec"]["submissionMode"] = "K8sMode"


def _drop_max_replicas(job):
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]


def _negative_min_replicas(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = -1


def _drop_entrypoint(job):
    del job["spec"]["entrypoint"]


def _shutdown_a_selected_cluster(job):
    del job["spec"]["rayClusterSpec"]
    job["spec"]["clusterSelector"] = {"ray.io/cluster": "ucgm-ray"}


def _capitalised_auth_mode(job):
    job["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "Token"}


def _auth_options_on_the_job(job):
    job["spec"]["authOptions"] = job["spec"]["rayClusterSpec"].pop("authOptions")


def _gpu_limit_in_the_wrong_place(job):
    _worker_container(job)["resources"] = copy.deepcopy(_worker_container(job)["resources"])
    _worker_container(job)["resources"]["limit"] = _worker_container(job)["resources"].pop("limits")


RAYJOB_MISTAKES = {  # mistake: (how to make it, what the error must say)
    "misspelled shutdownAfterJobFinishes": (_misspell_shutdown, "spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"),
    "backoffLimit as a string": (_quote_backoff_limit, "spec.backoffLimit: '3' is not of type 'integer'"),
    "head container without image": (_drop_head_image, "headGroupSpec.template.spec.containers.0: 'image' is a required property"),
    "misspelled container field (Kubernetes schema)": (_misspell_worker_resources, "containers.0: Additional properties are not allowed ('resource' was unexpected)"),
    "rayStartParams value not a string": (_unquote_num_cpus, "rayStartParams.num-cpus: 0 is not of type 'string'"),
    "secretKeyRef without key (Kubernetes schema)": (_drop_secret_key, "valueFrom.secretKeyRef: 'key' is a required property"),
    "unknown submissionMode": (_unknown_submission_mode, "spec.submissionMode: 'K8sMode' is not one of"),
    "worker group without maxReplicas": (_drop_max_replicas, "workerGroupSpecs.0: 'maxReplicas' is a required property"),
    "negative minReplicas": (_negative_min_replicas, "workerGroupSpecs.0.minReplicas: -1 is less than the minimum of 0"),
    "no entrypoint": (_drop_entrypoint, "spec: 'entrypoint' is a required property"),
    "deleting a cluster the job did not create": (_shutdown_a_selected_cluster, "should not be valid under"),
    "limit instead of limits (Kubernetes schema)": (_gpu_limit_in_the_wrong_place, "resources: Additional properties are not allowed ('limit' was unexpected)"),
    "auth mode Token": (_capitalised_auth_mode, "authOptions.mode: 'Token' is not one of ['disabled', 'token']"),
    "authOptions outside rayClusterSpec": (_auth_options_on_the_job, "spec: Additional properties are not allowed ('authOptions' was unexpected)"),
}


@pytest.mark.parametrize("mistake", list(RAYJOB_MISTAKES))
def test_schema_refuses_a_real_mistake_in_a_rayjob(mistake, kuberay_registry, kubernetes_version):
    mutate, named = RAYJOB_MISTAKES[mistake]
    job = _rayjob()
    assert schema_errors(job, kuberay_registry, kubernetes_version) == []
    mutate(job)
    errors = schema_errors(job, kuberay_registry, kubernetes_version)
    assert errors, f"the schema accepted a RayJob with {mistake}"
    assert any(named in error for error in errors), errors


def test_schema_refuses_a_misspelled_raycluster_field(kuberay_registry, kubernetes_version):
    cluster = copy.deepcopy(RAYCLUSTER)
    cluster["spec"]["enableInTreeAutoScaling"] = cluster["spec"].pop("enableInTreeAutoscaling")
    errors = schema_errors(cluster, kuberay_registry, kubernetes_version)
    assert any("('enableInTreeAutoScaling' was unexpected)" in e for e in errors), errors


@pytest.mark.parametrize(
    "kind, mutate, named",
    [
        ("Secret", lambda d: d.__setitem__("stringdata", d.pop("stringData")), "('stringdata' was unexpected)"),
        ("ConfigMap", lambda d: d["data"].__setitem__("AWS_DEFAULT_REGION", 1), "data.AWS_DEFAULT_REGION: 1 is not of type"),
    ],
    ids=["Secret with misspelled stringData", "ConfigMap value not a string"],
)
def test_kubernetes_schema_refuses_a_mistake_in_a_core_object(kind, mutate, named, kuberay_registry, kubernetes_version):
    (doc,) = copy.deepcopy(list(_of_kind(kind).values()))
    mutate(doc)
    errors = schema_errors(doc, kuberay_registry, kubernetes_version)
    assert any(named in error for error in errors), errors


def test_kubectl_reads_the_manifests_as_the_tests_do(tmp_path):
    """The anchors, aliases and folded entrypoints must mean the same to kubectl's YAML reader
    (kustomize's, offline) as to PyYAML, or the checks above would check something else."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH")
    names = []
    for index, path in enumerate(sorted([*KUBERAY.rglob("*.yaml"), *KUBERAY.rglob("*.yaml.example")])):
        names.append(f"{index:02d}-{path.name.removesuffix('.example')}")
        shutil.copy(path, tmp_path / names[-1])
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": names}))
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(result.stdout) if d}
    assert rendered == {key.split(":", 1)[1]: doc for key, doc in MANIFESTS.items()}


# --------------------------------------------------------------------------------------------- KubeRay: meaning


def _entrypoint(job: dict) -> tuple[str, str, list[str]]:
    """(verb, job spec, overrides) of `python -m orchestrator <verb> <spec> [overrides]`."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "orchestrator"], f"entrypoint {job['spec']['entrypoint']!r} is not a `python -m orchestrator` command"
    return argv[3], argv[4], argv[5:]


def test_there_is_one_rayjob_per_verb():
    verbs = sorted(_entrypoint(job)[0] for job in RAYJOBS.values())
    assert verbs == sorted(VERBS)


@pytest.mark.parametrize("name", list(RAYJOBS))
def test_rayjob_cleans_up_retries_and_has_a_deadline(name):
    spec = RAYJOBS[name]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1, "retries are what make the idempotent entry points pay off"
    assert spec["activeDeadlineSeconds"] > 0
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec, "each attempt must bring up its own cluster"


@pytest.mark.parametrize("name", list(RAYJOBS))
def test_rayjob_entrypoint_is_a_command_the_cli_accepts(name, monkeypatch, capsys):
    verb, spec, overrides = _entrypoint(RAYJOBS[name])
    assert spec.startswith("jobs/") and (ROOT / spec).is_file(), f"{spec} is not a job spec of this repository (the image copies jobs/)"
    monkeypatch.chdir(ROOT)  # the image's working directory holds jobs/, as the repository root does
    try:
        code = cli_main([verb, spec, *overrides, "--check"])
    except SystemExit as exit_:  # argparse: an unknown verb or flag
        raise AssertionError(f"{RAYJOBS[name]['spec']['entrypoint']!r} exits with {exit_.code}: {capsys.readouterr().err}") from None
    err = capsys.readouterr().err
    if code == 2 and verb != "tune":
        # the cluster's bucket is not reachable from here: --check may refuse its locations, nothing else
        assert refused_keys(err) <= set(LOCATION_KEYS), err
        return
    assert code == 0, err


def test_every_rayjob_uses_the_same_shared_output_dir():
    """evaluate and generate read what train wrote, and a retry must find its checkpoints, so all
    use one output_dir, on storage every pod and every later cluster sees."""
    output_dirs = set()
    for job in RAYJOBS.values():
        _, _, overrides = _entrypoint(job)
        output_dirs |= {value for key, _, value in (o.partition("=") for o in overrides) if key == "output_dir"}
        assert any(o.startswith("output_dir=") for o in overrides), f"{job['metadata']['name']} keeps the spec's local output_dir"
    assert len(output_dirs) == 1 and next(iter(output_dirs)).startswith("s3://"), output_dirs


def test_tune_keeps_its_optuna_study_on_a_volume_that_outlives_the_cluster():
    """The sweep's driver (on the head) keeps the Optuna study in SQLite; a retry runs on a new
    cluster, so the file must sit on a PersistentVolumeClaim mounted in the head, not in the pod."""
    (job,) = [job for job in RAYJOBS.values() if _entrypoint(job)[0] == "tune"]
    overrides = dict(o.split("=", 1) for o in _entrypoint(job)[2])
    study = overrides.get("storage", "")
    assert study.startswith("/"), f"storage={study!r}: without it the sweep keeps the study next to its s3:// folder, which SQLite cannot"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"].rstrip("/") + "/" for m in head["containers"][0]["volumeMounts"]}
    (volume_name,) = [name for name, path in mounts.items() if study.startswith(path)]
    (volume,) = [v for v in head["volumes"] if v["name"] == volume_name]
    claims = {doc["metadata"]["name"] for doc in _of_kind("PersistentVolumeClaim").values()}
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert head["securityContext"]["fsGroup"] == 100, "the image's user `ray` (gid 100) must be able to write the volume"


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def cluster_capacity(cluster_spec: dict) -> dict[str, dict[str, float]]:
    """Ray resources the cluster can grow to: per pod of the largest kind and in total (workers at
    maxReplicas), as KubeRay derives them (rayStartParams, else the container limits)."""
    pods = []
    for group in cluster_spec.get("workerGroupSpecs", []):
        container = group["template"]["spec"]["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        params = group.get("rayStartParams", {})
        pod = {
            "CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
            "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        }
        pods.append((pod, group["maxReplicas"]))
    head_params = cluster_spec["headGroupSpec"].get("rayStartParams", {})
    head_limits = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    head = {"CPU": _quantity(head_params.get("num-cpus", head_limits.get("cpu", 0))), "GPU": _quantity(head_limits.get("nvidia.com/gpu", 0))}
    pods.append((head, 1))
    return {
        "per_pod": {r: max(pod[r] for pod, _ in pods) for r in ("CPU", "GPU")},
        "total": {r: sum(pod[r] * count for pod, count in pods) for r in ("CPU", "GPU")},
    }


def job_demand(verb: str, config) -> tuple[int, dict[str, float]] | None:
    """(units, resources per unit) a verb asks Ray for; None for verbs that run in the driver."""
    if verb in ("train", "tune"):  # tune: one trial, a training of the sweep's base job
        distributed = config.distributed
        return distributed.num_workers, {"CPU": distributed.cpus_per_worker, "GPU": distributed.gpus_per_worker}
    if verb in ("evaluate", "generate"):
        evaluation = config.evaluation
        return evaluation.num_actors, {"CPU": evaluation.cpus_per_actor, "GPU": evaluation.gpus_per_actor or 0.0}
    return None


def fit_problems(verb: str, config, cluster_spec: dict) -> list[str]:
    demand = job_demand(verb, config)
    if demand is None:
        return []
    units, per_unit = demand
    capacity = cluster_capacity(cluster_spec)
    problems = []
    for resource, amount in per_unit.items():
        if amount > capacity["per_pod"][resource]:
            problems.append(f"one unit needs {amount:g} {resource} but the largest pod has {capacity['per_pod'][resource]:g}")
        if units * amount > capacity["total"][resource]:
            problems.append(f"{units} units need {units * amount:g} {resource} but the cluster grows to {capacity['total'][resource]:g}")
    return problems


def _resolved(job: dict):
    """(verb, the job the entrypoint runs); for tune, the sweep's base job (what each trial runs)."""
    verb, spec, overrides = _entrypoint(job)
    if verb == "tune":
        assert (ROOT / spec).is_file(), f"the tune RayJob runs {spec}, which is not in the repository"
        return verb, load_sweep(ROOT / spec, overrides).base_job
    return verb, load_job(ROOT / spec, expand_shortcuts(verb, overrides))


@pytest.mark.parametrize("name", list(RAYJOBS))
def test_rayjob_asks_for_no_more_than_its_cluster_can_grow_to(name):
    """A job the autoscaler can never place waits forever; catch it before `kubectl apply`."""
    verb, config = _resolved(RAYJOBS[name])
    assert fit_problems(verb, config, RAYJOBS[name]["spec"]["rayClusterSpec"]) == []


def test_fit_check_refuses_a_job_larger_than_the_cluster():
    job = _rayjob()
    verb, config = _resolved(job)
    too_many = config.model_copy(update={"distributed": config.distributed.model_copy(update={"num_workers": 64})})
    too_big = config.model_copy(update={"distributed": config.distributed.model_copy(update={"gpus_per_worker": 2.0})})
    assert any("cluster grows to" in p for p in fit_problems(verb, too_many, job["spec"]["rayClusterSpec"]))
    assert any("largest pod" in p for p in fit_problems(verb, too_big, job["spec"]["rayClusterSpec"]))


def _cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": RAYCLUSTER["spec"], **{key: job["spec"]["rayClusterSpec"] for key, job in RAYJOBS.items()}}


def _ray_containers(cluster_spec: dict) -> list[dict]:
    templates = [cluster_spec["headGroupSpec"]["template"], *(g["template"] for g in cluster_spec.get("workerGroupSpecs", []))]
    return [container for template in templates for container in template["spec"]["containers"]]


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"infra/Dockerfile has no ARG {name}=<default>"
    return match.group(1).strip().strip('"')


def _project() -> dict:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_all_ray_pods_run_one_image_of_this_project_and_ray_version():
    images = {c["image"] for spec in _cluster_specs().values() for c in _ray_containers(spec)}
    assert len(images) == 1, images
    (image,) = images
    assert image.rsplit(":", 1)[1] == _project()["version"], f"{image} is not tagged with the project version"
    versions = {spec["rayVersion"] for spec in _cluster_specs().values()}
    assert versions == {ray.__version__} == {_dockerfile_arg("RAY_VERSION")}


@pytest.mark.parametrize("where", list(_cluster_specs()))
def test_every_ray_container_gets_settings_and_credentials_the_same_way(where):
    secret_keys = set(SECRET["stringData"])
    for container in _ray_containers(_cluster_specs()[where]):
        assert container.get("envFrom") == [{"configMapRef": {"name": SETTINGS_NAME}}], container["name"]
        env = {variable["name"]: variable for variable in container["env"]}
        assert set(env) == secret_keys, f"{container['name']}: {sorted(env)} vs the Secret's {sorted(secret_keys)}"
        for name, variable in env.items():
            reference = variable["valueFrom"]["secretKeyRef"]
            assert "value" not in variable and reference["name"] == SECRET_NAME and reference["key"] == name


def test_gpu_workers_autoscale_within_bounds_and_the_head_has_no_gpu():
    for where, spec in _cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True, where
        assert "nvidia.com/gpu" not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups = spec["workerGroupSpecs"]
        assert groups, where
        for group in groups:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"] and group["maxReplicas"] >= 1, where
            resources = group["template"]["spec"]["containers"][0]["resources"]
            # Kubernetes only schedules extended resources set as limits; requests, if given, must equal them
            assert _quantity(resources["limits"]["nvidia.com/gpu"]) >= 1, where
            assert resources.get("requests", {}).get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == resources["limits"]["nvidia.com/gpu"]


def test_credentials_live_only_in_the_secret_and_the_example_holds_placeholders():
    assert all(str(value).startswith("REPLACE_WITH_") for value in SECRET["stringData"].values()), SECRET["stringData"]
    assert not [name for name in SETTINGS["data"] if SECRET_LOOKING.search(name)], "credentials belong in the Secret"
    # the tracking store must outlive one pod: a server, not a path inside the cluster's copy
    assert SETTINGS["data"]["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    # `kubectl apply -f infra/kuberay/` takes .yaml/.yml/.json files: the example is not one of them,
    # and a filled-in copy is kept out of git
    assert [p.name for p in KUBERAY.iterdir() if "secret" in p.name] == ["secret.yaml.example"]
    assert "kuberay/secret.yaml" in (INFRA / ".gitignore").read_text().split()
    for spec in _cluster_specs().values():
        for container in _ray_containers(spec):
            literal = [v["name"] for v in container.get("env", []) if "value" in v and SECRET_LOOKING.search(v["name"])]
            assert not literal, literal


# --------------------------------------------------------------------------------------------- KubeRay: token authentication


def auth_problems(cluster_spec: dict) -> list[str]:
    """Why the cluster of a RayCluster or RayJob could be used without its Ray token: anyone who
    reaches an unauthenticated dashboard submits jobs, that is, runs code with the pods' credentials."""
    problems = []
    auth = cluster_spec.get("authOptions") or {}
    if auth.get("mode") != "token":
        problems.append(f"authOptions.mode is {auth.get('mode')!r}, not 'token': the dashboard would take jobs from anyone")
    if auth.get("enableK8sTokenAuth"):
        problems.append("authOptions.enableK8sTokenAuth: KubeRay refuses it in RayJobs, and it needs RBAC this repository does not ship")
    version = cluster_spec.get("rayVersion")
    if version is None or Version(version) < OLDEST_RAY_WITH_TOKEN_AUTH:
        problems.append(f"rayVersion {version!r}: KubeRay applies authOptions only for Ray >= {OLDEST_RAY_WITH_TOKEN_AUTH}")
    head = cluster_spec["headGroupSpec"]
    service_types = {head.get("serviceType", "ClusterIP"), head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")}
    if service_types != {"ClusterIP"} or head.get("enableIngress"):
        problems.append(f"head Service {sorted(service_types)}, ingress {head.get('enableIngress', False)}: the dashboard must stay inside Kubernetes (kubectl port-forward)")
    # KubeRay sets RAY_AUTH_MODE only where a container does not set it already
    containers = [*_ray_containers(cluster_spec), {"name": "autoscaler", **cluster_spec.get("autoscalerOptions", {})}]
    for container in containers:
        for variable in container.get("env", []):
            if variable["name"] == "RAY_AUTH_MODE" and variable.get("value") != "token":
                problems.append(f"{container['name']}: RAY_AUTH_MODE={variable.get('value')!r} overrides authOptions")
            if variable["name"] == "RAY_AUTH_TOKEN" and "value" in variable:
                problems.append(f"{container['name']}: a literal RAY_AUTH_TOKEN would be committed with the manifest")
    return problems


@pytest.mark.parametrize("where", list(_cluster_specs()))
def test_every_cluster_we_ship_requires_the_ray_token_and_keeps_its_dashboard_inside_kubernetes(where):
    assert auth_problems(_cluster_specs()[where]) == []


def _without_auth(spec):
    del spec["authOptions"]


def _container_env(spec, which: int = 0) -> list[dict]:
    container = _ray_containers(spec)[which]
    container["env"] = copy.deepcopy(container["env"])
    return container["env"]


AUTH_MISTAKES = {  # mistake: (how to make it in a cluster spec, what the check must say)
    "no authOptions": (_without_auth, "not 'token'"),
    "auth mode disabled": (lambda s: s["authOptions"].update(mode="disabled"), "not 'token'"),
    "Kubernetes-delegated auth": (lambda s: s["authOptions"].update(enableK8sTokenAuth=True), "enableK8sTokenAuth"),
    "a Ray without token auth": (lambda s: s.update(rayVersion="2.51.0"), "Ray >= 2.52.0"),
    "no rayVersion": (lambda s: s.pop("rayVersion"), "rayVersion None"),
    "a LoadBalancer for the head": (lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer"), "inside Kubernetes"),
    "an ingress to the dashboard": (lambda s: s["headGroupSpec"].update(enableIngress=True), "inside Kubernetes"),
    "a worker turning auth off": (lambda s: _container_env(s, 1).append({"name": "RAY_AUTH_MODE", "value": "disabled"}), "ray-worker: RAY_AUTH_MODE='disabled'"),
    "the autoscaler turning auth off": (lambda s: s["autoscalerOptions"].update(env=[{"name": "RAY_AUTH_MODE", "value": "disabled"}]), "autoscaler: RAY_AUTH_MODE"),
    "a token in the manifest": (lambda s: _container_env(s).append({"name": "RAY_AUTH_TOKEN", "value": "0123abcd"}), "literal RAY_AUTH_TOKEN"),
}


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
@pytest.mark.parametrize("mistake", list(AUTH_MISTAKES))
def test_auth_check_refuses_a_cluster_that_anyone_could_use(mistake, kind):
    spec = copy.deepcopy(_rayjob()["spec"]["rayClusterSpec"] if kind == "RayJob" else RAYCLUSTER["spec"])
    assert auth_problems(spec) == []
    mutate, named = AUTH_MISTAKES[mistake]
    mutate(spec)
    problems = auth_problems(spec)
    assert any(named in problem for problem in problems), problems


def test_the_schema_takes_kuberays_auth_fields_where_the_api_reference_puts_them(kuberay_registry, kubernetes_version):
    """secretName (a Secret of your own, key auth_token) is the documented alternative to the
    generated token; both it and the generated form must pass the ray.io/v1 schema."""
    cluster = copy.deepcopy(RAYCLUSTER)
    cluster["spec"]["authOptions"] = {"mode": "token", "secretName": "ucgm-ray-auth"}
    assert schema_errors(cluster, kuberay_registry, kubernetes_version) == []
    cluster["spec"]["authOptions"] = {"mode": "token", "secret": "ucgm-ray-auth"}
    assert any("('secret' was unexpected)" in e for e in schema_errors(cluster, kuberay_registry, kubernetes_version))


# --------------------------------------------------------------------------------------------- cluster launcher


def _launcher_schema() -> dict:
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def _launcher_errors(config: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(_launcher_schema()).iter_errors(config)]


def test_cluster_launcher_config_matches_the_schema_of_the_installed_ray():
    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    assert _launcher_errors(config) == []
    # what `ray up` does before it talks to AWS: fill in the provider's defaults, validate again
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize(
    "mutate, named",
    [
        (lambda c: c["available_node_types"]["gpu"].__setitem__("max_worker", 4), "available_node_types.gpu: Additional properties are not allowed ('max_worker' was unexpected)"),
        (lambda c: c["available_node_types"]["gpu"]["resources"].__setitem__("GPU", "4"), "resources.GPU: '4' is not of type 'integer'"),
        (lambda c: c["docker"].__setitem__("imag", c["docker"].pop("image")), "docker: Additional properties are not allowed ('imag' was unexpected)"),
        (lambda c: c.__setitem__("idle_timeout_minutes", "10"), "idle_timeout_minutes: '10' is not of type"),
    ],
    ids=["misspelled max_workers", "GPU count as a string", "misspelled docker image", "timeout as a string"],
)
def test_ray_schema_refuses_a_real_mistake_in_the_launcher_config(mutate, named):
    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    mutate(config)
    assert any(named in error for error in _launcher_errors(config)), _launcher_errors(config)


def test_ray_up_checks_refuse_an_unknown_head_node_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    config["head_node_type"] = "cpu-head"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))


def test_cluster_launcher_runs_the_kuberay_image_and_keeps_settings_outside_the_repo():
    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    (image,) = {c["image"] for c in _ray_containers(RAYCLUSTER["spec"])}
    assert config["docker"]["image"] == image
    assert any(f"ray.__version__ == '{ray.__version__}'" in command for command in config["setup_commands"])
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    for remote, local in config["file_mounts"].items():
        assert local.startswith("~/"), f"{remote} is synced from {local}; settings with tokens stay outside the repository"
        assert all(remote in command for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:])


# Where the launcher config puts the cluster's token on every node: Ray's default token file of the
# image's user (~/.ray/auth_token), also named by RAY_AUTH_TOKEN_PATH in the start commands.
LAUNCHER_TOKEN_FILE = "/home/ray/.ray/auth_token"


def launcher_auth_problems(config: dict) -> list[str]:
    """Why a node of the launcher's cluster could start Ray without token authentication, or the
    token could come from the repository, or the dashboard be reachable from outside unguarded."""
    problems = []
    source = config.get("file_mounts", {}).get(LAUNCHER_TOKEN_FILE)
    if source is None:
        problems.append(f"no file_mounts entry puts the cluster's token at {LAUNCHER_TOKEN_FILE}")
    elif not source.startswith("~/"):
        problems.append(f"the token is copied from {source}: it must come from outside the repository (~/...)")
    enable = f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={LAUNCHER_TOKEN_FILE} &&"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in (c for c in config[key] if "ray start" in c):
            position = command.find(enable)
            # after the env file is read (it cannot undo it), before Ray starts
            if not command.find(". /home/ray/.ucgm-ray.env") < position < command.find("ray start"):
                problems.append(f"{key}: `ray start` does not run after `{enable}`")
            if set(re.findall(r"RAY_AUTH_MODE=(\S+)", command)) != {"token"}:
                problems.append(f"{key}: sets RAY_AUTH_MODE to something other than token")
    # The dashboard listens on every interface of the head (actors on other nodes query it). The
    # launcher's own security group lets only SSH in from outside; anything more opens it.
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    if any((rule.get("FromPort"), rule.get("ToPort")) != (22, 22) for rule in rules):
        problems.append("provider.security_group opens ports besides SSH: the dashboard must be reached through `ray dashboard`")
    for name, node_type in config["available_node_types"].items():
        if "SecurityGroupIds" in node_type["node_config"]:
            problems.append(f"{name}: own SecurityGroupIds replace the launcher's SSH-only group")
    return problems


def test_cluster_launcher_starts_every_node_with_token_auth_and_the_token_from_outside_the_repo():
    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    assert launcher_auth_problems(config) == []


def _unauthenticated_start(config):
    config["head_start_ray_commands"] = [c.replace("export RAY_AUTH_MODE=token", "export RAY_AUTH_MODE=disabled") for c in config["head_start_ray_commands"]]


def _auth_before_the_env_file(config):
    enable = f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={LAUNCHER_TOKEN_FILE} && "
    config["worker_start_ray_commands"] = [enable + c.replace(enable, "") for c in config["worker_start_ray_commands"]]


@pytest.mark.parametrize(
    "mutate, named",
    [
        (_unauthenticated_start, "head_start_ray_commands: `ray start` does not run after"),
        (_auth_before_the_env_file, "worker_start_ray_commands: `ray start` does not run after"),
        (lambda c: c["file_mounts"].pop(LAUNCHER_TOKEN_FILE), "no file_mounts entry"),
        (lambda c: c["file_mounts"].__setitem__(LAUNCHER_TOKEN_FILE, "infra/auth_token"), "outside the repository"),
        (lambda c: c["provider"].__setitem__("security_group", {"IpPermissions": [{"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}), "opens ports besides SSH"),
        (lambda c: c["available_node_types"]["head"]["node_config"].__setitem__("SecurityGroupIds", ["sg-0123"]), "head: own SecurityGroupIds"),
    ],
    ids=["auth disabled on the head", "auth set before the env file", "no token on the nodes", "token from the repository",
         "dashboard port opened", "own security group"],
)
def test_launcher_auth_check_refuses_a_cluster_that_anyone_could_use(mutate, named):
    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    mutate(config)
    problems = launcher_auth_problems(config)
    assert any(named in problem for problem in problems), problems


# --------------------------------------------------------------------------------------------- image


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\") if pending else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_image_is_rays_gpu_image_of_the_tested_ray_and_a_supported_python():
    ray_version, python_tag = _dockerfile_arg("RAY_VERSION"), _dockerfile_arg("PYTHON_TAG")
    assert _dockerfile_arg("BASE_IMAGE") == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu"
    assert ray_version == ray.__version__
    ray_requirement = next(r for r in _project()["dependencies"] if r.startswith("ray["))
    assert Version(ray_version) in SpecifierSet(ray_requirement.split("]", 1)[1].split(";")[0].split("#")[0].strip())
    python = re.fullmatch(r"py3(\d+)", python_tag)
    assert python, python_tag
    assert Version(f"3.{python.group(1)}") in SpecifierSet(_project()["requires-python"])
    assert ("FROM", "${BASE_IMAGE}") in _final_stage()[:1]


def test_image_installs_the_torch_that_setup_sh_installs():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    match = re.search(r'UCGM_TORCH_PACKAGES:-"([^"]+)"', setup)
    assert match and _dockerfile_arg("TORCH_PACKAGES") == match.group(1)


def test_image_runs_as_a_non_root_user():
    users = [arguments for keyword, arguments in _final_stage() if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").removeprefix("**/")
        parts = Path(path).parts
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))] + list(parts)
        if any(fnmatch(candidate, pattern) for candidate in candidates):
            excluded = not negate
    return excluded


def test_image_copies_files_that_exist_and_that_the_build_context_sends():
    copied = []
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword in ("COPY", "ADD") and "--from=" not in arguments:
            sources = [a for a in arguments.split() if not a.startswith("--")][:-1]
            copied += sources
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"infra/Dockerfile copies {source}, which is not in the repository"
        assert not _dockerignore_excludes(source), f".dockerignore keeps {source} out of the build context"
    for private in (".venv", "outputs", "mlruns", ".git", "infra/kuberay/secret.yaml"):
        assert _dockerignore_excludes(private), f".dockerignore lets {private} into the build context"


def test_image_sets_no_credentials():
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arguments) or [arguments.split()[0]]
            assert not [n for n in names if SECRET_LOOKING.search(n) or n.startswith(("AWS_", "MLFLOW_"))], arguments


BUILDERS = {  # name: (command that answers only when the builder can build, build command)
    "docker": (["docker", "info"], ["docker", "build", "-f", "infra/Dockerfile", "-t", "ucgm-ray:test", "."]),
    "podman": (["podman", "info"], ["podman", "build", "-f", "infra/Dockerfile", "-t", "ucgm-ray:test", "."]),
    "buildah": (["buildah", "info"], ["buildah", "bud", "-f", "infra/Dockerfile", "-t", "ucgm-ray:test", "."]),
    "kaniko": (["executor", "version"], ["executor", "--context", f"dir://{ROOT}", "--dockerfile", "infra/Dockerfile", "--no-push"]),
}


def working_builder() -> tuple[str | None, list[str]]:
    """The first builder that answers, and why each one before it did not."""
    reasons = []
    for name, (probe, _) in BUILDERS.items():
        if shutil.which(probe[0]) is None:
            reasons.append(f"{name}: `{probe[0]}` not on PATH")
            continue
        result = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            reasons.append(f"{name}: `{' '.join(probe)}` failed ({last[0]})")
            continue
        return name, reasons
    return None, reasons


def test_image_builds_where_a_builder_is_available():
    """Pulls Ray's GPU image and installs torch: many GB and many minutes, so it only runs where a
    container builder works (and the network reaches Docker Hub and PyPI)."""
    builder, reasons = working_builder()
    if builder is None:
        pytest.skip("no container builder can build here: " + "; ".join(reasons))
    result = subprocess.run(BUILDERS[builder][1], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"{builder} build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_manifests_files_are_all_checked():
    """A new manifest lands in MANIFESTS only if it is a .yaml (or .yaml.example) file; anything
    else in infra/kuberay would escape the checks above."""
    stray = [p for p in KUBERAY.rglob("*") if p.is_file() and not p.name.endswith((".yaml", ".yaml.example"))]
    assert stray == [], stray
