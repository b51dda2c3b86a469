"""The benchmark against the real kube-proxy: one lab, its real API server, the same Services for all.

    python -m ebpfsvc.bench.real [--quick] [--services 1,1000,10000] [--repeats 5] [--out DIR]

Datapaths, one active at a time on node-1 (the client's node), each programmed by a real
process watching the lab's API server:

    ebpfsvc               the agent (lab.agent start), the node's ebpfsvc: the TC path
    ebpfsvc-socket        the same agent with `socket-lb: true` (docs/socklb.md), the client a process
                          in its pod's cgroup (pod cli-s): translated at connect()
    ebpfsvc-agent-stopped (only when asked, --datapaths) the TC path with the agent stopped after it
                          programmed the maps: the datapath alone, without the agent's CPU
    kube-proxy-iptables   the kube-proxy binary, --proxy-mode=iptables (lab/kubeproxy.py)
    kube-proxy-nftables   the same, --proxy-mode=nftables
    direct                nothing: the client uses pod IPs

IPVS is left out: this kernel has no IP_VS.  The Python-generated rule sets of run.py
(`ebpfsvc bench`) stay as the fallback where the binary cannot run; they are never in this
run's tables.

Services: selectorless, in namespace `bench`, each with an EndpointSlice this run writes (so
an endpoint change is one API write, and nothing else moves).  The probes (measured) are
applied through the lab's API relay; the N fillers (two real backends each) are POSTed
straight to the API server from worker processes inside the control-plane namespace
(bench/fill.py), timed.  Every N is measured with every datapath in every repeat, in an order
rotated by one per repeat.

Per activation: start the process; the time until the watch probe answers on the wire
(`program_seconds`, from start); kube-proxy's own "SyncProxyRules complete" time or the
agent's first full sync time (the rule/map writing alone); traffic (wrk/nginx conn/s,
sockperf p50/p99 with its client and server on one CPU (tools.LATENCY_CPU), iperf3 TCP
same/cross node and UDP, CPU per connection and per GB from /proc/stat); endpoint changes
(the watch probe's EndpointSlice moves srv-a -> srv-b and back, timed from the API write to
the first new connection that reaches the new backend);
then stop and clean the node (kube-proxy --cleanup, ebpfsvc cleanup).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from ebpfsvc.bench import report, tools, traffic
from ebpfsvc.lab.api import APIError

NAMES = ("ebpfsvc", "ebpfsvc-socket", "kube-proxy-iptables", "kube-proxy-nftables", "direct")
# Not in the default run, for finding where a gap comes from (--datapaths): the agent's programs
# and maps as it left them, the agent itself stopped once they served (its CPU out of the picture).
DIAGNOSTIC = ("ebpfsvc-agent-stopped",)
NODE = "node-1"
# cli-s: the socket path's client, a pod of its own. A client that reaches a backend port both
# through a ClusterIP translated at TC and straight meets the server's TIME_WAIT of the other
# way's connections and loses most of its connection rate for a while (docs/socklb.md).
PODS = {"cli": "node-1", "cli-s": "node-1", "srv-a": "node-1", "srv-b": "node-2"}
SOCKET_LB = "socket-lb: true\n"   # the line of the agents' config.yaml (the ConfigMap's) that turns it on
NAMESPACE = "bench"
MANAGED_BY = "bench.ebpfsvc.io"
# Server ports in the pods. Distinct ports for the direct view and the service view keep their
# TIME_WAIT 4-tuples apart (docs/bench.md, "Why a server port per way in").
NGINX_SVC, NGINX_DIRECT = 8090, 8091
SOCKPERF = 11111
IPERF = 5201
WATCH = 8082          # traffic.py's echo server (OP_WHO): which backend answered
FILL_STEP = 5_000     # Services per recorded step of the fill (Run.fill)
# The control-plane processes whose CPU per object each step of the fill records: their pid
# records in the lab's state dir (lab/controlplane.py's names), in the report's column order.
FILL_CPU_OF = ("kube-apiserver", "etcd", "kube-controller-manager")
FILLER = 8083         # filler services' backends (an echo server, so they are real)
PROBES = {            # name -> [(port name, service port, protocol, target port, backends)]
    "web": [("http", 80, "TCP", NGINX_SVC, ["srv-a"])],
    "rr": [("rr", 80, "TCP", SOCKPERF, ["srv-a"])],
    "iperf-local": [("tcp", IPERF, "TCP", IPERF, ["srv-a"]), ("udp", IPERF, "UDP", IPERF, ["srv-a"])],
    "iperf-remote": [("tcp", IPERF, "TCP", IPERF, ["srv-b"])],
    "watch": [("who", 80, "TCP", WATCH, ["srv-a"])],
}


@dataclass
class Config:
    services: tuple[int, ...] = (1, 1_000, 10_000)
    repeats: int = 5
    datapaths: tuple[str, ...] = NAMES
    seconds: float = 3.0              # per traffic measurement
    changes: int = 2                  # endpoint changes per activation (there and back)
    # After the probe answers: the agent may still be writing the rest of its first full sync (the
    # probe can come early in it), and a process that just started still pays its start-up tail
    # (Python, Go GC): traffic and machine-wide CPU would charge that to the datapath.
    settle_seconds: float = 2.0
    settle_max_seconds: float = 60.0  # then measure anyway (a proxy that never idles is a finding too)
    apply_processes: int = 2          # API writers: processes × threads, each thread one kept-alive connection
    apply_threads: int = 8
    bpf_stats: bool = True            # ebpfsvc's BPF run time per connection, in a wrk run of its own (bpf_cost)
    # datapath -> the most services it is measured at (kube-proxy-iptables' first sync grows faster
    # than linearly: minutes per activation at 10,000); skipped points are listed in the report.
    max_services: dict = field(default_factory=dict)
    program_timeout: float = 300.0
    # kube-proxy-iptables: before measuring, endpoint changes (each a sync, which writes KUBE-SERVICES
    # in a new Go map order) until the measured Service's rule sits past this fraction of the chain
    # (issue 13's worst case: its rule last); None measures wherever the start put it.
    iptables_late: float | None = None
    note: str = ""
    command: str = ""

    @classmethod
    def quick(cls, **kw) -> "Config":
        return replace(cls(services=(1, 1_000), repeats=2, seconds=2.0, changes=2), **kw)


# --- objects ------------------------------------------------------------------------------

def service(name: str, ports: list[tuple]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"type": "ClusterIP",
                     "ports": [{"name": pn, "port": port, "protocol": proto, "targetPort": target}
                               for pn, port, proto, target, _ in ports]}}


def endpoint_slice(name: str, ports: list[tuple], ips: dict[str, str]) -> dict:
    """The selectorless Service's one slice; every port of it must have the same backends."""
    backends = ports[0][4]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-bench", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": name,
                                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
            "addressType": "IPv4",
            "ports": [{"name": pn, "port": target, "protocol": proto} for pn, _, proto, target, _ in ports],
            "endpoints": [{"addresses": [ips[b]], "conditions": {"ready": True}, "nodeName": PODS[b]}
                          for b in backends]}


