"""Load generators in C, from Debian: wrk against nginx, sockperf ping-pong, qperf, iperf3 (TCP and UDP).

Each client runs in the client pod's namespace as a child process bounded by its own duration
(and killed `_SLACK` seconds past it); each returns a dict with the machine's busy CPU seconds
over the run (/proc/stat, as traffic.busy_seconds: NAT and forwarding run in softirq, in no
process's rusage).

    wrk_connection_rate   wrk -H "Connection: close" against nginx (keepalive_timeout 0): a new
                          TCP connection per request; requests/s = connections/s
    sockperf_latency      sockperf ping-pong on one TCP connection: p50 / p99 in µs (sockperf
                          reports half the round trip, as every sockperf figure); client and
                          server pinned to one CPU (LATENCY_CPU, below)
    qperf_latency         qperf tcp_lat, the same request/response over IPv4 or IPv6 (sockperf 3.7
                          takes no IPv6 address): its mean in µs, half the round trip as sockperf's;
                          no percentiles (qperf reports none); pinned the same way
    iperf3_udp            iperf3 -u -b 0 with 64-byte datagrams: packets/s that arrived
    traffic.tcp_throughput  iperf3, one TCP stream (kept from traffic.py)

Servers: `nginx_server` (a pod process, its config in a temporary directory under the lab's
state dir, `daemon off;`, no master process, so the pid we hold is the server), `sockperf_server`,
`qperf_server` and traffic.iperf3_server.  Each is stopped by its own pid.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from ebpfsvc.bench.traffic import busy_seconds, client_preexec, cpu_times, server_preexec, stop_process
from ebpfsvc.datapath import nsenter

_SLACK = 20.0

# sockperf's client and server both run on this CPU (the last one this process may use). Left to
# the scheduler, the two land on the same vCPU or on different ones from run to run; on different
# ones every wake-up of the other side is an IPI to a halted vCPU (this VM's cpuidle is haltpoll
# with guest_halt_poll_ns=0), and the half round trip jumps from 12-16 µs to 42-52 µs for any
# datapath, direct included (docs/bench.md, "sockperf's two modes"). On one CPU the figure is the
# path's own cost, and repeats agree.
LATENCY_CPU = max(os.sched_getaffinity(0))


def pinned(preexec, cpu: int | None):
    """`preexec`, then the child bound to `cpu` (None: left to the scheduler)."""
    if cpu is None:
        return preexec

    def enter() -> None:
        preexec()
        os.sched_setaffinity(0, {cpu})

    return enter

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{servers}
}}
"""


class Proc:
    """A server process started in a namespace; stop() ends it, by its pid only."""

    def __init__(self, argv: list[str], netns: str, ready, timeout: float = 10.0, log: Path | None = None,
                 cpu: int | None = None, cgroup=None):
        self.argv = argv
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=pinned(server_preexec(netns, cgroup), cpu))
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[0]} did not start in {netns}" + (f"; see {log}" if log else ""))
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def listening(netns: str, port: int, udp: bool = False) -> bool:
    """Something in `netns` listens on `port` (ss in that namespace)."""
    out = subprocess.run(["ss", "-Hln", "-u" if udp else "-t", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10, preexec_fn=nsenter.preexec(netns))
    return bool(out.stdout.strip())


def nginx_server(netns: str, ports: list[int], state_dir: Path, ipv6: bool = False, cgroup=None) -> Proc:
    """nginx listening on `ports` in `netns` (IPv4; `ipv6`: IPv6 too), answering every request with
    200 "ok" and closing; in its pod's `cgroup` when given (traffic.server_preexec)."""
    workdir = Path(tempfile.mkdtemp(prefix="nginx-", dir=state_dir))
    listen = (lambda p: f"listen {p}; listen [::]:{p};") if ipv6 else (lambda p: f"listen {p};")
    servers = "\n".join(f"    server {{ {listen(p)} location / {{ return 200 \"ok\\n\"; }} }}" for p in ports)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, servers=servers))
    return Proc(["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")], netns,
                lambda: all(listening(netns, p) for p in ports), log=workdir / "stdout.log", cgroup=cgroup)


def sockperf_server(netns: str, port: int, state_dir: Path, cpu: int | None = LATENCY_CPU, cgroup=None) -> Proc:
    return Proc(["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(port)], netns,
                lambda: listening(netns, port), log=state_dir / f"sockperf-{port}.log", cpu=cpu, cgroup=cgroup)


def qperf_server(netns: str, port: int, state_dir: Path, cpu: int | None = LATENCY_CPU) -> Proc:
    """qperf's server on control port `port` (both families); each client names the data port it
    listens on for the test (qperf_latency's `data_port`), so a Service in front of it needs both."""
    return Proc(["qperf", "-lp", str(port)], netns, lambda: listening(netns, port),
                log=state_dir / f"qperf-{port}.log", cpu=cpu)


def _run(netns: str, argv: list[str], duration: float, cgroup=None, cpu: int | None = None) -> tuple[str, dict]:
    before = cpu_times()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + _SLACK,
                          preexec_fn=pinned(client_preexec(netns, cgroup), cpu))
    cpu = busy_seconds(before, cpu_times())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {netns}: exit {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout + proc.stderr, cpu


def parse_wrk(text: str) -> dict:
    """wrk's summary: requests/s, requests, socket errors."""
    out = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
           "requests": int(re.search(r"(\d+) requests in", text).group(1))}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(g) for g in errors.groups()) if errors else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    return out


