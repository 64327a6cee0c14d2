"""The Kubernetes manifests (deploy/kubernetes): valid against the Kubernetes schemas, and consistent with each
other and with the server they run. No cluster runs here; this is what can be checked without one."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from serving.cli import build_parser, config_from_args

FOLDER = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
K8S_VERSION = "1.31.0"


def _docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(FOLDER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.stem)}"] = doc
    return docs


DOCS = _docs()


@pytest.mark.parametrize("key", sorted(k for k in DOCS if not k.startswith("Kustomization/")))
def test_every_manifest_is_valid_against_the_kubernetes_schema(key):
    kubernetes_validate.validate(DOCS[key], K8S_VERSION, strict=True)  # raises on an unknown or mistyped field


def test_kustomization_lists_every_manifest_but_the_example_secret():
    listed = set(yaml.safe_load((FOLDER / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in FOLDER.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk


def _server():
    deployment = DOCS["Deployment/attnserve-server"]
    return deployment, deployment["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_server_runs_non_root_read_only_with_limits_and_native_grpc_probes():
    _, pod, c = _server()
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001  # the image's
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    health_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    for probe, service in (("livenessProbe", "liveness"), ("startupProbe", "liveness"), ("readinessProbe", None)):
        assert c[probe]["grpc"]["port"] == health_port and c[probe]["grpc"].get("service") == service
    env = {e["name"]: e["value"] for e in c["env"]}
    grace = float(env["ATTNSERVE_DRAIN_SECONDS"]) + float(env["ATTNSERVE_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > grace  # streams in flight finish before the kubelet's SIGKILL


def test_the_server_flags_parse_into_what_the_manifest_promises(monkeypatch):
    _, pod, c = _server()
    for e in c["env"]:
        monkeypatch.setenv(e["name"], e["value"])
    cfg = config_from_args(build_parser().parse_args(c["args"][1:]))  # args[0] is the subcommand
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg.address.endswith(f":{ports['grpc']}") and cfg.metrics_port == ports["metrics"]
    assert cfg.health_port == ports["health"] and cfg.metrics_address == "0.0.0.0"
    assert cfg.http_port == ports["http"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert str(cfg.repo) == mounts["models"]["mountPath"] and mounts["models"]["readOnly"]
    secrets = mounts["secrets"]["mountPath"]
    sec = cfg.security
    for path in (sec.tls_cert, sec.tls_key, sec.auth_token_file, sec.admin_token_file):
        assert str(path).startswith(secrets + "/")
    example = DOCS["Secret/attnserve-secrets"]["stringData"]
    assert {Path(str(p)).name for p in (sec.tls_cert, sec.tls_key, sec.auth_token_file, sec.admin_token_file)} \
        == set(example)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == "attnserve-secrets"


def test_service_pdb_hpa_and_job_point_at_what_exists():
    deployment, pod, _ = _server()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = DOCS["Service/attnserve-server"]
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance per call over every pod
    assert service["spec"]["selector"] == labels
    assert DOCS["PodDisruptionBudget/attnserve-server"]["spec"]["selector"]["matchLabels"] == labels
    assert DOCS["HorizontalPodAutoscaler/attnserve-server"]["spec"]["scaleTargetRef"]["name"] == "attnserve-server"
    claim = DOCS["PersistentVolumeClaim/attnserve-models"]["metadata"]["name"]
    job = DOCS["Job/attnserve-export"]["spec"]["template"]["spec"]
    for spec in (pod, job):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claim in claims
    assert job["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