def filler_name(i: int) -> str:
    return f"svc-{i:05d}"


def filler_ports() -> list[tuple]:
    return [("http", 80, "TCP", FILLER, ["srv-a", "srv-b"])]


def filler_objects(indexes, ips: dict[str, str]) -> list[list[dict]]:
    """Each filler's Service and its slice, in that order (the slice names the Service)."""
    return [[service(filler_name(i), filler_ports()), endpoint_slice(filler_name(i), filler_ports(), ips)]
            for i in indexes]


def _create_some(cp_netns: str, kubeconfig: str, indexes: list[int], ips: dict[str, str], threads: int) -> int:
    """In one worker process: each filler's Service and slice, from `threads` threads inside the
    control-plane namespace `cp_netns`, straight to the API server (bench/fill.py)."""
    from ebpfsvc.bench import fill
    from ebpfsvc.datapath import nsenter

    settings = fill.kubeconfig_settings(kubeconfig)     # read once, not per thread
    return nsenter.run_in(cp_netns, fill.create_all, lambda: fill.Writer(**settings),
                          filler_objects(indexes, ips), threads)


def create_fillers(cp_netns: str, kubeconfig: str, indexes: range, ips: dict[str, str], processes: int,
                   threads: int) -> int:
    """Fillers `indexes` created through the API from `processes` worker processes (spawned: the
    bench's own threads are not forked), each in the lab's control-plane namespace `cp_netns` with
    `kubeconfig` its API server's own (loopback) address; returns the objects created."""
    import multiprocessing

    parts = [list(indexes[k::processes]) for k in range(processes)]
    if processes <= 1:
        return _create_some(cp_netns, kubeconfig, parts[0], ips, threads)
    from ebpfsvc.bench import real    # by its module name, also when this runs as __main__ (-m)

    # A Pool, not a ProcessPoolExecutor: leaving its block terminates the workers, so an interrupted
    # fill (SIGTERM) goes on to the lab's teardown instead of waiting for them to finish writing.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return sum(pool.starmap(real._create_some, [(cp_netns, kubeconfig, part, ips, threads) for part in parts]))


def order(names: tuple[str, ...], repeat: int) -> list[str]:
    """`names` rotated by `repeat`: no datapath is always first or always after the same one."""
    k = repeat % len(names) if names else 0
    return list(names[k:] + names[:k])


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# kube-proxy runs one proxier per IP family and logs both; the lab's Services are IPv4.
_SYNC_RE = re.compile(r'"SyncProxyRules complete" ipFamily="IPv4"[^\n]*?elapsed="([^"]+)"')
_GO_DURATION = re.compile(r"([\d.]+)(h|m(?!s)|s|ms|µs|us|ns)")
_AGENT_RE = re.compile(r"synced (\d+) frontends in ([\d.]+) ms \(full\)")
_AGENT_LOAD_RE = re.compile(r"datapath loaded in ([\d.]+)s")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}


def go_duration(text: str) -> float:
    """Seconds in a Go time.Duration string: "2m46.45s", "45.4ms", "1h0m2s"."""
    return sum(float(v) * _UNITS[u] for v, u in _GO_DURATION.findall(text))


def kube_proxy_sync_seconds(log_text: str) -> list[float]:
    """Every IPv4 "SyncProxyRules complete" elapsed time in a kube-proxy log, in seconds."""
    return [go_duration(d) for d in _SYNC_RE.findall(log_text)]


def agent_full_sync_ms(log_text: str) -> list[tuple[int, float]]:
    """(frontends, ms) of every full sync in an agent log."""
    return [(int(n), float(ms)) for n, ms in _AGENT_RE.findall(log_text)]


# When each sync finished, from the process's own log line, to split an endpoint change into
# "API write", "proxy synced" and "on the wire". The agent logs Python's asctime (local time, ms);
# kube-proxy logs klog's header (local time, µs, month and day but no year).
_AGENT_SYNC_AT = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO ebpfsvc\.agent: synced \d+ frontends in ([\d.]+) ms",
                            re.M)
_KLOG_SYNC_AT = re.compile(r'^I(\d{4} \d\d:\d\d:\d\d\.\d+)\s[^\n]*"SyncProxyRules complete" ipFamily="IPv4"[^\n]*?'
                           r'elapsed="([^"]+)"', re.M)


def sync_completions(log_text: str, year: int) -> list[tuple[float, float]]:
    """(wall-clock time the sync finished, its own duration in ms) of every sync in an agent or
    kube-proxy log, in the order logged."""
    out = []
    for stamp, ms in _AGENT_SYNC_AT.findall(log_text):
        out.append((dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), float(ms)))
    for stamp, elapsed in _KLOG_SYNC_AT.findall(log_text):
        at = dt.datetime.strptime(f"{year}{stamp}", "%Y%m%d %H:%M:%S.%f").timestamp()
        out.append((at, go_duration(elapsed) * 1000))
    return out


def _proc_file(pid: int | None, name: str) -> str | None:
    """/proc/<pid>/<name>, or None when there is no such process."""
    if pid is None:
        return None
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_peak_rss_mib(pid: int | None) -> float | None:
    """The peak resident memory (VmHWM) of one process, in MiB; None when it is gone."""
    text = _proc_file(pid, "status")
    found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M) if text is not None else None
    return int(found.group(1)) / 1024 if found else None


def process_mapped_maps_mib(pid: int | None) -> float | None:
    """Of a process's resident memory, the BPF maps it has mmap'ed (anon_inode:bpf-map: the agent's
    writer stores Maglev slots into lb_maglev in place), in MiB; None when the process is gone. The
    kernel maps every page of such a map at mmap (remap_vmalloc_range), so they are in its RSS
    from the start, though they are the map's memory (in the maps' memlock), not the process's:
    the agent's own peak is proxy_peak_rss_mib minus this."""
    text = _proc_file(pid, "smaps")
    if text is None:
        return None
    total, inside = 0, False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and ":" not in head:        # a mapping's first line: "start-end perms offset dev inode path"
            inside = line.endswith("anon_inode:bpf-map")
        elif inside and head == "Rss:":
            total += int(line.split()[1])
    return total / 1024


def tc_programs(netns: str) -> dict[int, str]:
    """Every BPF program attached at TC in namespace `netns` (a node's): program id -> name."""
    from ebpfsvc.datapath import tc
    from ebpfsvc.datapath.nsenter import netlink

    links = netlink(netns, lambda ipr: [link["index"] for link in ipr.get_links()])
    return {f.prog_id: f.name for i in links for f in tc.list_filters(i, netns) if f.prog_id}


def bpf_run_delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                  names: dict[int, str]) -> dict[str, tuple[int, int]]:
    """(ns, runs) spent by each program name between two prog_run_stats readings."""
    out: dict[str, tuple[int, int]] = {}
    for pid, (ns1, n1) in after.items():
        ns0, n0 = before.get(pid, (ns1, n1))
        ns, n = out.get(names[pid], (0, 0))
        out[names[pid]] = (ns + ns1 - ns0, n + n1 - n0)
    return out


