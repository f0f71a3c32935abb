"""The deployment files' offline checks catch broken files.

`deploy/local/test.sh` (and so CI) runs hadolint, the Compose schema,
kubernetes-validate and deploy/k8s/check.py on the repository's files; these
tests feed each tool a broken copy and expect it to fail, so a check that
cannot fail is noticed. No cluster or Docker engine is needed.
"""

import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
BIN = pathlib.Path(sys.executable).parent


def tool(name):
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN} (deploy/lint-requirements.txt)")
    return str(path)


def load_check():
    spec = importlib.util.spec_from_file_location("k8s_check", REPO / "deploy/k8s/check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendered_istio(check, tmp_path):
    """The Istio overlay with the transcoder option, as CI renders it."""
    variant = check.with_component(tmp_path, "variant", REPO / "deploy/k8s/overlays/istio", "istio-grpc-json-transcoder")
    path = check.render(variant, tmp_path / "variant.yaml")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def problems_of(check, docs, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    problems = []
    check.check(path, problems)
    return problems


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_the_shipped_manifests_pass(tmp_path):
    check = load_check()
    assert problems_of(check, rendered_istio(check, tmp_path), tmp_path) == []


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("no readiness probe", "readinessProbe is not a gRPC probe"),
        ("grace below the drain", "terminationGracePeriodSeconds below preStop"),
        ("gRPC port without appProtocol", "gRPC port without appProtocol"),
        ("an extra caller of the wallet", "AuthorizationPolicy allows"),
        ("a missing Secret key", "reads a missing Secret key"),
        ("the descriptor not mounted", "is on no ConfigMap volume"),
        ("a retry on an RPC that does not exist", "is no RPC of proto/"),
    ],
)
def test_check_py_fails_on_a_broken_manifest(tmp_path, breakage, expected):
    check = load_check()
    docs = rendered_istio(check, tmp_path)
    gateway = find(docs, "Deployment", "flashsale-gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    if breakage == "no readiness probe":
        del container["readinessProbe"]
    elif breakage == "grace below the drain":
        gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 1
    elif breakage == "gRPC port without appProtocol":
        for port in find(docs, "Service", "flashsale-wallet")["spec"]["ports"]:
            port.pop("appProtocol", None)
    elif breakage == "an extra caller of the wallet":
        rule = find(docs, "AuthorizationPolicy", "flashsale-wallet")["spec"]["rules"][0]
        rule["from"][0]["source"]["principals"].append("cluster.local/ns/flashsale/sa/intruder")
    elif breakage == "a missing Secret key":
        env = next(e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {}))
        env["valueFrom"]["secretKeyRef"]["key"] = "NO_SUCH_KEY"
    elif breakage == "the descriptor not mounted":
        del gateway["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/userVolumeMount"]
    elif breakage == "a retry on an RPC that does not exist":
        virtual_service = next(d for d in docs if d["kind"] == "VirtualService")
        match = next(m for h in virtual_service["spec"]["http"] for m in h.get("match", []) if "uri" in m)
        match["uri"]["exact"] = "/flashsale.wallet.v1.WalletService/Steal"
    problems = problems_of(check, docs, tmp_path)
    assert any(expected in p for p in problems), problems


def test_kubernetes_validate_fails_on_an_invalid_resource(tmp_path):
    check = load_check()
    docs = rendered_istio(check, tmp_path)
    find(docs, "Deployment", "flashsale-wallet")["spec"]["replicas"] = "three"
    (tmp_path / "core").mkdir()
    broken = tmp_path / "core/broken.yaml"
    broken.write_text(yaml.safe_dump_all([d for d in docs if d["apiVersion"] in check.CORE_GROUPS]))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "--no-warn", str(broken)], capture_output=True, text=True
    )
    assert result.returncode != 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    good = subprocess.run([tool("hadolint"), str(REPO / "deploy/docker/Dockerfile")], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout
    bad = tmp_path / "Dockerfile"
    # Unpinned base image, apt-get without cleanup, and `cd` in RUN.
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp && make\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0, result.stdout


def test_the_compose_schema_fails_on_a_bad_compose_file(tmp_path):
    compose = yaml.safe_load((REPO / "deploy/compose/compose.yaml").read_text())
    name, service = next(iter(compose["services"].items()))
    service["restart_policy"] = "sometimes"  # not a Compose key
    shutil.copy(REPO / "deploy/compose/compose.yaml", tmp_path / "good.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(compose))
    run = lambda path: subprocess.run(  # noqa: E731
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True
    )
    assert run(tmp_path / "good.yaml").returncode == 0
    result = run(tmp_path / "bad.yaml")
    assert result.returncode != 0, f"{name}: {result.stdout}"
