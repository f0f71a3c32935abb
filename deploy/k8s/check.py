"""Structural checks of the rendered Kubernetes manifests, beyond their schemas.

kubernetes-validate checks every core resource against the Kubernetes schema;
the mesh and operator resources (GRPCRoute, Istio, ServiceMonitor) have no
schema available offline, and no schema knows what this suite needs. This
script checks that, on each rendered overlay given on the command line:

- every resource but the Namespace lands in namespace `flashsale`;
- every Deployment has gRPC startup, readiness and liveness probes on its gRPC
  port, resource requests and limits, a preStop pause, and a grace period that
  covers the pause plus SHUTDOWN_GRACE_SECONDS;
- every gRPC Service port says `appProtocol: grpc`;
- every ConfigMap or Secret key a container reads exists;
- every variable of the configuration table in deploy/README.md is given to
  the service that reads it (or is listed below as deliberately left at its
  default);
- autoscalers and disruption budgets point at Deployments that exist;
- mesh routes name Services, ports and RPCs that exist (RPCs from proto/);
- Istio's AuthorizationPolicies allow exactly the callers the NetworkPolicies
  allow, by the service accounts of those callers' pods;
- the gRPC-JSON transcoder option reads a descriptor file its sidecar mounts
  from a ConfigMap that holds it, and names services of proto/.

Usage: python3 deploy/k8s/check.py OUT_DIR KUSTOMIZATION_DIR...
renders each directory with `kubectl kustomize` into OUT_DIR/<name>.yaml (for
kubernetes-validate to read next), and the last one again with each optional
component (the Prometheus Operator's; the Istio gRPC-JSON transcoder on the
Istio overlay); checks each, and exits 1 on any finding.
Without kubectl it says so and falls back to concatenating the listed
resources and components (no patches applied), so the checks still run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

# Left at their defaults on purpose: optional claims, and the OTEL_* knobs
# beyond the endpoint and sampler.
OPTIONAL = {"JWT_ISSUER", "JWT_AUDIENCE", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            # sign-in through an identity provider instead of JWT_SECRET (k8s README)
            "OIDC_ISSUER", "OIDC_AUDIENCE", "OIDC_JWKS_URL", "OIDC_JWKS_FILE", "OIDC_ROLES_CLAIM",
            "OIDC_JWKS_MIN_REFETCH_MS", "OIDC_CLIENT_ID",
            # the services' own mutual TLS, for deployments without a mesh (deploy/README.md)
            "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE", "TLS_RELOAD_INTERVAL_MS"}

KNOWN_CRDS = {
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
}

SERVICES = {"gateway", "inventory", "wallet"}

CORE_GROUPS = ("v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1")


def rpcs():
    """Every `package.Service/Method` defined in proto/."""
    found = set()
    for proto in (ROOT / "proto").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
        for service, body in re.findall(r"^service\s+(\w+)\s*\{(.*?)^\}", text, re.M | re.S):
            for method in re.findall(r"^\s*rpc\s+(\w+)\(", body, re.M):
                found.add(f"{package}.{service}/{method}")
    return found


def readme_variables():
    """Variable -> the services deploy/README.md's configuration table says read it."""
    text = (ROOT / "deploy" / "README.md").read_text()
    section = text.split("## Configuration", 1)[1]
    table = next(block for block in section.split("\n\n") if block.startswith("| variable"))
    wanted = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0].split("(")[0])
        words = set(re.findall(r"[a-z]+", cells[1]))
        services = {"gateway", "inventory", "wallet"} if words & {"all", "each"} else words & SERVICES
        for name in names:
            readers = set(services)
            named = next((s for s in SERVICES if name.startswith(s.upper() + "_")), None)
            if named and name.endswith("_LISTEN_ADDR"):
                readers = {named}  # each service its own
            elif named and name.endswith("_URL"):
                readers -= {named}  # the address of a service, for its callers
            wanted.setdefault(name, set()).update(readers)
    return wanted


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())