def process_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of one process (all its threads), or None when it is gone."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iptables_position(save: str, address: str) -> tuple[int, int] | None:
    """Where the rule for ClusterIP `address` sits in KUBE-SERVICES (1-based) and how many rules it has."""
    rules = [line for line in save.splitlines() if line.startswith("-A KUBE-SERVICES ")]
    for i, line in enumerate(rules, 1):
        if f"-d {address}/32" in line:
            return i, len(rules)
    return None


# --- the run ------------------------------------------------------------------------------

class Run:
    def __init__(self, cfg: Config, out: Path, log=print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.lab = None
        self.servers: list = []
        self.filled = 0
        self.watch_at = "srv-a"     # the watch probe's backend now: endpoint changes move it
        self.data: dict = {"meta": {}, "results": [], "points": [], "applies": [], "changes": [],
                           "errors": [], "skipped": []}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.out / "results.json")

    def record(self, dp: str, n: int, metrics: dict, repeat: int) -> None:
        self.data["results"] += report.records(dp, n, {k: v for k, v in metrics.items() if v is not None},
                                               repeat=repeat)

    # -- lab --
    def setup(self) -> None:
        from ebpfsvc.lab import Lab

        self.lab = Lab.up(prefix="bench-" + uuid.uuid4().hex[:6], agents=False)
        # On a loaded machine the API server's start-up hooks (RBAC bootstrap roles...) can outlast
        # kube-controller-manager's wait for a healthy API server, and it exits: no ServiceAccounts,
        # no pods. Once the API server is ready, start it again if so (a no-op while it runs).
        self.lab.wait_api_ready(timeout=300)
        self.lab.control_plane("start", "kube-controller-manager")
        self.lab.apply([{"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": p, "annotations": {"lab.ebpfsvc.io/ready": "true"}},
                         "spec": {"nodeName": n, "containers": [{"name": "c"}]}} for p, n in PODS.items()])
        self.lab.wait_ready(list(PODS), timeout=60)
        self.ips = {p: self.lab.pod_ip(p) for p in PODS}
        self.ns = {p: self.lab.pod_netns(p) for p in PODS}
        state = self.lab.state.path
        for pod in ("srv-a", "srv-b"):
            # In the pod's cgroup, as a kubelet runs it: the socket path's sock_ops sees its sockets.
            ns, cg = self.ns[pod], self.lab.pod_cgroup(pod)
            self.servers += [tools.nginx_server(ns, [NGINX_SVC, NGINX_DIRECT], state, cgroup=cg),
                             tools.sockperf_server(ns, SOCKPERF, state, cgroup=cg),
                             traffic.iperf3_server(ns, IPERF, cgroup=cg), traffic.echo_server(ns, WATCH),
                             traffic.echo_server(ns, FILLER)]
        api = self.lab.api
        api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        t0 = time.monotonic()
        for name, ports in PROBES.items():
            api.apply(service(name, ports))
            api.apply(endpoint_slice(name, ports, self.ips))
        self.vip = {name: self.lab.service(f"{NAMESPACE}/{name}")["spec"]["clusterIP"] for name in PROBES}
        self.data["applies"].append({"objects": 2 * len(PROBES), "seconds": time.monotonic() - t0, "threads": 1})
        self.data["meta"]["lab"] = {"prefix": self.lab.prefix, "pods": {p: {"node": PODS[p], "ip": self.ips[p]}
                                                                         for p in PODS}, "probes": self.vip}

    def fill(self, n: int) -> None:
        """Fillers up to n service ports in all (probes included), created through the API by
        cfg.apply_processes processes of cfg.apply_threads threads, each thread one kept-alive
        connection straight to the API server in the cp namespace (bench/fill.py; one Python
        process alone is held to one core by its interpreter lock).

        In steps of FILL_STEP Services, each recorded with the CPU each control-plane process
        spent per object: kube-apiserver's grows with the Services already there (its ClusterIP
        allocator lists every IPAddress object twice per allocation, for its metrics:
        docs/bench.md, "The fill"), so one figure for a whole fill would hide where it goes."""
        probes = sum(len(p) for p in PROBES.values())
        want = max(0, n - probes)
        if want <= self.filled:
            return
        from ebpfsvc.lab import controlplane, names

        procs, threads = self.cfg.apply_processes, self.cfg.apply_threads
        netns = names.member_netns(self.lab.prefix, names.CONTROL_PLANE)
        kubeconfig = str(controlplane.Paths(self.lab.state.path).inside_kubeconfig)
        components = {c: rec.pid for c in FILL_CPU_OF if (rec := self.lab.state.read_pid(c))}
        for start in range(self.filled, want, FILL_STEP):
            stop = min(want, start + FILL_STEP)
            cpu0 = {c: process_cpu_seconds(pid) for c, pid in components.items()}
            t0 = time.monotonic()
            created = create_fillers(netns, kubeconfig, range(start, stop), self.ips, procs, threads)
            seconds = time.monotonic() - t0
            objects = 2 * (stop - start)
            assert created == objects, (created, objects)
            cpu = {c: (b - a) * 1000 / objects for c, pid in components.items()
                   if (a := cpu0[c]) is not None and (b := process_cpu_seconds(pid)) is not None}
            after = stop + probes
            self.data["applies"].append({"objects": objects, "services_after": after, "seconds": seconds,
                                         "processes": procs, "threads": threads, "per_s": objects / seconds,
                                         "cpu_ms_per_object": cpu,
                                         "via": "POST from the cp namespace to 127.0.0.1:6443",
                                         "load_after": loadavg()})
            self.log(f"  API: {objects:,} objects (Services + EndpointSlices) to {after:,} services in "
                     f"{seconds:.1f} s ({objects / seconds:,.0f}/s, {procs} processes × {threads} threads; "
                     "CPU ms per object: " + ", ".join(f"{c} {v:.2f}" for c, v in cpu.items()) + ")")
            self.filled = stop

    def teardown(self) -> None:
        traffic.stop_servers(self.servers)
        self.servers = []
        if self.lab is not None:
            self.lab.down()
            self.lab = None

    # -- datapaths --
    def _log_size(self, record: str) -> int:
        path = self.lab.state.log_path(record)
        return path.stat().st_size if path.exists() else 0

    def _log_since(self, record: str, offset: int) -> str:
        path = self.lab.state.log_path(record)
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def activate(self, dp: str, n: int) -> dict:
        """Start `dp` on node-1; returns what programming it cost. Traffic must answer when this returns."""
        from ebpfsvc.lab import kubeproxy, names

        if dp == "direct":
            return {}
        record = names.kube_proxy_record(NODE) if dp.startswith("kube-proxy") else names.agent_record(NODE)
        offset = self._log_size(record)
        if dp.startswith("ebpfsvc"):
            # Said for every start: the lab's agents begin with the DaemonSet's ConfigMap, whose
            # socket-lb is on, so until 2026-12-05 a run's first ebpfsvc point (before any
            # deactivate turned it off) had the socket programs on the servers' cgroup.
            self._socket_lb(dp == "ebpfsvc-socket")
        with traffic.BackendWatch(self.ns["cli"], self.vip["watch"], 80, self.ips[self.watch_at],
                                  duration=self.cfg.program_timeout) as watch:
            t0 = time.monotonic()
            if dp.startswith("kube-proxy"):
                kubeproxy.start(self.lab, NODE, dp.removeprefix("kube-proxy-"))
            else:
                self.lab.agent("start", NODE)
            seen = watch.result()["seen_at"]
        if seen is None:
            raise RuntimeError(f"{dp} did not serve the watch probe within {self.cfg.program_timeout:.0f} s")
        out = {"program_seconds": seen - t0}
        if dp == "ebpfsvc-socket":
            # The watch probe (a client outside the pods' cgroups) answered through TC; the socket
            # programs are compiled and attached after the TC ones.
            from ebpfsvc.datapath import socklb
            from ebpfsvc.lab import cgroups

            cgroup = cgroups.node_cgroup(self.lab.prefix, NODE)
            deadline = time.monotonic() + self.cfg.program_timeout
            while not all(socklb.attached(cgroup).values()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"socket programs not attached to {cgroup} within "
                                       f"{self.cfg.program_timeout:.0f} s")
                time.sleep(0.2)
            out["socket_attach_seconds"] = time.monotonic() - t0
        # What the rules or maps cost alone, from the process's own log (written by the time traffic flows).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = self._log_since(record, offset)
            if dp.startswith("kube-proxy"):
                syncs = kube_proxy_sync_seconds(text)
                if syncs:
                    out["first_sync_seconds"] = syncs[0]
                    break
            else:
                syncs = agent_full_sync_ms(text)
                if syncs:
                    out["map_write_seconds"] = syncs[0][1] / 1000
                    loaded = _AGENT_LOAD_RE.findall(text)
                    if loaded:      # compiling and loading the BPF object (bcc), once per agent start
                        out["bpf_load_seconds"] = float(loaded[0])
                    break
            time.sleep(0.2)
        if dp == "kube-proxy-iptables":
            pos = self._kube_services_position()
            if pos and self.cfg.iptables_late:
                pos, out["kube_services_resyncs"] = self._place_late(pos)
            if pos:
                out["kube_services_position"], out["kube_services_rules"] = pos
        return out

    def _kube_services_position(self) -> tuple[int, int] | None:
        save = self.lab.node_exec(NODE, ["iptables-save", "-t", "nat"], timeout=60).stdout
        return iptables_position(save, self.vip["web"])

    def _place_late(self, pos: tuple[int, int], most: int = 60) -> tuple[tuple[int, int], int]:
        """Syncs of kube-proxy-iptables (the watch probe's endpoint moved, seen on the wire) until the
        measured Service's rule sits past `iptables_late` of KUBE-SERVICES, at most `most`: its
        place and the number of syncs it took."""
        syncs = 0
        while pos[0] < self.cfg.iptables_late * pos[1] and syncs < most:
            self.endpoint_change("kube-proxy-iptables", "srv-b" if self.watch_at == "srv-a" else "srv-a")
            syncs += 1
            pos = self._kube_services_position() or pos
        return pos, syncs

    def deactivate(self, dp: str) -> None:
        from ebpfsvc.lab import kubeproxy, names, network

        if dp.startswith("kube-proxy"):
            kubeproxy.stop(self.lab, NODE)
            kubeproxy.cleanup(self.lab, NODE, timeout=300)
        elif dp.startswith("ebpfsvc"):
            from ebpfsvc.lab import cgroups

            self.lab.agent("stop", NODE)
            subprocess.run([sys.executable, "-m", "ebpfsvc.cli", "cleanup", "--pin-dir",
                            str(names.pin_dir(self.lab.prefix, NODE)), "--netns", self.lab.node_netns(NODE),
                            "--socket-lb-cgroup", str(cgroups.node_cgroup(self.lab.prefix, NODE))],
                           capture_output=True, text=True, timeout=60, check=True)
        # Each datapath starts on a node without the last one's connections in the kernel's
        # conntrack. kube-proxy's entries (client:port -> VIP:80, the backend's replies) outlive
        # it (TIME_WAIT, 120 s) and, with the nat hooks iptables' --cleanup leaves, make netfilter
        # give a connection the next datapath translated before it (client:port -> backend)
        # another source port; the backend's TIME_WAIT on that port then drops a later SYN (PAWS),
        # retransmitted after 1 s. Measured on 2026-12-03: 168-257 such SYNs in a 2 s wrk run of
        # ebpfsvc after kube-proxy-iptables, 8-44 the other way (docs/bench.md, "Why the flush").
        self.data.setdefault("conntrack_flushed", []).append(
            {"after": dp, "entries": network.flush_conntrack(self.lab.node_netns(NODE))})

    def _socket_lb(self, on: bool) -> None:
        """The agents' config.yaml with or without `socket-lb: true` (read when an agent starts)."""
        from ebpfsvc.lab import agents

        config = self.lab.state.path / agents.CONFIG_FILE
        text = config.read_text().replace(SOCKET_LB, "")
        config.write_text(text + SOCKET_LB if on else text)

    def proxy_pid(self, dp: str) -> int | None:
        """The pid of the proxy process serving node-1 (the agent or kube-proxy); None for direct."""
        from ebpfsvc.lab import names

        if dp == "direct":
            return None
        record = names.kube_proxy_record(NODE) if dp.startswith("kube-proxy") else names.agent_record(NODE)
        rec = self.lab.state.read_pid(record)
        return rec.pid if rec else None

    def settle(self, dp: str) -> float:
        """Wait until the proxy is idle (under 5% of a core over half a second), at least
        cfg.settle_seconds and at most cfg.settle_max_seconds; return the seconds waited.

        A proxy that just programmed its first sync still has a start-up tail (the agent's
        initial watches and Python's first collections, kube-proxy's Go GC and its second sync);
        measured traffic would charge that work to the datapath."""
        t0 = time.monotonic()
        time.sleep(self.cfg.settle_seconds)
        pid = self.proxy_pid(dp)
        while time.monotonic() - t0 < self.cfg.settle_max_seconds:
            before = process_cpu_seconds(pid)
            time.sleep(0.5)
            after = process_cpu_seconds(pid)
            if before is None or after is None or (after - before) / 0.5 < 0.05:
                break
        return time.monotonic() - t0

    def endpoint_change(self, dp: str, to: str) -> dict:
        """Move the watch probe's endpoint to pod `to` through the API. Returns ms until a new
        connection reaches it (`ms`), and its parts: until the API server acknowledged the write
        (`api_ms`), until the proxy logged the sync that programmed it (`synced_ms`, None when no
        sync was logged) and that sync's own duration (`sync_ms`)."""
        from ebpfsvc.lab import names

        record = names.kube_proxy_record(NODE) if dp.startswith("kube-proxy") else names.agent_record(NODE)
        offset = self._log_size(record)
        ports = [(pn, port, proto, target, [to]) for pn, port, proto, target, _ in PROBES["watch"]]
        with traffic.BackendWatch(self.ns["cli"], self.vip["watch"], 80, self.ips[to], duration=60) as watch:
            wall0, t0 = time.time(), time.monotonic()
            self.lab.api.apply(endpoint_slice("watch", ports, self.ips))
            api_ms = (time.monotonic() - t0) * 1000
            self.watch_at = to
            seen = watch.result()["seen_at"]
        if seen is None:
            raise RuntimeError(f"endpoint change to {to}: not seen on the wire within 60 s")
        # after_ack_ms: the figure comparable across proxies and API servers (the write itself is the
        # same for all, and in this lab it crosses a Python relay). The watcher's previous attempt
        # bounds when the change reached the wire from below (its resolution).
        before = watch.result().get("previous_attempt_at")
        out = {"ms": (seen - t0) * 1000, "api_ms": api_ms, "after_ack_ms": (seen - t0) * 1000 - api_ms,
               "resolution_ms": (seen - before) * 1000 if before is not None else None,
               "synced_ms": None, "sync_ms": None}
        # The first sync that began after the write: the one that programmed it (kube-proxy logs a
        # sync's end after its conntrack cleanup and metrics, so the line may trail the wire).
        deadline = time.monotonic() + 3
        while out["synced_ms"] is None and time.monotonic() < deadline:
            for at, ms in sync_completions(self._log_since(record, offset), dt.date.today().year):
                if at - ms / 1000 >= wall0 - 0.002:
                    out["synced_ms"], out["sync_ms"] = (at - wall0) * 1000, ms
                    break
            else:
                time.sleep(0.1)
        return out

    def traffic(self, dp: str) -> dict:
        """Every traffic metric once, with what the proxy process itself burned meanwhile (it shares
        the machine's two cores with the load generators: CPU it spends is a rate they lose)."""
        pid = self.proxy_pid(dp)
        cpu0, t0 = process_cpu_seconds(pid), time.monotonic()
        m = self._traffic(dp)
        cpu1 = process_cpu_seconds(pid)
        if cpu0 is not None and cpu1 is not None:
            m["proxy_cpu_pct"] = (cpu1 - cpu0) / (time.monotonic() - t0) * 100
        m["proxy_peak_rss_mib"] = process_peak_rss_mib(pid)    # what surviving N services costs
        m["proxy_mapped_maps_mib"] = process_mapped_maps_mib(pid)
        return m

    def bpf_measured(self, dp: str) -> bool:
        return self.cfg.bpf_stats and dp.startswith("ebpfsvc")

    @contextlib.contextmanager
    def bpf_cost(self, dp: str):
        """For ebpfsvc: the run-time statistics of node-1's TC programs, and of the socket
        programs on its cgroup (connect4, sock_ops...: named by their hook) when the socket path
        is on, over the block, turned on for it alone (bpfsys.run_time_stats: they cost every BPF
        program on the machine a clock read per run); yields a dict filled at its end with
        program name -> (ns, runs)."""
        out: dict[str, tuple[int, int]] = {}
        if not self.bpf_measured(dp):
            yield out
            return
        from ebpfsvc.datapath import bpfsys, socklb
        from ebpfsvc.lab import cgroups

        names = tc_programs(self.lab.node_netns(NODE))
        names.update({prog: hook for hook, progs in socklb.attached(cgroups.node_cgroup(self.lab.prefix, NODE)).items()
                      for prog in progs})
        fd = bpfsys.run_time_stats()
        try:
            before = {p: bpfsys.prog_run_stats(p) for p in names}
            yield out
            after = {p: bpfsys.prog_run_stats(p) for p in names}
        finally:
            os.close(fd)
        out.update(bpf_run_delta({p: v for p, v in before.items() if v}, {p: v for p, v in after.items() if v},
                                 names))

    def _traffic(self, dp: str) -> dict:
        cli, s = self.ns["cli"], self.cfg.seconds
        direct = dp == "direct"
        # The socket path serves processes in the node's cgroup: its client runs in its pod's.
        cg = self.lab.pod_cgroup("cli-s") if dp == "ebpfsvc-socket" else None
        if cg is not None:
            cli = self.ns["cli-s"]
        web = (self.ips["srv-a"], NGINX_DIRECT) if direct else (self.vip["web"], 80)
        rr = (self.ips["srv-a"], SOCKPERF) if direct else (self.vip["rr"], 80)
        local = self.ips["srv-a"] if direct else self.vip["iperf-local"]
        remote = self.ips["srv-b"] if direct else self.vip["iperf-remote"]
        m: dict = {}
        # A SYN the server drops (its TIME_WAIT of an earlier connection on the same 4-tuple
        # rejects it, PAWS) costs wrk a 1 s retransmit timeout: counted, since a few of them
        # halve a 2 s run's rate whatever the datapath.
        syns = traffic.net_counters(cli, "netstat", "TcpExt")["TCPSynRetrans"]
        w = tools.wrk_connection_rate(cli, *web, duration=s, cgroup=cg)
        m["syn_retransmits"] = traffic.net_counters(cli, "netstat", "TcpExt")["TCPSynRetrans"] - syns
        m["tcp_crr_cps"], m["cpu_us_per_conn"] = w["requests_per_s"], w["cpu_us_per_conn"]
        m["wrk_errors"] = w["socket_errors"] + w["non_2xx"]
        # The BPF programs' own time per connection (every program of node-1, both directions):
        # what the datapath costs apart from the kernel's stack and the load generators. A wrk
        # run of its own: run-time statistics cost every program run two clock reads (the VM's
        # pvclock, ~1.7 µs a connection in 2026-12-03's profile), which conn/s must not pay.
        # One second: ~9,000 connections are plenty for a mean, and fewer of the client's ports
        # are used again while the backend still holds them in TIME_WAIT.
        with self.bpf_cost(dp) as bpf:
            w = tools.wrk_connection_rate(cli, *web, duration=1, cgroup=cg) if self.bpf_measured(dp) else None
        if bpf and w and w["requests"]:
            m["bpf_ns_per_conn"] = sum(ns for ns, _ in bpf.values()) / w["requests"]
            m["bpf_runs_per_conn"] = sum(n for _, n in bpf.values()) / w["requests"]
            m["bpf_ns_per_run"] = m["bpf_ns_per_conn"] / m["bpf_runs_per_conn"] if m["bpf_runs_per_conn"] else None
            # Per program (from_pod, to_pod...): ns and runs per connection, kept in the point.
            m["bpf_by_program"] = {name: {"ns_per_conn": ns / w["requests"], "runs_per_conn": n / w["requests"]}
                                   for name, (ns, n) in sorted(bpf.items()) if n}
        p = tools.sockperf_latency(cli, *rr, duration=s, cgroup=cg)
        m["tcp_rr_p50_us"], m["tcp_rr_p99_us"] = p["p50_us"], p["p99_us"]
        t = traffic.tcp_throughput(cli, local, IPERF, duration=s, cgroup=cg)
        m["tcp_throughput_gbps"], m["cpu_s_per_gb"] = t["gbit_per_s"], t["cpu_seconds_per_gb"]
        m["tcp_throughput_cross_node_gbps"] = traffic.tcp_throughput(cli, remote, IPERF, duration=s,
                                                                     cgroup=cg)["gbit_per_s"]
        m["udp_pps"] = tools.iperf3_udp(cli, local, IPERF, duration=s, cgroup=cg)["arrived_pps"]
        return m

    def point(self, dp: str, n: int, repeat: int) -> None:
        load_before = loadavg()
        self.log(f"  {dp} at {n:,} services (repeat {repeat + 1}), load {load_before[0]:.2f}")
        try:
            prog = self.activate(dp, n)
            m = dict(prog)
            m["settle_seconds"] = self.settle(dp)
            if dp == "ebpfsvc-agent-stopped":
                self.lab.agent("stop", NODE)        # the programs stay attached, the maps pinned
            m.update(self.traffic(dp))
            if dp not in ("direct", "ebpfsvc-agent-stopped"):
                # Each change moves the probe to the pod it is not on (an odd count leaves it on srv-b:
                # the next datapath must still see a real move, not a no-op write).
                changes = [self.endpoint_change(dp, "srv-b" if self.watch_at == "srv-a" else "srv-a")
                           for _ in range(self.cfg.changes)]
                m["endpoint_change_ms"] = statistics.median(c["ms"] for c in changes)
                m["endpoint_change_api_ms"] = statistics.median(c["api_ms"] for c in changes)
                m["endpoint_change_after_ack_ms"] = statistics.median(c["after_ack_ms"] for c in changes)
                synced = [c["synced_ms"] for c in changes if c["synced_ms"] is not None]
                if synced:
                    m["endpoint_change_synced_ms"] = statistics.median(synced)
                self.data["changes"].append({"datapath": dp, "services": n, "repeat": repeat,
                                             "ms": [c["ms"] for c in changes], "parts": changes})
        except Exception as exc:
            # Where it failed, not only what: a bare "Expecting value" names no step.
            where = traceback.extract_tb(exc.__traceback__)[-3:]
            error = f"{type(exc).__name__}: {exc} (at {'; '.join(f'{f.name}:{f.lineno}' for f in where)})"
            self.data["errors"].append({"datapath": dp, "services": n, "repeat": repeat, "error": error[:2000]})
            self.log(f"    error: {error[:300]}")
            m = None
        finally:
            try:
                self.deactivate(dp)
            except Exception as exc:
                self.data["errors"].append({"datapath": dp, "services": n, "repeat": repeat,
                                            "error": f"deactivate: {exc}"[:2000]})
                raise
        load_after = loadavg()
        self.data["points"].append({"datapath": dp, "services": n, "repeat": repeat, "load_before": load_before,
                                    "load_after": load_after, "metrics": m})
        if m:
            self.record(dp, n, {k: v for k, v in m.items() if isinstance(v, (int, float))}, repeat)
            self.log("    " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, (int, float))))
        self.save()

    def run(self) -> Path:
        self.data["meta"].update({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                  "baseline": "the real kube-proxy binary (lab/kubeproxy.py)",
                                  "machine": machine(), "command": self.cfg.command, "notes": self.cfg.note,
                                  "config": self.cfg.__dict__, "load_start": loadavg(),
                                  "ipvs": "not measured: this kernel has no IP_VS"})
        t0 = time.monotonic()
        try:
            self.setup()
            for n in self.cfg.services:
                self.fill(n)
                here = tuple(d for d in self.cfg.datapaths if n <= self.cfg.max_services.get(d, n))
                for d in set(self.cfg.datapaths) - set(here):
                    self.data["skipped"].append({"datapath": d, "services": n,
                                                 "why": f"--max-services {d}={self.cfg.max_services[d]}"})
                for repeat in range(self.cfg.repeats):
                    for dp in order(here, repeat):
                        self.point(dp, n, repeat)
        except Stopped as stop:
            self.data["meta"]["stopped"] = f"by {stop} after {(time.monotonic() - t0) / 60:.1f} min"
            raise
        except APIError as exc:     # the fill's or the probes' writes, after their retries
            self.data["meta"]["failed"] = f"{exc} after {(time.monotonic() - t0) / 60:.1f} min"
            raise
        finally:
            self.teardown()
            self.data["meta"]["load_end"] = loadavg()
            self.data["meta"]["minutes"] = round((time.monotonic() - t0) / 60, 1)
            self.save()
        return write(self.data, self.out)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB, kernel {os.uname().release}"


