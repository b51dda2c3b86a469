"""The real kube-proxy in a lab node's namespace: its identity, command line, start/stop, --cleanup.

The binary is the one `make setup` builds (controlplane.binary("kube-proxy")). The lab's
controller starts it (rpc op "kube-proxy"), as it starts agents: it is the parent that reaps
it, the pid record `kube-proxy-<node>` is in the state dir, and `lab down` stops it with
everything else. Used by the migration test (tests/e2e/test_migration.py) and, with its
`mode` and `args`, by the benchmark against kube-proxy.

Everything kube-proxy changes stays inside the node's namespace:

- Identity: a token of the `kube-system/kube-proxy` ServiceAccount bound to the built-in
  `system:node-proxier` ClusterRole (what kubeadm gives it), in `kube-proxy-<node>.kubeconfig`,
  against the API server's fabric address.
- Sysctls (kube-proxy v1.37, cmd/kube-proxy/app and pkg/proxy/conntrack): nf_conntrack_max and
  /sys/module/nf_conntrack/parameters/hashsize are global (one value for the machine, whatever
  the namespace): `--conntrack-max-per-core=0` leaves both alone. The rest are per network
  namespace and keep kube-proxy's defaults, as on a real node: nf_conntrack_tcp_timeout_established
  (24h) and _close_wait (1h), and route_localnet=1 in iptables mode (localhost NodePorts). The
  migration test checks that the root namespace's values do not change.
- Its own process: `--oom-score-adj=0` instead of -999, so on a shared machine the lab's
  kube-proxy is no harder for the OOM killer to pick than anything else.
- Kernel modules: `--cleanup`, and the nftables mode at start, run `modprobe -va ip_vs` before
  cleaning IPVS leftovers, which would load ip_vs for the whole machine. kube-proxy runs with a
  PATH of its own (`<state>/kube-proxy-bin`: iptables, ip6tables, their -save/-restore, nft),
  without modprobe, and then skips IPVS, as it does on a host without modprobe.
- Local traffic: with a lab file's `clusterCIDR` (examples/lab/cluster-cidr.yaml), kube-proxy
  runs in its default mode, `--detect-local-mode=ClusterCIDR --cluster-cidr=<it>`: any pod
  source is local, so pods of other nodes reaching an externalTrafficPolicy Local NodePort,
  externalIP or LB IP are sent to the cluster-wide endpoints (the agents get the same
  `--cluster-cidr`, agents.py). Without one (the default lab: its /24s have no common prefix
  that leaves out the fabric's node addresses) it tells local traffic by the Node's own
  `spec.podCIDR` (`--detect-local-mode=NodeCIDR`), which the lab's Nodes carry. For the
  ClusterIP path both are the same decision: a node only ever sees its own pods' packets to a
  ClusterIP.
- Ports, inside the node's namespace: /healthz on 0.0.0.0:10256 and /metrics on
  127.0.0.1:10249, kube-proxy's defaults (an ebpfsvc agent on the same node then retries
  them in the background until kube-proxy lets go: health.py `Listener`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ebpfsvc.lab import controlplane, names, rpc
from ebpfsvc.lab.processes import ProcRecord, alive, base_env

if TYPE_CHECKING:
    from ebpfsvc.lab.lab import Lab
    from ebpfsvc.lab.labfile import LabSpec
    from ebpfsvc.lab.store import State

MODES = ("iptables", "nftables")
NAMESPACE, SERVICE_ACCOUNT, CLUSTER_ROLE = "kube-system", "kube-proxy", "system:node-proxier"
HEALTHZ_PORT, METRICS_PORT = 10256, 10249
# What kube-proxy makes in a node, by mode: what `--cleanup` must leave none of.
IPTABLES_CHAIN_PREFIXES = ("KUBE-",)
NFTABLES_TABLE = "kube-proxy"


class KubeProxyError(RuntimeError):
    pass


def record(node: str) -> str:
    """Name of the pid record and log in the state dir."""
    return names.kube_proxy_record(node)


def kubeconfig_path(state: "State", node: str) -> Path:
    return state.path / f"{record(node)}.kubeconfig"


# What kube-proxy executes (iptables mode: iptables*, ip6tables*; nftables mode: nft); nothing else
# is on its PATH (module docstring: modprobe).
TOOLS = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore", "nft")


def tools_dir(state: "State") -> Path:
    """A directory of links to the tools kube-proxy may run, to be its whole PATH."""
    path = state.path / "kube-proxy-bin"
    path.mkdir(exist_ok=True)
    search = base_env()["PATH"]
    for tool in TOOLS:
        link = path / tool
        target = shutil.which(tool, path=search)
        if target is None:
            raise KubeProxyError(f"{tool} not found in {search}: kube-proxy needs it "
                                 "(apt-get install iptables nftables)")
        if not link.is_symlink():
            link.symlink_to(target)    # its own name: iptables-nft's multi-binary dispatches on it
    return path


def environment(state: "State") -> dict[str, str]:
    env = base_env()
    env["PATH"] = str(tools_dir(state))
    return env


def install_identity(lab: "Lab") -> None:
    """The ServiceAccount, its binding to system:node-proxier, and one kubeconfig per node."""
    api = lab.api
    api.apply({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}})
    api.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "lab:kube-proxy"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CLUSTER_ROLE},
               "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]})
    paths = controlplane.Paths(lab.state.path)
    address = lab.spec.control_plane.address
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": 7 * 24 * 3600}}
    token_path = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{SERVICE_ACCOUNT}/token"
    for node in lab.spec.nodes:
        token = api.request("POST", token_path, request)["status"]["token"]
        controlplane.write_kubeconfig(kubeconfig_path(lab.state, node.name),
                                      controlplane.api_url(address), paths.ca, token,
                                      f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}")


def local_traffic_flags(spec: "LabSpec") -> list[str]:
    """How kube-proxy tells pod traffic (module docstring): the lab's cluster CIDR, else the Node's podCIDR."""
    if spec.cluster_cidr is not None:
        return ["--detect-local-mode=ClusterCIDR", f"--cluster-cidr={spec.cluster_cidr}"]
    return ["--detect-local-mode=NodeCIDR"]


def command(state: "State", spec: "LabSpec", node_name: str, mode: str = "iptables",
            args: Iterable[str] = ()) -> list[str]:
    """kube-proxy's argv for `node_name` (`args` last, so they win)."""
    if mode not in MODES:
        raise KubeProxyError(f"kube-proxy mode {mode!r}: one of {', '.join(MODES)}")
    node = spec.node(node_name)
    return [
        controlplane.binary("kube-proxy"),
        f"--kubeconfig={kubeconfig_path(state, node.name)}",
        f"--hostname-override={node.name}",
        f"--proxy-mode={mode}",
        *local_traffic_flags(spec),
        "--conntrack-max-per-core=0",          # no global sysctl (module docstring)
        f"--healthz-bind-address=0.0.0.0:{HEALTHZ_PORT}",
        f"--metrics-bind-address=127.0.0.1:{METRICS_PORT}",
        "--oom-score-adj=0",
        "--v=2",
        *args,
    ]


