"""The Kubernetes manifests (deploy/), checked without a cluster.

* Every overlay, every component on top of the single-gpu overlay and the prometheus-adapter
  rules render with kustomize: its own binary where installed, else the one built into kubectl.
* Every rendered object validates against the Kubernetes API's OpenAPI schemas, strictly
  (unknown fields rejected), for every Kubernetes minor version that kubernetes-validate ships
  from MIN_KUBERNETES on; objects without a schema fail rather than pass unchecked. Broken
  objects and a broken overlay are shown to be rejected.
* yamllint passes on deploy/ with the repository's .yamllint.
* The objects agree with each other (selectors, named ports, the autoscaler's metric and the
  adapter's rule), with the image (uid, ports, /cache, the entrypoint's variables, parsed by
  the image's own option parser) and with python_backend/names.py (the ensembles' names).
"""
from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions
from packaging.version import Version
from yamllint import linter
from yamllint.config import YamlLintConfig

from fasterrcnn.options import Options, env_variables
from python_backend import names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"

# The oldest Kubernetes the manifests claim (docs/deploy.md): every field they use exists there.
MIN_KUBERNETES = "1.27"
VERSIONS = [v for v in all_versions() if Version(v) >= Version(MIN_KUBERNETES)]

OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (DEPLOY / "components").iterdir() if (p / "kustomization.yaml").is_file())
# What each render must ask for: GPUs per pod and engine precision.
EXPECTED = {"single-gpu": (1, "fp16"), "multi-gpu": (2, "fp16"), "single-gpu-fp32": (1, "fp32"),
            "single-gpu+fp32": (1, "fp32"), "single-gpu+node-cache": (1, "fp16"),
            "single-gpu+restricted": (1, "fp16")}
RENDERS = OVERLAYS + [f"single-gpu+{c}" for c in COMPONENTS]
SERVER, PREPARE = "tritonserver", "prepare"


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def _kustomize_command() -> list[str] | None:
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize"]
    return None


def _require_kustomize() -> list[str]:
    command = _kustomize_command()
    if command is None:
        # these machines' image carries kubectl (google-cloud-sdk); a machine without it skips with
        # the reason rather than failing the suite for a missing tool
        pytest.skip("neither kustomize nor kubectl (which embeds kustomize) is on PATH")
    return command


def kustomize(folder: Path) -> list[dict]:
    """The objects ``kustomize build folder`` prints; raises RuntimeError with kustomize's message."""
    proc = subprocess.run([*_require_kustomize(), str(folder)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kustomize failed on {folder}: {proc.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(proc.stdout) if obj]


def _overlay_with_component(tmp: Path, component: str) -> Path:
    """A kustomization in ``tmp`` of the single-gpu overlay plus one component (kustomize takes
    only relative paths)."""
    rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [rel(DEPLOY / "overlays" / "single-gpu")],
        "components": [rel(DEPLOY / "components" / component)]}))
    return tmp


@functools.cache
def _render_cached(name: str, tmp: str) -> tuple[dict, ...]:
    if name == "prometheus-adapter":
        return tuple(kustomize(DEPLOY / "prometheus-adapter"))
    overlay, _, component = name.partition("+")
    if not component:
        return tuple(kustomize(DEPLOY / "overlays" / overlay))
    folder = Path(tmp) / name
    folder.mkdir(parents=True, exist_ok=True)
    return tuple(kustomize(_overlay_with_component(folder, component)))


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("kustomize"))
    return lambda name: copy.deepcopy(list(_render_cached(name, tmp)))


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def containers(deployment: dict) -> dict[str, dict]:
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


# ----------------------------------------------------------------------------------------------
# Schemas and lint
# ----------------------------------------------------------------------------------------------

