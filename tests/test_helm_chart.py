"""The Helm chart (deploy/helm/prunefusion), offline: rendered by Helm v4's SDK (helm_python), every object validated
strictly against Kubernetes 1.25 and 1.37 (kubernetes-validate), and the rendered objects checked for what the
server needs: probes that match its health behaviour, a grace period above its drain, a config its own loader
accepts, and Job commands its own CLI parses. Nothing is applied to a cluster."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")
pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("check_chart", ROOT / "deploy" / "helm" / "check_chart.py")
check_chart = sys.modules["check_chart"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(check_chart)

HOME = "/var/lib/prunefusion"
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/component", "app.kubernetes.io/managed-by")


@pytest.fixture(scope="module")
def report():
    return check_chart.run()


@pytest.fixture(scope="module")
def values_sets():
    return dict(check_chart.values_sets())


def objects(values=None):
    return check_chart.render_objects(values or {})


def one(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


def server_container(objs):
    containers = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "server")


def server_config(objs) -> dict:
    return yaml.safe_load(one(objs, "ConfigMap", "prunefusion")["data"]["config.yaml"])


def render_error(values) -> str:
    with pytest.raises(helm.HelmError) as err:
        check_chart.render(values)
    return str(err.value)


# --- the whole check: lint, render, strict validation -----------------------------------------------------------


def test_every_values_set_lints_renders_and_validates_strictly_for_the_oldest_and_newest_k8s(report):
    from kubernetes_validate.utils import all_versions

    assert report.problems == []
    assert check_chart.K8S_VERSIONS == ("1.25", "1.37")
    assert all_versions()[0].startswith("1.25.")  # the oldest schema kubernetes-validate bundles
    examples = {f"examples/{p.name}" for p in check_chart.EXAMPLES.glob("*.yaml")}
    assert {"examples/cpu.yaml", "examples/gpu-vllm.yaml", "examples/external-redis.yaml",
            "examples/keda-monitoring.yaml", "examples/compression-job.yaml"} <= examples
    assert {r.values for r in report.rows} == {"default"} | examples
    kinds = {r.kind for r in report.rows}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "Job", "ScaledObject", "ServiceMonitor"} <= kinds
    for row in report.rows:
        crd = row.kind in {"ScaledObject", "ServiceMonitor"}
        assert row.results == dict.fromkeys(check_chart.K8S_VERSIONS, "not schema-checked" if crd else "ok"), row


def test_strict_validation_catches_an_unknown_field_and_the_check_reports_it():
    import kubernetes_validate

    deployment = copy.deepcopy(one(objects(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {"port": 1}
    for version in check_chart.K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError, match="grpcc"):
            check_chart.validate(deployment, version)


def test_check_chart_has_help_and_fails_on_a_bad_values_file(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        check_chart.main(["--help"])
    assert done.value.code == 0 and "kubernetes-validate" in capsys.readouterr().out
    monkeypatch.setattr(check_chart, "EXAMPLES", tmp_path / "no-examples")  # the defaults and the bad file only
    bad = tmp_path / "bad.yaml"
    bad.write_text("replicaCount: two\n")
    assert check_chart.main(["--values", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "/replicaCount" in captured.err and "not schema-checked" in captured.out


# --- values.schema.json ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "field"), [
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"replicas": 3}, "'replicas'"),  # unknown top-level key
    ({"config": {"server": {"port": "50051x"}}}, "/config/server/port"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"config": {"servre": {}}}, "'servre'"),
])
def test_the_schema_rejects_a_bad_value_naming_its_field_in_lint_and_render(values, field):
    assert field in render_error(values)
    report = helm.lint(check_chart.CHART, values, strict=True)
    assert any(field in m["error"] for m in report["messages"] if m["severity"] == 3), report


# --- the Deployment: command, probes, grace period, security ----------------------------------------------------


def test_the_server_runs_serve_with_the_configmap_config_and_no_build():
    from prunefusion.cli import build_parser

    objs = objects()
    container = server_container(objs)
    assert container["command"] == ["tini", "--", "prunefusion"]  # the images' ENTRYPOINT: tini reaps as PID 1
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        path = ROOT / "deploy" / "docker" / dockerfile
        if path.is_file():
            assert f"ENTRYPOINT {json.dumps(container['command'])}" in path.read_text(), dockerfile
    args = build_parser().parse_args(container["args"])  # the real parser: an unknown argument exits
    assert (args.command, args.config, args.no_build, args.port) == ("serve", "/etc/prunefusion/config.yaml", True,
                                                                     None)
    # the ConfigMap itself at /etc/prunefusion (no init container renders the config any more)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/prunefusion")
    volumes = {v["name"]: v for v in one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == one(objs, "ConfigMap", "prunefusion")["metadata"]["name"]
    assert mount["readOnly"] is True


def test_the_default_image_is_the_one_deploy_check_sh_builds():
    image = server_container(objects())["image"]
    assert image == "prunefusion:cpu"
    check_sh = ROOT / "deploy" / "check.sh"
    if check_sh.is_file():  # the image build and its end-to-end check: the chart follows its tag
        built = re.search(r"^IMAGE=\$\{PRUNEFUSION_IMAGE:-([^}]+)\}", check_sh.read_text(), re.MULTILINE)
        assert built and built.group(1) == image


def test_probes_readiness_and_startup_on_grpc_health_liveness_survives_a_drain():
    objs = objects()
    container, config = server_container(objs), server_config(objs)
    port, health_port = config["server"]["port"], config["server"]["health_port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port == 50051 and ports["health"] == health_port and ports["metrics"] == 9464
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": ""}, probe  # the overall status: every model
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600  # model loading
    liveness = container["livenessProbe"]
    assert "grpc" not in liveness  # NOT_SERVING during a drain (on the health port too: the same servicer)
    assert liveness["tcpSocket"]["port"] == health_port != port


def test_readiness_can_wait_for_one_service_the_server_registers(values_sets):
    from prunefusion.server.app import QUALITY_SERVICE, SERVICE_OF_TASK
    from prunefusion.server.config import parse_config
    from prunefusion.server.registry import ModelRegistry

    text = SERVICE_OF_TASK["text"]
    assert text == "prunefusion.v1.TextGeneration" and SERVICE_OF_TASK["multimodal"] == "prunefusion.v1.Multimodal"
    schema = json.loads((check_chart.CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["probes"]["properties"]["readinessService"]["enum"]) == {
        "", *SERVICE_OF_TASK.values(), QUALITY_SERVICE}
    container = server_container(objects({"probes": {"readinessService": text}}))
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": text}, probe
    assert "grpc" not in container["livenessProbe"]
    # the services the server registers for a config (server/app.py): the chart's check agrees with it
    multimodal = {"config": {"models": [{"name": "tf", "path": "${PRUNEFUSION_HOME}/models/tf",
                                         "engine": "transfusion"}], "quality": {"enabled": False}}}
    registered = {task for task in ModelRegistry(parse_config(server_config(objects(multimodal))).models).tasks}
    assert registered == {"multimodal"}
    assert "does not serve it" in render_error({**multimodal, "probes": {"readinessService": text}})
    assert "does not serve it" in render_error({**multimodal, "probes": {"readinessService": QUALITY_SERVICE}})
    ok = server_container(objects({**multimodal, "probes": {"readinessService": SERVICE_OF_TASK["multimodal"]}}))
    assert ok["readinessProbe"]["grpc"]["service"] == "prunefusion.v1.Multimodal"
    embeddings = {"config": {"models": [{"name": "minilm", "path": "${PRUNEFUSION_HOME}/models/minilm",
                                         "engine": "onnx"}]}}
    assert {task for task in ModelRegistry(parse_config(server_config(objects(embeddings))).models).tasks} == {
        "embedding"}
    assert "does not serve it" in render_error({**embeddings, "probes": {"readinessService": text}})
    ok = server_container(objects({**embeddings, "probes": {"readinessService": SERVICE_OF_TASK["embedding"]}}))
    assert ok["readinessProbe"]["grpc"]["service"] == "prunefusion.v1.Embeddings"
    assert "/probes/readinessService" in render_error({"probes": {"readinessService": "TextGeneration"}})
    readme = (ROOT / "deploy" / "helm" / "README.md").read_text()
    assert "probes.readinessService" in readme and text in readme


def test_liveness_without_a_health_port_is_still_no_grpc_health_check():
    objs = objects({"config": {"server": {"health_port": None}}})
    container = server_container(objs)
    assert "health_port" not in server_config(objs)["server"]
    assert "grpc" not in container["livenessProbe"] and container["livenessProbe"]["tcpSocket"]["port"] == 50051


def test_with_tls_the_probes_ask_the_plaintext_health_port(values_sets):
    container = server_container(objects(values_sets["examples/tls-auth.yaml"]))
    assert container["readinessProbe"]["grpc"]["port"] == container["startupProbe"]["grpc"]["port"] == 50052
    tls_no_health = {"config": {"server": {"health_port": None, "tls": {"cert_file": "/c", "key_file": "/k"}}}}
    assert "health_port" in render_error(tls_no_health)


@pytest.mark.parametrize(("drain", "delay"), [(30, 5), (100, 2), (0.5, 0)])
def test_termination_grace_is_computed_above_the_whole_drain(drain, delay):
    objs = objects({"config": {"server": {"drain_seconds": drain, "drain_delay_seconds": delay}}})
    grace = one(objs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    server = server_config(objs)["server"]
    assert (server["drain_seconds"], server["drain_delay_seconds"]) == (drain, delay)
    assert isinstance(grace, int) and grace > drain + delay + 2  # + the 2 s flush of server/app.py


def test_a_grace_period_set_below_the_drain_is_refused():
    assert "terminationGracePeriodSeconds (20) must exceed" in render_error({"terminationGracePeriodSeconds": 20})
    objs = objects({"terminationGracePeriodSeconds": 120})
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120


def test_non_root_read_only_with_a_tmp_emptydir():
    objs = objects()
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 1000
    container = server_container(objs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


# --- volume, services, labels, rollouts -------------------------------------------------------------------------


def test_prunefusion_home_is_the_pvc():
    objs = objects()
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["resources"]["requests"]["storage"]
    container = server_container(objs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PRUNEFUSION_HOME"] == HOME
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == HOME)
    volumes = one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    existing = objects({"persistence": {"existingClaim": "models"}})
    assert not [o for o in existing if o["kind"] == "PersistentVolumeClaim"]
    assert "claimName: models" in yaml.safe_dump(one(existing, "Deployment"))
    assert "ReadWriteMany" in render_error({"persistence": {"accessModes": ["ReadWriteOnce"]}})  # 2 replicas
    single = objects({"replicaCount": 1, "persistence": {"accessModes": ["ReadWriteOnce"]}})
    assert one(single, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_services_grpc_h2c_metrics_and_a_headless_one_for_client_side_balancing():
    objs = objects()
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objs, "Service", "prunefusion")
    assert service["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["metrics"]["port"] == 9464
    assert ports["http"]["port"] == 8000 and ports["http"]["appProtocol"] == "http"
    from prunefusion.server.config import parse_config

    assert parse_config(server_config(objs)).server.http_port == 8000  # the server's default: the chart agrees
    assert {p["name"]: p["containerPort"] for p in server_container(objs)["ports"]}["http"] == 8000
    no_http = objects({"config": {"server": {"http_port": None}}})
    assert "http" not in {p["name"] for p in one(no_http, "Service", "prunefusion")["spec"]["ports"]}
    assert "http" not in {p["name"] for p in server_container(no_http)["ports"]}
    assert parse_config(server_config(no_http)).server.http_port is None
    headless = one(objs, "Service", "prunefusion-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in headless["spec"]["ports"]] == [50051]
    for svc in (service, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in server_container(objs)["ports"]}


def test_standard_labels_on_every_object_and_the_pods(values_sets):
    for label, values in values_sets.items():
        for obj in objects(values):
            labels = obj["metadata"]["labels"]
            assert all(labels.get(k) for k in STANDARD_LABELS), (label, obj["kind"], labels)
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            template = obj.get("spec", {}).get("template", {}).get("metadata")
            if template:
                assert all(template["labels"].get(k) for k in STANDARD_LABELS), (label, obj["kind"])


def test_a_config_change_rolls_the_pods():
    def checksum(values):
        return one(objects(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"server": {"log_level": "DEBUG"}}})


def test_pod_disruption_budget():
    objs = objects()
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= one(objs, "Deployment")["spec"]["template"]["metadata"][
        "labels"].items()
    assert one(objects({"podDisruptionBudget": {"minAvailable": "50%"}}), "PodDisruptionBudget")["spec"] == {
        "minAvailable": "50%", "selector": pdb["spec"]["selector"]}


# --- the server config: accepted by the server's own loader -------------------------------------------------------


def test_every_configmap_config_loads_with_the_server_config_loader(values_sets, tmp_path):
    from prunefusion.server.config import load_config

    for label, values in values_sets.items():
        objs = objects(values)
        path = tmp_path / f"{label.replace('/', '-')}.yaml"
        path.write_text(one(objs, "ConfigMap", "prunefusion")["data"]["config.yaml"])
        config = load_config(path)  # raises ConfigError naming the field
        assert [m.name for m in config.models] == [m["name"] for m in (values.get("config") or {}).get(
            "models", [{"name": "tiny-lm"}])], label
        assert {p["containerPort"] for p in server_container(objs)["ports"]} >= {config.server.port}
        if config.cache.url is None:  # embedded Redis: per pod, never on the shared volume
            assert not config.cache.data_dir.startswith("${PRUNEFUSION_HOME}") and config.cache.data_dir.startswith(
                "/tmp/"), label


def test_the_default_config_serves_tiny_lm_with_torch_and_opens_metrics_to_the_pod_network():
    from prunefusion.server.config import parse_config

    config = parse_config(server_config(objects()))
    assert [(m.name, m.path, m.engine) for m in config.models] == [
        ("tiny-lm", "${PRUNEFUSION_HOME}/models/tiny-lm", "torch")]
    assert (config.server.host, config.server.port, config.server.metrics_host, config.server.metrics_port) == (
        "0.0.0.0", 50051, "0.0.0.0", 9464)
    assert config.server.drain_seconds == 30 and config.cache.url is None


def test_external_redis_url_comes_from_a_secret_the_server_expands_from_its_environment(values_sets):
    from prunefusion.server.config import parse_config

    objs = objects(values_sets["examples/external-redis.yaml"])
    assert not [o for o in objs if o["kind"] == "Secret"]  # existingSecret: the chart makes none
    assert server_config(objs)["cache"]["url"] == "${PRUNEFUSION_REDIS_URL}"  # a reference, no credential
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod  # nothing renders the config: the server expands cache.url itself
    env = next(e for e in server_container(objs)["env"] if e["name"] == "PRUNEFUSION_REDIS_URL")
    assert env["valueFrom"]["secretKeyRef"] == {"name": "prunefusion-redis", "key": "url"}
    mount = next(m for m in server_container(objs)["volumeMounts"] if m["mountPath"] == "/etc/prunefusion")
    assert "configMap" in next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert not [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert parse_config(server_config(objs)).cache.url == "${PRUNEFUSION_REDIS_URL}"


def test_the_secrets_url_reaches_the_server_through_its_environment(monkeypatch):
    """As the pod has it: the Secret's value (base64 in the chart's Secret) in PRUNEFUSION_REDIS_URL, the ConfigMap's
    YAML through the server's loader, cache.url through server/app.py's cache_url, which opens the cache."""
    from prunefusion.server.app import cache_url
    from prunefusion.server.config import ConfigError, parse_config

    url = "redis://:p#ss:w@rd@redis-master:6379/0"  # '#' (a YAML comment), ':' and '@' in the password
    objs = objects({"redis": {"url": url}})
    secret = one(objs, "Secret")
    env = next(e for e in server_container(objs)["env"] if e["name"] == "PRUNEFUSION_REDIS_URL")
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "url"}
    config = parse_config(server_config(objs))
    monkeypatch.setenv("PRUNEFUSION_REDIS_URL", base64.b64decode(secret["data"][ref["key"]]).decode())
    assert cache_url(config.cache) == url
    monkeypatch.delenv("PRUNEFUSION_REDIS_URL")
    with pytest.raises(ConfigError, match=r"cache.url: \$\{PRUNEFUSION_REDIS_URL\} is not set in the environment"):
        cache_url(config.cache)


def test_a_redis_url_in_values_goes_into_a_chart_secret_and_rolls_the_pods():
    objs = objects({"redis": {"url": "redis://redis:6379/0"}})
    secret = one(objs, "Secret")
    assert secret["metadata"]["name"] == "prunefusion-redis" and set(secret["data"]) == {"url"}
    assert "redis://redis" not in one(objs, "ConfigMap", "prunefusion")["data"]["config.yaml"]
    assert "checksum/redis-secret" in one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "cache.url" in render_error({"redis": {"url": "redis://r:6379"}, "config": {"cache": {"url": "redis://x"}}})
    assert "/redis/url" in render_error({"redis": {"url": "http://redis:6379"}})


# --- GPU -----------------------------------------------------------------------------------------------------------


def test_the_gpu_example_asks_for_gpus_and_serves_vllm(values_sets):
    from prunefusion.server.config import parse_config

    objs = objects(values_sets["examples/gpu-vllm.yaml"])
    container = server_container(objs)
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and container["image"] == "prunefusion:cuda"  # deploy/docker/Dockerfile.cuda's tag
    config = parse_config(server_config(objs))
    assert {m.engine for m in config.models} == {"vllm"} and {m.device for m in config.models} == {"cuda"}
    assert all(1 <= m.vllm.tensor_parallel_size <= gpus for m in config.models)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    too_few = copy.deepcopy(values_sets["examples/gpu-vllm.yaml"])
    too_few["resources"]["limits"]["nvidia.com/gpu"] = 1
    assert 'resources.limits["nvidia.com/gpu"] >= 2' in render_error(too_few)


# --- autoscaling and monitoring -------------------------------------------------------------------------------------


def test_hpa_scales_on_the_servers_queue_depth_metric(values_sets):
    from prunefusion.server.metrics import REQUESTS_WAITING

    objs = objects(values_sets["examples/external-redis.yaml"])
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == REQUESTS_WAITING._name
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objs, "Deployment")["metadata"]["name"]
    assert "replicas" not in one(objs, "Deployment")["spec"]  # the HPA owns it
    per_model = objects({"autoscaling": {"enabled": True, "model": "tiny-lm"}})
    assert one(per_model, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["selector"] == {
        "matchLabels": {"model": "tiny-lm"}}
    readme = (ROOT / "deploy" / "helm" / "README.md").read_text()
    assert f"seriesQuery: '{REQUESTS_WAITING._name}" in readme and "sum(<<.Series>>" in readme


def test_keda_and_servicemonitor(values_sets):
    from prunefusion.server.metrics import REQUESTS_WAITING

    objs = objects(values_sets["examples/keda-monitoring.yaml"])
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    scaled = one(objs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and REQUESTS_WAITING._name in trigger["metadata"]["query"]
    assert 'namespace="prunefusion"' in trigger["metadata"]["query"]
    monitor = one(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = one(objs, "Service", "prunefusion")
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "pick one" in render_error({"keda": {"enabled": True}, "autoscaling": {"enabled": True}})


# --- the compression Job --------------------------------------------------------------------------------------------


def job_commands(job) -> list[list[str]]:
    """The prunefusion commands of the Job's shell script, with $PRUNEFUSION_HOME as the pod has it."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-ec"]
    script = container["args"][0].replace("${PRUNEFUSION_HOME}", HOME)
    return [shlex.split(line) for line in script.splitlines() if line.strip().startswith("prunefusion ")]


