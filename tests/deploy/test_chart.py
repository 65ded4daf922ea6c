"""The Helm chart, rendered by Helm's own engine (helm-python-sdk binds the Helm Go SDK; offline): lint, every
manifest against the Kubernetes API schemas, gRPC probes on the serving port, container args and config keys
accepted by the real `loraserve serve` parser, keys only in Secrets, and values.schema.json refusing bad values."""

from __future__ import annotations

import argparse
import copy
import hashlib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from adapters.s3_store import S3Settings
from service.cli import build_parser

CHART = Path(__file__).resolve().parents[2] / "helm" / "loraserve"
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships
RELEASE, NAMESPACE = "demo", "inference"
FULLNAME = f"{RELEASE}-loraserve"
KEY_HASH = "sha256:" + hashlib.sha256(b"acme-secret-api-key").hexdigest()

# Every optional part on: S3 store with several replicas and an HPA, PDB, ServiceMonitor, mTLS, tenants from
# values, a GPU, a mounted model, OTLP export.
FULL = {
    "replicaCount": 3,
    "image": {"repository": "registry.example/loraserve", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "server": {"port": 50051, "metricsPort": 9090, "drainGraceSeconds": 45, "logLevel": "info", "maxMessageMib": 8,
               "maxPromptBytes": 65536, "maxUploadMib": 128, "streamInterval": 4},
    "runtime": {"model": "/models/base.gguf", "dtype": "float32", "kvCacheGib": 2, "maxModelLen": 4096,
                "draftModel": "/models/draft.gguf"},
    "engine": {"maxNumSeqs": 32, "maxBatchedTokens": 2048, "maxWaiting": 256, "speculation": "draft",
               "maxSharedPrefillTokens": 256},
    "adapters": {"maxActiveAdapters": 16},
    "telemetry": {"otlpEndpoint": "http://otel-collector.observability:4317"},
    "pricing": {"inputPer1k": 0.5, "outputPer1k": 1.5},
    "store": {"kind": "s3", "s3": {"bucket": "team-adapters", "prefix": "loraserve/prod",
                                   "endpointUrl": "http://minio.storage:9000", "region": "eu-west-1",
                                   "credentialsSecret": "adapter-bucket-credentials"}},
    "database": {"existingSecret": "loraserve-database", "secretKey": "dsn", "poolSize": 16, "leaseTtlSeconds": 30},
    "tenants": {"tenants": [{"id": "acme", "api_keys": [KEY_HASH], "limits": {"requests_per_minute": 600}}]},
    "tls": {"enabled": True, "existingSecret": "loraserve-tls", "requireClientCert": True},
    "modelVolume": {"enabled": True, "mountPath": "/models", "existingClaim": "models"},
    "gpu": {"count": 1},
    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 10, "targetRequestsWaiting": 4,
                    "targetCPUUtilizationPercentage": 80},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "serviceMonitor": {"enabled": True, "interval": "10s", "labels": {"release": "prometheus"}},
    "serviceAccount": {"create": True, "annotations": {"iam.example/role": "adapters-reader"}},
    "podAnnotations": {"team": "ml"},
    "extraEnv": [{"name": "LORASERVE_EXTRA", "value": "1"}],
    "nodeSelector": {"pool": "inference"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "loraserve"}}}],
}
EXISTING_TENANTS = {"tenants": {"existingSecret": "platform-tenants", "secretKey": "tenants.yaml"},
                    "persistence": {"enabled": True, "existingClaim": "loraserve-data"}}
POOL = {"inferencePool": {"enabled": True}}
CASES = {"default": {}, "full": FULL, "existing-secrets": EXISTING_TENANTS, "inference-pool": POOL}
EPP = f"{FULLNAME}-epp"


