"""The lab's control plane: the real etcd, kube-apiserver and kube-controller-manager.

They are the binaries `make setup` builds from their Go modules (scripts/build-k8s.sh),
and they run in the lab's own `<prefix>-cp` namespace, plugged into the fabric like a
control-plane node, so node agents reach the API server the way they would in a cluster:
over the network, at the address the `kubernetes` Service's endpoints name.

    etcd                      127.0.0.1:2379 inside the cp namespace
    kube-apiserver            0.0.0.0:6443 inside the cp namespace (advertised on the fabric)
    kube-controller-manager   the Endpoints, EndpointSlice, EndpointSlice-mirroring,
                              ServiceAccount and garbage-collector controllers, nothing else
    API proxy (apiproxy.py)   127.0.0.1:<port> in the root namespace -> the API server, so
                              `kubectl` and the lab's own Python reach it from the host:
                              loopback only, nothing is routed into the lab

Identities: the lab's admin (this module's kubeconfig) is a static token in
system:masters; each node agent authenticates with a ServiceAccount token of
deploy/'s `ebpfsvc` ServiceAccount, so deploy/'s ClusterRole is what it may do.
Everything lives under the lab's state dir (`pki/`, `etcd/`, kubeconfigs).
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ebpfsvc.lab.store import api_time

K8S_ROOT = Path("/var/lib/ebpfsvc/k8s")
API_PORT = 6443
ETCD_CLIENT = "http://127.0.0.1:2379"
# Components in start order: each is a pid record and a log in the state dir.
ETCD, APISERVER, CONTROLLER_MANAGER, API_PROXY = "etcd", "kube-apiserver", "kube-controller-manager", "apiproxy"
COMPONENTS = (ETCD, APISERVER, CONTROLLER_MANAGER, API_PROXY)
ADMIN_USER = "lab-admin"
# The controllers a Service data plane needs from kube-controller-manager; the node
# lifecycle controller is left out on purpose: the lab's kubelet keeps no node leases,
# and lab nodes must not be tainted unreachable.
CONTROLLERS = ("endpoints-controller", "endpointslice-controller", "endpointslice-mirroring-controller",
               "serviceaccount-controller", "garbage-collector-controller", "namespace-controller",
               "service-cidr-controller")


class ControlPlaneError(RuntimeError):
    pass


def bin_dir() -> Path:
    """Where scripts/build-k8s.sh put the binaries (its `current` link)."""
    path = K8S_ROOT / "current"
    if not (path / "kube-apiserver").exists():
        raise ControlPlaneError(f"no Kubernetes binaries in {path}; run `make setup` (scripts/build-k8s.sh)")
    return path.resolve()


def binary(name: str) -> str:
    return str(bin_dir() / name)


@dataclass(frozen=True)
class Paths:
    """Files of one lab's control plane, under its state dir."""
    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def admin_token(self) -> Path:
        return self.pki / "admin.token"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig through the loopback API proxy (host side)."""
        return self.root / "kubeconfig"

    @property
    def inside_kubeconfig(self) -> Path:
        """The admin's kubeconfig for processes inside the cp namespace (the controller manager)."""
        return self.root / "kubeconfig.cp"

    @property
    def proxy_port(self) -> Path:
        return self.root / "apiproxy.port"

    def agent_kubeconfig(self, node: str) -> Path:
        return self.root / f"agent-{node}.kubeconfig"


# -- PKI --------------------------------------------------------------------------------------

def host_port(address, port: int) -> str:
    """`address:port`, an IPv6 address in brackets (URLs, the API proxy's target)."""
    return f"[{address}]:{port}" if ipaddress.ip_address(str(address)).version == 6 else f"{address}:{port}"


def api_url(address) -> str:
    """The API server's URL at `address` (the control plane's fabric address, or loopback)."""
    return f"https://{host_port(address, API_PORT)}"