def validate(obj: dict, version: str) -> None:
    """kubernetes-validate, strict; an object without a schema is an error, not a warning."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except SchemaNotFoundError as e:
        raise AssertionError(e.message) from None


def test_every_render_is_covered():
    assert set(RENDERS) == set(EXPECTED), "add the new overlay or component to EXPECTED"
    assert len(VERSIONS) >= 5, f"kubernetes-validate ships {all_versions()}"


@pytest.mark.parametrize("name", RENDERS + ["prometheus-adapter"])
def test_render_validates_against_kubernetes_schemas(render, name):
    objects = render(name)
    kinds = sorted(o["kind"] for o in objects)
    if name == "prometheus-adapter":
        assert kinds == ["ConfigMap"]
    else:
        pvc = [] if name.endswith("+node-cache") else ["PersistentVolumeClaim"]
        assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                "Service", "Service", *pvc])
    failures = []
    for obj in objects:
        for version in VERSIONS:
            try:
                validate(obj, version)
            except kubernetes_validate.ValidationError as e:  # its repr holds the whole schema: keep the gist
                path = ".".join(str(p) for p in e.path)
                failures.append(f"{obj['kind']}/{obj['metadata']['name']} fails Kubernetes {version} at "
                                f"{path}: {e.message}")
    assert not failures, f"{name}:\n" + "\n".join(failures)


def _parent(obj: dict, path: str) -> tuple[dict, str]:
    """The mapping holding the dotted ``path`` (list items by index) and the last key."""
    *head, last = path.split(".")
    for key in head:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    return obj, last


def _set(path: str, value):
    def mutate(obj):
        parent, key = _parent(obj, path)
        parent[key] = value
    return mutate


def _delete(path: str):
    def mutate(obj):
        parent, key = _parent(obj, path)
        del parent[key]
    return mutate


POD = "spec.template.spec"
BROKEN = {
    "replicas as a string": (_set("spec.replicas", "2"), "is not of type 'integer'"),
    "no containers": (_delete(f"{POD}.containers"), "'containers' is a required property"),
    "misspelt field": (_set(f"{POD}.containers.0.livenessprobe", {}), "'livenessprobe' was unexpected"),
    "port as text": (_set(f"{POD}.containers.0.ports.0.containerPort", "8000"), "is not of type 'integer'"),
    "no selector": (_delete("spec.selector"), "'selector' is a required property"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validator_rejects_a_broken_deployment(render, case):
    deployment = one(render("single-gpu"), "Deployment")
    validate(deployment, VERSIONS[-1])  # the unbroken one passes, so the rejection below is the mutation's
    mutate, message = BROKEN[case]
    mutate(deployment)
    for version in (VERSIONS[0], VERSIONS[-1]):
        with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(message)):
            validate(deployment, version)


def test_validator_rejects_a_kind_without_schema():
    with pytest.raises(AssertionError, match="Couldn't find schema"):
        validate({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                  "metadata": {"name": "fasterrcnn"}, "spec": {}}, VERSIONS[-1])


def test_kustomize_rejects_a_patch_of_a_missing_object(tmp_path):
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "no-such-deployment"},
        "spec": {"template": {"spec": {"containers": [{"name": SERVER, "image": "x"}]}}}}))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(DEPLOY / "base", tmp_path)], "patches": [{"path": "patch.yaml"}]}))
    with pytest.raises(RuntimeError, match="no-such-deployment"):
        kustomize(tmp_path)


def _yamllint_config() -> YamlLintConfig:
    return YamlLintConfig(file=str(ROOT / ".yamllint"))


def test_yamllint_passes():
    files = sorted(DEPLOY.rglob("*.yaml")) + [ROOT / ".yamllint"]
    assert len(files) >= 10
    problems = [f"{f.relative_to(ROOT)}:{p.line}: {p.rule}: {p.desc}"
                for f in files for p in linter.run(f.read_text(), _yamllint_config(), str(f))]
    assert not problems, "\n".join(problems)


def test_yamllint_config_rejects_broken_yaml():
    text = "spec:\n  replicas: 1\n  replicas: 2\n  image: " + "x" * 120 + "\n  enabled: yes\n"
    rules = {p.rule for p in linter.run(text, _yamllint_config())}
    assert rules == {"key-duplicates", "line-length", "truthy"}


# ----------------------------------------------------------------------------------------------
# The objects against each other and against the image
# ----------------------------------------------------------------------------------------------

def _dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\d+)", DOCKERFILE.read_text(), re.M)
    assert users, "the Dockerfile sets no numeric USER"
    return int(users[-1].split(":")[0])


def _dockerfile_ports() -> set[int]:
    exposed = re.findall(r"^EXPOSE\s+(.+)$", DOCKERFILE.read_text(), re.M)
    return {int(p.split("/")[0]) for line in exposed for p in line.split()}


def _dockerfile_cache_dir() -> str:
    found = re.findall(r"^ENV\s+CACHE_DIR=(\S+)", DOCKERFILE.read_text(), re.M)
    assert found, "the Dockerfile sets no CACHE_DIR"
    return found[-1]


def _gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _settings(objects: list[dict], container: dict) -> dict[str, str]:
    """The variables a container gets from its envFrom ConfigMaps (which must be in the render)."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        values.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    return values


