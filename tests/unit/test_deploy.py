"""Deployment artefacts (deploy/), checked offline: no Docker daemon, no cluster.

* every document under deploy/kubernetes validates against the Kubernetes JSON schema (kubernetes-validate,
  strict: an unknown or misspelt field fails) for the oldest and newest versions we claim;
* cross-checks the schema cannot make: probes, Services, HPA and PDB point at what exists; the ConfigMap names
  real ServerSettings variables and the settings each pod would start with parse (the image's ENV, then the
  ConfigMap, then the container's env, then the entrypoint's flags); the shutdown budget covers the grace period;
* deploy/Dockerfile, parsed as text: multi-stage, wheel built with HNSWLIB_NO_NATIVE=1, the [server] extra
  installed with the constraints file, a runtime stage with only the venv, a numeric non-root USER, and
  ENTRYPOINT llmrec-server.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices

from llmrec.server.settings import ENV_PREFIX, CommandLineSettings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"

# The oldest Kubernetes we claim (native gRPC probes are GA since 1.27, PodDisruptionBudget policy/v1 since 1.21,
# autoscaling/v2 since 1.23) and the newest the pinned kubernetes-validate knows: removed or renamed fields fail.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
TRAINING_STACK = ("torch", "transformers", "optimum")
COMPILERS = ("build-essential", "gcc", "g++", "clang", "make", "cmake")
# Seconds a pod needs after the grace period: close the encoder, a last catalogue snapshot, exit.
SHUTDOWN_MARGIN_S = 10
# Start-up budget: the bundle is hash-checked, loaded and warmed up before SERVING (~1 s for 20k items on a quiet
# machine, far longer from network storage under load).
MIN_STARTUP_BUDGET_S = 120
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


# ---- loading ----------------------------------------------------------------------------------------------------

def _load_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((f"{path.name}: {document.get('kind')}/{document.get('metadata', {}).get('name')}",
                                  document))
    return documents


DOCUMENTS = _load_documents()


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in DOCUMENTS if document["kind"] == kind]


def _workloads() -> list[dict[str, Any]]:
    return [document for _, document in DOCUMENTS if document["kind"] in WORKLOAD_KINDS]


def _name(document: dict[str, Any]) -> str:
    return f"{document['kind']}/{document['metadata']['name']}"


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def _server_container(workload: dict[str, Any]) -> dict[str, Any]:
    """The container that runs llmrec-server: the one with a port named grpc."""
    containers = [c for c in _pod_spec(workload)["containers"]
                  if any(port.get("name") == "grpc" for port in c.get("ports", []))]
    assert len(containers) == 1, f"{_name(workload)}: exactly one container must declare a port named grpc"
    return containers[0]


def _container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", []) if "name" in port}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _bytes(quantity: str | int) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert match, f"cannot read the quantity {quantity!r}"
    number, unit = float(match.group(1)), match.group(2) or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return int(number * scale)


# ---- Dockerfile parsing (plain text: instructions, line continuations, comments, stages) -----------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.args_of("ENV"):
            tokens = shlex.split(args)
            if len(tokens) == 2 and "=" not in tokens[0]:  # legacy `ENV KEY value`
                values[tokens[0]] = tokens[1]
                continue
            for token in tokens:
                key, separator, value = token.partition("=")
                assert separator, f"cannot read ENV {args!r}"
                values[key] = value
        return values

    def runs(self) -> list[str]:
        return self.args_of("RUN")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comment lines are dropped even inside a continuation, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            instructions.append((instruction.upper(), " ".join(args.split())))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def _stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction, args in _instructions(text):
        if instruction == "FROM":
            tokens = [token for token in args.split() if not token.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), tokens[0])
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert instruction == "ARG", f"only ARG may come before the first FROM, not {instruction}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((instruction, args))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return _stages(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def builder(dockerfile: list[Stage]) -> Stage:
    """The stage the runtime stage copies its venv from."""
    sources = {re.search(r"--from=(\S+)", args).group(1) for args in dockerfile[-1].args_of("COPY")
               if "--from=" in args}
    assert len(sources) == 1, f"the runtime stage must copy from exactly one builder stage, not {sources}"
    (source,) = sources
    stages = [stage for stage in dockerfile if stage.name == source]
    assert stages, f"COPY --from={source} names no stage"
    return stages[0]


@pytest.fixture(scope="module")
def runtime(dockerfile: list[Stage]) -> Stage:
    return dockerfile[-1]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), f"not exec form: {args}"
    return value


def _image_uid(runtime: Stage) -> int:
    users = runtime.args_of("USER")
    assert users, "the runtime stage sets no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit(), (f"USER {users[-1]!r} must be numeric: Kubernetes can only enforce runAsNonRoot "
                            "against a numeric user")
    return int(user)


# ---- Kubernetes: schema ----------------------------------------------------------------------------------------

def test_the_manifests_hold_the_serving_resources():
    kinds = {document["kind"] for _, document in DOCUMENTS}
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds, kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version):
    problems = []
    for where, document in DOCUMENTS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            problems.append(f"{where}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:  # an unknown kind or apiVersion
            problems.append(f"{where}: {error.message}")
    assert not problems, "\n".join(problems)


def test_every_resource_is_in_one_namespace():
    namespaces = {document["metadata"].get("namespace") for _, document in DOCUMENTS
                  if document["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, namespaces
    declared = {document["metadata"]["name"] for document in _of_kind("Namespace")}
    assert not declared or namespaces == declared, (namespaces, declared)


# ---- Kubernetes: workloads -------------------------------------------------------------------------------------

def test_workload_selectors_match_their_pods():
    for workload in _workloads():
        assert _selects(workload["spec"]["selector"]["matchLabels"], _pod_labels(workload)), _name(workload)


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_are_native_grpc_health_checks_on_the_grpc_port(probe):
    for workload in _workloads():
        container = _server_container(workload)
        assert probe in container, f"{_name(workload)} has no {probe}"
        check = container[probe]
        assert "grpc" in check, f"{_name(workload)}: {probe} must be a native grpc probe (grpc.health.v1)"
        assert check["grpc"]["port"] == _container_ports(container)["grpc"], (
            f"{_name(workload)}: {probe} checks port {check['grpc']['port']}, the grpc containerPort is "
            f"{_container_ports(container)['grpc']}")
        # "" is the whole server: SERVING only once the bundle is loaded and warmed up
        assert check["grpc"].get("service", "") == "", f"{_name(workload)}: {probe} service"


def test_the_startup_probe_leaves_time_to_load_the_bundle():
    for workload in _workloads():
        probe = _server_container(workload)["startupProbe"]
        budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
        assert budget >= MIN_STARTUP_BUDGET_S, f"{_name(workload)}: {budget} s to reach SERVING"


def test_pods_run_locked_down():
    for workload in _workloads():
        pod = _pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True, _name(workload)
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", _name(workload)
        assert pod.get("automountServiceAccountToken") is False, _name(workload)
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, _name(workload)
            assert context["readOnlyRootFilesystem"] is True, _name(workload)
            assert context["capabilities"]["drop"] == ["ALL"], _name(workload)


def test_pods_run_as_the_image_user(runtime):
    uid = _image_uid(runtime)
    for workload in _workloads():
        context = _pod_spec(workload)["securityContext"]
        assert context.get("runAsUser", uid) == uid, f"{_name(workload)} runs as {context['runAsUser']}, image {uid}"


def test_no_service_link_variables_reach_the_server():
    # With service links on, a Service named llmrec (or llmrec-metrics) makes the kubelet set
    # LLMREC_PORT=tcp://10.x.y.z:50051 (LLMREC_METRICS_PORT=...) in every pod of the namespace.
    for workload in _workloads():
        assert _pod_spec(workload).get("enableServiceLinks") is False, _name(workload)


def test_resources_are_requested_and_limited():
    for workload in _workloads():
        resources = _server_container(workload)["resources"]
        for kind in ("cpu", "memory"):
            assert kind in resources["requests"] and kind in resources["limits"], f"{_name(workload)}: {kind}"
        assert _cpu(resources["requests"]["cpu"]) <= _cpu(resources["limits"]["cpu"]), _name(workload)
        assert _bytes(resources["requests"]["memory"]) <= _bytes(resources["limits"]["memory"]), _name(workload)
        # docs/benchmarks.md: peak RSS ~300 MB with 20k items; leave room for sessions and larger catalogues
        assert _bytes(resources["limits"]["memory"]) >= 512 * 2**20, _name(workload)
        assert _cpu(resources["requests"]["cpu"]) >= 1, _name(workload)


def test_the_bundle_is_mounted_read_only():
    for workload in _workloads():
        mounts = {mount["mountPath"]: mount for mount in _server_container(workload)["volumeMounts"]}
        settings = _effective_settings(workload)
        assert settings.bundle_root is not None, _name(workload)
        mount = mounts.get(str(settings.bundle_root))
        assert mount is not None, f"{_name(workload)}: nothing is mounted at the bundle root {settings.bundle_root}"
        assert mount.get("readOnly") is True, f"{_name(workload)}: the bundle must be mounted read-only"


# ---- Kubernetes: Services, HPA, PDB ----------------------------------------------------------------------------

def test_every_service_routes_to_one_workloads_grpc_port():
    services = _of_kind("Service")
    assert any(service["spec"].get("clusterIP") == "None" for service in services), "no headless Service"
    assert any(service["spec"].get("type", "ClusterIP") == "ClusterIP" and service["spec"].get("clusterIP") != "None"
               for service in services), "no ClusterIP Service"
    for service in services:
        selected = [w for w in _workloads() if _selects(service["spec"]["selector"], _pod_labels(w))]
        # a Service across the readers and the writer would mix two catalogues
        assert len(selected) == 1, f"{_name(service)} selects {[_name(w) for w in selected]}"
        container = _server_container(selected[0])
        ports = _container_ports(container)
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = ports.get(target) if isinstance(target, str) else target
            assert number in ports.values(), f"{_name(service)}: targetPort {target} is no containerPort"
            if port.get("name") == "grpc":
                assert number == ports["grpc"] == container["readinessProbe"]["grpc"]["port"], _name(service)


def test_the_read_fleet_is_replicated_behind_both_services():
    for deployment in _of_kind("Deployment"):
        assert deployment["spec"].get("replicas", 1) >= 2, _name(deployment)
        selecting = [s for s in _of_kind("Service") if _selects(s["spec"]["selector"], _pod_labels(deployment))]
        assert {s["spec"].get("clusterIP") == "None" for s in selecting} == {True, False}, (
            f"{_name(deployment)}: wants a ClusterIP and a headless Service")


def test_the_autoscaler_targets_the_deployment_on_cpu():
    deployments = {d["metadata"]["name"]: d for d in _of_kind("Deployment")}
    autoscalers = _of_kind("HorizontalPodAutoscaler")
    assert autoscalers
    for hpa in autoscalers:
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment"), target
        assert target["name"] in deployments, f"{_name(hpa)} scales {target['name']}, which is not declared"
        deployment = deployments[target["name"]]
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
        assert deployment["spec"].get("replicas", 1) >= hpa["spec"]["minReplicas"], _name(hpa)
        cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
        assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization", _name(hpa)
        for container in _pod_spec(deployment)["containers"]:  # utilisation is measured against the request
            assert "cpu" in container.get("resources", {}).get("requests", {}), container["name"]


def test_the_disruption_budget_covers_the_deployment_only():
    budgets = _of_kind("PodDisruptionBudget")
    assert budgets
    for pdb in budgets:
        assert pdb["apiVersion"] == "policy/v1" and pdb["spec"].get("minAvailable") == 1, _name(pdb)
        selected = [w for w in _workloads() if _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(w))]
        assert [w["kind"] for w in selected] == ["Deployment"], f"{_name(pdb)} selects {[_name(w) for w in selected]}"


# ---- Kubernetes: settings --------------------------------------------------------------------------------------

def _settings_env_names() -> set[str]:
    """Every LLMREC_* variable `llmrec-server` reads: the prefix on each field's name, or on each of its
    validation aliases (env_prefix_target="all" prefixes aliases too); matched case-insensitively."""
    names = set()
    for name, info in CommandLineSettings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            choices = [choice for choice in alias.choices if isinstance(choice, str)]
        elif isinstance(alias, str):
            choices = [alias]
        else:
            choices = [info.alias or name]
        names.update(f"{ENV_PREFIX}{choice}".upper() for choice in choices)
    return names


def test_settings_env_names_are_derived_from_the_model():
    names = _settings_env_names()
    assert {"LLMREC_PORT", "LLMREC_BUNDLE_ROOT", "LLMREC_STATE_DIR", "LLMREC_SESSION_IDLE_TIMEOUT",
            "LLMREC_CONFIG"} <= names
    assert "LLMREC_SESSION_IDLE" not in names


def _config_maps_of(workload: dict[str, Any]) -> list[dict[str, Any]]:
    by_name = {c["metadata"]["name"]: c for c in _of_kind("ConfigMap")}
    maps = []
    for source in _server_container(workload).get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in by_name, f"{_name(workload)} reads ConfigMap {name}, which is not declared"
        maps.append(by_name[name])
    return maps


def test_config_map_keys_are_server_settings():
    names = _settings_env_names()
    config_maps = _of_kind("ConfigMap")
    assert config_maps and all(any(c is m for w in _workloads() for m in _config_maps_of(w)) for c in config_maps), (
        "every ConfigMap should be read by a workload")
    for config_map in config_maps:
        unknown = sorted(key for key in config_map["data"] if key.upper() not in names)
        assert not unknown, f"{_name(config_map)}: {unknown} are no ServerSettings variables"
    for workload in _workloads():
        unknown = [e["name"] for e in _server_container(workload).get("env", [])
                   if e["name"].upper().startswith(ENV_PREFIX) and e["name"].upper() not in names]
        assert not unknown, f"{_name(workload)}: {unknown} are no ServerSettings variables"


@functools.cache
def _image_stage() -> Stage:
    return _stages(DOCKERFILE.read_text())[1][-1]


def _argv(workload: dict[str, Any]) -> list[str]:
    """What the container runs: the image's ENTRYPOINT (or the pod's command) plus the pod's args."""
    container = _server_container(workload)
    command = container.get("command") or _exec_form(_image_stage().args_of("ENTRYPOINT")[-1])
    assert Path(command[0]).name == "llmrec-server", command
    return [*command[1:], *container.get("args", [])]