def check(path, problems):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    where = Path(path).name

    def problem(text):
        problems.append(f"{where}: {text}")

    by_kind = {}
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key[0] not in CORE_GROUPS and key not in KNOWN_CRDS:
            problem(f"unexpected resource {key}")
        if not doc.get("metadata", {}).get("name"):
            problem(f"{key} without a name")
        by_kind.setdefault(doc["kind"], []).append(doc)

    for doc in docs:
        if doc["kind"] != "Namespace" and doc.get("metadata", {}).get("namespace") != "flashsale":
            problem(f"{doc['kind']} {doc['metadata'].get('name')} is not in namespace flashsale")
    if "Secret" not in by_kind:
        # The Secret is created by the operator, from the example's keys.
        example = ROOT / "deploy/k8s/base/secrets.example.yaml"
        by_kind["Secret"] = [d for d in yaml.safe_load_all(example.read_text()) if d]
    config = {k for d in by_kind.get("ConfigMap", []) for k in d.get("data", {})}
    secrets = {k for d in by_kind.get("Secret", []) for k in d.get("stringData", {}) | d.get("data", {})}
    grace = int(next(d["data"]["SHUTDOWN_GRACE_SECONDS"] for d in by_kind["ConfigMap"]))
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}
    accounts = {d["metadata"]["name"] for d in by_kind.get("ServiceAccount", [])}
    env_of = {}

    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not selects(deployment["spec"]["selector"], labels):
            problem(f"{name}: its selector does not select its pods")
        if pod.get("serviceAccountName") not in accounts:
            problem(f"{name}: service account {pod.get('serviceAccountName')} does not exist")
        for container in pod["containers"]:
            grpc = next((p["containerPort"] for p in container["ports"] if p["name"] == "grpc"), None)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if container.get(probe, {}).get("grpc", {}).get("port") != grpc:
                    problem(f"{name}: {probe} is not a gRPC probe on port {grpc}")
            resources = container.get("resources", {})
            if not {"cpu", "memory"} <= set(resources.get("requests", {})) or not {"cpu", "memory"} <= set(
                resources.get("limits", {})
            ):
                problem(f"{name}: cpu and memory requests and limits are required")
            pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
            if pause is None:
                problem(f"{name}: no preStop pause")
            elif pod.get("terminationGracePeriodSeconds", 30) < pause + grace:
                problem(f"{name}: terminationGracePeriodSeconds below preStop {pause} s + grace {grace} s")
            component = name.removeprefix("flashsale-")
            env_of[component] = {e["name"] for e in container.get("env", [])}
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source and source["configMapKeyRef"]["key"] not in config:
                    problem(f"{name}: {env['name']} reads a missing ConfigMap key")
                if "secretKeyRef" in source and source["secretKeyRef"]["key"] not in secrets:
                    problem(f"{name}: {env['name']} reads a missing Secret key")

    wanted = readme_variables()
    if len(wanted) < 20:
        problem(f"deploy/README.md's configuration table gave {len(wanted)} variables; is its layout changed?")
    for variable, readers in wanted.items():
        if variable in OPTIONAL or (variable.startswith("OTEL_") and variable not in {"OTEL_EXPORTER_OTLP_ENDPOINT"}):
            continue
        for reader in readers:
            if variable not in env_of.get(reader, set()):
                problem(f"{variable} (deploy/README.md, read by {reader}) is not given to flashsale-{reader}")

    for name, service in services.items():
        for port in service["spec"]["ports"]:
            if port["name"] == "grpc" and port.get("appProtocol") != "grpc":
                problem(f"service {name}: gRPC port without appProtocol: grpc")
        if not any(selects({"matchLabels": service["spec"]["selector"]}, d["spec"]["template"]["metadata"]["labels"])
                   for d in deployments.values()):
            problem(f"service {name} selects no Deployment")

    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        if hpa["spec"]["scaleTargetRef"]["name"] not in deployments:
            problem(f"autoscaler {hpa['metadata']['name']} targets a missing Deployment")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(selects(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
                   for d in deployments.values()):
            problem(f"disruption budget {pdb['metadata']['name']} selects no pods")

    known_rpcs = rpcs()
    for route in by_kind.get("GRPCRoute", []):
        for parent in route["spec"]["parentRefs"]:
            ports = {p["port"] for p in services.get(parent["name"], {"spec": {"ports": []}})["spec"]["ports"]}
            if parent.get("kind") != "Service" or parent.get("port") not in ports:
                problem(f"route {route['metadata']['name']}: parent {parent} is no port of a Service")
        for rule in route["spec"]["rules"]:
            for match in rule.get("matches", []):
                rpc = f"{match['method']['service']}/{match['method']['method']}"
                if rpc not in known_rpcs:
                    problem(f"route {route['metadata']['name']}: {rpc} is no RPC of proto/")
    for vs in by_kind.get("VirtualService", []):
        for host in vs["spec"]["hosts"]:
            if host not in services:
                problem(f"virtual service {vs['metadata']['name']}: no Service {host}")
        for http in vs["spec"]["http"]:
            for match in http.get("match", []):
                if "uri" not in match:
                    continue
                rpc = match["uri"]["exact"].lstrip("/")
                if rpc not in known_rpcs:
                    problem(f"virtual service {vs['metadata']['name']}: {rpc} is no RPC of proto/")
    for dr in by_kind.get("DestinationRule", []):
        if dr["spec"]["host"] not in services:
            problem(f"destination rule {dr['metadata']['name']}: no Service {dr['spec']['host']}")

    for envoy_filter in by_kind.get("EnvoyFilter", []):
        check_transcoder(envoy_filter, deployments, by_kind.get("ConfigMap", []), problem)

    policies = [p for p in by_kind.get("AuthorizationPolicy", []) if p.get("spec")]
    if policies:
        namespace = next(d["metadata"]["name"] for d in by_kind["Namespace"])
        if not any(p["spec"].get("mtls", {}).get("mode") == "STRICT" for p in by_kind.get("PeerAuthentication", [])):
            problem("no PeerAuthentication STRICT")
        for netpol in by_kind.get("NetworkPolicy", []):
            target = netpol["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
            if target not in deployments:
                continue
            allowed_by_netpol = set()
            for rule in netpol["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    caller = peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                    if caller in deployments:
                        account = deployments[caller]["spec"]["template"]["spec"]["serviceAccountName"]
                        allowed_by_netpol.add(f"cluster.local/ns/{namespace}/sa/{account}")
            if not allowed_by_netpol:
                continue
            allowed_by_mesh = {
                principal
                for p in policies
                if p["spec"].get("selector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == target
                for rule in p["spec"].get("rules", [])
                for source in rule.get("from", [])
                for principal in (source.get("source") or {}).get("principals") or []
            }
            if allowed_by_mesh != allowed_by_netpol:
                problem(f"{target}: AuthorizationPolicy allows {sorted(allowed_by_mesh)}, "
                        f"the NetworkPolicy {sorted(allowed_by_netpol)}")
    return len(docs)


def check_transcoder(envoy_filter, deployments, config_maps, problem):
    """The descriptor the transcoder reads is mounted into the selected pods'
    sidecar from a ConfigMap key of that name, and its services exist."""
    name = envoy_filter["metadata"]["name"]
    target = envoy_filter["spec"]["workloadSelector"]["labels"].get("app.kubernetes.io/name")
    if target not in deployments:
        problem(f"envoy filter {name}: selects no Deployment")
        return
    annotations = deployments[target]["spec"]["template"]["metadata"].get("annotations", {})
    volumes = {v["name"]: v for v in json.loads(annotations.get("sidecar.istio.io/userVolume", "[]"))}
    mounts = json.loads(annotations.get("sidecar.istio.io/userVolumeMount", "[]"))
    services = {rpc.split("/")[0] for rpc in rpcs()}
    for patch in envoy_filter["spec"]["configPatches"]:
        config = patch["patch"]["value"].get("typed_config", {})
        if not config.get("@type", "").endswith(".GrpcJsonTranscoder"):
            continue
        descriptor = Path(config.get("proto_descriptor", ""))
        mount = next((m for m in mounts if Path(m["mountPath"]) == descriptor.parent), None)
        volume = volumes.get(mount["name"]) if mount else None
        if volume is None or "configMap" not in volume:
            problem(f"envoy filter {name}: {descriptor} is on no ConfigMap volume of {target}'s sidecar")
            continue
        held = next((c for c in config_maps if c["metadata"]["name"] == volume["configMap"]["name"]), None)
        if held is None or descriptor.name not in held.get("binaryData", {}) | held.get("data", {}):
            problem(f"envoy filter {name}: ConfigMap {volume['configMap']['name']} holds no {descriptor.name}")
        for service in config.get("services", []):
            if service not in services:
                problem(f"envoy filter {name}: {service} is no service of proto/")


def concatenated(directory):
    """The resources a kustomization lists, without its patches or transformers."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    parts = []
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        target = directory / entry
        parts.append(concatenated(target) if target.is_dir() else target.read_text())
    return "\n---\n".join(parts)


def render(directory, out):
    if shutil.which("kubectl"):
        text = subprocess.run(["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True).stdout
    else:
        print(f"kubectl not found: {directory} concatenated, not rendered (patches not applied)", file=sys.stderr)
        text = concatenated(directory)
    out.write_text(text)
    return out


def with_component(out_dir, name, overlay, component):
    """A kustomization in OUT_DIR/NAME: OVERLAY plus deploy/k8s/components/COMPONENT."""
    variant = out_dir / name
    variant.mkdir(exist_ok=True)
    (variant / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # Kustomize takes only relative paths to other kustomizations.
                "resources": [os.path.relpath(overlay.resolve(), variant.resolve())],
                "components": [os.path.relpath(ROOT / "deploy/k8s/components" / component, variant.resolve())],
            }
        )
    )
    return variant


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = []
    directories = list(map(Path, sys.argv[2:]))
    # The optional components, on the last overlay given (the Istio one in CI).
    variants = [
        with_component(out_dir, "with-prometheus-operator", directories[-1], "prometheus-operator"),
        with_component(out_dir, "with-grpc-json-transcoder", directories[-1], "istio-grpc-json-transcoder"),
    ]
    for directory in directories + variants:
        path = render(directory, out_dir / f"{directory.name}.yaml")
        count = check(path, problems)
        print(f"{directory}: {count} resources checked")
    for text in problems:
        print(f"FAIL {text}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