@pytest.mark.parametrize("name", RENDERS)
def test_gpus_and_settings(render, name):
    objects = render(name)
    deployment = one(objects, "Deployment")
    by_name = containers(deployment)
    gpus, precision = EXPECTED[name]
    # the prepare step builds engines on the same GPUs the server then runs them on
    assert _gpu_limit(by_name[SERVER]) == gpus
    assert _gpu_limit(by_name[PREPARE]) == gpus
    assert sum(_gpu_limit(c) for c in deployment["spec"]["template"]["spec"]["containers"]) == gpus

    settings = _settings(objects, by_name[SERVER])
    assert settings == _settings(objects, by_name[PREPARE]), "prepare and serve must see the same settings"
    unknown = set(settings) - set(env_variables())
    assert not unknown, f"variables the image does not read: {sorted(unknown)}"
    options = Options.from_env(settings)  # the image's own parser: raises on a bad value
    assert options.target == "tensorrt" and options.precision == precision
    # GPUS pins instances to CUDA ids: they must exist among the pod's GPUs ('all' is every one)
    assert options.gpus is None or max(options.gpus) < gpus


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize("name", RENDERS)
def test_prepare_then_serve(render, name):
    deployment = one(render(name), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    prepare, server = containers(deployment)[PREPARE], containers(deployment)[SERVER]
    assert [c["name"] for c in spec["initContainers"]][-1] == PREPARE, "prepare runs last, right before the server"
    assert _env(prepare)["PREPARE_ONLY"] == "1" and "PREPARE_ONLY" not in _env(server)
    assert _env(server)["REBUILD"] == "0", "the server must reuse what prepare built"
    readers = [ENTRYPOINT, *sorted((ROOT / "fasterrcnn").glob("*.py"))]
    assert any("PREPARE_ONLY" in p.read_text() for p in readers), "the image no longer reads PREPARE_ONLY"
    assert {c["image"] for c in containers(deployment).values()} == {"fasterrcnn-triton:25.10"}
    assert "command" not in prepare and "command" not in server, "both go through the image's entrypoint"


@pytest.mark.parametrize("name", RENDERS)
def test_cache_volume(render, name):
    objects = render(name)
    deployment = one(objects, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    cache_dir = _dockerfile_cache_dir()
    for container in containers(deployment).values():
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get(cache_dir) == "cache", f"{container['name']} does not mount the cache at {cache_dir}"
    sources = set(volumes["cache"]) - {"name"}
    # the cache's owner: fsGroup alone fails where the volume's CSI driver ignores it
    owner = containers(deployment).get("cache-owner")
    if name.endswith("+restricted"):
        assert owner is None, "the restricted Pod Security level admits no root container"
    else:
        assert deployment["spec"]["template"]["spec"]["initContainers"][0] is owner, "cache-owner runs first"
        assert owner["command"][-2:] == [str(_dockerfile_uid()), cache_dir]
    if name.endswith("+node-cache"):
        assert sources == {"hostPath"}
        assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    else:
        assert sources == {"persistentVolumeClaim"}
        claim = one(objects, "PersistentVolumeClaim", volumes["cache"]["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes share the cache"
    # the python backend's shared memory: RAM, not the container's disk (docker run --shm-size)
    server_mounts = {m["mountPath"]: m["name"] for m in containers(deployment)[SERVER]["volumeMounts"]}
    assert volumes[server_mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("name", RENDERS)
def test_security_context_matches_the_image(render, name):
    deployment = one(render(name), "Deployment")
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    uid = _dockerfile_uid()
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"], pod["runAsNonRoot"]) == (uid, uid, uid, True)
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    # Pod Security "restricted" allows these volume types only; node-cache's hostPath needs "privileged"
    restricted = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                  "secret"}
    types = {key for v in deployment["spec"]["template"]["spec"]["volumes"] for key in v if key != "name"}
    assert types - restricted == ({"hostPath"} if name.endswith("+node-cache") else set())
    for c in containers(deployment).values():
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        if c["name"] == "cache-owner":  # root only to chown the cache folder, with CHOWN alone
            assert (sc["runAsUser"], sc["capabilities"]["add"]) == (0, ["CHOWN"])
        else:
            assert "runAsUser" not in sc and "add" not in sc["capabilities"]
        assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"]


def _stand_in(folder: Path, name: str, status: int) -> None:
    """An executable ``name`` that records its arguments in ``folder/name.args`` and exits ``status``."""
    exe = folder / name
    exe.write_text(f'#!/bin/sh\necho "$@" > "{folder / name}.args"\nexit {status}\n')
    exe.chmod(0o755)


@pytest.mark.parametrize("case", ["owned", "given", "root squashed"])
def test_cache_owner_gives_the_cache_to_the_image_user(render, tmp_path, case):
    """cache-owner's script, run here on a folder: it leaves a folder the image's uid owns, chowns
    one it doesn't, and where chown fails (root squashed on NFS) says so without failing the pod
    (a folder open to all still works; otherwise the entrypoint stops with the fix)."""
    owner = containers(one(render("single-gpu"), "Deployment"))["cache-owner"]
    *script, uid, _ = owner["command"]
    assert script[:2] == ["sh", "-c"] and uid == str(_dockerfile_uid())
    cache = tmp_path / "cache"
    cache.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "chown", 1 if case == "root squashed" else 0)
    if case == "owned":
        uid = str(cache.stat().st_uid)
    result = subprocess.run([*script, uid, str(cache)], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    chowned = (bin_dir / "chown.args").read_text().split() if (bin_dir / "chown.args").exists() else None
    if case == "owned":
        assert chowned is None and not result.stdout + result.stderr
    else:
        assert chowned == [f"{uid}:{uid}", str(cache)]
    if case == "given":
        assert result.stdout == f"cache-owner: gave {cache} to uid {uid}\n"
    if case == "root squashed":
        mode = f"{cache.stat().st_mode & 0o777:o}"
        assert f"could not give {cache} to uid {uid}" in result.stderr and f"mode {mode}" in result.stderr


def _port(container: dict, name_or_number) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert name_or_number in ports, f"no container port named {name_or_number!r}"
    return ports[name_or_number]


def _args(container: dict) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container.get("args", []))


@pytest.mark.parametrize("name", RENDERS)
def test_probes_ports_and_shutdown(render, name):
    deployment = one(render(name), "Deployment")
    server = containers(deployment)[SERVER]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert set(ports.values()) == _dockerfile_ports()
    # Triton's health endpoints, on its HTTP port
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        get = server[probe]["httpGet"]
        assert (get["path"], _port(server, get["port"])) == (path, 8000), probe
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "tritonserver's engine load needs minutes"
    # SIGTERM: the preStop sleep, then tritonserver's drain, both inside the grace period
    sleep = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = int(sleep[1]) + int(_args(server)["exit-timeout-secs"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain + 10
    # Prometheus scrapes Triton's metrics port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", RENDERS)
def test_services_budget_and_autoscaler_find_the_pods(render, name):
    objects = render(name)
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    server = containers(deployment)[SERVER]
    for service in (o for o in objects if o["kind"] == "Service"):
        assert _selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert _port(server, port["targetPort"]) == port["port"], (service["metadata"]["name"], port["name"])
    service_ports = {p["name"]: p["port"] for p in one(objects, "Service", "fasterrcnn")["spec"]["ports"]}
    assert service_ports["http"] == 8000 and service_ports["grpc"] == 8001
    assert one(objects, "Service", "fasterrcnn-headless")["spec"]["clusterIP"] == "None"

    assert _selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                      deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def _adapter_rules(render) -> list[dict]:
    config_map = one(render("prometheus-adapter"), "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def test_autoscaler_metric_is_the_adapter_rule(render):
    rules = _adapter_rules(render)
    hpa = one(render("single-gpu"), "HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    served = {r["name"]["as"]: r for r in rules}
    assert metric["pods"]["metric"]["name"] in served, f"the adapter serves {sorted(served)}"
    rule = served[metric["pods"]["metric"]["name"]]
    # per pod and namespace: the HPA asks for the pods of its Deployment
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)


def test_adapter_rule_divides_step_queue_time_by_ensemble_requests(render):
    [rule] = _adapter_rules(render)
    query = " ".join(rule["metricsQuery"].split())
    ensembles = f"{names.ENSEMBLE}|{names.ENSEMBLE_RAW}"
    numerator, _, denominator = query.partition(" / ")
    # the steps' queues (every model but the ensembles), over the requests the ensembles served
    assert f'nv_inference_queue_duration_us{{<<.LabelMatchers>>,model!~"{ensembles}"}}' in numerator
    assert f'nv_inference_request_success{{<<.LabelMatchers>>,model=~"{ensembles}"}}' in denominator
    assert numerator.startswith("sum by (<<.GroupBy>>)") and denominator.startswith("clamp_min(")
    for side in (numerator, denominator):
        assert re.search(r"rate\(\w+\{[^}]*\}\[1m\]\)", side), side
