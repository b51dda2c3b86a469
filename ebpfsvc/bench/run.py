"""The benchmark run behind `make bench` / `make bench-quick` (`ebpfsvc bench`).

One lab (no agents, a unique prefix), four datapaths on the client's node,
switched in turn, the same services and the same traffic for each:

    node-1: cli (client), srv-a            node-2: srv-b, srv-c
    every srv-*: echo servers :8080-8083 (TCP + UDP), iperf3 server :5201

The measured Services ("probes", 198.19.255.0/24) have one endpoint each, so
every connection of a measurement goes to the same pod (iperf3 needs that) and
direct can be measured against that pod's IP:

    echo          :80 TCP+UDP -> srv-a:8081   request/response, connect rate, UDP rate
    iperf-local   :5201       -> srv-a:5201   throughput, same node (and CPU s/GB)
    iperf-remote  :5201       -> srv-b:5201   throughput, cross node
    watch         :80         -> srv-a:8082   endpoint change: moved to srv-b, watched on the wire
    spread        :80         -> srv-a, srv-b, srv-c :8083 (a check that the datapath balances)

direct measures against srv-a:8080.  One server port per way of reaching a pod,
because the echo server closes first and keeps TIME_WAIT: a client that reaches
srv-a:8080 once directly and once through a ClusterIP computes its initial
sequence numbers and timestamps from different addresses, so a reused source
port meeting the other view's TIME_WAIT is refused (PAWS) and stalls a second
in SYN retransmission.  Within one view (one ClusterIP, whatever datapath
translates it) reuse is accepted, as it is on a real node.

The other services (synthetic_state) are real: k endpoints each on the same
three pods.  N counts every service port in the tables, probes included; the
smallest point holds the probes alone.

Order: for each repeat, for each N, each datapath in turn (ebpfsvc, iptables,
nftables, direct; rotated by one each repeat): activate = program the whole state from nothing (timed),
measure, change an endpoint (timed on the wire), deactivate.  So each repeat
is a fresh program-from-nothing too, and a slow minute of the machine spreads
over every datapath and size.  A (datapath, N) point whose programming is
predicted (or was measured) to take longer than `max_program_seconds` is
skipped with the reason recorded, rather than holding up the run.

Output: results.json (records for ebpfsvc.bench.report plus details and the
machine), report.md with extra sections, one PNG per metric.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ebpfsvc.bench import datapaths, report, traffic
from ebpfsvc.bench.baselines import synthetic_state
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, LBState, Protocol, ServicePortName

CLIENT = "cli"
PODS = {CLIENT: "node-1", "srv-a": "node-1", "srv-b": "node-2", "srv-c": "node-2"}
SERVERS = ("srv-a", "srv-b", "srv-c")
NODE = "node-1"                     # where the datapath under test runs: the client's node
ECHO_PORT, IPERF_PORT, SERVICE_PORT = 8080, 5201, 80
# Echo server port per way of reaching it (see the module note on TIME_WAIT).
ECHO_PORTS = {"direct": 8080, "echo": 8081, "watch": 8082, "spread": 8083}
PROBE_NET = "198.19.255.0/24"
VIP = {"echo": "198.19.255.1", "iperf-local": "198.19.255.2", "iperf-remote": "198.19.255.3",
       "watch": "198.19.255.4", "spread": "198.19.255.5"}
NAMESPACE = "bench-probe"

# Per driver: seconds and count bounds (traffic.measure_suite's keys).
FULL_BOUNDS = {"throughput": 3.0, "rr": (3.0, 200_000), "crr": (3.0, 20_000), "udp": (2.0, 3_000_000)}
QUICK_BOUNDS = dict(traffic.SUITE_BOUNDS["quick"])

KEY_METRICS = ("tcp_throughput_gbps", "tcp_throughput_cross_node_gbps", "tcp_rr_p50_us", "tcp_rr_p99_us",
               "tcp_rr_tps", "tcp_crr_cps", "udp_pps", "cpu_s_per_gb", "program_seconds", "endpoint_change_ms")


@dataclass
class Config:
    services: tuple[int, ...] = (1, 1_000, 10_000, 50_000)
    repeats: int = 3
    quick: bool = False
    datapaths: tuple[str, ...] = datapaths.NAMES
    bounds: dict = field(default_factory=lambda: dict(FULL_BOUNDS))
    endpoints_per_service: int = 2        # of the synthetic services (2 backends: one 251-slot Maglev table)
    max_program_seconds: float = 150.0    # skip a (datapath, N) point whose programming takes longer
    change_every_repeat_below: float = 20.0   # endpoint change in every repeat if programming is faster
    settle_seconds: float = 1.0           # pause after programming: the kernel frees what the previous one left
    spread_connections: int = 300
    packet_cost: bool = True              # ns/packet through BPF_PROG_TEST_RUN (bench/datapath.py)
    packet_cost_args: dict = field(default_factory=lambda: {"repeat": 1_000_000, "samples": 20_000,
                                                           "services": (1, 10_000)})
    maglev_backends: tuple[int, ...] = (1, 3, 10, 100, 1000)
    nodeport: bool = True                 # NodePort TC vs XDP (bench/nodeport.py, its own lab with agents)
    nodeport_seconds: float = 3.0
    command: str = ""
    note: str = ""

    @classmethod
    def full(cls, **overrides) -> "Config":
        return replace(cls(), **overrides)

    @classmethod
    def quick_run(cls, **overrides) -> "Config":
        base = cls(services=(1, 1_000), repeats=1, quick=True, bounds=dict(QUICK_BOUNDS), settle_seconds=0.2,
                   packet_cost_args={"repeat": 100_000, "samples": 2_000, "services": (1, 1_000)},
                   maglev_backends=(3, 100), nodeport=False)
        return replace(base, **overrides)


# --- the services ----------------------------------------------------------------------------

def probes(ips: dict[str, str], watch: str = "srv-a") -> list[Frontend]:
    """The measured service ports, each on its own ClusterIP in PROBE_NET; `watch` is the watch probe's pod."""
    def fe(name: str, port: int, pods: list[str], target: int, proto: Protocol = Protocol.TCP,
           port_name: str = "") -> Frontend:
        backends = tuple(Backend(ipaddress.IPv4Address(ips[p]), target, proto) for p in pods)
        return Frontend(FrontendKey(ipaddress.IPv4Address(VIP[name]), port, proto),
                        ServicePortName(NAMESPACE, name, port_name, proto), backends=backends)

    return [
        fe("echo", SERVICE_PORT, ["srv-a"], ECHO_PORTS["echo"], Protocol.TCP, "tcp"),
        fe("echo", SERVICE_PORT, ["srv-a"], ECHO_PORTS["echo"], Protocol.UDP, "udp"),
        fe("iperf-local", IPERF_PORT, ["srv-a"], IPERF_PORT),
        fe("iperf-remote", IPERF_PORT, ["srv-b"], IPERF_PORT),
        fe("watch", SERVICE_PORT, [watch], ECHO_PORTS["watch"]),
        fe("spread", SERVICE_PORT, list(SERVERS), ECHO_PORTS["spread"]),
    ]