def make_pki(paths: Paths, addresses, service_ip) -> None:
    """A CA, the API server's serving certificate, the ServiceAccount signing key, an admin token.

    The serving certificate names every address a client dials: the fabric addresses (agents;
    one per family), 127.0.0.1 (the proxy and the controller manager) and the `kubernetes`
    Service's ClusterIP (pods), so every client verifies TLS against the lab's CA.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    paths.pki.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("ebpfsvc-lab-ca")).issuer_name(name("ebpfsvc-lab-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                      "kubernetes.default.svc.cluster.local", "localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(str(a))) for a in (*addresses, "127.0.0.1", service_ip)]
    cert = (x509.CertificateBuilder().subject_name(name("kube-apiserver")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    (paths.pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (paths.pki / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (paths.pki / "apiserver.key").write_bytes(pem_key(key))
    (paths.pki / "sa.key").write_bytes(pem_key(sa_key))
    (paths.pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token = secrets.token_hex(24)
    paths.admin_token.write_text(token + "\n")
    # kube-apiserver --token-auth-file: token,user,uid,"group1,group2"
    (paths.pki / "tokens.csv").write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
    for path in paths.pki.iterdir():
        path.chmod(0o600)
    write_kubeconfig(paths.inside_kubeconfig, f"https://127.0.0.1:{API_PORT}", paths.ca, token, ADMIN_USER)


def write_kubeconfig(path: Path, server: str, ca: Path, token: str, user: str) -> None:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# -- command lines ------------------------------------------------------------------------------

def commands(paths: Paths, address, service_cidrs, node_port_range: str = "30000-32767") -> dict[str, list[str]]:
    """Component -> argv, for the processes that run inside the cp namespace.

    `address` is the primary fabric address (--advertise-address: the API server requires it
    of the primary service range's family, as the `kubernetes` Service is single-stack);
    `service_cidrs` one range per lab family, primary first: with two, the cluster is
    dual-stack and a PreferDualStack or RequireDualStack Service gets a ClusterIP of each.
    The controller manager needs no family flag: its EndpointSlice controller makes a slice
    per family of the Service's spec.ipFamilies from the Pods' status.podIPs (its
    --service-cluster-ip-range only serves node IPAM, which the lab does not run)."""
    pki = paths.pki
    service_cidrs = [service_cidrs] if isinstance(service_cidrs, ipaddress._BaseNetwork) else list(service_cidrs)
    # "::" listens on both families; 0.0.0.0 (IPv4 labs, as before) too in Go, but say what is meant.
    bind = "::" if any(c.version == 6 for c in service_cidrs) else "0.0.0.0"
    return {
        ETCD: [
            binary("etcd"), "--name", "lab", "--data-dir", str(paths.etcd_data),
            "--listen-client-urls", ETCD_CLIENT, "--advertise-client-urls", ETCD_CLIENT,
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "lab=http://127.0.0.1:2380",
            # A lab's data is thrown away with it: no fsync per write on a shared disk.
            "--unsafe-no-fsync", "--log-level", "warn",
        ],
        APISERVER: [
            binary("kube-apiserver"),
            "--etcd-servers", ETCD_CLIENT,
            "--bind-address", bind, "--secure-port", str(API_PORT), "--advertise-address", str(address),
            "--service-cluster-ip-range", ",".join(map(str, service_cidrs)),
            "--service-node-port-range", node_port_range,
            "--tls-cert-file", str(pki / "apiserver.crt"), "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--token-auth-file", str(pki / "tokens.csv"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--authorization-mode", "Node,RBAC",
            "--enable-priority-and-fairness=false",
            "--profiling=false", "--v=1",
        ],
        CONTROLLER_MANAGER: [
            binary("kube-controller-manager"),
            "--kubeconfig", str(paths.inside_kubeconfig),
            "--authentication-kubeconfig", str(paths.inside_kubeconfig),
            "--authorization-kubeconfig", str(paths.inside_kubeconfig),
            "--controllers", ",".join(CONTROLLERS),
            "--leader-elect=false", "--secure-port=0", "--v=1",
            # Endpoint changes reach the slices at once (the default batches for 0 s too; explicit
            # because the lab's e2e timings depend on it).
            "--endpointslice-updates-batch-period=0s",
        ],
    }


# -- bootstrap: what kubeadm and the kubelets would have done ---------------------------------

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT = "kube-system", "ebpfsvc"
ZONE_LABEL = "topology.kubernetes.io/zone"


def wait_ready(api, timeout: float = 90.0, log_hint: str = "") -> None:
    """Until /readyz answers ok (the bootstrap RBAC roles and the `default` namespace exist)."""
    from ebpfsvc.lab.api import APIError

    deadline = time.monotonic() + timeout
    while True:
        try:
            api.request("GET", "/readyz", timeout=5)
            if api.get("Namespace", None, "default") is not None:
                return
            last = "the default namespace is not there yet"
        except APIError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"the API server is not ready after {timeout:.0f}s ({last}){log_hint}")
        time.sleep(0.25)


def node_object(node) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name,
                                                        "kubernetes.io/os": "linux", ZONE_LABEL: node.zone}},
            "spec": {"podCIDR": str(node.pod_cidr), "podCIDRs": [str(c) for c in node.pod_cidrs]}}


def node_status(node) -> dict:
    """What a kubelet reports: addresses (an InternalIP per family, the primary first, as a
    dual-stack kubelet's --node-ip lists them), Ready, and the capacity topology hints weigh zones by."""
    resources = {"cpu": "2", "memory": "4Gi", "pods": "110"}
    return {"addresses": [*({"type": "InternalIP", "address": str(a)} for a in node.addresses),
                          {"type": "Hostname", "address": node.name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "lab node", "lastHeartbeatTime": api_time(),
                            "lastTransitionTime": api_time()}],
            "capacity": resources, "allocatable": resources}


def register_nodes(api, spec) -> None:
    for node in spec.nodes:
        api.apply(node_object(node))
        api.patch_status("Node", None, node.name, node_status(node))


def deploy_documents(*files: str) -> list[dict]:
    docs = []
    for name in files:
        docs += [d for d in yaml.safe_load_all((DEPLOY_DIR / name).read_text()) if d]
    return docs


def install_agent_identity(api, paths: Paths, spec, address) -> None:
    """deploy/'s ServiceAccount, ClusterRole(Binding) and ConfigMap, then one kubeconfig per node
    with a token of that ServiceAccount: the agents can do exactly what deploy/ grants."""
    for doc in deploy_documents("serviceaccount.yaml", "rbac.yaml", "configmap.yaml"):
        api.apply(doc)
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": 7 * 24 * 3600}}
    token_path = (f"/api/v1/namespaces/{AGENT_NAMESPACE}/serviceaccounts/"
                  f"{AGENT_SERVICE_ACCOUNT}/token")
    for node in spec.nodes:
        token = api.request("POST", token_path, request)["status"]["token"]
        write_kubeconfig(paths.agent_kubeconfig(node.name), api_url(address), paths.ca, token,
                         f"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}")