def start(lab: "Lab", node: str, mode: str = "iptables", args: Iterable[str] = ()) -> ProcRecord:
    """Start kube-proxy on `node` (the controller spawns it); its record. Installs the identity first."""
    if not kubeconfig_path(lab.state, node).exists():
        install_identity(lab)
    rpc.call(lab.state.path, {"op": "kube-proxy", "action": "start", "node": node, "mode": mode,
                              "args": list(args)})
    rec = lab.state.read_pid(record(node))
    if rec is None:
        raise KubeProxyError(f"kube-proxy on {node}: started, but no pid record")
    return rec


def stop(lab: "Lab", node: str) -> None:
    """SIGTERM (SIGKILL after 5 s). Like the real one, kube-proxy leaves its rules behind."""
    rpc.call(lab.state.path, {"op": "kube-proxy", "action": "stop", "node": node})


def running(lab: "Lab", node: str) -> bool:
    return alive(lab.state.read_pid(record(node)))


def cleanup(lab: "Lab", node: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`kube-proxy --cleanup` in the node's namespace: removes the iptables chains (KUBE-*, and the
    jumps to them) and the nftables `kube-proxy` tables of every mode; exit code 0 when clean."""
    return lab.node_exec(node, [controlplane.binary("kube-proxy"), "--cleanup", "--v=2"], timeout=timeout,
                         env=environment(lab.state))


def log(lab: "Lab", node: str) -> str:
    path = lab.state.log_path(record(node))
    return path.read_text(errors="replace") if path.exists() else ""


# -- kube-proxy's zone ------------------------------------------------------------------------------

# proxier.go (both modes, v1.37.2) at --vmodule=proxier=4 logs this each time the node's topology
# labels reach the proxier (OnTopologyChange).
ZONE_GIVEN = '"Updated proxier node topology labels"'
ZONE_FLAGS = ["--vmodule=proxier=4"]


def zone_given(log_text: str, pid: int, zone: str) -> bool:
    """Whether kube-proxy process `pid`'s proxier logged being given `zone` (klog's header carries the
    pid: an appended log of earlier runs does not count)."""
    mark = f" {pid} proxier.go:"
    return any(mark in line and ZONE_GIVEN in line and f'"{zone}"' in line for line in log_text.splitlines())


def start_knowing_zone(lab: "Lab", node: str, mode: str, zone: str, address: str, port: int,
                       tries: int = 3, grace: float = 15.0) -> int:
    """Start kube-proxy on `node` and wait until it serves address:port and its proxier has the node's
    zone; restart it (at most `tries` starts) if the zone never comes. How many restarts it took.

    kube-proxy v1.37.2 can lose the zone at start, and then ignores every zone hint ("node is
    missing label") until the Node's zone label changes: cmd/kube-proxy/app/server.go adds its
    node-topology handler to the node informer that the NodeManager has already started and synced,
    and registers the proxier with that handler one statement later. The informer replays the Node
    to the new handler at once, from another goroutine; if that runs first, the handler records the
    zone with nobody to tell, and afterwards it passes on changes only. Seen twice in CI (a
    PreferSameZone Service answered from both zones for 60 s), never on a quiet machine."""
    for attempt in range(tries):
        rec = start(lab, node, mode, args=ZONE_FLAGS)
        wait_serving(lab, node, mode, address, port)
        # Counted from the first rules, not from the start: a start slower than `grace` on a loaded
        # machine must still be asked once (the replay reaches the proxier before its first sync or never).
        deadline = time.monotonic() + grace
        while not zone_given(log(lab, node), rec.pid, zone):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        else:
            return attempt
        stop(lab, node)
    raise KubeProxyError(f"kube-proxy on {node}: its proxier was not given zone {zone!r} in {tries} starts; "
                         f"its log:\n{log(lab, node)[-3000:]}")


# -- what kubelet adds to a real node ----------------------------------------------------------------

# kubelet's own firewall rule (pkg/kubelet/kubelet_network_linux.go, v1.37), on every node where
# iptables exists: localnet packets that conntrack has not seen are dropped. kube-proxy's iptables
# mode writes the same rule and `--cleanup` leaves it (kubelet owns it).
KUBELET_FIREWALL = ["-m", "comment", "--comment", "block incoming localnet connections",
                    "--dst", "127.0.0.0/8", "!", "--src", "127.0.0.0/8",
                    "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"]


def install_kubelet_firewall(lab: "Lab", node: str) -> None:
    """What kubelet does on every real node: the KUBE-FIREWALL chain, jumped to from INPUT and
    OUTPUT, with its localnet rule. The lab's kubelet (the controller) leaves it out, so lab
    traffic meets no netfilter conntrack; a migration needs it: the rule uses conntrack, which
    keeps nf_conntrack on in the node's namespace once `kube-proxy --cleanup` has removed
    kube-proxy's own rules, and with it the NAT of connections kube-proxy translated
    (docs/deploy.md, "Migrating from kube-proxy")."""
    steps = [["-N", "KUBE-FIREWALL"], ["-I", "OUTPUT", "-j", "KUBE-FIREWALL"],
             ["-I", "INPUT", "-j", "KUBE-FIREWALL"], ["-A", "KUBE-FIREWALL", *KUBELET_FIREWALL]]
    for step in steps:
        out = lab.node_exec(node, ["iptables", "-w", "-t", "filter", *step], timeout=30)
        if out.returncode != 0:
            raise KubeProxyError(f"iptables {' '.join(step)} in {node}: {out.stderr.strip()}")


# -- what kube-proxy programmed in a node --------------------------------------------------------


def iptables_chains(lab: "Lab", node: str) -> set[str]:
    """Every KUBE-* chain in the node's iptables (IPv4 and IPv6), as `table/CHAIN`."""
    found = set()
    for save in ("iptables-save", "ip6tables-save"):
        out = lab.node_exec(node, [save], timeout=30)
        if out.returncode != 0:
            raise KubeProxyError(f"{save} in {node}: {out.stderr.strip()}")
        table = ""
        for line in out.stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and line[1:].startswith(IPTABLES_CHAIN_PREFIXES):
                found.add(f"{table}/{line[1:].split()[0]}")
    return found


def nftables_tables(lab: "Lab", node: str) -> set[str]:
    """kube-proxy's nftables tables in the node, as `family name`."""
    out = lab.node_exec(node, ["nft", "list", "tables"], timeout=30)
    if out.returncode != 0:
        raise KubeProxyError(f"nft list tables in {node}: {out.stderr.strip()}")
    return {line.removeprefix("table ").strip() for line in out.stdout.splitlines()
            if line.strip().endswith(f" {NFTABLES_TABLE}")}


def leftovers(lab: "Lab", node: str) -> set[str]:
    """Whatever of kube-proxy's (either mode) is in the node: empty after `--cleanup`."""
    return iptables_chains(lab, node) | {f"nft {t}" for t in nftables_tables(lab, node)}


def ruleset(lab: "Lab", node: str, mode: str) -> str:
    """The node's rules as kube-proxy's mode writes them (iptables-save, or its nft table)."""
    if mode == "iptables":
        return lab.node_exec(node, ["iptables-save"], timeout=30).stdout
    return lab.node_exec(node, ["nft", "list", "table", "ip", NFTABLES_TABLE], timeout=30).stdout


def serves(lab: "Lab", node: str, mode: str, address: str, port: int, endpoints: Iterable[str] = ()) -> bool:
    """kube-proxy has programmed rules for ClusterIP address:port on `node`, and DNATs to each of
    `endpoints` ("ip:port") somewhere in its rules."""
    text = ruleset(lab, node, mode)
    if mode == "iptables":
        programmed = f"-d {address}/32" in text and f"--dport {port} " in text
    else:
        programmed = f"{address} . tcp . {port} " in text or f"{address} . tcp . {port}\n" in text
    return programmed and all(re.search(_endpoint_pattern(endpoint), text) for endpoint in endpoints)


def _endpoint_pattern(endpoint: str) -> str:
    """ip:port as a DNAT target: iptables' --to-destination and nft's one-endpoint `dnat to` write
    ip:port, nft's numgen map for several endpoints ip . port. Whole: 198.18.1.3 is not 198.18.1.30."""
    ip, _, port = endpoint.rpartition(":")
    return rf"(?<![\d.]){re.escape(ip)}(?::| \. ){port}(?!\d)"


def wait_serving(lab: "Lab", node: str, mode: str, address: str, port: int, timeout: float = 60.0,
                 since: float | None = None, endpoints: Iterable[str] = ()) -> float:
    """Wait until kube-proxy on `node` has rules for address:port (and DNATs to each of `endpoints`);
    seconds since `since` (or the call).

    Rules for the address alone can come from a sync that saw an EndpointSlice before its last
    endpoint was ready: a test that needs every backend to take connections passes `endpoints`."""
    endpoints = tuple(endpoints)
    began = time.monotonic() if since is None else since
    deadline = time.monotonic() + timeout
    while not serves(lab, node, mode, address, port, endpoints):
        if not running(lab, node):
            raise KubeProxyError(f"kube-proxy on {node} exited; its log:\n{log(lab, node)[-3000:]}")
        if time.monotonic() > deadline:
            raise KubeProxyError(f"kube-proxy on {node} has no rules for {address}:{port} "
                                 f"(to {', '.join(endpoints) or 'any endpoint'}) after {timeout}s; "
                                 f"its log:\n{log(lab, node)[-3000:]}")
        time.sleep(0.1)
    return time.monotonic() - began