def states(n: int, ips: dict[str, str], k: int) -> tuple[LBState, LBState, frozenset]:
    """The state at N service ports; the same after the watch probe's endpoint moved srv-a -> srv-b;
    the keys of the frontends that differ.

    The second state shares every unchanged Frontend object with the first, as the
    agent's desired-state builder hands the writer a new state: what a datapath may
    do with that (ebpfsvc: look at the changed frontends only) is its own business.
    """
    pool = [(ips[p], ECHO_PORT) for p in SERVERS]
    before = synthetic_state(max(n, len(probes(ips))), k, pool, probes=probes(ips, "srv-a"))
    moved = {fe.key: fe for fe in probes(ips, "srv-b") if fe.service.name == "watch"}
    after = LBState.of(moved.get(key, fe) for key, fe in before.frontends.items())
    return before, after, frozenset(moved)


def service_count(n: int) -> int:
    """The number of service ports actually in the tables for a requested N."""
    return max(n, 6)


# --- machine ------------------------------------------------------------------------------

def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)
    repo = Path(__file__).resolve().parents[2]
    commit = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "iptables": _first_line(["iptables-nft", "--version"]),
        "nft": _first_line(["nft", "--version"]),
        "iperf3": _first_line(["iperf3", "--version"]),
        "git": commit + (" (uncommitted changes)" if dirty not in ("", "?") else ""),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# --- the run -----------------------------------------------------------------------------------