def _environment(workload: dict[str, Any]) -> dict[str, str]:
    """LLMREC_* as the server sees them: the image's ENV, then the ConfigMaps, then the container's env."""
    env = {key: value for key, value in _image_stage().env().items() if key.startswith(ENV_PREFIX)}
    for config_map in _config_maps_of(workload):
        env.update(config_map["data"])
    for variable in _server_container(workload).get("env", []):
        if "value" in variable:  # a valueFrom (a Secret's key) is unknown here; its name is checked above
            env[variable["name"]] = variable["value"]
    return env


def _effective_settings(workload: dict[str, Any]) -> CommandLineSettings:
    """The settings `llmrec-server` would start with in this pod (a parse error fails the test). Only the pod's
    variables are seen, never the developer's."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.upper().startswith(ENV_PREFIX)]:
            patch.delenv(name)
        for key, value in _environment(workload).items():
            patch.setenv(key, value)
        return parse_settings(_argv(workload))


def test_each_pod_starts_with_valid_settings_that_match_its_ports():
    for workload in _workloads():
        settings = _effective_settings(workload)
        ports = _container_ports(_server_container(workload))
        assert settings.host == "0.0.0.0", f"{_name(workload)} listens on {settings.host} only"
        assert settings.port == ports["grpc"], f"{_name(workload)}: server port {settings.port}, grpc port {ports}"
        if settings.metrics:  # on by default: the port must be declared and scraped where it is served
            assert ports.get("metrics") == settings.metrics_port, f"{_name(workload)}: metrics on {settings.metrics_port}"
            annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/port") == str(settings.metrics_port), _name(workload)
            assert annotations.get("prometheus.io/scrape") == "true", _name(workload)
        else:
            assert "metrics" not in ports, f"{_name(workload)} declares a metrics port it does not serve"


def test_no_config_map_setting_is_shadowed_by_a_flag():
    # flags beat LLMREC_* variables: a ConfigMap key for a flag the entrypoint or args pass is dead
    for workload in _workloads():
        flagged = {token[2:].split("=")[0].replace("-", "_") for token in _argv(workload) if token.startswith("--")}
        shadowed = {f"{ENV_PREFIX}{name}".upper() for name in flagged}
        for config_map in _config_maps_of(workload):
            dead = sorted(key for key in config_map["data"] if key.upper() in shadowed)
            assert not dead, f"{_name(config_map)}: {dead} are overridden by {_name(workload)}'s flags"


def test_threads_fit_the_cpu_limit():
    # 0 (auto) counts the node's cores (sched_getaffinity), not the container's CPU quota
    for workload in _workloads():
        settings = _effective_settings(workload)
        limit = _cpu(_server_container(workload)["resources"]["limits"]["cpu"])
        for name in ("intra_op_threads", "encoder_workers"):
            threads = getattr(settings, name)
            assert 1 <= threads <= max(1, int(limit)), f"{_name(workload)}: {name}={threads}, CPU limit {limit}"


def test_termination_grace_covers_the_drain_and_the_servers_grace_period():
    # The server drains itself (drain_seconds: NOT_SERVING but still serving) after SIGTERM; a preStop sleep,
    # if a manifest keeps one, comes before SIGTERM and adds to it.
    for workload in _workloads():
        settings = _effective_settings(workload)
        pod = _pod_spec(workload)
        pre_stop = _server_container(workload).get("lifecycle", {}).get("preStop", {})
        if "sleep" in pre_stop:
            pre_stop_s = pre_stop["sleep"]["seconds"]
        elif pre_stop:
            command = pre_stop.get("exec", {}).get("command", [])
            assert command[:1] == ["sleep"], f"{_name(workload)}: a preStop hook should only sleep"
            pre_stop_s = float(command[1])
        else:
            pre_stop_s = 0
        drain = pre_stop_s + settings.drain_seconds
        assert drain > 0, f"{_name(workload)}: no drain period (LLMREC_DRAIN_SECONDS) before the server stops"
        needed = drain + settings.grace_seconds + SHUTDOWN_MARGIN_S
        assert pod.get("terminationGracePeriodSeconds", 30) > needed, (
            f"{_name(workload)}: terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} <= "
            f"drain {drain} + grace {settings.grace_seconds} + {SHUTDOWN_MARGIN_S}")


def test_only_a_single_writer_keeps_catalogue_state():
    # The state directory is locked by one server and its journal is private to it: replicated pods must not
    # have one (their writes would diverge), and the one that does must be a single StatefulSet pod on its
    # own persistent volume.
    for workload in _workloads():
        settings = _effective_settings(workload)
        if settings.state_dir is None:
            continue
        assert workload["kind"] == "StatefulSet" and workload["spec"].get("replicas", 1) == 1, (
            f"{_name(workload)} keeps catalogue state in {settings.state_dir} but may run several pods")
        mounts = {m["mountPath"]: m for m in _server_container(workload)["volumeMounts"]}
        mount = mounts.get(str(settings.state_dir))
        assert mount is not None and not mount.get("readOnly", False), f"{_name(workload)}: state dir mount"
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        claims |= {v["name"] for v in _pod_spec(workload).get("volumes", []) if "persistentVolumeClaim" in v}
        assert mount["name"] in claims, f"{_name(workload)}: the state dir must be on a PersistentVolumeClaim"
    for deployment in _of_kind("Deployment"):
        assert _effective_settings(deployment).state_dir is None, _name(deployment)


# ---- Dockerfile ------------------------------------------------------------------------------------------------

def test_the_image_is_multi_stage_on_one_slim_python_3_11(dockerfile, builder, runtime):
    assert len(dockerfile) >= 2 and builder is not runtime
    # the venv's scripts point at the builder's interpreter: both stages need the same Python at the same path
    assert runtime.base == builder.base, (runtime.base, builder.base)
    assert re.match(r"(docker\.io/(library/)?)?python:3\.11[.\d]*-slim", runtime.base), runtime.base


def test_the_builder_builds_the_wheel_with_hnswlib_not_native(builder):
    env = builder.env()
    inline = any(re.search(r"\bHNSWLIB_NO_NATIVE=1\b", run) for run in builder.runs())
    assert env.get("HNSWLIB_NO_NATIVE") == "1" or inline, "hnswlib would be compiled for the build machine's CPU"
    assert any(re.search(r"pip (wheel|install)\b.*\s\.(\s|$)|-m build\b", run) for run in builder.runs()), (
        "the builder must build the llmrec wheel from the checkout (setup.py generates the stubs)")


def _server_installs(builder: Stage) -> list[str]:
    installs = [run for run in builder.runs() if re.search(r"pip install\b.*\[server\]", run)]
    assert installs, "the builder never installs llmrec[server]"
    return installs


def test_the_server_extra_is_installed_with_the_constraints_file(builder):
    copied = " ".join(builder.args_of("COPY"))
    for install in _server_installs(builder):
        match = re.search(r"(?:-c|--constraint)[ =](\S+)", install)
        assert match, f"not constrained: {install}"
        constraints = match.group(1)
        assert constraints == "requirements/constraints.txt" or constraints.endswith("/requirements/constraints.txt")
        assert "requirements/constraints.txt" in copied, "the constraints file is not copied into the builder"
        assert not re.search(r"\[[^\]]*\btrain\b", install), f"the train extra would bring torch: {install}"


def test_no_stage_installs_the_training_stack_and_the_runtime_builds_nothing(dockerfile, runtime):
    for stage in dockerfile:
        for run in stage.runs():
            for install in re.findall(r"(?:pip|uv pip) install[^&;|]*", run):
                named = [package for package in TRAINING_STACK if re.search(rf"\b{package}\b", install)]
                assert not named, f"{stage.name or stage.base} installs {named}: {install}"
    for run in runtime.runs():
        assert not re.search(r"\bpip install\b", run), f"the runtime stage installs packages: {run}"
        for apt in re.findall(r"apt-get install[^&;|]*", run):
            found = [c for c in COMPILERS if re.search(rf"(?<![\w.+-]){re.escape(c)}(?![\w.+-])", apt)]
            assert not found, f"compilers in the runtime stage: {found}"
    copies = [args for args in runtime.args_of("COPY") + runtime.args_of("ADD")]
    assert copies and all(args.startswith("--from=") for args in copies), f"the runtime stage copies {copies}"


def test_the_runtime_runs_as_a_fixed_non_root_user(runtime):
    assert _image_uid(runtime) > 0, "the runtime stage runs as root"


def test_the_entrypoint_is_llmrec_server_on_all_interfaces(runtime):
    entrypoints = runtime.args_of("ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT"
    command = _exec_form(entrypoints[-1])  # exec form: the server is PID 1 and gets SIGTERM itself
    assert command[0] == "llmrec-server", command
    assert "--host" in command and command[command.index("--host") + 1] == "0.0.0.0", command


def test_the_runtime_declares_its_volumes_ports_and_valid_settings(runtime):
    env = runtime.env()
    assert env.get("LLMREC_BUNDLE_ROOT") == "/bundles" and env.get("LLMREC_STATE_DIR") == "/state", env
    names = _settings_env_names()
    unknown = sorted(key for key in env if key.startswith(ENV_PREFIX) and key.upper() not in names)
    assert not unknown, f"the image sets {unknown}, which are no ServerSettings variables"
    volumes = {v for args in runtime.args_of("VOLUME") for v in (_exec_form(args) if args.startswith("[")
                                                                     else args.split())}
    assert {"/bundles", "/state"} <= volumes, volumes
    exposed = {int(port.split("/")[0]) for args in runtime.args_of("EXPOSE") for port in args.split()}
    port = int(env.get("LLMREC_PORT", CommandLineSettings.model_fields["port"].default))
    assert port in exposed, f"gRPC port {port} is not EXPOSEd ({exposed})"
    if env.get("LLMREC_METRICS_PORT"):
        assert int(env["LLMREC_METRICS_PORT"]) in exposed, f"metrics port is not EXPOSEd ({exposed})"


def _package_dir(package: str, package_dir: dict[str, str]) -> str:
    """Where setuptools finds `package`: the nearest mapped parent in [tool.setuptools.package-dir]."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        parent = ".".join(parts[:cut])
        if parent in package_dir:
            return "/".join([package_dir[parent], *parts[cut:]])
    return "/".join(parts)


def test_the_build_context_carries_every_package(builder):
    """The wheel build needs every package folder of pyproject.toml, the protos, setup.py and the readme; each
    COPY source must exist and pass the .dockerignore allowlist."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    needed = {_package_dir(package, setuptools.get("package-dir", {})).split("/")[0]
              for package in setuptools["packages"]} | {"protos", "setup.py", "pyproject.toml",
                                                             pyproject["project"]["readme"]}
    sources = set()
    for args in builder.args_of("COPY"):
        tokens = [token for token in args.split() if not token.startswith("--")]
        sources.update(token.rstrip("/") for token in tokens[:-1])
    missing = sorted(path for path in needed if path not in sources)
    assert not missing, f"the builder does not COPY {missing}"
    allowed = {line[1:].strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert source in allowed, f"COPY {source}: excluded by {DOCKERIGNORE.name}"