def render(values: dict) -> dict[tuple[str, str], dict]:
    """{(kind, name): manifest} of everything the chart renders with `values` (NOTES.txt left out)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    out = {}
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in out, f"{key} rendered twice"
                out[key] = doc
    return out


def notes(values: dict) -> str:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def container(manifests: dict) -> dict:
    pod = manifests["Deployment", FULLNAME]["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def server_config(manifests: dict) -> dict:
    return yaml.safe_load(manifests["ConfigMap", FULLNAME]["data"]["config.yaml"])


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_lint_passes_with_default_and_full_values():
    for values in CASES.values():
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_validates_against_the_kubernetes_schemas(case):
    manifests = render(CASES[case])
    kinds = sorted(kind for kind, _ in manifests)
    expected = {
        "default": ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "Service", "ServiceAccount"],
        "full": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret", "Service",
                 "Service", "ServiceAccount", "ServiceMonitor"],
        "existing-secrets": ["ConfigMap", "Deployment", "Service", "Service", "ServiceAccount"],
        "inference-pool": ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "InferencePool",
                           "PersistentVolumeClaim", "Role", "RoleBinding", "Service", "Service", "Service",
                           "ServiceAccount", "ServiceAccount"],
    }[case]
    assert kinds == expected
    for (kind, _), doc in manifests.items():
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        if kind == "ServiceMonitor":  # a CRD: no schema in the Kubernetes API; checked against the Service
            service = manifests["Service", FULLNAME]
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
            assert [e["port"] for e in doc["spec"]["endpoints"]] == ["metrics"]
            assert "metrics" in [p["name"] for p in service["spec"]["ports"]]
            continue
        if kind == "InferencePool":  # a CRD too: its wiring is checked in test_inference_pool_*
            continue
        # strict: unknown fields fail too, so a misspelt key cannot pass silently.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_probes_use_grpc_health_on_the_serving_port(case):
    values = copy.deepcopy(CASES[case])
    values.setdefault("server", {})["port"] = 6123
    manifests = render(values)
    c = container(manifests)
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert grpc_port == 6123 == server_config(manifests)["server"]["port"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 6123}  # the server's overall health ("" service)
        assert not {"httpGet", "tcpSocket", "exec"} & set(c[probe])
    for name in (FULLNAME, f"{FULLNAME}-headless"):
        grpc = next(p for p in manifests["Service", name]["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["port"] == 6123 and grpc["targetPort"] == "grpc"


def test_termination_grace_outlasts_the_drain():
    for drain in (0, 30, 300):
        values = {"server": {"port": 50051, "metricsPort": 0, "drainGraceSeconds": drain},
                  "probes": {"startup": {"periodSeconds": 5, "failureThreshold": 60},
                             "readiness": {"periodSeconds": 5, "failureThreshold": 2},
                             "liveness": {"periodSeconds": 10, "failureThreshold": drain // 10 + 1}}}
        manifests = render(values)
        pod = manifests["Deployment", FULLNAME]["spec"]["template"]["spec"]
        c = container(manifests)
        sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert server_config(manifests)["server"]["drain_grace_s"] == drain
        assert pod["terminationGracePeriodSeconds"] > sleep + drain
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > drain  # never restarted mid-drain


def test_container_args_and_config_keys_are_accepted_by_the_real_serve_parser():
    """Everything the chart hands the server must exist in `loraserve serve`: the args it renders, and the
    keys of the --config file, which are the snake_case names of the flags (store, telemetry exporters and
    pricing have no flags)."""
    serve = serve_parser()
    flags = {opt for a in serve._actions for opt in a.option_strings}
    dests = {a.dest for a in serve._actions}
    missing: set[str] = set()
    for values in CASES.values():
        manifests = render(values)
        args = container(manifests)["args"]
        assert args[0] == "serve" and container(manifests).get("command") is None  # the image's entrypoint
        missing |= {a for a in args[1:] if a.startswith("--") and a not in flags}
        config = server_config(manifests)
        for section in ("server", "runtime", "engine", "adapters"):
            missing |= {f"--{k.replace('_', '-')} (config {section}.{k})" for k in config[section] if k not in dests}
        missing |= {f"--{k.replace('_', '-')} (config telemetry.{k})" for k in config["telemetry"]
                    if k not in dests and k not in ("otlp_endpoint", "log_format")}
        if not missing:
            build_parser().parse_args(args)  # types and choices too
    assert not missing, f"flags the chart uses that `loraserve serve` does not have: {sorted(missing)}"


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_config_loads_into_the_servers_configuration(case, tmp_path):
    """The ConfigMap's config.yaml goes through the server's own loader (unknown keys and bad values are
    refused there) and yields the values the chart was given."""
    from service.cli import serve_configs

    manifests = render(CASES[case])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(server_config(manifests)))
    args = [a for a in container(manifests)["args"]]
    if "--config" in args:  # the mounted path inside the pod -> the rendered file here
        args[args.index("--config") + 1] = str(path)
    else:
        args += ["--config", str(path)]
    for flag in ("--tenants", "--tls-cert", "--tls-key", "--tls-client-ca"):
        if flag in args:  # files that only exist inside the pod; their flags were checked above
            i = args.index(flag)
            del args[i:i + 2]
    rc, ec, ac, sc, svc = serve_configs(build_parser().parse_args(args))
    config = server_config(manifests)
    assert sc.port == config["server"]["port"] and svc.metrics_port == config["server"]["metrics_port"]
    assert ec.max_num_batched_tokens == config["engine"]["max_batched_tokens"]
    assert (sc.max_message_mib, svc.max_upload_mib) == (config["server"]["max_message_mib"],
                                                        config["server"]["max_upload_mib"])
    assert sc.max_prompt_bytes == (65536 if case == "full" else None)  # None: derived from the context window
    assert sc.stream_interval == (4 if case == "full" else 1)
    assert svc.store_kind == config["store"]["kind"]
    assert (svc.database_pool_size, svc.database_lease_ttl_s) == ((16, 30) if case == "full" else (8, 20))
    assert svc.database_url is None  # the URL is never in the config: it comes from a Secret (env)
    assert sc.http_port == 8000 == config["server"]["http_port"]  # the OpenAI-compatible front, on by default
    assert (rc.device, rc.kv_cache_gib) == (("cuda", 2) if case == "full" else ("cpu", 1))


def test_store_section_is_what_open_store_takes():
    fs = server_config(render({}))["store"]
    assert fs == {"kind": "filesystem", "path": "/var/lib/loraserve/adapters"}
    s3 = server_config(render(FULL))["store"]
    assert s3.pop("kind") == "s3"
    assert S3Settings.from_mapping(s3) == S3Settings(bucket="team-adapters", prefix="loraserve/prod",
                                                     endpoint_url="http://minio.storage:9000", region="eu-west-1")
    c = container(render(FULL))
    assert c["envFrom"] == [{"secretRef": {"name": "adapter-bucket-credentials"}}]  # AWS_* from a Secret


def test_the_database_url_comes_from_a_secret(tmp_path, monkeypatch):
    """With a database the URL reaches the server as LORASERVE_DATABASE_URL from the named Secret (never values,
    never the ConfigMap), and the server built from the rendered args and config uses PostgreSQL with it."""
    from service.cli import DATABASE_URL_ENV, serve_configs

    manifests = render(FULL)
    env = {e["name"]: e for e in container(manifests)["env"]}
    assert env[DATABASE_URL_ENV] == {"name": DATABASE_URL_ENV, "valueFrom": {"secretKeyRef": {
        "name": "loraserve-database", "key": "dsn"}}}
    config = server_config(manifests)
    assert config["database"] == {"pool_size": 16, "connect_timeout_s": 3, "lease_ttl_s": 30}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://loraserve:pw@postgres.db:5432/loraserve")
    *_, svc = serve_configs(build_parser().parse_args(["serve", "--config", str(path)]))
    assert svc.database_kind == "postgresql" and svc.database_url.endswith("@postgres.db:5432/loraserve")
    assert DATABASE_URL_ENV not in {e["name"] for e in container(render({}))["env"]}  # SQLite by default


def test_api_keys_never_land_in_a_configmap():
    manifests = render(FULL)
    cm_text = yaml.safe_dump(manifests["ConfigMap", FULLNAME])
    assert KEY_HASH not in cm_text and "api_keys" not in cm_text and "AWS_SECRET" not in cm_text
    secret = manifests["Secret", f"{FULLNAME}-tenants"]
    tenants = yaml.safe_load(secret["stringData"]["tenants.yaml"])
    assert tenants["tenants"][0]["api_keys"] == [KEY_HASH]
    for (kind, _), doc in manifests.items():
        if kind != "Secret":
            assert KEY_HASH not in yaml.safe_dump(doc)
    c = container(manifests)
    assert c["args"][c["args"].index("--tenants") + 1] == "/etc/loraserve/tenants/tenants.yaml"
    pod = manifests["Deployment", FULLNAME]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "tenants")
    assert volume["secret"]["secretName"] == f"{FULLNAME}-tenants"

    existing = render(EXISTING_TENANTS)  # an existing Secret: the chart makes none, mounts the named one
    assert not any(kind == "Secret" for kind, _ in existing)
    pod = existing["Deployment", FULLNAME]["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "tenants")["secret"]["secretName"] == "platform-tenants"


def test_restrictive_security_context():
    for values in CASES.values():
        manifests = render(values)
        pod = manifests["Deployment", FULLNAME]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        sc = container(manifests)["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert not any("hostPath" in v for v in volumes.values())
        mounts = {m["mountPath"]: m for m in container(manifests)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        writable = sorted(path for path, m in mounts.items() if not m.get("readOnly"))
        assert writable == ["/tmp", "/var/lib/loraserve"]


def test_threads_follow_the_cpu_limit():
    for cpu, threads, expected in (("4", None, 4), ("1500m", None, 1), (3, None, 3), ("250m", None, 1), ("4", 2, 2)):
        manifests = render({"resources": {"limits": {"cpu": cpu, "memory": "4Gi"}},
                            "runtime": {"threads": threads}})
        assert server_config(manifests)["runtime"]["threads"] == expected
        env = {e["name"]: e["value"] for e in container(manifests)["env"]}
        assert env["OMP_NUM_THREADS"] == str(expected)


def test_scale_out_parts():
    manifests = render(FULL)
    deployment = manifests["Deployment", FULLNAME]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    headless = manifests["Service", f"{FULLNAME}-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"].items() <= pod_labels.items()
    hpa = manifests["HorizontalPodAutoscaler", FULLNAME]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    waiting = next(m for m in hpa["metrics"] if m["type"] == "Pods")["pods"]
    assert waiting["metric"]["name"] == "loraserve_num_requests_waiting"
    assert manifests["PodDisruptionBudget", FULLNAME]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    c = container(manifests)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["args"][c["args"].index("--tls-client-ca") + 1] == "/etc/loraserve/tls/ca.crt"
    config = server_config(manifests)
    assert config["telemetry"]["otlp_endpoint"] == "http://otel-collector.observability:4317"
    assert config["runtime"]["model"] == "/models/base.gguf"
    assert config["runtime"]["draft_model"] == "/models/draft.gguf" and config["engine"]["speculation"] == "draft"
    assert config["engine"]["max_shared_prefill_tokens"] == 256
    # with a GPU the server runs on it, its KV arena sized from the GPU's memory fraction
    assert config["runtime"]["device"] == "cuda" and config["runtime"]["gpu_memory_fraction"] == 0.9
    assert config["runtime"]["cuda_graphs"] is True  # decode steps replayed as CUDA graphs
    # With S3 the data dir is per pod (an emptyDir); one PVC is never shared by replicas.
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]
    assert render({})["Deployment", FULLNAME]["spec"]["strategy"] == {"type": "Recreate"}


def test_notes_say_how_to_call_the_service():
    text = notes({})
    assert f"dns:///{FULLNAME}-headless.{NAMESPACE}.svc.cluster.local:50051" in text
    assert f"kubectl -n {NAMESPACE} port-forward svc/{FULLNAME} 50051:50051" in text
    assert "loraserve call --target 127.0.0.1:50051" in text
    assert "No tenants are configured" in text
    full = notes(FULL)
    assert 'authorization: Bearer $LORASERVE_API_KEY' in full and "-plaintext" not in full
    assert "No tenants are configured" not in full


@pytest.mark.parametrize("values, message", [
    ({"tenants": {"tenants": [{"id": "acme", "api_keys": ["hunter2"]}]}},
     r"at '/tenants/tenants/0/api_keys/0': 'hunter2' does not match pattern '\^sha256:\[0-9a-f\]\{64\}\$'"),
    ({"server": {"port": 70000, "metricsPort": 9090, "drainGraceSeconds": 30}},
     r"at '/server/port': maximum: got 70,?000, want 65,?535"),
    ({"sever": {"port": 50051}}, r"additional properties 'sever' not allowed"),
    ({"server": {"port": 50051, "metricsPort": 9090, "drainGraceSeconds": 30, "maxMessageMib": 1}},
     r"at '/server/maxMessageMib': minimum: got 1, want 2"),
    ({"server": {"port": 50051, "metricsPort": 9090, "drainGraceSeconds": 30, "streamInterval": 0}},
     r"at '/server/streamInterval': minimum: got 0, want 1"),
    ({"store": {"kind": "nfs"}}, r"at '/store/kind': value must be one of 'filesystem', 's3'"),
    ({"runtime": {"dtype": "fp16"}}, r"at '/runtime/dtype': value must be one of 'bfloat16', 'float32'"),
    ({"store": {"kind": "s3", "s3": {"bucket": "Bad_Bucket"}}}, r"at '/store/s3/bucket'"),
    ({"database": {"url": "postgresql://u:p@db/x"}}, r"additional properties 'url' not allowed"),
    ({"database": {"poolSize": 0}}, r"at '/database/poolSize': minimum: got 0, want 1"),
    ({"store": {"kind": "s3", "s3": {"bucket": "b", "refreshSeconds": 5}}}, r"additional properties 'refreshSeconds'"),
])
def test_schema_rejects_bad_values_with_a_clear_message(values, message):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=message):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmValuesError, match=message):  # and so does an install's render
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": 2}, "replicaCount > 1 or autoscaling.enabled needs store.kind=s3"),
    ({"replicaCount": 2, "store": {"kind": "s3", "s3": {"bucket": "adapters"}}},
     r"replicaCount > 1 or autoscaling.enabled needs database.existingSecret \(a PostgreSQL URL\)"),
    ({"store": {"kind": "s3"}}, "store.kind=s3 needs store.s3.bucket"),
    ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret"),
    ({"server": {"port": 50051, "metricsPort": 9090, "drainGraceSeconds": 120}},
     r"probes.liveness.periodSeconds \* failureThreshold \(60 s\) must exceed server.drainGraceSeconds \(120 s\)"),
    ({"server": {"port": 50051, "metricsPort": 0, "drainGraceSeconds": 30}, "serviceMonitor": {"enabled": True}},
     "serviceMonitor.enabled needs server.metricsPort > 0"),
])
def test_combinations_the_schema_cannot_express_fail_the_render(values, message):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmRenderError, match=message):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_the_kubernetes_validation_catches_a_misspelt_field():
    """The check above has teeth: a field the API does not have, or a wrong type, fails it."""
    deployment = render({})["Deployment", FULLNAME]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_inference_pool_is_off_by_default():
    for case in ("default", "full", "existing-secrets"):
        kinds = {kind for kind, _ in render(CASES[case])}
        assert not kinds & {"InferencePool", "Role", "RoleBinding"}, case
        assert ("Deployment", EPP) not in render(CASES[case])


@pytest.mark.parametrize("api", ["inference.networking.k8s.io/v1", "inference.networking.x-k8s.io/v1alpha2"])
def test_inference_pool_selects_the_pods_on_their_http_port_and_names_the_endpoint_picker(api):
    values = {"server": {"port": 50051, "metricsPort": 9090, "drainGraceSeconds": 30, "httpPort": 8080},
              "inferencePool": {"enabled": True, "apiVersion": api}}
    manifests = render(values)
    pool = manifests["InferencePool", FULLNAME]
    assert pool["apiVersion"] == api
    pod_labels = manifests["Deployment", FULLNAME]["spec"]["template"]["metadata"]["labels"]
    http = next(p for p in container(manifests)["ports"] if p["name"] == "http")
    assert http["containerPort"] == 8080 == server_config(manifests)["server"]["http_port"]
    epp_service = manifests["Service", EPP]["spec"]
    ext_proc = next(p for p in epp_service["ports"] if p["name"] == "grpc-ext-proc")
    spec = pool["spec"]
    if api.endswith("/v1"):
        assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
        assert spec["targetPorts"] == [{"number": 8080}]
        assert spec["endpointPickerRef"] == {"name": EPP, "port": {"number": ext_proc["port"]}}
    else:
        assert spec["selector"].items() <= pod_labels.items() and spec["targetPortNumber"] == 8080
        assert spec["extensionRef"] == {"name": EPP, "portNumber": ext_proc["port"], "failureMode": "FailClose"}
    # The picker: its Service reaches its pods (not the model servers'), its args name the pool, its plugins
    # score LoRA affinity, queue, KV cache and prefix, and its Role lets it read the pool and the pods.
    epp = manifests["Deployment", EPP]["spec"]["template"]
    assert epp_service["selector"].items() <= epp["metadata"]["labels"].items()
    assert not epp_service["selector"].items() <= pod_labels.items()
    assert not spec.get("selector", {}).get("matchLabels", spec.get("selector")).items() <= \
        epp["metadata"]["labels"].items()
    c = epp["spec"]["containers"][0]
    args = c["args"]
    assert args[args.index("--pool-name") + 1] == FULLNAME and args[args.index("--pool-namespace") + 1] == NAMESPACE
    assert ("--pool-group" in args) == api.endswith("v1alpha2")
    assert {p["containerPort"] for p in c["ports"]} >= {ext_proc["port"]}
    plugins = yaml.safe_load(manifests["ConfigMap", EPP]["data"]["plugins.yaml"])
    assert args[args.index("--config-file") + 1] == "/config/plugins.yaml"
    assert {p["type"] for p in plugins["plugins"]} == {"queue-scorer", "kv-cache-utilization-scorer",
                                                       "prefix-cache-scorer", "lora-affinity-scorer"}
    profile = plugins["schedulingProfiles"][0]["plugins"]
    assert {p["pluginRef"]: p["weight"] for p in profile}["lora-affinity-scorer"] == 2
    rules = manifests["Role", EPP]["rules"]
    assert any("inferencepools" in r["resources"] and api.split("/")[0] in r["apiGroups"] for r in rules)
    assert any("pods" in r["resources"] for r in rules)
    binding = manifests["RoleBinding", EPP]
    assert binding["subjects"][0]["name"] == epp["spec"]["serviceAccountName"] == EPP


def test_inference_pool_needs_the_http_port():
    values = {"server": {"port": 50051, "metricsPort": 9090, "drainGraceSeconds": 30, "httpPort": 0},
              "inferencePool": {"enabled": True}}
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmRenderError, match="inferencePool.enabled needs server.httpPort > 0"):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