class Run:
    """One benchmark run: its lab, servers, datapaths, and the results collected so far."""

    def __init__(self, config: Config, out_dir: Path, log=print):
        self.cfg = config
        self.out = Path(out_dir)
        self.log = log
        self.lab = None
        self.servers: list = []
        self.started = time.monotonic()
        self.data: dict = {"meta": {}, "results": [], "skipped": [], "programming": [], "endpoint_change": [],
                           "memory": [], "spread": [], "errors": []}

    # -- bookkeeping --
    def save(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(path)
        return path

    def record(self, datapath: str, services: int, metrics: dict, repeat: int) -> None:
        self.data["results"] += report.records(datapath, services, metrics, repeat=repeat)

    def skip(self, datapath: str, services: int, repeat: int, reason: str) -> None:
        self.data["skipped"].append({"datapath": datapath, "services": services, "repeat": repeat, "reason": reason})
        self.log(f"  skip {datapath} at {services:,} services (repeat {repeat + 1}): {reason}")

    # -- lab --
    def setup(self) -> None:
        from ebpfsvc.lab import Lab, names

        prefix = "bench-" + uuid.uuid4().hex[:6]
        self.lab = Lab.up(prefix=prefix, agents=False)
        self.lab.apply([{"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": pod, "labels": {"bench": pod},
                                      "annotations": {"lab.ebpfsvc.io/ready": "true"}},
                         "spec": {"nodeName": node, "containers": [{"name": "c"}]}}
                        for pod, node in PODS.items()])
        self.lab.wait_ready(list(PODS), timeout=60)
        self.ips = {pod: self.lab.pod_ip(pod) for pod in PODS}
        self.ns = {pod: self.lab.pod_netns(pod) for pod in PODS}
        self.node_ns = self.lab.node_netns(NODE)
        starts = [(traffic.echo_server, pod, port) for pod in SERVERS for port in ECHO_PORTS.values()]
        starts += [(traffic.iperf3_server, pod, IPERF_PORT) for pod in SERVERS]
        with ThreadPoolExecutor(4) as pool:      # each waits until its server listens
            futures = [pool.submit(start, self.ns[pod], port) for start, pod, port in starts]
        errors = []
        for future in futures:
            try:
                self.servers.append(future.result())
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        node = self.lab.spec.node(NODE)
        local_pods = [p for p, n in PODS.items() if n == NODE]
        links = [names.pod_host_link("default", p) for p in local_pods]
        gateway = str(node.gateway)     # the agent's hairpin address
        self.datapaths = {name: datapaths.make(name, self.node_ns, names.pin_dir(prefix, NODE), links, gateway)
                          for name in self.cfg.datapaths}
        self.data["meta"]["lab"] = {"prefix": prefix, "pods": {p: {"node": PODS[p], "ip": self.ips[p]} for p in PODS},
                                    "probes": VIP, "datapath_node": NODE, "attached_to": links}

    def teardown(self) -> None:
        traffic.stop_servers(self.servers)
        self.servers = []
        for dp in getattr(self, "datapaths", {}).values():
            try:
                dp.deactivate()
            except Exception:
                pass
        if self.lab is not None:
            self.lab.down()
            self.lab = None

    # -- one (repeat, N, datapath) cell --
    def targets(self, dp: datapaths.Datapath) -> dict[str, tuple[str, int]]:
        if not dp.translates:
            return {"echo": (self.ips["srv-a"], ECHO_PORTS["direct"]), "iperf-local": (self.ips["srv-a"], IPERF_PORT),
                    "iperf-remote": (self.ips["srv-b"], IPERF_PORT)}
        return {"echo": (VIP["echo"], SERVICE_PORT), "iperf-local": (VIP["iperf-local"], IPERF_PORT),
                "iperf-remote": (VIP["iperf-remote"], IPERF_PORT)}

    def predicted_program_seconds(self, name: str, n: int) -> float | None:
        """Measured at this N before, else extrapolated from the two largest smaller N (power law)."""
        done = {}
        for p in self.data["programming"]:
            if p["datapath"] == name:
                done.setdefault(p["services"], []).append(p["program_seconds"])
        if n in done:
            return max(done[n])
        smaller = sorted(s for s in done if s < n)
        if not smaller:
            return None
        n1 = smaller[-1]
        t1 = max(done[n1])
        if len(smaller) == 1 or t1 <= 0:
            return t1 * n / max(n1, 1)
        n0 = smaller[-2]
        t0 = max(done[n0])
        exponent = math.log(t1 / t0) / math.log(n1 / n0) if t0 > 0 else 1.0
        return t1 * (n / n1) ** min(max(exponent, 1.0), 2.5)

    def cell(self, dp: datapaths.Datapath, n: int, repeat: int) -> None:
        services = service_count(n)
        cfg = self.cfg
        if dp.translates:
            predicted = self.predicted_program_seconds(dp.name, services)
            if predicted is not None and predicted > cfg.max_program_seconds:
                measured = any(p["datapath"] == dp.name and p["services"] == services
                               for p in self.data["programming"])
                how = "took" if measured else "predicted from smaller N to take"
                self.skip(dp.name, services, repeat,
                          f"programming {how} {predicted:.0f} s > max_program_seconds {cfg.max_program_seconds:.0f} s")
                return
        state, changed, changed_keys = self._states[n]
        client = self.ns[CLIENT]
        line = f"  {dp.name:9}"
        try:
            info = dp.activate(state)
            if dp.translates:
                self.data["programming"].append({"datapath": dp.name, "services": services, "repeat": repeat, **info})
                self.record(dp.name, services, {"program_seconds": info["program_seconds"]}, repeat)
                line += f" program {info['program_seconds']:7.2f} s |"
            time.sleep(cfg.settle_seconds)
            t = self.targets(dp)
            m = traffic.measure_suite(client, t["echo"], t["iperf-local"], server_netns=self.ns["srv-a"],
                                      bounds=cfg.bounds)
            cross = traffic.tcp_throughput(client, *t["iperf-remote"], duration=cfg.bounds["throughput"])
            m["tcp_throughput_cross_node_gbps"] = cross["gbit_per_s"]
            self.record(dp.name, services, m, repeat)
            line += (f" {m['tcp_throughput_gbps']:6.2f} / {m['tcp_throughput_cross_node_gbps']:5.2f} Gbit/s"
                     f" | rr p50 {m['tcp_rr_p50_us']:6.1f} µs p99 {m['tcp_rr_p99_us']:7.1f} µs"
                     f" | {m['tcp_crr_cps']:7,.0f} conn/s | {m['udp_pps']:9,.0f} pkt/s")
            if dp.translates:
                spread = traffic.backend_spread(client, VIP["spread"], SERVICE_PORT, count=cfg.spread_connections,
                                                duration=20)
                self.data["spread"].append({"datapath": dp.name, "services": services, "repeat": repeat,
                                            "backends": spread.get("backends", {}), "errors": spread.get("errors")})
                memory = dp.memory()
                if memory is not None:
                    self.data["memory"].append({"datapath": dp.name, "services": services, "repeat": repeat,
                                                **memory})
                    self.record(dp.name, services, {
                        "bpf_bytes_per_service": memory["entry_bytes_per_service"],
                        "bpf_memlock_mib": memory["memlock_bytes"] / 2**20}, repeat)
                if repeat == 0 or info["program_seconds"] < cfg.change_every_repeat_below:
                    ms = self.endpoint_change(dp, services, repeat, changed, changed_keys,
                                              info["program_seconds"])
                    line += f" | change {ms:8.1f} ms" if ms is not None else " | change not seen"
        except Exception as exc:        # recorded, and the run goes on (Ctrl-C is not an Exception)
            self.data["errors"].append({"datapath": dp.name, "services": services, "repeat": repeat,
                                        "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc(limit=6)})
            self.skip(dp.name, services, repeat, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            dp.deactivate()
        self.log(line)

    def endpoint_change(self, dp: datapaths.Datapath, services: int, repeat: int, changed: LBState,
                        changed_keys: frozenset, program_seconds: float) -> float | None:
        """The watch probe's endpoint moves srv-a -> srv-b: ms until a new connection reaches srv-b."""
        duration = max(10.0, 3 * program_seconds + 10)
        with traffic.BackendWatch(self.ns[CLIENT], VIP["watch"], SERVICE_PORT, self.ips["srv-b"],
                                  duration=duration) as watch:
            time.sleep(0.2)             # connections reach srv-a meanwhile: the watch works
            changed_at = time.monotonic()
            info = dp.change(changed, changed_keys)
            result = watch.result()
        entry = {"datapath": dp.name, "services": services, "repeat": repeat, **info,
                 "attempts": result["attempts"], "before": result["before"], "errors": result["errors"]}
        ms = None
        if result["seen_at"] is not None:
            ms = (result["seen_at"] - changed_at) * 1e3
            entry["wire_ms"] = ms
            self.record(dp.name, services, {"endpoint_change_ms": ms}, repeat)
        self.data["endpoint_change"].append(entry)
        return ms

    # -- everything --
    def main_loop(self) -> None:
        cfg = self.cfg
        self._states = {}
        for n in cfg.services:
            self._states[n] = states(n, self.ips, cfg.endpoints_per_service)
        for repeat in range(cfg.repeats):
            for n in cfg.services:
                self.log(f"[repeat {repeat + 1}/{cfg.repeats}, {service_count(n):,} services, "
                         f"{time.monotonic() - self.started:5.0f} s]")
                for name in order(cfg.datapaths, repeat):
                    self.cell(self.datapaths[name], n, repeat)
                    self.save()

    def extras_in_lab(self) -> None:
        """ns/packet through BPF_PROG_TEST_RUN, pins under the lab's pin root (removed by lab down)."""
        if not self.cfg.packet_cost:
            self.data["packet_cost"] = {"skipped": "not requested"}
            return
        from ebpfsvc.bench import datapath as packet
        from ebpfsvc.lab import names

        self.log("[ns/packet: BPF_PROG_TEST_RUN]")
        try:
            self.data["packet_cost"] = packet.measure(**self.cfg.packet_cost_args, show=False,
                                                      pin_root=str(names.pin_root(self.lab.prefix)))
        except Exception as exc:
            self.data["packet_cost"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}

    def extras_outside_lab(self) -> None:
        from ebpfsvc.bench import maglev as maglev_bench

        self.log("[Maglev build time]")
        self.data["maglev"] = maglev_bench.measure(self.cfg.maglev_backends)
        if not self.cfg.nodeport:
            self.data["nodeport"] = {"skipped": "not in this run (the quick run leaves it out: "
                                                "it needs a lab with agents; `make bench` runs it)"}
            return
        self.log("[NodePort: TC vs XDP, its own lab with agents]")
        self.data["nodeport"] = run_nodeport(self.cfg.nodeport_seconds)

    def run(self) -> Path:
        self.data["meta"].update({
            "command": self.cfg.command or "ebpfsvc bench",
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "config": {k: v for k, v in asdict(self.cfg).items() if k not in ("command", "note")},
            "machine_info": machine_info(),
        })
        mi = self.data["meta"]["machine_info"]
        self.data["meta"]["machine"] = f"{mi['cpu']}, {mi['cores']} cores, {mi['memory_gib']} GiB"
        self.data["meta"]["kernel"] = f"{mi['kernel']}; {mi['iptables']}; {mi['nft']}; {mi['iperf3']}"
        self.save()
        try:
            self.setup()
            self.main_loop()
            self.extras_in_lab()
        finally:
            self.teardown()
            self.data["meta"]["machine_info"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
            self.save()
        self.extras_outside_lab()
        self.data["meta"]["wall_seconds"] = round(time.monotonic() - self.started, 1)
        self.data["meta"]["notes"] = notes(self.data, self.cfg.note)
        self.save()
        return write(self.data, self.out)


def order(names: tuple[str, ...], repeat: int) -> list[str]:
    """The datapaths of one repeat: rotated by one each repeat, so none is always measured first
    or right after the same other one; iptables-legacy stays last (its xtables hooks outlive it)."""
    rest = [n for n in names if n != "iptables-legacy"]
    k = repeat % len(rest) if rest else 0
    return rest[k:] + rest[:k] + [n for n in names if n == "iptables-legacy"]


def run_nodeport(seconds: float) -> dict:
    """bench/nodeport.py in its own lab with agents; any failure is recorded, not raised."""
    try:
        from ebpfsvc.bench import nodeport
        from ebpfsvc.lab import Lab
    except Exception as exc:       # the module is being finished by another engineer
        return {"skipped": f"bench/nodeport.py not importable: {exc}"}
    if not hasattr(nodeport, "measure"):
        return {"skipped": "bench/nodeport.py has no measure()"}
    try:
        lab = Lab.up(prefix="bnp-" + uuid.uuid4().hex[:6], agents=True)
    except Exception as exc:
        return {"skipped": f"lab with agents did not come up: {exc}"}
    rows, failed = {}, {}
    try:
        for mode in getattr(nodeport, "MODES", ("direct", "tc", "xdp")):
            try:                    # one mode at a time: a failing mode keeps the others' figures
                raw = nodeport.measure(lab, seconds, 3000, (mode,))
            except Exception as exc:
                failed[mode] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            for key, value in raw.items():
                t, c = value["throughput"], value["connect_rate"]
                rows[key] = {"gbit_per_s": t["gbit_per_s"], "cpu_s_per_gb": t["cpu_seconds_per_gb"],
                             "retransmits": t["retransmits"], "connections_per_s": c["connections_per_s"],
                             "connect_p50_us": c.get("latency_p50_us"), "errors": c["errors"]}
    finally:
        lab.down()
    if not rows:
        return {"skipped": "failed: " + "; ".join(f"{m}: {e}" for m, e in failed.items())}
    return {"seconds": seconds, "rows": rows, "failed": failed}


# --- notes, report ---------------------------------------------------------------------------

def notes(data: dict, note: str = "") -> str:
    mi = data["meta"]["machine_info"]
    parts = [f"load average {' '.join(mi['loadavg_start'])} at the start, "
             f"{' '.join(mi.get('loadavg_end', ['?']))} at the end of the traffic"]
    if note:
        parts.insert(0, note)
    if data["skipped"]:
        parts.append(f"{len(data['skipped'])} point(s) skipped, see Setup")
    return "; ".join(parts)


def _mib(n: int | None) -> str:
    """Bytes as MiB for a table cell; "-" for a figure an older results file does not have."""
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _table(header: list[str], rows: list[list], align: str = "---:") -> list[str]:
    return report._table(header, [[str(c) for c in row] for row in rows], align=align)


def extra_sections(data: dict) -> str:
    """Sections report.write_report does not know: setup, skips, memory, endpoint changes, Maglev,
    ns/packet, NodePort, backend spread."""
    cfg = data["meta"].get("config", {})
    lab = data["meta"].get("lab", {})
    lines = ["## Summary", "", "Medians; e = ebpfsvc, ipt = iptables, nft = nftables, – = not measured.", "",
             summary(data), "", "## Setup", ""]
    lines += [
        f"- Lab: `{lab.get('prefix', '?')}` (no agents). Client pod `cli` and server pod `srv-a` on node-1, "
        "`srv-b` and `srv-c` on node-2; each server runs echo servers (TCP+UDP; :8080 for direct, :8081-8083 "
        "behind the probes) and iperf3 (:5201).",
        f"- The datapath under test runs on node-1 only (the client's node), one at a time; ebpfsvc is attached "
        f"to node-1's pod veths ({', '.join(lab.get('attached_to', []))}). Server-side nodes run no datapath "
        "(a kube-proxy node would also track and walk its rules for connections arriving there).",
        f"- Probes (one endpoint each; `spread` three): {', '.join(f'{k} {v}' for k, v in VIP.items())}. "
        "Same-node figures go to srv-a, cross-node throughput to srv-b.",
        f"- Services: N service ports in the tables, probes included ({cfg.get('endpoints_per_service')} "
        "endpoints per synthetic service, on the three real server pods); the smallest point is the 6 probes alone.",
        f"- Repeats: {cfg.get('repeats')}, interleaved (each repeat: every N, every datapath in turn: "
        f"{', '.join(cfg.get('datapaths', []))}, the order rotated by one each repeat); each activation "
        "programs from nothing.",
        f"- Bounds per measurement: {cfg.get('bounds')}.",
        "- Programming time: ebpfsvc `MapWriter.apply` into empty maps (the BPF compile/load at agent start is "
        "not included: see load_seconds in results.json); iptables / nftables: the `iptables-restore` / "
        "`nft -f` run (rendering not included). Endpoint change: ebpfsvc as its agent does (MapWriter.apply "
        "with the LBDelta naming the changed frontend: only that is looked at and written), the baselines "
        "reload everything (kube-proxy's full sync; its partial syncs are not modelled); timed from the "
        "start of the change until a new connection reaches the new backend (render included).",
        "",
    ]
    if data.get("skipped"):
        lines += ["Skipped points:", ""]
        lines += _table(["datapath", "services", "repeat", "reason"],
                        [[s["datapath"], f"{s['services']:,}", s["repeat"] + 1, s["reason"]] for s in data["skipped"]],
                        align=":---")
        lines.append("")

    if data.get("memory"):
        lines += ["## ebpfsvc: memory in BPF maps", "",
                  "Entry bytes: key + value bytes of the entries written (frontends incl. address markers, "
                  "backends, service names, Maglev slots), per service port. memlock: what the kernel charges "
                  "for all the maps as created (preallocated: set by the Limits, not by N; the Maglev array grows "
                  "past its default only when the state needs it); of which the IPv6 maps (lb6_*, ct6, frag6; "
                  "lb6_frontends, lb6_backends and lb6_source_ranges are not preallocated, so they grow with "
                  "their entries).", ""]
        seen = {}
        for m in data["memory"]:
            seen.setdefault(m["services"], m)
        rows = []
        for n, m in sorted(seen.items()):
            maglev_map = m["maps"].get("lb_maglev", {})
            rows.append([f"{n:,}", f"{m['entry_bytes_per_service']:,.0f}", f"{m['entry_bytes'] / 2**20:,.1f}",
                         f"{m['memlock_bytes'] / 2**20:,.0f}", _mib(m.get("memlock_ipv6_bytes")),
                         f"{maglev_map.get('max_entries', 0):,}"])
        lines += _table(["services", "entry bytes / service", "entry MiB", "memlock MiB", "of which IPv6 maps MiB",
                         "Maglev slots limit"], rows)
        lines.append("")

    if data.get("endpoint_change"):
        lines += ["## Endpoint change, details", "",
                  "`control s`: the datapath's own time for the change (ebpfsvc: MapWriter.apply with the delta; "
                  "baselines: render + full reload). `wire ms`: until the first new connection reached the new "
                  "backend.", ""]
        rows = []
        for e in data["endpoint_change"]:
            wire = e.get("wire_ms")
            rows.append([e["datapath"], f"{e['services']:,}", e["repeat"] + 1, f"{e['change_seconds']:.3f}",
                         "not seen" if wire is None else f"{wire:.1f}", e["attempts"]])
        lines += _table(["datapath", "services", "repeat", "control s", "wire ms", "connections tried"], rows)
        lines.append("")

    if data.get("maglev"):
        lines += ["## Maglev table build (`bench/maglev.py`)", "",
                  "Per service: N backends, table size M, median build time; extra moved = slots that changed "
                  "backend beyond those that had to, on one removal / addition.", ""]
        rows = [[r["backends"], f"{r['table_size']:,}", f"{r['build_ms']:.2f}", f"{r['min_slots']}/{r['max_slots']}",
                 f"{100 * r['extra_moved_remove']:.2f}%", f"{100 * r['extra_moved_add']:.2f}%",
                 f"{r['table_bytes']:,}"] for r in data["maglev"]]
        lines += _table(["backends", "M", "build ms", "min/max slots", "extra moved: remove", "add", "bytes"], rows)
        lines.append("")

    pc = data.get("packet_cost") or {}
    lines += ["## ns/packet in the kernel (`bench/datapath.py`, BPF_PROG_TEST_RUN)", ""]
    if "runs" in pc:
        from ebpfsvc.bench import datapath as packet
        lines += [packet.format_table(pc), ""]
    else:
        lines += [f"Not measured: {pc.get('skipped', 'not run')}.", ""]

    np_ = data.get("nodeport") or {}
    lines += ["## NodePort: TC vs XDP (`bench/nodeport.py`)", ""]
    if "rows" in np_:
        lines += [f"From the lab's external client through node-1, {np_['seconds']} s per point; path `remote`: "
                  "backend on node-2 (SNAT + DNAT), `local`: backend on node-1. `-csum`: TX checksum offload off "
                  "(only then can XDP translate veth packets).", ""]
        rows = [[k, f"{r['gbit_per_s']:.2f}", f"{r['cpu_s_per_gb']:.2f}", r["retransmits"],
                 f"{r['connections_per_s']:,.0f}"] for k, r in np_["rows"].items()]
        lines += _table(["path/mode", "Gbit/s", "CPU s/GB", "retransmits", "conn/s"], rows)
        lines.append("")
        for mode, error in (np_.get("failed") or {}).items():
            lines.append(f"- mode `{mode}` failed: {error}")
        if np_.get("failed"):
            lines.append("")
    else:
        lines += [f"Not measured: {np_.get('skipped', 'not run')}.", ""]

    if data.get("spread"):
        lines += ["## Backend spread (the `spread` probe, 3 endpoints)", ""]
        rows = []
        for s in data["spread"]:
            counts = s["backends"]
            rows.append([s["datapath"], f"{s['services']:,}", s["repeat"] + 1,
                         ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))])
        lines += _table(["datapath", "services", "repeat", "connections per backend"], rows, align=":---")
        lines.append("")
    if data.get("errors"):
        lines += ["## Errors", ""]
        for e in data["errors"]:
            lines += [f"- {e['datapath']} at {e['services']:,} services, repeat {e['repeat'] + 1}: {e['error']}"]
        lines.append("")
    return "\n".join(lines)


def summary(data: dict) -> str:
    """Two compact tables of medians (data plane, control plane) per N: the README's figures."""
    s = report.summarize(data["results"])
    order = ("ebpfsvc", "iptables", "nftables", "direct")

    def cells(metric: str, n: int, names=order) -> list[str]:
        return [report.fmt(s[(metric, d, n)].median) if (metric, d, n) in s else "–" for d in names]

    sizes = sorted({n for (_, _, n) in s})
    short = "e / ipt / nft / direct"
    lines = _table(["services", f"Gbit/s same node ({short})", f"Gbit/s cross node ({short})",
                    f"conn/s ({short})", f"rr p50 µs ({short})"],
                   [[f"{n:,}"] + [" / ".join(cells(m, n)) for m in (
                       "tcp_throughput_gbps", "tcp_throughput_cross_node_gbps", "tcp_crr_cps", "tcp_rr_p50_us")]
                    for n in sizes])
    lines.append("")
    kp = ("ebpfsvc", "iptables", "nftables")
    lines += _table(["services", "program s (e / ipt / nft)", "endpoint change ms (e / ipt / nft)",
                     "BPF entry bytes / service"],
                    [[f"{n:,}", " / ".join(cells("program_seconds", n, kp)),
                      " / ".join(cells("endpoint_change_ms", n, kp)),
                      cells("bpf_bytes_per_service", n, ("ebpfsvc",))[0]] for n in sizes])
    return "\n".join(lines)


def write(data: dict, out: Path) -> Path:
    """report.md (report.write_report + extra_sections) and the plots, from a results dict."""
    path = report.write_report(data, out)
    with path.open("a") as f:
        f.write("\n" + extra_sections(data))
    return path


def key_ratios(data: dict) -> str:
    """The ratio table printed at the end: ebpfsvc against direct and each kube-proxy mode, per metric and N."""
    s = report.summarize(data["results"])
    dens = [d for d in ("direct", "iptables", "nftables") if any(k[1] == d for k in s)]
    header = ["metric", "services"] + [f"ebpfsvc/{d}" for d in dens]
    rows = []
    for metric in KEY_METRICS:
        for n in report.services_in(s, metric):
            if (metric, "ebpfsvc", n) not in s:
                continue
            rows.append([metric, f"{n:,}"] + [report.fmt_ratio(report.ratio(s, metric, "ebpfsvc", d, n)) for d in dens])
    lines = _table(header, rows)
    lines.append("(above 1 is better for rates and throughput, worse for latency, seconds, ms, CPU)")
    return "\n".join(lines)


def execute(config: Config, out_dir: str | Path | None = None, log=print) -> Path:
    """Run the benchmark; returns the report's path.  SIGTERM is turned into KeyboardInterrupt, so
    the lab is taken down whatever stops the run."""
    if out_dir is None:
        out_dir = Path("results") / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    previous = signal.getsignal(signal.SIGTERM)
    owner = os.getpid()

    def interrupt(signum, frame):
        # Forked helpers inherit this handler: pyroute2's netns workers are forks of this
        # process, ended with SIGTERM.  Raising there would run the rest of the benchmark
        # (and its lab teardown) in the fork; a fork just exits.
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    in_main_thread = True
    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:              # not the main thread (a test runner's worker): leave signals alone
        in_main_thread = False
    try:
        return Run(config, Path(out_dir), log).run()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def command_line() -> str:
    """How this run was started, as a reader would retype it."""
    args = sys.argv[1:]
    if sys.argv and sys.argv[0].endswith(("ebpfsvc/cli/__main__.py", "ebpfsvc/__main__.py", "ebpfsvc")):
        text = " ".join(["python -m ebpfsvc.cli", *map(shlex.quote, args)])
    else:
        text = " ".join(map(shlex.quote, sys.argv))
    if os.environ.get("MAKELEVEL"):        # started by make: name the target too
        target = "bench-quick" if "--quick" in args else "bench"
        text = f"make {target} ({text})"
    return text