def test_no_compression_job_by_default():
    objs = objects()
    assert not [o for o in objs if o["kind"] == "Job"]
    assert "initContainers" not in one(objs, "Deployment")["spec"]["template"]["spec"]


def test_the_compression_job_builds_into_the_volume_with_commands_the_cli_parses(values_sets, tmp_path):
    from prunefusion.cli import build_parser
    from prunefusion.compression.job import load_job

    objs = objects(values_sets["examples/compression-job.yaml"])
    job = one(objs, "Job")
    pod = job["spec"]["template"]["spec"]
    commands = job_commands(job)
    assert [c[:3] for c in commands] == [["prunefusion", "models", "build"], ["prunefusion", "compress", "run"],
                                         ["prunefusion", "models", "list"]]
    parser = build_parser()
    parsed = [parser.parse_args(c[1:]) for c in commands]
    assert parsed[0].what == "lm" and parsed[0].device == "cpu" and not parsed[0].no_pruned
    run = parsed[1]
    assert (run.job, run.out, run.device) == ("/etc/prunefusion/jobs/tiny-lm-angular-50.yaml",
                                              f"{HOME}/models/tiny-lm-angular-50", "cpu")
    # the job file is in the ConfigMap mounted there, and is a job `compress run` accepts
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/prunefusion/jobs")
    configmap_name = next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]["name"]
    jobs = one(objs, "ConfigMap", configmap_name)["data"]
    assert set(jobs) == {"tiny-lm-angular-50.yaml"}
    (tmp_path / "job.yaml").write_text(jobs["tiny-lm-angular-50.yaml"])
    spec = load_job(tmp_path / "job.yaml")
    assert spec.name == "tiny-lm-angular-50" and spec.prune.fraction == 0.5
    # into the volume the servers read, with the same PRUNEFUSION_HOME
    home_mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == HOME)
    claim = next(v for v in pod["volumes"] if v["name"] == home_mount["name"])["persistentVolumeClaim"]["claimName"]
    assert claim == one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    assert {"name": "PRUNEFUSION_HOME", "value": HOME} in pod["containers"][0]["env"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})
    assert job["metadata"]["name"].endswith("-1")  # by revision: a Job's template cannot change on upgrade


