"""The deployment files, checked offline (no docker, no cluster):

- ``deploy/k8s/``: every manifest validates against the Kubernetes OpenAPI schemas
  (kubernetes-validate, strict: unknown fields fail), every reference between them
  resolves, the worker's probes and ports are what ``cloud serve`` serves, each setting is
  a real ``cloud serve`` flag, the autoscaler's metric is one the worker exports, and the
  EMQX ACL gives devices and workers exactly their topics;
- ``docker/*.Dockerfile``: every image builds on ``ARG BASE``; the edge image copies
  only the contract and the edge package, and a wheel built from just those holds only
  them;
- ``docker/compose.yaml``: the services, host networking off port 1883, the workers'
  health checks on their metrics ports, the fleet's flags, the prepare step's output.

The images themselves are built and run by ``docker/bench-images.sh`` (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from paho.mqtt.client import topic_matches_sub

from cloud_service.http import MetricsHTTP
from cloud_service.metrics import Metrics
from splitinfer.cli import build_parser
from splitinfer.mqtt import BrokerConfig
from splitinfer.topics import Topics

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "docker"
# The oldest Kubernetes release still in common managed offerings, and the newest the
# schema package knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

Doc = dict[str, Any]


@functools.cache
def manifests() -> list[tuple[str, Doc]]:  # read once; callers copy before changing
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((f"{path.relative_to(REPO)}:{doc['kind']}/"
                            f"{doc['metadata']['name']}", doc))
    return out


def find(kind: str, name: str) -> Doc:
    hits = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name} under deploy/k8s, found {len(hits)}"
    return hits[0]


def subparser(*names: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = build_parser()
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def flags(*names: str) -> set[str]:
    return {o for a in subparser(*names)._actions for o in a.option_strings}


def env_of(flag: str) -> str:  # splitinfer.cli.env_default's naming
    return "SPLITINFER_" + flag.lstrip("-").upper().replace("-", "_")


# ---------------------------------------------------------------- Kubernetes

def test_there_are_manifests_for_each_part() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in manifests()}
    for wanted in [("Namespace", "splitinfer"), ("StatefulSet", "emqx"),
                   ("Service", "emqx"), ("Service", "emqx-headless"),
                   ("ConfigMap", "emqx-config"), ("Secret", "emqx-auth"),
                   ("Deployment", "splitinfer-worker"), ("ConfigMap", "splitinfer-worker"),
                   ("Secret", "splitinfer-worker-credentials"),
                   ("HorizontalPodAutoscaler", "splitinfer-worker"),
                   ("PersistentVolumeClaim", "splitinfer-artifacts")]:
        assert wanted in kinds, f"deploy/k8s lacks {wanted[0]}/{wanted[1]}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    for where, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is not valid Kubernetes {version}: {exc.message} "
                        f"at {'.'.join(str(p) for p in exc.path)}")


def test_the_validator_rejects_what_kubernetes_would() -> None:
    """The check above can fail: a misspelt field, a wrong type, a missing selector."""
    good = find("Deployment", "splitinfer-worker")
    version = K8S_VERSIONS[-1]
    kubernetes_validate.validate(good, version, strict=True)
    typo = copy.deepcopy(good)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "two"
    no_selector = copy.deepcopy(good)
    del no_selector["spec"]["selector"]
    for bad in (typo, wrong_type, no_selector):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, version, strict=True)


def test_everything_lives_in_a_declared_namespace() -> None:
    namespaces = {d["metadata"]["name"] for _, d in manifests() if d["kind"] == "Namespace"}
    for where, doc in manifests():
        if doc["kind"] == "Namespace":
            continue
        ns = doc["metadata"].get("namespace")
        assert ns, f"{where}: no metadata.namespace"
        if not where.startswith("deploy/k8s/monitoring/"):  # the adapter's, installed apart
            assert ns in namespaces, f"{where}: namespace {ns} is not declared"


def _pod_specs() -> Iterator[tuple[str, Doc, Doc]]:
    for where, doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield where, doc, doc["spec"]["template"]


def test_references_resolve() -> None:
    """Selectors match their pods, and every ConfigMap, Secret (and key), volume and
    claim a pod names exists in deploy/k8s."""
    objects = {(d["kind"], d["metadata"]["name"]): d for _, d in manifests()}

    def keys(kind: str, name: str, where: str) -> set[str]:
        assert (kind, name) in objects, f"{where} names {kind}/{name}, not in deploy/k8s"
        obj = objects[(kind, name)]
        return set(obj.get("data", {})) | set(obj.get("stringData", {}))

    for where, doc, template in _pod_specs():
        labels = template["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
        spec = template["spec"]
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"] for v in spec.get("volumes", [])} | claims
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                have = keys("ConfigMap", volume["configMap"]["name"], where)
                assert {i["key"] for i in volume["configMap"].get("items", [])} <= have
            if "secret" in volume:
                have = keys("Secret", volume["secret"]["secretName"], where)
                assert {i["key"] for i in volume["secret"].get("items", [])} <= have
            if "persistentVolumeClaim" in volume:
                keys("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"],
                     where)
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mount of unknown {mount['name']}"
                if "subPath" in mount:
                    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
                    assert mount["subPath"] in keys("ConfigMap", volume["configMap"]["name"],
                                                    where)
            for source in container.get("envFrom", []):
                keys("ConfigMap", source["configMapRef"]["name"], where)
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if field in ref:
                        assert ref[field]["key"] in keys(kind, ref[field]["name"], where), \
                            f"{where}: {kind}/{ref[field]['name']} has no key {ref[field]['key']}"
    for where, doc in manifests():
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
            assert any(selector.items() <= t["metadata"]["labels"].items()
                       for _, _, t in _pod_specs()), f"{where} selects no pods"
        if doc["kind"] == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            assert (target["kind"], target["name"]) in objects, where


def _worker() -> tuple[Doc, dict[str, str]]:
    container = find("Deployment", "splitinfer-worker")["spec"]["template"]["spec"]["containers"][0]
    return container, find("ConfigMap", "splitinfer-worker")["data"]


def test_worker_settings_are_cloud_serve_flags() -> None:
    container, config = _worker()
    known = {env_of(f) for f in flags("cloud", "serve") if f.startswith("--")}
    # read by splitinfer.mqtt.BrokerConfig, so the password stays out of the URL
    known.add("SPLITINFER_BROKER_PASSWORD")
    names = set(config) | {e["name"] for e in container.get("env", [])}
    assert names - known == set(), f"not settings of 'splitinfer cloud serve': {names - known}"
    assert container["env"][0]["name"] == "SPLITINFER_WORKER_ID"  # stable, from the pod name
    assert subparser("cloud", "serve").parse_args(
        ["--artifacts", config["SPLITINFER_ARTIFACTS"],
         "--max-batch", config["SPLITINFER_MAX_BATCH"],
         "--metrics-port", config["SPLITINFER_METRICS_PORT"]]).metrics_port == 9100
    broker = BrokerConfig.from_url(config["SPLITINFER_BROKER"])
    assert (broker.host, broker.port, broker.username, broker.protocol) == \
        ("emqx.splitinfer.svc.cluster.local", 1883, "worker", "5")
    emqx = find("Service", "emqx")
    assert broker.host.split(".")[:2] == [emqx["metadata"]["name"], emqx["metadata"]["namespace"]]
    assert broker.port in {p["port"] for p in emqx["spec"]["ports"]}
    # the worker's user is in the broker's bootstrap users and the ACL's worker pattern
    users = find("Secret", "emqx-auth")["stringData"]["users.csv"].splitlines()
    assert any(line.split(",")[0] == broker.username for line in users[1:])


def test_worker_probes_hit_what_the_worker_serves() -> None:
    """Ports and paths agree with the ConfigMap, and a real MetricsHTTP answers them:
    /healthz 200 always, /readyz 200 only when ready (503 otherwise), /metrics carries the
    autoscaler's series."""
    container, config = _worker()
    assert config["SPLITINFER_METRICS_HOST"] == "0.0.0.0"  # a kubelet probes the pod IP
    port = int(config["SPLITINFER_METRICS_PORT"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"metrics": port}
    template = find("Deployment", "splitinfer-worker")["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe",
                                                   "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert all(p["port"] in ("metrics", port) for p in probes.values())

    ready = {"now": False}
    metrics = Metrics()
    http = MetricsHTTP(metrics.registry, lambda: ready["now"], port=0).start()
    try:
        def status(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(http.url + path, timeout=5) as reply:
                    return reply.status, reply.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, ""
        for probe in probes.values():
            if probe["path"] == "/readyz":
                assert status("/readyz")[0] == 503
                ready["now"] = True
                assert status("/readyz")[0] == 200
            else:
                assert status(probe["path"])[0] == 200
        code, text = status("/metrics")
        assert code == 200
    finally:
        http.stop()
    hpa = find("HorizontalPodAutoscaler", "splitinfer-worker")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names, "the autoscaler has no per-pod (queue-depth) metric"
    for name in names:
        assert re.search(rf"^{name} ", text, re.M), f"the worker exports no {name}"
    rules = yaml.safe_load(find("ConfigMap", "prometheus-adapter-splitinfer")
                           ["data"]["config.yaml"])["rules"]
    assert {r["name"]["as"] for r in rules} >= set(names)
    drain = float(config["SPLITINFER_DRAIN_TIMEOUT"])
    assert template["spec"]["terminationGracePeriodSeconds"] > drain


def test_emqx_cluster_finds_itself() -> None:
    sts = find("StatefulSet", "emqx")
    headless = find("Service", "emqx-headless")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    fqdn = f"{headless['metadata']['name']}.{headless['metadata']['namespace']}.svc.cluster.local"
    conf = find("ConfigMap", "emqx-config")["data"]["emqx.conf"]
    assert f'name = "{fqdn}"' in conf
    assert "shared_subscription = true" in conf
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EMQX_NODE__NAME"]["value"].endswith("." + fqdn)
    # the broker takes the worker's largest payload (splitinfer.wire.DEFAULT_MAX_PAYLOAD)
    from splitinfer.wire import DEFAULT_MAX_PAYLOAD
    kb = int(re.search(r"max_packet_size = (\d+)KB", conf).group(1))  # type: ignore[union-attr]
    assert kb * 1024 >= DEFAULT_MAX_PAYLOAD + 64 * 1024
    # every file the config names is mounted
    mounts = {m["mountPath"] for m in
              sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    for path in re.findall(r'(?:bootstrap_file|path) = "([^"]+)"', conf):
        assert path in mounts or str(Path(path).parent) in mounts, f"{path} is not mounted"


def _acl_rules() -> list[tuple[str, str | None, str, list[str]]]:
    """The EMQX acl.conf as (permission, username regex or None for all, action, topics)."""
    text = find("ConfigMap", "emqx-config")["data"]["acl.conf"]
    rules = []
    for perm, who, action, topics in re.findall(
            r"\{(allow|deny),\s*(all|\{username, \{re, \"[^\"]+\"\}\}),\s*"
            r"(publish|subscribe|all),\s*\[([^\]]*)\]\}\.", text):
        regex = re.search(r'"([^"]+)"', who)
        rules.append((perm, regex.group(1) if regex else None, action,
                      re.findall(r'"([^"]+)"', topics)))
    assert text.rstrip().endswith("{deny, all}."), "the ACL must end by denying the rest"
    assert len(rules) == text.count("{allow,"), "an ACL rule this test cannot read"
    return rules


def allowed(username: str, action: str, topic: str) -> bool:
    for perm, who, rule_action, patterns in _acl_rules():
        if who is not None and not re.search(who, username):
            continue
        if rule_action not in (action, "all"):
            continue
        if any(topic_matches_sub(p.replace("${username}", username), topic) for p in patterns):
            return perm == "allow"
    return False  # {deny, all}


def test_emqx_acl_gives_each_side_its_topics() -> None:
    config = _worker()[1]
    topics = Topics(config["SPLITINFER_PREFIX"])
    group = config["SPLITINFER_GROUP"]
    worker, me, other = "worker", "cam-0001", "cam-0002"
    for action, topic in [("subscribe", topics.shared_request_filter(group)),
                          ("subscribe", topics.request_filter()),
                          ("subscribe", topics.worker_status_filter()),
                          ("publish", topics.result(me)),
                          ("publish", topics.worker_status("w-1"))]:
        assert allowed(worker, action, topic), f"a worker may not {action} {topic}"
    for action, topic in [("publish", topics.request("digits", me)),
                          ("publish", topics.status(me)),
                          ("subscribe", topics.result(me))]:
        assert allowed(me, action, topic), f"device {me} may not {action} {topic}"
    for action, topic in [("publish", topics.request("digits", other)),
                          ("subscribe", topics.result(other)),
                          ("subscribe", topics.request_filter()),
                          ("subscribe", topics.shared_request_filter(group)),
                          ("publish", topics.result(other)),
                          ("publish", topics.worker_status("w-1"))]:
        assert not allowed(me, action, topic), f"device {me} may {action} {topic}"


# ---------------------------------------------------------------- Dockerfiles

def dockerfile(name: str) -> DockerfileParser:
    return DockerfileParser(path=str(DOCKER / name))


def instructions(df: DockerfileParser, kind: str) -> list[str]:
    return [i["value"] for i in df.structure if i["instruction"] == kind]


def copied(df: DockerfileParser) -> set[str]:
    sources: set[str] = set()
    for value in instructions(df, "COPY"):
        sources.update(value.split()[:-1])
    return sources


DOCKERFILES = sorted(p.name for p in DOCKER.glob("*.Dockerfile"))


def test_the_images_are_the_expected_ones() -> None:
    assert set(DOCKERFILES) == {"broker.Dockerfile", "cloud.Dockerfile",
                                "cloud-gpu.Dockerfile", "edge.Dockerfile", "tools.Dockerfile"}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_image_builds_on_the_base_argument(name: str) -> None:
    df = dockerfile(name)
    first = [i["instruction"] for i in df.structure if i["instruction"] != "COMMENT"][:2]
    assert first == ["ARG", "FROM"], f"{name}: expected ARG BASE=… then FROM ${{BASE}}"
    assert instructions(df, "ARG")[0] == "BASE=splitinfer-base:bookworm"
    assert instructions(df, "FROM") == ["${BASE}"]
    assert "# syntax" not in (DOCKER / name).read_text()  # would pull a frontend image
    user = instructions(df, "USER")
    assert user and user[-1] not in ("root", "0", "0:0"), f"{name} runs as root"


def _pip_extras(df: DockerfileParser) -> set[str]:
    found: set[str] = set()
    for run in instructions(df, "RUN"):
        for extras in re.findall(r'pip install --no-cache-dir "\.\[([a-z,-]+)\]"', run):
            found.update(extras.split(","))
    return found


@pytest.mark.parametrize(("name", "packages", "extras"), [
    ("edge.Dockerfile", {"splitinfer", "edge_agent"}, {"edge"}),
    ("cloud.Dockerfile", {"splitinfer", "cloud_service"}, {"cloud"}),
    ("cloud-gpu.Dockerfile", {"splitinfer", "cloud_service"}, {"cloud"}),
])
def test_device_and_worker_images_hold_only_their_packages(
        name: str, packages: set[str], extras: set[str]) -> None:
    df = dockerfile(name)
    assert copied(df) == {"pyproject.toml", "README.md"} | packages
    assert _pip_extras(df) == extras
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras <= set(declared)


def test_edge_image_refuses_the_offline_and_cloud_packages() -> None:
    run = " ".join(instructions(dockerfile("edge.Dockerfile"), "RUN"))
    checked = re.search(r"for m in ([\w ]+); do", run)
    assert checked, "the edge build no longer checks what it must not import"
    assert set(checked.group(1).split()) >= {"onnx", "torch", "cloud_service", "splitter",
                                             "simulators", "bench"}


def _command_exists(argv: list[str]) -> None:
    parser = subparser(*argv[1:])  # raises StopIteration/KeyError for an unknown command
    assert parser is not None


@pytest.mark.parametrize("name", ["cloud.Dockerfile", "cloud-gpu.Dockerfile",
                                  "edge.Dockerfile", "tools.Dockerfile"])
def test_entrypoints_are_splitinfer_commands(name: str) -> None:
    argv = json.loads(instructions(dockerfile(name), "ENTRYPOINT")[-1])
    assert argv[0] == "splitinfer"
    _command_exists(argv)


def test_package_discovery_with_only_the_edge_image_sources_finds_only_them(
        tmp_path: Path) -> None:
    """What the edge image's pip install sees: pyproject's [tool.setuptools.packages.find]
    run by setuptools' own finder over a copy of just what the Dockerfile COPYs."""
    from setuptools import find_namespace_packages  # type: ignore[import-untyped]

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    assert find.get("namespaces", True), "discovery changed: update this test"
    for name in copied(dockerfile("edge.Dockerfile")):
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, tmp_path / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(origin, tmp_path / name)
    found = find_namespace_packages(where=str(tmp_path), include=find["include"])
    assert {p.split(".")[0] for p in found} == {"splitinfer", "edge_agent"}
    assert {"splitinfer", "edge_agent"} <= set(found)
    # the same finder on the whole repository finds the rest, so the check can fail
    everything = find_namespace_packages(where=str(REPO), include=find["include"])
    assert {"cloud_service", "splitter", "simulators"} <= {p.split(".")[0] for p in everything}
    edge = pyproject["project"]["optional-dependencies"]["edge"]
    assert not [r for r in edge if re.match(r"(onnx|torch)\b(?!runtime)", r)], edge


# ---------------------------------------------------------------- compose

def compose() -> Doc:
    doc: Doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return doc


def test_compose_runs_broker_two_workers_and_a_fleet() -> None:
    services = compose()["services"]
    assert set(services) == {"broker", "prepare", "worker-1", "worker-2", "fleet", "edge",
                             "edge-serve", "app"}
    for name, service in services.items():
        assert service["network_mode"] == "host", f"{name} is not on the host network"
        assert "ports" not in service  # host networking publishes nothing
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"(?<![\d])1883(?![\d])", text.split("services:", 1)[1]), \
        "compose.yaml uses port 1883, which the host may already use"
    tagged = {"splitinfer-" + p.name.removesuffix(".Dockerfile")
              for p in DOCKER.glob("*.Dockerfile")}
    for name, service in services.items():
        assert service["image"] in tagged, f"{name}: image {service['image']} has no Dockerfile"
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
    # the broker's default port is the tuned config's listener
    conf = (DOCKER / "mosquitto" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 18830 127\.0\.0\.1$", conf, re.M)
    assert "${SPLITINFER_DEMO_PORT:-18830}" in " ".join(services["broker"]["entrypoint"])


def test_compose_workers_are_healthy_on_their_own_metrics_ports() -> None:
    services = compose()["services"]
    known = {env_of(f) for f in flags("cloud", "serve") if f.startswith("--")}
    ports = set()
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        env = worker["environment"]
        assert set(env) <= known, f"{name}: {set(env) - known} are no cloud serve settings"
        port = env["SPLITINFER_METRICS_PORT"]
        assert f"127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])
        assert env["SPLITINFER_BROKER"] == "mqtt://127.0.0.1:${SPLITINFER_DEMO_PORT:-18830}"
        assert worker["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
        ports.add(port)
    assert len(ports) == 2, "two workers on the host network need two metrics ports"
    assert services["worker-1"]["environment"]["SPLITINFER_WORKER_ID"] != \
        services["worker-2"]["environment"]["SPLITINFER_WORKER_ID"]


def test_compose_fleet_flags_are_fleet_flags() -> None:
    fleet = compose()["services"]["fleet"]
    argv = [a.replace("${SPLITINFER_DEMO_PORT:-18830}", "18830") for a in fleet["command"]]
    assert argv[0] == "fleet"
    args = subparser("fleet").parse_args(argv[1:])
    assert (args.workers, args.check, args.no_png) == (0, True, True)
    assert args.broker == "mqtt://127.0.0.1:18830"
    assert set(fleet["depends_on"]) == {"worker-1", "worker-2"}
    worker_env = compose()["services"]["worker-1"]["environment"]
    assert args.artifacts == worker_env["SPLITINFER_ARTIFACTS"]


def test_compose_edge_device_runs_the_edge_image_on_the_same_split() -> None:
    services = compose()["services"]
    edge = services["edge"]
    assert edge["image"] == "splitinfer-edge"
    script = edge["entrypoint"][-1].replace("${SPLITINFER_DEMO_PORT:-18830}", "18830")
    argv = shlex.split(script.split("&&")[0])
    assert argv[:3] == ["splitinfer", "edge", "run"]
    args = subparser("edge", "run").parse_args(argv[3:])
    assert args.broker == "mqtt://127.0.0.1:18830"
    assert args.artifacts == services["worker-1"]["environment"]["SPLITINFER_ARTIFACTS"]
    assert "digits_test.npz" in script  # the answers are scored against the labels


def test_compose_edge_service_and_its_app_agree_on_the_local_api() -> None:
    services = compose()["services"]
    serve = services["edge-serve"]
    assert serve["image"] == "splitinfer-edge" and serve["command"][0] == "serve"
    argv = [a.replace("${SPLITINFER_DEMO_PORT:-18830}", "18830") for a in serve["command"]]
    args = subparser("edge", "serve").parse_args(argv[1:])
    assert args.broker == "mqtt://127.0.0.1:18830"
    assert args.artifacts == services["worker-1"]["environment"]["SPLITINFER_ARTIFACTS"]
    assert args.http.startswith("127.0.0.1:")  # the local API stays on loopback
    assert args.state_dir.startswith("/tmp/")  # the image's only writable place for 65534
    assert f"http://{args.http}/healthz" in " ".join(serve["healthcheck"]["test"])
    app = " ".join(services["app"]["entrypoint"])
    assert f"http://{args.http}/v1/infer" in app and "application/x-npz" in app
    assert services["app"]["depends_on"]["edge-serve"]["condition"] == "service_healthy"


def test_compose_prepare_writes_what_workers_and_fleet_read(tmp_path: Path) -> None:
    """docker/compose_prepare.py, run here: the split the workers serve, the reference
    model the fleet finds one level up, and the labelled test set."""
    services = compose()["services"]
    out = tmp_path / "digits"
    subprocess.run([sys.executable, str(DOCKER / "compose_prepare.py"), str(out)],
                   check=True, timeout=240, capture_output=True)
    args = subparser("fleet").parse_args(services["fleet"]["command"][1:])
    edge = shlex.split(services["edge"]["entrypoint"][-1].split("&&")[0])
    root = Path("/artifacts/digits")
    for path in (args.artifacts, args.input, edge[edge.index("--input") + 1]):
        assert Path(path).is_relative_to(root)
        assert (out / Path(path).relative_to(root)).exists(), path
    manifest = json.loads((out / "split" / "manifest.json").read_text())
    assert (out / manifest["source"]["path"]).is_file()
    import numpy as np
    with np.load(out / "digits_test.npz") as npz:
        assert set(npz.files) == {"image", "label"} and len(npz["label"]) == 360
    with np.load(out / "digits_images.npz") as npz:
        assert npz.files == ["image"]  # edge run takes the model's inputs only