# --- the report ---------------------------------------------------------------------------

SUMMARY_METRICS = (("tcp_crr_cps", "conn/s (wrk)"), ("cpu_us_per_conn", "CPU µs/conn"),
                   ("bpf_ns_per_conn", "BPF ns/conn"),
                   ("tcp_rr_p50_us", "p50 µs"), ("tcp_rr_p99_us", "p99 µs"),
                   ("tcp_throughput_gbps", "Gbit/s same node"), ("tcp_throughput_cross_node_gbps", "Gbit/s cross"),
                   ("cpu_s_per_gb", "CPU s/GB"), ("udp_pps", "UDP pps"), ("program_seconds", "start → wire s"),
                   ("endpoint_change_after_ack_ms", "endpoint change ms (API ack → wire)"),
                   ("endpoint_change_ms", "endpoint change ms (API write → wire)"),
                   ("endpoint_change_api_ms", "… of it: API write ms"),
                   ("endpoint_change_synced_ms", "… until proxy synced ms"),
                   ("proxy_cpu_pct", "proxy CPU % in traffic"), ("proxy_peak_rss_mib", "proxy peak RSS MiB"),
                   ("proxy_mapped_maps_mib", "… of it: BPF maps mapped MiB"))


def summary(data: dict) -> str:
    """One screen: each metric × N, the four datapaths side by side (median and min-max)."""
    s = report.summarize(data["results"])
    sizes = sorted({r["services"] for r in data["results"]})
    lines = [f"## Summary: {' / '.join(NAMES)}", "",
             "Medians of the repeats, min–max in parentheses. Baseline: the real kube-proxy binary "
             "(v1.37, lab/kubeproxy.py) against the lab's API server; IPVS not measured (no IP_VS in this kernel).", ""]
    shown = NAMES + tuple(d for d in DIAGNOSTIC if any(r["datapath"] == d for r in data["results"]))
    header = ["metric", "services", *shown]
    rows = []
    for metric, title in SUMMARY_METRICS:
        for n in sizes:
            cells = [report.fmt_summary(s.get((metric, d, n))) for d in shown]
            if any(c != "–" for c in cells):
                rows.append([title, f"{n:,}", *cells])
    lines += report._table(header, rows)
    return "\n".join(lines) + "\n"


