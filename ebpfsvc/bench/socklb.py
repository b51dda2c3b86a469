"""The socket path against the TC path and direct pod-to-pod, in the lab (docs/socklb.md).

    python -m ebpfsvc.bench.socklb [--repeats 3] [--seconds 3] [--ipv6] [--out FILE.json]

A lab whose agents run with `socket-lb: true`; on node-1 a client pod per datapath and a
server pod, on node-2 a second server pod (cross node); Services `bench-same` and `bench-cross` select one
server each. Every measurement runs for the three datapaths, interleaved, in a rotated order:

    direct   the server pod's own address, the client a process in its pod's cgroup
             (the socket programs run and find no frontend)
    tc       the ClusterIP, the client a process outside every lab cgroup: the TC programs
             translate every packet (from_pod / to_pod)
    socket   the ClusterIP, the client a process in its pod's cgroup: translated at connect()

Tools (C, from Debian, as `make bench`): iperf3 (one TCP stream, Gbit/s, same node and cross
node), wrk against nginx with `Connection: close` (new connections/s), sockperf ping-pong
(p50 / p99 µs, half round trip). Medians with min-max; the load average is printed, since a
shared machine moves every figure.

--ipv6: the lab is the dual-stack one (examples/lab/dual-stack.yaml; the agents serve IPv6 from
its ServiceCIDRs) and four more rows measure over IPv6: iperf3 same node and cross node, wrk's
connection rate, and qperf's latency (tcp_lat, 64-byte messages: its mean, half the round trip as
sockperf's, no percentiles; sockperf 3.7 takes no IPv6 address), through IPv6-only Services
`bench-same6` and `bench-cross6` (tc, and socket: the connect6/sendmsg6 hooks, docs/socklb.md)
against the server pod's IPv6 address (direct), interleaved with the rest. qperf needs two service
ports, its control port and the data port its client names (-lp, -ip); its client and server run
on tools.LATENCY_CPU, as sockperf's server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from ebpfsvc.bench import tools, traffic
from ebpfsvc.lab import agents, cgroups

DUAL_STACK = Path(__file__).resolve().parents[2] / "examples" / "lab" / "dual-stack.yaml"

IPERF, NGINX, SOCKPERF = 5201, 8080, 11111
QPERF, QPERF_DATA = 19765, 19766      # qperf's control port and the data port its client asks for
# One client pod per datapath: a client that reaches one backend port both through the
# frontend (the TC path: its kernel sees the ClusterIP) and straight (its kernel sees the pod
# address) meets the server's TIME_WAIT of the other path's connections, whose TCP timestamps
# and sequence numbers come from another (source, destination) pair: the SYN is taken for an
# old duplicate and retried a second later (docs/socklb.md). Measured from one pod, each path
# cost the next one 99% of its connection rate.
CLIENTS = {"direct": "bench-cli-d", "tc": "bench-cli-t", "socket": "bench-cli-s"}
PODS = {**{c: "node-1" for c in CLIENTS.values()}, "bench-srv": "node-1", "bench-srv2": "node-2"}
SERVICES = {"bench-same": "bench-srv", "bench-cross": "bench-srv2"}
SERVICES6 = {"bench-same6": "bench-srv", "bench-cross6": "bench-srv2"}    # --ipv6: IPv6 single-stack
DATAPATHS = ("direct", "tc", "socket")


def _run(netns: str, cgroup: Path | None, argv: list[str], seconds: int) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                          preexec_fn=cgroups.preexec(netns, cgroup))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
    return proc.stdout + proc.stderr


class Bench:
    def __init__(self, seconds: int, ipv6: bool = False):
        from ebpfsvc.lab import Lab

        self.seconds = seconds
        self.ipv6 = ipv6
        self.servers: list = []
        self.lab = Lab.up(DUAL_STACK if ipv6 else None, prefix="es" + uuid.uuid4().hex[:6], agents=False)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        lab = self.lab
        config = lab.state.path / agents.CONFIG_FILE
        config.write_text(config.read_text() + "socket-lb: true\n")
        for node in lab.spec.nodes:
            lab.agent("start", node.name)
        lab.apply([{"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": p, "labels": {"app": p}, "annotations": {"lab.ebpfsvc.io/ready": "true"}},
                    "spec": {"nodeName": n, "containers": [{"name": "c"}]}} for p, n in PODS.items()])
        lab.wait_ready(list(PODS), timeout=60)
        ports = [{"name": n, "port": p, "targetPort": p} for n, p in
                 (("iperf", IPERF), ("http", NGINX), ("sockperf", SOCKPERF))]
        lab.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc},
                    "spec": {"selector": {"app": pod}, "ports": ports}} for svc, pod in SERVICES.items()])
        if self.ipv6:
            ports6 = ports[:2] + [{"name": "qperf", "port": QPERF, "targetPort": QPERF},
                                  {"name": "qperf-data", "port": QPERF_DATA, "targetPort": QPERF_DATA}]
            lab.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc},
                        "spec": {"selector": {"app": pod}, "ports": ports6, "ipFamilies": ["IPv6"]}}
                       for svc, pod in SERVICES6.items()])
        for pod in SERVICES.values():
            # In the pod's cgroup, as a kubelet runs it: the socket path's sock_ops sees its sockets.
            ns, cg = lab.pod_netns(pod), lab.pod_cgroup(pod)
            self.servers += [tools.nginx_server(ns, [NGINX], lab.state.path, ipv6=self.ipv6, cgroup=cg),
                             tools.sockperf_server(ns, SOCKPERF, lab.state.path, cgroup=cg),
                             traffic.iperf3_server(ns, IPERF, cgroup=cg)]
            if self.ipv6:
                self.servers.append(tools.qperf_server(ns, QPERF, lab.state.path))
        lab.wait_synced()
        self.client_ns = {d: lab.pod_netns(pod) for d, pod in CLIENTS.items()}
        self.client_cgroup = {d: lab.pod_cgroup(pod) for d, pod in CLIENTS.items()}
        self.target = {}
        for svc, pod in SERVICES.items():
            vip = lab.service(svc)["spec"]["clusterIP"]
            self.target[svc] = {"direct": lab.pod_ip(pod), "tc": vip, "socket": vip}
        for svc, pod in SERVICES6.items() if self.ipv6 else ():
            pod6 = next(p["ip"] for p in lab.pod(pod)["status"]["podIPs"] if ":" in p["ip"])
            vip6 = lab.service(svc)["spec"]["clusterIP"]
            self.target[svc] = {"direct": pod6, "tc": vip6, "socket": vip6}

    def _client(self, datapath: str):
        return self.client_ns[datapath], (None if datapath == "tc" else self.client_cgroup[datapath])

    def iperf3(self, svc: str, datapath: str) -> float:
        ns, cg = self._client(datapath)
        out = _run(ns, cg, ["iperf3", "-c", self.target[svc][datapath], "-p", str(IPERF), "-t", str(self.seconds),
                            "-J"], self.seconds)
        return json.loads(out[: out.rindex("}") + 1])["end"]["sum_received"]["bits_per_second"] / 1e9

    def wrk(self, datapath: str, svc: str = "bench-same") -> float:
        ns, cg = self._client(datapath)
        host = self.target[svc][datapath]
        out = _run(ns, cg, ["wrk", "-t1", "-c8", f"-d{self.seconds}s", "-H", "Connection: close",
                            f"http://{f'[{host}]' if ':' in host else host}:{NGINX}/"], self.seconds)
        parsed = tools.parse_wrk(out)
        if parsed["socket_errors"] or parsed["non_2xx"]:
            raise RuntimeError(f"wrk {datapath}: errors {parsed}")
        return parsed["requests_per_s"]

    def sockperf(self, datapath: str) -> dict:
        ns, cg = self._client(datapath)
        out = _run(ns, cg, ["sockperf", "ping-pong", "--tcp", "-i", self.target["bench-same"][datapath], "-p",
                            str(SOCKPERF), "-t", str(self.seconds), "-m", "64"], self.seconds)
        return tools.parse_sockperf(out)

    def qperf(self, datapath: str, svc: str = "bench-same6") -> float:
        ns, cg = self._client(datapath)
        return tools.qperf_latency(ns, self.target[svc][datapath], QPERF, QPERF_DATA, duration=self.seconds,
                                   cgroup=cg)["latency_us"]

    def flows(self, node: str = "node-1") -> int:
        from ebpfsvc.inspect.node import NodeMaps
        from ebpfsvc.lab import names

        with NodeMaps.open(names.pin_dir(self.lab.prefix, node), names=["ct4"]) as maps:
            return len(maps.ct())

    def close(self) -> None:
        for s in self.servers:
            s.stop()
        self.lab.down()


def run(repeats: int, seconds: int, ipv6: bool = False) -> dict:
    bench = Bench(seconds, ipv6)
    results: dict = {m: {d: [] for d in DATAPATHS} for m in
                     ("gbit_same", "gbit_cross", "conn_per_s", "p50_us", "p99_us")}
    if ipv6:
        results.update({m: {d: [] for d in DATAPATHS} for m in
                        ("gbit_same_v6", "gbit_cross_v6", "conn_per_s_v6", "lat_us_v6")})
    meta = {"seconds": seconds, "repeats": repeats, "cpus": os.cpu_count(), "loadavg": [], "ipv6": ipv6,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        for r in range(repeats):
            order = DATAPATHS[r % 3:] + DATAPATHS[: r % 3]
            meta["loadavg"].append(os.getloadavg()[0])
            for d in order:
                results["gbit_same"][d].append(bench.iperf3("bench-same", d))
            for d in order:
                results["gbit_cross"][d].append(bench.iperf3("bench-cross", d))
            for d in order:
                results["conn_per_s"][d].append(bench.wrk(d))
            for d in order:
                lat = bench.sockperf(d)
                results["p50_us"][d].append(lat["p50_us"])
                results["p99_us"][d].append(lat["p99_us"])
            for metric, svc in (("gbit_same_v6", "bench-same6"), ("gbit_cross_v6", "bench-cross6")) if ipv6 else ():
                for d in order:
                    results[metric][d].append(bench.iperf3(svc, d))
            for d in order if ipv6 else ():
                results["conn_per_s_v6"][d].append(bench.wrk(d, "bench-same6"))
            for d in order if ipv6 else ():
                results["lat_us_v6"][d].append(bench.qperf(d))
        meta["tc_flows_node1_after"] = bench.flows()
    finally:
        bench.close()
    return {"meta": meta, "results": results}


def report(data: dict) -> str:
    lines = [f"{'metric':<14}" + "".join(f"{d:>26}" for d in DATAPATHS) + f"{'socket/direct':>16}{'tc/direct':>12}"]
    for metric, by_dp in data["results"].items():
        med = {d: statistics.median(v) for d, v in by_dp.items() if v}
        cells = "".join((f"{med[d]:>10.4g} ({min(by_dp[d]):.4g}-{max(by_dp[d]):.4g})" if d in med else "-").rjust(26)
                        for d in DATAPATHS)
        ratio = {d: f"{med[d] / med['direct']:.3f}" if d in med else "-" for d in ("socket", "tc")}
        lines.append(f"{metric:<14}{cells}{ratio['socket']:>16}{ratio['tc']:>12}")
    meta = data["meta"]
    lines.append(f"{meta['repeats']} interleaved repeats of {meta['seconds']} s, started {meta['started']}, "
                 f"{meta['cpus']} CPUs, load average {min(meta['loadavg']):.1f}-{max(meta['loadavg']):.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--ipv6", action="store_true",
                        help="a dual-stack lab, and iperf3, wrk and qperf rows over IPv6")
    parser.add_argument("--out", type=Path, default=None, help="write the raw results here (JSON)")
    args = parser.parse_args(argv)
    data = run(args.repeats, args.seconds, args.ipv6)
    if args.out:
        args.out.write_text(json.dumps(data, indent=1))
    print(report(data))


if __name__ == "__main__":
    main()
