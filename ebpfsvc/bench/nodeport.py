"""North-south measurements: iperf3 throughput and TCP connection rate from the lab's
external client, through NodePort with the TC uplink programs, with XDP in front of
them, and direct (no Service, plain forwarding), on this machine.

    sudo .venv/bin/python -m ebpfsvc.bench.nodeport [--seconds 5] [--conns 3000] [--json FILE]

Every path enters the cluster at node-1 (198.18.0.11):

    remote  backend pod on node-2: NodePort is SNAT + DNAT at node-1 (externalTrafficPolicy
            Cluster, backend elsewhere); direct = the client routes the pod's /32 via node-1.
    local   backend pod on node-1: NodePort is DNAT only; direct = the pod's /32 via node-1.

Modes:
    direct  to the pod IP (the uplink programs are attached but match nothing);
    tc      the agents as the lab starts them (--uplink-mode tc);
    xdp     + xdp_uplink on node-1's eth0 in native mode, as --uplink-mode xdp attaches it,
            and an XDP_PASS program on eth0's veth peer in the fabric: a veth only accepts
            XDP_TX frames when its peer runs XDP (or has GRO on). Veth XDP also turns off
            GSO on the peer, so every frame is MTU-sized: the cost this measures.
    *-csum  the same with TX checksum offload off on the client's and the pods' eth0, so
            packets carry full checksums, as from a real NIC: only then can XDP translate a
            veth packet itself (a partial checksum goes to TC, see nodeport_xdp.h). Checksum
            offload off also means no TSO: compare -csum modes with each other.

One lab (a unique prefix), torn down at the end even on failure; every client run is bounded
in count and time (ebpfsvc.bench.traffic). Numbers are for comparing modes on this machine:
the Python connect-rate client and two shared cores bound them, not the datapath alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid


from ebpfsvc.bench import traffic
from ebpfsvc.datapath import nodeaddrs, uplink
from ebpfsvc.inspect.node import NodeMaps
from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, names

NODE1 = "198.18.0.11"
PATHS = {"remote": ("np-remote", "node-2"), "local": ("np-local", "node-1")}   # path -> (pod, its node)
MODES = ("direct", "tc", "xdp", "direct-csum", "tc-csum", "xdp-csum")


def ports(path: str, mode: str) -> tuple[int, int, int, int]:
    """(iperf3 port, connect-rate port, their nodePorts) of one measurement.

    Every mode has servers and nodePorts of its own, so no measurement meets the sockets
    (TIME_WAIT under another ISN) or conntrack entries another one left behind.
    """
    i, j = MODES.index(mode), list(PATHS).index(path)
    return 5201 + i, 7000 + i, 30300 + 100 * j + 2 * i, 30301 + 100 * j + 2 * i


XDP_PASS_SRC = b"int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"


def _pod(name: str, node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"pod": name}, "annotations": {"lab.ebpfsvc.io/ready": "true"}},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]}}


def _service(path: str) -> dict:
    pod = PATHS[path][0]
    spec_ports = []
    for mode in MODES:
        iperf, crr, iperf_np, crr_np = ports(path, mode)
        spec_ports += [{"name": f"iperf-{MODES.index(mode)}", "port": iperf, "targetPort": iperf, "nodePort": iperf_np},
                       {"name": f"crr-{MODES.index(mode)}", "port": crr, "targetPort": crr, "nodePort": crr_np}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": pod},
            "spec": {"type": "NodePort", "selector": {"pod": pod}, "ports": spec_ports}}


def _wait_programmed(lab: Lab, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    want = [np for path in PATHS for mode in MODES for np in ports(path, mode)[2:]]
    while True:
        try:
            with NodeMaps.open(names.pin_dir(lab.prefix, "node-1")) as maps:
                fes = [maps.frontend(NODE1, port, "TCP", "external") for port in want]
            if all(fe is not None and fe.backend_count == 1 for fe in fes):
                return
        except OSError:
            pass                            # the agent has not pinned its maps yet
        if time.monotonic() > deadline:
            raise TimeoutError("node-1's agent did not program the NodePorts")
        time.sleep(0.2)


def tx_checksum(netns: str, ifname: str, enable: bool) -> None:
    """ethtool -K IFNAME tx on|off, inside `netns` (pyroute2's ethtool ioctls act on the caller's namespace)."""
    from pyroute2.ethtool import Ethtool

    def set_() -> None:
        eth = Ethtool()
        try:
            features = eth.get_features(ifname)
            for name, feature in features.features.items():
                if name.startswith("tx-checksum") and feature.available:   # fixed ones refuse a change
                    feature.enable = enable
            eth.set_features(ifname, features)
        finally:
            eth.close()

    nsenter.run_in(netns, set_)


class XdpMode:
    """xdp_uplink on node-1's eth0 (sharing the agent's pinned maps) + XDP_PASS on its fabric peer."""

    def __init__(self, lab: Lab):
        from bcc import BPF

        self.node_ns = lab.node_netns("node-1")
        self.fabric_ns = names.fabric_netns(lab.prefix)
        self.dp = uplink.load(names.pin_dir(lab.prefix, "node-1"), cache=False)
        nodeaddrs.write(self.dp.maps, nodeaddrs.NodeAddrs(snat4=NODE1))
        self.passer = BPF(text=XDP_PASS_SRC)
        self.pass_fn = self.passer.load_func(b"xdp_pass", BPF.XDP)
        self.eth0 = uplink.ifindex_of("eth0", self.node_ns)
        self.peer = uplink.ifindex_of(names.fabric_port("node-1"), self.fabric_ns)

    def __enter__(self) -> "XdpMode":
        try:
            uplink.attach_xdp(self.peer, self.pass_fn.fd, self.fabric_ns)
            uplink.attach_xdp(self.eth0, self.dp.programs[uplink.XDP_PROG_NAME].fd, self.node_ns)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ifindex, ns in ((self.eth0, self.node_ns), (self.peer, self.fabric_ns)):
            try:
                uplink.detach_xdp(ifindex, ns)
            except Exception:               # the namespace may already be gone
                pass
        self.dp.close()
        self.passer.cleanup()


def _drops(lab: Lab) -> dict[str, int]:
    with NodeMaps.open(names.pin_dir(lab.prefix, "node-1")) as maps:
        return {k: v for k, v in maps.drops().items() if v}


def _throughput(lab: Lab, client_ns: str, target: str, port: int, seconds: float) -> dict:
    """iperf3, tried twice: a failed first attempt is kept in the result (with node-1's drop counters)."""
    try:
        return traffic.tcp_throughput(client_ns, target, port, duration=seconds)
    except RuntimeError as exc:
        failed = {"error": str(exc)[-300:], "node1_drops": _drops(lab)}
        print(f"  first attempt failed: {failed}", flush=True)
        time.sleep(1)
    result = traffic.tcp_throughput(client_ns, target, port, duration=seconds)
    result["first_attempt"] = failed
    return result


def measure(lab: Lab, seconds: float, conns: int, modes=MODES) -> dict:
    client_ns = lab.external_netns("client")
    servers = []
    results: dict = {}
    try:
        lab.apply([_pod(pod, node) for pod, node in PATHS.values()] + [_service(path) for path in PATHS])
        lab.wait_ready([pod for pod, _ in PATHS.values()], timeout=60)
        for path, (pod, _) in PATHS.items():
            for mode in modes:
                iperf, crr, _, _ = ports(path, mode)
                servers.append(traffic.iperf3_server(lab.pod_netns(pod), iperf))
                servers.append(traffic.echo_server(lab.pod_netns(pod), crr))
        def direct(ns) -> None:             # "direct": the pods' /32 via node-1, like an upstream router
            idx = ns.link_lookup(ifname="eth0")[0]
            for pod, _ in PATHS.values():
                ns.route("replace", dst=f"{lab.pod_ip(pod)}/32", gateway=NODE1, oif=idx)

        nsenter.netlink(client_ns, direct)
        _wait_programmed(lab)

        senders = [(client_ns, "eth0")] + [(lab.pod_netns(pod), "eth0") for pod, _ in PATHS.values()]
        for mode in modes:
            if mode.endswith("-csum"):
                for ns, ifname in senders:
                    tx_checksum(ns, ifname, False)
            ctx = XdpMode(lab) if mode.startswith("xdp") else None
            if ctx:
                ctx.__enter__()
            try:
                for path, (pod, _) in PATHS.items():
                    iperf, crr_port, iperf_np, crr_np = ports(path, mode)
                    if mode.startswith("direct"):
                        target, tport, cport = lab.pod_ip(pod), iperf, crr_port
                    else:
                        target, tport, cport = NODE1, iperf_np, crr_np
                    tput = _throughput(lab, client_ns, target, tport, seconds)
                    crr = traffic.tcp_connect_rate(client_ns, target, cport, count=conns, duration=seconds)
                    results[f"{path}/{mode}"] = {"throughput": tput, "connect_rate": crr}
                    print(f"{path:6} {mode:11} {tput['gbit_per_s']:7.2f} Gbit/s  "
                          f"retr {tput['retransmits']:5}  {tput['cpu_seconds_per_gb']:6.2f} CPU s/GB  "
                          f"{crr['connections_per_s']:8.0f} conn/s  p50 {crr.get('latency_p50_us', float('nan')):5.0f} us  "
                          f"errors {crr['errors']}", flush=True)
            finally:
                if ctx:
                    ctx.__exit__()
    finally:
        for server in servers:
            server.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ebpfsvc.bench.nodeport", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement (each is also count-bounded)")
    ap.add_argument("--conns", type=int, default=3000, help="at most this many connections per connect-rate run")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    args = ap.parse_args(argv)
    lab = Lab.up(prefix="np" + uuid.uuid4().hex[:6], agents=True)
    try:
        results = measure(lab, args.seconds, args.conns, tuple(args.modes.split(",")))
    finally:
        lab.down()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    json.dump({k: {"gbit_per_s": round(v["throughput"]["gbit_per_s"], 3),
                   "connections_per_s": round(v["connect_rate"]["connections_per_s"])}
               for k, v in results.items()}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