def _ratio(a: report.Summary | None, b: report.Summary | None) -> tuple[float, float, float] | None:
    """Ratio of medians, with the ratio's range from the extremes (min/max, max/min)."""
    if a is None or b is None or not b.median or not b.low or not b.high:
        return None
    return a.median / b.median, a.low / b.high, a.high / b.low


def _range_ratio(s, metric: str, num: str, den: str, n: int) -> tuple[float, float, float] | None:
    """`num` ÷ `den` on `metric` at `n` services (_ratio)."""
    return _ratio(s.get((metric, num, n)), s.get((metric, den, n)))


def _share_of_direct(data: dict, dp: str, n: int, metric: str = "tcp_crr_cps") -> list[float]:
    """`dp`'s `metric` at `n` services divided by direct's in the same repeat, one per repeat that
    has both: a drift of the machine between rows, which both datapaths see, is divided out."""
    by = {(r["datapath"], r["repeat"]): r["value"] for r in data["results"]
          if r["metric"] == metric and r["services"] == n and "repeat" in r}
    return [v / by[("direct", rep)] for (d, rep), v in by.items() if d == dp and by.get(("direct", rep))]


def targets(data: dict) -> list[tuple[str, str, str]]:
    """Issue 13's targets, each met / missed / not measured, with its evidence."""
    s = report.summarize(data["results"])
    sizes = sorted({r["services"] for r in data["results"]})
    out = []

    def fmt(r) -> str:
        return f"{r[0]:.3f} ({r[1]:.3f}–{r[2]:.3f})"

    r = _range_ratio(s, "tcp_crr_cps", "ebpfsvc", "kube-proxy-iptables", 10_000)
    # What any proxy could reach at most: no proxy at all (direct) against iptables. Below 3 the
    # target is out of reach on this machine whatever the datapath does, and the report says so.
    ceiling = _range_ratio(s, "tcp_crr_cps", "direct", "kube-proxy-iptables", 10_000)
    out.append(("conn/s at 10,000 services: ebpfsvc ≥ 3 × kube-proxy-iptables",
                ("met" if r[0] >= 3 else "**missed**") if r else "not measured",
                (fmt(r) + " ×" if r else "no 10,000 row")
                + (f"; ceiling, direct ÷ kube-proxy-iptables: {fmt(ceiling)} ×" if ceiling else "")))
    # Judged from the API's acknowledgement (docs/bench.md): the write itself is no proxy's work.
    change = "endpoint_change_after_ack_ms" if any(r["metric"] == "endpoint_change_after_ack_ms"
                                                    for r in data["results"]) else "endpoint_change_ms"
    for mode in ("kube-proxy-iptables", "kube-proxy-nftables"):
        r = _range_ratio(s, change, "ebpfsvc", mode, 10_000)
        out.append((f"endpoint change at 10,000 ({'API ack' if change != 'endpoint_change_ms' else 'API write'}"
                    f" → wire): ebpfsvc ≤ 1/100 of {mode}",
                    ("met" if r[0] <= 0.01 else "**missed**") if r else "not measured",
                    fmt(r) + " ×" if r else "no 10,000 row"))
    for metric, what in (("tcp_throughput_gbps", "same node"), ("tcp_throughput_cross_node_gbps", "cross node")):
        rs = {n: _range_ratio(s, metric, "ebpfsvc", "direct", n) for n in sizes}
        rs = {n: r for n, r in rs.items() if r}
        if rs:
            worst = min(rs, key=lambda n: rs[n][0])
            out.append((f"throughput {what}: ebpfsvc ≥ 0.97 × direct (median)",
                        "met" if rs[worst][0] >= 0.97 else "**missed**",
                        "; ".join(f"{n:,}: {fmt(r)}" for n, r in rs.items())))
    for metric in ("tcp_rr_p50_us", "tcp_rr_p99_us"):
        rs = {n: _range_ratio(s, metric, "ebpfsvc", "direct", n) for n in sizes}
        rs = {n: r for n, r in rs.items() if r}
        if rs:
            ok = all(r[0] <= 1.03 for r in rs.values())
            out.append((f"{metric}: ebpfsvc within 3% of direct", "met" if ok else "**missed**",
                        "; ".join(f"{n:,}: {fmt(r)}" for n, r in rs.items())))
    # Read twice: plainly, and through direct. The rows of 1 and 50,000 services are measured up to
    # an hour apart, and the machine's own speed moves in between (2026-12-05: direct 1.037 × from
    # 1 to 50,000); each repeat's share of direct carries no such drift.
    shares = [_share_of_direct(data, "ebpfsvc", n) for n in (50_000, 1)]
    for key, r, how, missing in (
            ("conn/s at 50,000: ebpfsvc flat against 1 service (≤ 3%)",
             _ratio(s.get(("tcp_crr_cps", "ebpfsvc", 50_000)), s.get(("tcp_crr_cps", "ebpfsvc", 1))),
             "50,000 ÷ 1", "no 50,000 and 1 rows for ebpfsvc in this run"),
            ("conn/s at 50,000: ebpfsvc's share of direct flat against 1 service's (≤ 3%)",
             _ratio(*(report.Summary.of(v) for v in shares)) if all(shares) else None,
             "50,000 ÷ 1; each repeat's ebpfsvc ÷ direct", "no 50,000 and 1 rows for ebpfsvc and direct in this run")):
        out.append((key, ("met" if abs(r[0] - 1) <= 0.03 else "**missed**") if r else "not measured",
                    f"{fmt(r)} × ({how})" if r else missing))
    # Issue 15's, for the socket path (ebpfsvc-socket): median ratios, with the spread beside them.
    for metric, what, ok in (
            ("tcp_throughput_gbps", "issue 15: throughput same node: ebpfsvc-socket ≥ 0.99 × direct",
             lambda r: r >= 0.99),
            ("tcp_throughput_cross_node_gbps", "issue 15: throughput cross node: ebpfsvc-socket ≥ 0.99 × direct",
             lambda r: r >= 0.99),
            ("tcp_crr_cps", "issue 15: conn/s: ebpfsvc-socket within 2% of direct", lambda r: r >= 0.98),
            ("tcp_rr_p50_us", "issue 15: request/response p50: ebpfsvc-socket within 2% of direct",
             lambda r: r <= 1.02)):
        rs = {n: _range_ratio(s, metric, "ebpfsvc-socket", "direct", n) for n in sizes}
        rs = {n: r for n, r in rs.items() if r}
        out.append((what, ("met" if all(ok(r[0]) for r in rs.values()) else "**missed**") if rs else "not measured",
                    "; ".join(f"{n:,}: {fmt(r)}" for n, r in rs.items()) or "no ebpfsvc-socket and direct rows"))
    return out