def wrk_connection_rate(netns: str, address: str, port: int, *, duration: float = 5.0, connections: int = 8,
                        threads: int = 1, cgroup=None) -> dict:
    """wrk with `Connection: close`: every request a new TCP connection (nginx closes after answering)."""
    seconds = max(1, round(duration))
    text, cpu = _run(netns, ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-H", "Connection: close",
                             f"http://{address}:{port}/"], seconds, cgroup)
    out = parse_wrk(text)
    out["cpu_seconds"] = cpu["total"]
    out["cpu_us_per_conn"] = cpu["total"] / out["requests"] * 1e6 if out["requests"] else float("nan")
    return out


def parse_sockperf(text: str) -> dict:
    """sockperf ping-pong's summary: percentiles (µs, half round trip) and observations."""
    pct = {float(p): float(v) for p, v in re.findall(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)", text)}
    avg = re.search(r"avg-latency=([\d.]+)", text) or re.search(r"avg-lat=\s*([\d.]+)", text)
    obs = re.search(r"(\d+) observations", text) or re.search(r"ReceivedMessages=(\d+)", text)
    if 50.0 not in pct or 99.0 not in pct:
        raise RuntimeError(f"sockperf: no percentiles in its output: {text[-500:]}")
    return {"p50_us": pct[50.0], "p99_us": pct[99.0], "avg_us": float(avg.group(1)) if avg else None,
            "observations": int(obs.group(1)) if obs else None}


def sockperf_latency(netns: str, address: str, port: int, *, duration: float = 5.0, size: int = 64,
                     cgroup=None, cpu: int | None = LATENCY_CPU) -> dict:
    """Against a sockperf_server pinned to the same `cpu` (both None: wherever the scheduler puts them)."""
    seconds = max(1, round(duration))
    text, busy = _run(netns, ["sockperf", "ping-pong", "--tcp", "-i", address, "-p", str(port), "-t", str(seconds),
                              "-m", str(size)], seconds, cgroup, cpu)
    out = parse_sockperf(text)
    out["cpu_seconds"] = busy["total"]
    return out


# qperf prints each figure with a unit it picks by magnitude (its own output: "latency = 11.1 us",
# "= 1.2 ms") and thousands separated by commas ("port = 19,766").
_QPERF_TIME_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6}
_QPERF_RATE = {"/sec": 1.0, "K/sec": 1e3, "M/sec": 1e6, "G/sec": 1e9}


def parse_qperf(text: str, test: str = "tcp_lat") -> dict:
    """qperf's report of one latency test (-v or not): latency in µs (half the round trip) and,
    with -v, the messages per second."""
    body = re.search(rf"^{test}:\n((?:[ \t]+\S.*\n?)+)", text, re.M)
    if not body:
        raise RuntimeError(f"qperf: no {test} report in its output: {text.strip()[-500:]}")
    fields = {k: (float(v.replace(",", "")), unit.strip())
              for k, v, unit in re.findall(r"^\s+(\w+)\s*=\s*([\d.,]+)\s*(.*)$", body.group(1), re.M)}
    if "latency" not in fields or fields["latency"][1] not in _QPERF_TIME_US:
        raise RuntimeError(f"qperf: {test} has no latency in a known unit: {body.group(1).strip()[:300]}")
    value, unit = fields["latency"]
    rate = fields.get("msg_rate")
    return {"latency_us": value * _QPERF_TIME_US[unit],
            "msg_per_s": rate[0] * _QPERF_RATE[rate[1]] if rate and rate[1] in _QPERF_RATE else None}


def qperf_latency(netns: str, address: str, port: int, data_port: int, *, duration: float = 5.0, size: int = 64,
                  cgroup=None, cpu: int | None = LATENCY_CPU) -> dict:
    """qperf tcp_lat against a qperf_server on control `port`, the test's data on `data_port`;
    client and server on the same `cpu` (LATENCY_CPU's reason)."""
    seconds = max(1, round(duration))
    text, busy = _run(netns, ["qperf", "-v", "-lp", str(port), "-ip", str(data_port), "-t", str(seconds),
                              "-m", str(size), address, "tcp_lat"], seconds, cgroup, cpu)
    out = parse_qperf(text)
    out["cpu_seconds"] = busy["total"]
    return out


def iperf3_udp(netns: str, address: str, port: int, *, duration: float = 3.0, size: int = 64, cgroup=None) -> dict:
    """One UDP flow at full speed (-b 0): datagrams/s that arrived at the server (iperf3's own count)."""
    import json

    seconds = max(1, round(duration))
    text, cpu = _run(netns, ["iperf3", "-c", address, "-p", str(port), "-u", "-b", "0", "-l", str(size),
                             "-t", str(seconds), "-J"], seconds, cgroup)
    result = json.loads(text[text.index("{"):text.rindex("}") + 1])
    if result.get("error"):
        raise RuntimeError(f"iperf3 -u: {result['error']}")
    s = result["end"]["sum"]
    arrived = s["packets"] - s.get("lost_packets", 0)
    return {"arrived_pps": arrived / s["seconds"], "sent_packets": s["packets"], "lost_percent": s.get("lost_percent"),
            "cpu_seconds": cpu["total"]}