def test_servers_wait_for_the_jobs_models_with_the_server_config_loader(values_sets, tmp_path, monkeypatch, capsys):
    # with an external Redis too: the init container reads the same config, cache.url unexpanded, without the Secret
    values = {**values_sets["examples/compression-job.yaml"], "redis": {"existingSecret": "prunefusion-redis"}}
    objs = objects(values)
    init = next(c for c in one(objs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
                if c["name"] == "wait-for-models")
    assert init["command"][1:] == ["/etc/prunefusion/wait-for-models.py", "/etc/prunefusion/config.yaml"]
    assert {"name": "PRUNEFUSION_HOME", "value": HOME} in init["env"]
    assert "PRUNEFUSION_REDIS_URL" not in {e["name"] for e in init["env"]}
    assert server_config(objs)["cache"]["url"] == "${PRUNEFUSION_REDIS_URL}"
    monkeypatch.delenv("PRUNEFUSION_REDIS_URL", raising=False)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in init["volumeMounts"] if m["mountPath"] == "/etc/prunefusion")
    assert next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]["name"] == "prunefusion"
    configmap = one(objs, "ConfigMap", "prunefusion")["data"]
    config = tmp_path / "config.yaml"
    config.write_text(configmap["config.yaml"])
    script = {"__name__": "wait_for_models"}
    exec(compile(configmap["wait-for-models.py"], "wait-for-models.py", "exec"), script)  # the text the pod runs
    home = tmp_path / "home"
    monkeypatch.setenv("PRUNEFUSION_HOME", str(home))
    for name in ("tiny-lm", "tiny-lm-pruned"):
        (home / "models" / name).mkdir(parents=True)
        (home / "models" / name / "config.json").write_text("{}")
    assert script["main"]([str(config), "--every", "0.01", "--timeout", "0"]) == 1
    err = capsys.readouterr().err
    assert "tiny-lm-angular-50" in err and "tiny-lm-pruned" not in err
    (home / "models" / "tiny-lm-angular-50").mkdir()
    (home / "models" / "tiny-lm-angular-50" / "config.json").write_text("{}")
    assert script["main"]([str(config), "--timeout", "5"]) == 0


def test_the_compression_job_as_a_helm_hook_needs_an_existing_claim(values_sets):
    hook = copy.deepcopy(values_sets["examples/compression-job.yaml"])
    hook["compressionJob"]["helmHook"] = True
    assert "persistence.existingClaim" in render_error(hook)
    hook["persistence"] = {"existingClaim": "models"}
    objs = objects(hook)
    job = one(objs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    jobs_configmap = one(objs, "ConfigMap", "prunefusion-compression-jobs")
    assert jobs_configmap["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(jobs_configmap["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    assert "initContainers" not in one(objs, "Deployment")["spec"]["template"]["spec"]  # servers start after it
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]  # the chart's SA does not exist yet