def extra(data: dict) -> str:
    lines = ["## Targets (issue 13)", ""]
    lines += report._table(["target", "verdict", "evidence: ratio of medians (range from the extremes)"],
                           [list(t) for t in targets(data)], align=":---")
    lines += ["", "## Creating the Services through the API", ""]
    lines += report._table(["services after", "objects", "seconds", "objects/s", "processes × threads"]
                           + [f"{c} CPU ms/object" for c in FILL_CPU_OF],
                           [[f"{a['services_after']:,}" if "services_after" in a else "-", f"{a['objects']:,}", f"{a['seconds']:.1f}",
                             f"{a['objects'] / a['seconds']:,.0f}", f"{a.get('processes', 1)} × {a['threads']}"]
                            + [f"{a['cpu_ms_per_object'][c]:.2f}" if c in a.get("cpu_ms_per_object", {}) else "-"
                               for c in FILL_CPU_OF]
                            for a in data["applies"]])
    lines += ["", "## Each point: load average (1 min) before → after", ""]
    lines += report._table(["datapath", "services", "repeat", "load before", "load after", "ok"],
                           [[p["datapath"], f"{p['services']:,}", str(p["repeat"] + 1), f"{p['load_before'][0]:.2f}",
                             f"{p['load_after'][0]:.2f}", "yes" if p["metrics"] else "error"] for p in data["points"]])
    pos = [(p["services"], p["metrics"].get("kube_services_position"), p["metrics"].get("kube_services_rules"))
           for p in data["points"] if p["metrics"] and p["metrics"].get("kube_services_position")]
    if pos:
        lines += ["", "## Where the measured service sat in KUBE-SERVICES (iptables mode)", "",
                  "kube-proxy writes KUBE-SERVICES in Go map order (`for svcName, svc := range proxier.svcPortMap` in "
                  "pkg/proxy/iptables/proxier.go): random per sync, so no name puts a service last; each activation's "
                  "actual position is below, and connection rate should be read against it.", ""]
        lines += report._table(["services", "position", "rules"], [[f"{n:,}", str(a), str(b)] for n, a, b in pos])
    if data.get("skipped"):
        lines += ["", "## Not measured", ""] + [f"- {k['datapath']} at {k['services']:,} services: {k['why']}"
                                               for k in data["skipped"]]
    if data["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e['datapath']} at {e['services']:,} (repeat {e['repeat'] + 1}): "
                                          f"{e['error'][:400]}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def write(data: dict, out: Path) -> Path:
    path = report.write_report(data, out)
    body = path.read_text()
    head, _, rest = body.partition("Figures are medians")
    path.write_text(head + summary(data) + "\n" + extra(data) + "\nFigures are medians" + rest)
    return path


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT in the bench's own process: unwinds the run like Ctrl-C (every `finally`
    runs, so the lab is torn down) but is no Exception, so point() does not record it as one
    failed point and go on."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise Stopped once in this process; a second signal while the run
    unwinds (the lab's teardown) is logged and ignored, so it cannot cut the cleanup short.
    Children forked from this process (before they exec) just exit."""
    owner, stopping = os.getpid(), []

    def stop(signum, frame):
        if os.getpid() != owner:
            os._exit(128 + signum)
        if stopping:
            print(f"{signal.Signals(signum).name} again: still cleaning up", file=sys.stderr, flush=True)
            return
        stopping.append(signum)
        print(f"{signal.Signals(signum).name}: stopping; tearing the lab down", file=sys.stderr, flush=True)
        raise Stopped(signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ebpfsvc.bench.real", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 and 1,000 services, 2 repeats, 2 s per measurement")
    ap.add_argument("--services", help="comma-separated numbers of service ports")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--datapaths", help=f"comma-separated subset of {','.join(NAMES + DIAGNOSTIC)}")
    ap.add_argument("--apply-processes", type=int, help="API writers creating the fillers: processes")
    ap.add_argument("--apply-threads", type=int, help="... and threads in each")
    ap.add_argument("--max-services", action="append", default=[], metavar="DATAPATH=N",
                    help="measure DATAPATH at no more than N services (repeatable)")
    ap.add_argument("--no-bpf-stats", action="store_true", help="no BPF run-time statistics during wrk")
    ap.add_argument("--iptables-late", type=float, metavar="FRACTION",
                    help="kube-proxy-iptables measured with its rule for the Service past this fraction of "
                         "KUBE-SERVICES (resyncs until it is): iptables' worst case near 1")
    ap.add_argument("--out")
    ap.add_argument("--note", default="")
    ap.add_argument("--report-only", metavar="RESULTS_JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        print(write(data, Path(args.out or Path(args.report_only).parent)))
        return
    cfg = Config.quick() if args.quick else Config()
    if args.services:
        cfg.services = tuple(int(x) for x in args.services.split(","))
    if args.repeats:
        cfg.repeats = args.repeats
    if args.seconds:
        cfg.seconds = args.seconds
    if args.apply_processes:
        cfg.apply_processes = args.apply_processes
    if args.apply_threads:
        cfg.apply_threads = args.apply_threads
    cfg.bpf_stats = not args.no_bpf_stats
    if args.iptables_late is not None:
        if not 0 < args.iptables_late < 1:
            ap.error(f"--iptables-late {args.iptables_late}: a fraction of the chain, between 0 and 1")
        cfg.iptables_late = args.iptables_late
    for item in args.max_services:
        name, _, most = item.partition("=")
        if name not in NAMES + DIAGNOSTIC or not most.isdigit():
            ap.error(f"--max-services {item}: want DATAPATH=N, DATAPATH one of {', '.join(NAMES + DIAGNOSTIC)}")
        cfg.max_services[name] = int(most)
    if args.datapaths:
        cfg.datapaths = tuple(d for d in args.datapaths.split(",") if d)
        unknown = set(cfg.datapaths) - set(NAMES) - set(DIAGNOSTIC)
        if unknown:
            ap.error(f"unknown datapaths {sorted(unknown)}; one of {', '.join(NAMES + DIAGNOSTIC)}")
    cfg.note = args.note
    cfg.command = " ".join(sys.argv)
    out = Path(args.out or Path("results") / ("real-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")))
    run = Run(cfg, out)
    with stop_on_signals():
        try:
            print(run.run())
        except Stopped as stop:
            # A stop is not a failure of the bench.
            _ended(run, out, f"stopped by {stop}", 128 + stop.signum)
        except APIError as exc:
            _ended(run, out, f"failed: {exc}", 1)


def _ended(run: "Run", out: Path, why: str, code: int) -> None:
    """A run that did not finish: Run.run has torn the lab down and saved results.json on the way
    out; say so in one line, report what was measured, without a traceback, and exit `code`."""
    done = len([p for p in run.data["points"] if p["metrics"]])
    if run.data["results"]:
        write(run.data, out)
    print(f"{why}: lab torn down; {done} points kept in {out / 'results.json'}", file=sys.stderr, flush=True)
    sys.exit(code)

if __name__ == "__main__":
    main()
