"""What the TC programs cost the socket path, without a lab: namespaces, the real programs, real tools.

    python -m ebpfsvc.bench.tcshare [--repeats 5] [--seconds 3] [--out FILE.json]

One node namespace with three pods on veths (client `cli` in the node's cgroup, client `cli-t`
outside it, server `srv` with nginx and sockperf, in the node's cgroup as a kubelet's pod is), the TC
programs (bpf/lb_pod.c) on every pod veth and the socket programs (bpf/lb_sock.c) on the node's
cgroup, maps written by the real MapWriter: a ClusterIP with port 80 -> srv:8080 (nginx),
11111 -> srv:11111 (sockperf) and 5201 -> srv:5201 (iperf3). No API server and no agent, so nothing
but the measured traffic and the machine's other load moves the figures.

Datapaths, interleaved in an order rotated every repeat:

    direct-bare   cli -> srv's address, no program on the veths (`make bench`'s direct)
    direct        cli -> srv's address, TC programs attached: an unmarked socket's packets take the
                  full TC path (parse, conntrack and frontend lookups, all missing). This is what
                  every socket-path packet paid before the fast exit.
    socket        cli -> the ClusterIP, translated at connect(); its packets skip the TC work, and
                  so do the server's replies (sock_ops marked its accepted socket)
    socket-unmarked
                  the same with the sock_ops hook detached: the server's replies take the full
                  from_pod (as before 2026-12-04 evening)
    socket-bare   the same with no program on the veths: the fast exit's floor
    tc            cli-t (outside the cgroup) -> the ClusterIP, translated per packet at TC
    direct-clsact, socket-clsact
                  direct and socket with the same programs attached as cls_bpf filters on clsact
                  (as on kernels before 6.6, and as every agent before 2026-12-04) instead of at
                  TCX: what the attachment itself costs (only where the kernel has TCX)

Metrics: wrk `Connection: close` connections/s (8 connections, 1 thread), sockperf ping-pong p50/p99
(64 bytes, TCP), iperf3 Gbit/s (one TCP stream, client to server), all with the kernel's run-time
statistics off; then, in a one-second run of wrk and of sockperf with BPF_ENABLE_STATS on (it costs every program run ~30-45 ns, so it is off for the figures above:
before 2026-12-04 evening it was on during them), the connect4 hook's run time per connect() and the
run time per run of the programs on the client's veth: a second load of lb_pod.c on the same
maps is attached there, so its counts are the client's packets (from_pod: requests; to_pod: replies)
and nobody else's; likewise on the server's veth (srv_from_pod: its replies, srv_to_pod: the requests).
Medians with min-max; the load average is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from ebpfsvc.bench import tools, traffic
from ebpfsvc.datapath import bpfsys, loader, nodeaddrs, nsenter, socklb, tc
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.lab import cgroups, network
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, LBState, Protocol, ServicePortName

VIP = "198.19.0.10"
GATEWAY = ipaddress.IPv4Address("198.18.0.1")
PODS = {"cli": "198.18.1.5", "cli-t": "198.18.1.6", "srv": "198.18.2.1"}
NGINX, SOCKPERF, IPERF = 8080, 11111, 5201
DATAPATHS = ("direct-bare", "direct", "socket", "socket-unmarked", "socket-bare", "tc", "direct-clsact",
             "socket-clsact")
PROGRAMS = {"from_pod": tc.INGRESS, "to_pod": tc.EGRESS}


class Node:
    """The namespaces, programs and servers; close() removes them all."""

    def __init__(self, state_dir: Path):
        self.prefix = "es" + uuid.uuid4().hex[:6]
        self.node_ns = f"{self.prefix}-node"
        self.pod_ns = {name: f"{self.prefix}-{name}" for name in PODS}
        self.cgroup = cgroups.node_cgroup(self.prefix, "node-1")
        self.pin_dir = Path("/sys/fs/bpf") / self.prefix
        self.links: list[int] = []
        self.servers: list = []
        self.made: list[str] = []
        self.pod_dp = self.sock_dp = self.cli_dp = self.srv_dp = None
        try:
            self._build(state_dir)
        except BaseException:
            self.close()
            raise

    def _build(self, state_dir: Path) -> None:
        network.create_namespace(self.node_ns, forwarding=True)
        self.made.append(self.node_ns)
        network.add_pod_gateway(self.node_ns, GATEWAY)
        self.pod_dp = loader.load(self.pin_dir, cache=False)
        # The hairpin source is a map the programs read (datapath/nodeaddrs.py), not a load argument.
        nodeaddrs.write(self.pod_dp.maps, nodeaddrs.NodeAddrs(hairpin4=GATEWAY))
        # The client's and the server's veths get programs of their own (same source, same maps):
        # their run statistics are that pod's packets only.
        self.cli_dp = loader.load(self.pin_dir, cache=False)
        self.srv_dp = loader.load(self.pin_dir, cache=False)
        self.sock_dp = socklb.load(self.pin_dir, cache=False)
        for i, (name, addr) in enumerate(PODS.items()):
            ns = self.pod_ns[name]
            network.create_namespace(ns)
            self.made.append(ns)
            link = f"lxc{self.prefix[2:]}{i}"
            network.add_pod(self.node_ns, ns, link, addr, GATEWAY)
            self.links.append(nsenter.run_in(self.node_ns, lambda link=link: socket.if_nametoindex(link)))
        self.attach_tc()
        cgroups.create(self.cgroup / "pods" / "cli")
        socklb.attach(self.sock_dp, self.cgroup)
        srv = ipaddress.IPv4Address(PODS["srv"])
        MapWriter(self.pod_dp.maps).apply(LBState.of([
            Frontend(key=FrontendKey(ipaddress.IPv4Address(VIP), port, Protocol.TCP),
                     service=ServicePortName("default", "bench", name, Protocol.TCP),
                     backends=(Backend(srv, target, Protocol.TCP),))
            for name, port, target in (("http", 80, NGINX), ("rr", SOCKPERF, SOCKPERF), ("iperf", IPERF, IPERF))]))
        srv_cg = self.cgroup / "pods" / "srv"
        self.servers = [tools.nginx_server(self.pod_ns["srv"], [NGINX], state_dir, cgroup=srv_cg),
                        tools.sockperf_server(self.pod_ns["srv"], SOCKPERF, state_dir, cgroup=srv_cg),
                        traffic.iperf3_server(self.pod_ns["srv"], IPERF, cgroup=srv_cg)]

    def attach_tc(self, clsact: bool = False) -> None:
        """The programs on every pod veth: as the agent attaches them (TCX where the kernel has it),
        or as cls_bpf filters on clsact (`clsact`), as a kernel without TCX has them."""
        with tc.without_tcx() if clsact else contextlib.nullcontext():
            for idx, pod in zip(self.links, PODS):
                dp = {"cli": self.cli_dp, "srv": self.srv_dp}.get(pod, self.pod_dp)
                for name, direction in PROGRAMS.items():
                    tc.attach(idx, dp.programs[name].fd, name, direction, netns=self.node_ns)

    def detach_tc(self) -> None:
        for idx in self.links:
            for direction in PROGRAMS.values():
                tc.detach(idx, direction, netns=self.node_ns)

    def mark_accepted(self, on: bool) -> None:
        """The sock_ops hook (the server side's marks) attached, or detached for `socket-unmarked`."""
        if on:
            socklb.attach(self.sock_dp, self.cgroup, ("sock_ops",))
        else:
            socklb.detach(self.cgroup, ("sock_ops",))

    def client(self, datapath: str) -> tuple[str, Path | None, str]:
        """(namespace, cgroup or None, destination address) of `datapath`'s client."""
        if datapath == "tc":
            return self.pod_ns["cli-t"], None, VIP
        target = PODS["srv"] if datapath.startswith("direct") else VIP
        return self.pod_ns["cli"], self.cgroup / "pods" / "cli", target

    def close(self) -> None:
        for s in self.servers:
            s.stop()
        socklb.detach(self.cgroup)
        cgroups.remove(self.prefix)
        for ns in reversed(self.made):
            network.remove_namespace(ns)
        for dp in (self.sock_dp, self.cli_dp, self.srv_dp, self.pod_dp):
            if dp:
                dp.close()
        loader.unpin(self.pin_dir)


@contextlib.contextmanager
def _run_time_stats(fds: dict[str, int]):
    """The kernel's run-time statistics on for the block only; yields a dict filled at its end with
    ns per run of each program of `fds` (name -> fd), and its runs (`<name>_runs`)."""
    out: dict[str, float] = {}
    stats_fd = bpfsys.run_time_stats()
    try:
        before = {name: bpfsys.prog_fd_run_stats(fd) for name, fd in fds.items()}
        yield out
        for name, fd in fds.items():
            ns, cnt = bpfsys.prog_fd_run_stats(fd)
            ns0, cnt0 = before[name]
            out[name] = (ns - ns0) / (cnt - cnt0) if cnt > cnt0 else float("nan")
            out[f"{name}_runs"] = cnt - cnt0
    finally:
        os.close(stats_fd)


def run(repeats: int, seconds: int) -> dict:
    metrics = ("conn_per_s", "p50_us", "p99_us", "gbit_per_s", "from_pod_ns", "to_pod_ns", "srv_from_pod_ns",
               "srv_to_pod_ns", "from_pod_runs_per_rt", "connect4_ns")
    # from_pod_ns: ns per run of the client veth's from_pod (its requests), to_pod_ns: of its to_pod
    # (the replies); from_pod_runs_per_rt: its runs per sockperf observation (a request, and ACKs);
    # connect4_ns: ns per run of the socket path's connect hook during wrk (every connect() in the
    # cgroup: translated for socket, found no frontend for direct).
    results: dict = {m: {d: [] for d in DATAPATHS} for m in metrics}
    meta = {"seconds": seconds, "repeats": repeats, "cpus": os.cpu_count(), "loadavg": [],
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "kernel": os.uname().release}
    with tempfile.TemporaryDirectory(prefix="tcshare-") as tmp:
        node = Node(Path(tmp))
        fds = {name: node.cli_dp.programs[name].fd for name in PROGRAMS}
        fds.update({f"srv_{name}": node.srv_dp.programs[name].fd for name in PROGRAMS})
        datapaths = DATAPATHS if tc.tcx_supported() else tuple(d for d in DATAPATHS if not d.endswith("-clsact"))
        meta["tcx"] = tc.tcx_supported()
        try:
            for r in range(repeats):
                k = r % len(datapaths)
                order = datapaths[k:] + datapaths[:k]
                meta["loadavg"].append(os.getloadavg()[0])
                for d in order:
                    ns, cg, dst = node.client(d)
                    if d.endswith(("-bare", "-clsact")):
                        node.detach_tc()
                    if d.endswith("-clsact"):
                        node.attach_tc(clsact=True)
                    if d == "socket-unmarked":
                        node.mark_accepted(False)
                    try:
                        port = 80 if dst == VIP else NGINX
                        w = tools.wrk_connection_rate(ns, dst, port, duration=seconds, cgroup=cg)
                        if w["socket_errors"] or w["non_2xx"]:
                            raise RuntimeError(f"wrk {d}: errors {w}")
                        results["conn_per_s"][d].append(w["requests_per_s"])
                        p = tools.sockperf_latency(ns, dst, SOCKPERF, duration=seconds, cgroup=cg)
                        results["gbit_per_s"][d].append(
                            traffic.tcp_throughput(ns, dst, IPERF, duration=seconds, cgroup=cg)["gbit_per_s"])
                        # The programs' run times in runs of their own, one second each: the statistics
                        # cost every BPF program a clock read per run (~30-45 ns here), which the rates
                        # and latencies above must not pay (bench/real.py measures the same way).
                        connect_fd = node.sock_dp.programs["connect4"].fd
                        with _run_time_stats({"connect4": connect_fd}) as connects:
                            tools.wrk_connection_rate(ns, dst, port, duration=1, cgroup=cg)
                        if cg is not None:              # connect4 runs for the cgroup's sockets only
                            results["connect4_ns"][d].append(connects["connect4"])
                        with _run_time_stats(fds) as runs:
                            stats_p = tools.sockperf_latency(ns, dst, SOCKPERF, duration=1, cgroup=cg)
                    finally:
                        if d.endswith(("-bare", "-clsact")):
                            node.detach_tc()
                            node.attach_tc()
                        if d == "socket-unmarked":
                            node.mark_accepted(True)
                    results["p50_us"][d].append(p["p50_us"])
                    results["p99_us"][d].append(p["p99_us"])
                    if not d.endswith("-bare") and d != "tc":        # the client veth's own programs ran
                        results["from_pod_ns"][d].append(runs["from_pod"])
                        results["to_pod_ns"][d].append(runs["to_pod"])
                        results["srv_from_pod_ns"][d].append(runs["srv_from_pod"])
                        results["srv_to_pod_ns"][d].append(runs["srv_to_pod"])
                        if stats_p.get("observations"):
                            results["from_pod_runs_per_rt"][d].append(runs["from_pod_runs"] / stats_p["observations"])
        finally:
            meta["loadavg"].append(os.getloadavg()[0])
            node.close()
    return {"meta": meta, "results": results}


RATIOS = (("socket", "direct-bare"), ("socket-unmarked", "direct-bare"), ("socket", "socket-unmarked"),
          ("direct", "direct-bare"), ("socket", "direct"), ("socket-bare", "direct-bare"),
          ("tc", "direct-bare"), ("socket-clsact", "direct-bare"), ("direct-clsact", "direct-bare"))


def report(data: dict) -> str:
    lines = [f"{'metric':<22}" + "".join(f"{d:>24}" for d in DATAPATHS) + "".join(f"{a + '/' + b:>24}"
                                                                                  for a, b in RATIOS)]
    for metric, by_dp in data["results"].items():
        med = {d: statistics.median(v) for d, v in by_dp.items() if v}
        cells = "".join((f"{med[d]:.4g} ({min(by_dp[d]):.4g}-{max(by_dp[d]):.4g})" if d in med else "-").rjust(24)
                        for d in DATAPATHS)
        cells += "".join((f"{med[a] / med[b]:.3f}" if a in med and b in med and med[b] else "-").rjust(24)
                         for a, b in RATIOS)
        lines.append(f"{metric:<22}{cells}")
    meta = data["meta"]
    lines.append(f"{meta['repeats']} interleaved repeats of {meta['seconds']} s, started {meta['started']}, "
                 f"{meta['cpus']} CPUs, kernel {meta['kernel']}, load average "
                 f"{min(meta['loadavg']):.1f}-{max(meta['loadavg']):.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the raw results here (JSON)")
    args = parser.parse_args(argv)
    data = run(args.repeats, args.seconds)
    if args.out:
        args.out.write_text(json.dumps(data, indent=1))
    print(report(data))


if __name__ == "__main__":
    main()
