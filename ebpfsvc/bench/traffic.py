"""Traffic drivers: one measurement each, run from a client namespace, returned as a dict.

Every driver takes (client_netns, address, port, bounds) and runs its client in
a child process that entered `client_netns` before exec, so the caller's
namespace never changes and the client does not share an interpreter (or a
GIL) with the caller.  Bounds are both a count and a duration: a driver stops
at whichever comes first, and its process is killed if it overruns them.

    tcp_throughput        iperf3, one TCP stream: Gbit/s, retransmits, CPU s/GB
    udp_packet_rate       one UDP flow of small datagrams at full speed: packets/s that arrived
    tcp_request_response  one connection, 1-byte ping-pong: p50/p99 latency, transactions/s
    tcp_connect_rate      connect, one request, close, repeated: connections/s, latency
    backend_spread        short connections asking "which backend are you?": counts
    BackendWatch          from an endpoint change to the first connection reaching the new backend

The servers to measure against run in the backend namespaces: `echo_server`
(this module's own, for all but throughput) and `iperf3_server`.  iperf3 opens a
control connection and then data connections to the same address: through a
Service with several endpoints these may land on different backends, which
iperf3 cannot handle, so measure iperf3 through a Service with one endpoint
(or with sessionAffinity ClientIP).

The Python client costs far more per transaction than the datapath does, so
latencies and rates are comparable between datapaths measured the same way,
not with numbers from netperf or a C client.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from ebpfsvc.datapath import nsenter

# The last byte of a request tells the echo server what to do after replying.
OP_KEEP = b"r"     # reply, keep the connection (request/response)
OP_CLOSE = b"c"    # reply, then close: the server closes first, so TIME_WAIT stays on its side
OP_WHO = b"w"      # reply with the address the client reached, then close
IP_PKTINFO = 8           # linux/in.h; the socket module does not export it
UDP_QUERY = b"?count"   # a datagram asking the echo server how many it counted from this source

_CLIENT_SLACK = 30.0     # seconds a child may run beyond its duration bound before it is killed
WATCH_INTERVAL = 0.001   # a backend watch's pace: the resolution of what it times (run_watch)


# --- CPU accounting ----------------------------------------------------------------

def cpu_times() -> dict[str, float]:
    """Machine-wide CPU seconds per state from /proc/stat (not per namespace: softirq work counts)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    tick = os.sysconf("SC_CLK_TCK")
    return {name: int(value) / tick for name, value in zip(names, fields)}


def busy_seconds(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds spent not idle between two cpu_times() readings, total and per state."""
    states = ["user", "nice", "system", "irq", "softirq", "steal"]
    delta = {s: after[s] - before[s] for s in states}
    delta["total"] = sum(delta.values())
    return delta


# --- servers -------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM to this one process (by its pid), SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Server:
    """A server process this module started in a namespace; stop() ends it (and only it).

    A thread keeps reading the server's output, so a chatty server (iperf3
    prints a report per test) never blocks on a full pipe.
    """

    def __init__(self, argv: list[str], netns: str, ready_text: str, timeout: float = 10.0, cgroup=None):
        self.netns = netns
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._ready = threading.Event()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     preexec_fn=server_preexec(netns, cgroup))
        threading.Thread(target=self._drain, args=(ready_text,), daemon=True).start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            self._stderr.seek(0)
            raise RuntimeError(f"{argv[0]} did not start in {netns}: {self._stderr.read().strip()[:500]}")

    def _drain(self, ready_text: str) -> None:
        for line in self.proc.stdout:
            if ready_text in line:
                self._ready.set()

    def stop(self) -> None:
        stop_process(self.proc)
        self._stderr.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_servers(servers) -> None:
    """stop() each of `servers` (Server, tools.Proc) on its own: a teardown goes on past one that
    fails to stop (say, its namespace went first), so none of the others is left running."""
    for server in servers:
        try:
            server.stop()
        except Exception:
            pass


def echo_server(netns: str, port: int, address: str = "0.0.0.0") -> Server:
    """This module's TCP echo server (see serve_echo) in `netns`, listening when this returns."""
    argv = [sys.executable, "-m", "ebpfsvc.bench.traffic", "serve", "--address", address, "--port", str(port)]
    return Server(argv, netns, "listening")


def iperf3_server(netns: str, port: int, cgroup=None) -> Server:
    """`iperf3 -s` in `netns` (and its pod's `cgroup`: server_preexec), listening when this returns;
    serves one test at a time."""
    return Server(["iperf3", "-s", "-p", str(port), "--forceflush"], netns, "Server listening", cgroup=cgroup)


def serve_echo(address: str, port: int) -> None:
    """Single-threaded echo server on TCP `port`, and a datagram counter on UDP `port`.

    TCP: echo each request, then act on its last byte (OP_*).  UDP: count the
    datagrams of each source; a datagram starting with UDP_QUERY is answered
    with that source's count (which then starts again from zero).
    One thread and a selector, not a thread per connection: spawning threads
    would cap the connection rate below what the datapaths can do.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(4096)
    listener.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    udp.bind((address, port))
    udp.setblocking(False)
    udp_counts: Counter[tuple[str, int]] = Counter()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(udp, selectors.EVENT_READ)
    print("listening", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is udp:
                _count_datagrams(udp, udp_counts)
                continue
            if sock is listener:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                continue
            op = data[-1:]
            reply = sock.getsockname()[0].encode() if op == OP_WHO else data
            try:
                sock.sendall(reply)
            except ConnectionError:
                op = OP_CLOSE
            if op in (OP_CLOSE, OP_WHO):
                sel.unregister(sock)
                sock.close()


def _count_datagrams(udp: socket.socket, counts: Counter) -> None:
    # Drain everything queued: one select() per datagram would halve the rate.
    # recvmsg with IP_PKTINFO, because the answer to a query must leave from
    # the address the query was sent to (a pod may have several, and through a
    # Service conntrack only reverses the NAT of replies from that address).
    recvmsg = udp.recvmsg
    while True:
        try:
            data, ancdata, _, source = recvmsg(2048, 64)
        except BlockingIOError:
            return
        if not data.startswith(UDP_QUERY):
            counts[source] += 1
            continue
        local = next((d for level, kind, d in ancdata if level == socket.IPPROTO_IP and kind == IP_PKTINFO), None)
        reply = [str(counts.pop(source, 0)).encode()]
        if local is None:
            udp.sendto(reply[0], source)
            continue
        # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}: answer from addr.
        pktinfo = struct.pack("=i4s4s", 0, local[8:12], b"\0\0\0\0")
        udp.sendmsg(reply, [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0, source)


# --- clients (run in the child process) ---------------------------------------------------

def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    s = sorted(samples_ns)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] / 1000.0

    return {"latency_p50_us": pct(50), "latency_p90_us": pct(90), "latency_p99_us": pct(99),
            "latency_min_us": s[0] / 1000.0, "latency_max_us": s[-1] / 1000.0,
            "latency_mean_us": sum(s) / len(s) / 1000.0}


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError("server closed the connection early")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def run_rr(address: str, port: int, count: int, duration: float, size: int) -> dict:
    request = b"x" * (size - 1) + OP_KEEP
    lat: list[int] = []
    sock = socket.create_connection((address, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(duration * 1e9)
    try:
        while len(lat) < count:
            t0 = clock()
            if t0 >= deadline:
                break
            sock.sendall(request)
            _recv_exactly(sock, size)
            lat.append(clock() - t0)
    finally:
        sock.close()
    elapsed = (clock() - start) / 1e9
    return {"transactions": len(lat), "seconds": elapsed,
            "transactions_per_s": len(lat) / elapsed if elapsed else 0.0, **_percentiles(lat)}


def _one_short_connection(address: str, port: int, op: bytes) -> bytes:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(3)
    try:
        sock.connect((address, port))
        sock.sendall(op)
        chunks = []
        while True:          # read until the server's FIN: it closes first
            chunk = sock.recv(256)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        sock.close()


def run_crr(address: str, port: int, count: int, duration: float, op: bytes = OP_CLOSE,
            max_errors: int = 50) -> dict:
    lat: list[int] = []
    replies: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(duration * 1e9)
    while len(lat) < count and sum(errors.values()) < max_errors:
        t0 = clock()
        if t0 >= deadline:
            break
        try:
            reply = _one_short_connection(address, port, op)
        except OSError as exc:
            errors[type(exc).__name__] += 1
            continue
        lat.append(clock() - t0)
        if op == OP_WHO:
            replies[reply.decode(errors="replace")] += 1
    elapsed = (clock() - start) / 1e9
    out = {"connections": len(lat), "seconds": elapsed,
           "connections_per_s": len(lat) / elapsed if elapsed else 0.0,
           "errors": dict(errors), **_percentiles(lat)}
    if op == OP_WHO:
        out["backends"] = dict(replies)
    return out


def run_udp(address: str, port: int, count: int, duration: float, size: int) -> dict:
    """Send `size`-byte datagrams as fast as one socket can, then ask the server how many arrived."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((address, port))
    payload = b"u" * size
    send = sock.send
    sent = dropped_locally = 0
    clock = time.perf_counter
    start = clock()
    deadline = start + duration
    while sent + dropped_locally < count:
        if (sent & 1023) == 0 and clock() >= deadline:
            break
        try:
            send(payload)
            sent += 1
        except (BlockingIOError, ConnectionRefusedError):
            dropped_locally += 1      # full socket queue, or an ICMP error from an earlier datagram
    seconds = clock() - start
    received = None
    sock.settimeout(0.2)
    for _ in range(25):               # the query or its answer may be lost too: ask again
        try:
            send(UDP_QUERY)
            received = int(sock.recv(64))
            break
        except (TimeoutError, ConnectionRefusedError, ValueError):
            continue
    sock.close()
    return {"sent_packets": sent, "send_errors": dropped_locally, "seconds": seconds,
            "received_packets": received}


def run_watch(address: str, port: int, backend: str, duration: float, interval: float = WATCH_INTERVAL) -> dict:
    """Short "who" connections, one every `interval` at most, until `backend` answers; when it first
    did and when the last one before it started (CLOCK_MONOTONIC): the change reached the wire
    between the two.

    Paced, not back to back: on a 2-core machine a watcher spinning a core would take it from the
    proxy whose change it times (and from the API server)."""
    attempts, others, errors = 0, Counter(), Counter()
    deadline = time.monotonic() + duration
    last_start = None
    print("watching", flush=True)
    while (start := time.monotonic()) < deadline:
        attempts += 1
        try:
            reply = _one_short_connection(address, port, OP_WHO).decode(errors="replace")
        except OSError as exc:
            errors[type(exc).__name__] += 1
            reply = None
        if reply == backend:
            return {"seen_at": time.monotonic(), "previous_attempt_at": last_start, "attempts": attempts,
                    "before": dict(others), "errors": dict(errors)}
        if reply is not None:
            others[reply] += 1
        last_start = start
        time.sleep(max(0.0, start + interval - time.monotonic()))
    return {"seen_at": None, "previous_attempt_at": last_start, "attempts": attempts, "before": dict(others),
            "errors": dict(errors)}


class BackendWatch:
    """Time from a change to the first new connection that reaches `backend`, seen on the wire.

        with BackendWatch(client_ns, cluster_ip, 80, "198.18.2.12") as watch:
            changed_at = time.monotonic()
            ...apply the endpoint change...
        watch.result()["seen_at"] - changed_at

    The watcher connects back to back from the client namespace (every attempt
    a new connection, so each is balanced afresh), from before the change until
    `backend` answers or `duration` runs out.  CLOCK_MONOTONIC is the same
    clock in every process, so the child's timestamp compares with the caller's.
    """

    def __init__(self, client_netns: str, address: str, port: int, backend: str, *, duration: float = 10.0,
                 interval: float = WATCH_INTERVAL):
        argv = [sys.executable, "-m", "ebpfsvc.bench.traffic", "client", "watch", address, str(port),
                "--backend", backend, "--count", "0", "--duration", str(duration), "--interval", str(interval)]
        self.duration = duration
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=nsenter.preexec(client_netns))
        if "watching" not in self.proc.stdout.readline():
            self.proc.kill()
            raise RuntimeError(f"backend watch did not start: {self.proc.stderr.read()[:500]}")
        self._result: dict | None = None

    def result(self) -> dict:
        if self._result is None:
            out, err = self.proc.communicate(timeout=self.duration + _CLIENT_SLACK)
            if self.proc.returncode != 0:
                raise RuntimeError(f"backend watch failed: {err.strip()[-500:]}")
            self._result = json.loads(out)
        return self._result

    def __enter__(self) -> "BackendWatch":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _client(client_netns: str, args: list[str], duration: float) -> dict:
    argv = [sys.executable, "-m", "ebpfsvc.bench.traffic", "client", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + _CLIENT_SLACK,
                          preexec_fn=nsenter.preexec(client_netns))
    if proc.returncode != 0:
        raise RuntimeError(f"client {' '.join(args)} in {client_netns} failed: {proc.stderr.strip()[-1000:]}")
    return json.loads(proc.stdout)


# --- drivers -----------------------------------------------------------------------

def tcp_request_response(client_netns: str, address: str, port: int, *, count: int = 20000,
                         duration: float = 5.0, size: int = 1) -> dict:
    """Ping-pong of `size`-byte messages on one connection: latency percentiles and transactions/s."""
    return _client(client_netns, ["rr", address, str(port), "--count", str(count), "--duration", str(duration),
                                  "--size", str(size)], duration)


def tcp_connect_rate(client_netns: str, address: str, port: int, *, count: int = 5000,
                     duration: float = 5.0) -> dict:
    """Connect, one 1-byte request and reply, close, repeated: connections/s and per-connection latency."""
    return _client(client_netns, ["crr", address, str(port), "--count", str(count), "--duration", str(duration)],
                   duration)


def backend_spread(client_netns: str, address: str, port: int, *, count: int = 300,
                   duration: float = 20.0) -> dict:
    """Short connections that each ask the server which address they reached; "backends" counts them."""
    return _client(client_netns, ["who", address, str(port), "--count", str(count), "--duration", str(duration)],
                   duration)


def client_preexec(netns: str, cgroup=None):
    """A client's preexec_fn: its pod's namespace, and its pod's cgroup when given (the socket path,
    --socket-lb, serves only processes in the node's cgroup: docs/socklb.md)."""
    if cgroup is None:
        return nsenter.preexec(netns)
    from ebpfsvc.lab import cgroups
    return cgroups.preexec(netns, cgroup)


def server_preexec(netns: str, cgroup=None):
    """A server's preexec_fn: its own session (ended by its pid alone), its pod's cgroup when given,
    its pod's namespace. A pod's server is in the pod's cgroup on a kubelet's node, and the socket
    path's sock_ops hook (bpf/lib/sock.h) sees its accepted connections only there."""
    enter = client_preexec(netns, cgroup)

    def start() -> None:
        os.setsid()
        enter()

    return start


def _iperf3(client_netns: str, args: list[str], duration: float, cgroup=None) -> tuple[dict, dict[str, float]]:
    """Run an iperf3 client; its JSON result and the machine's busy CPU seconds meanwhile."""
    before = cpu_times()
    # iperf3 reads -t as whole seconds, and 0 means "forever": never pass less than 1.
    seconds = str(max(1, round(duration)))
    proc = subprocess.run(["iperf3", *args, "-t", seconds, "-J"], capture_output=True, text=True,
                          timeout=duration + _CLIENT_SLACK, preexec_fn=client_preexec(client_netns, cgroup))
    cpu = busy_seconds(before, cpu_times())
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 {' '.join(args)}: no JSON ({proc.stderr.strip()[:500]})") from None
    error = result.get("error") or (proc.stderr.strip() if proc.returncode else "")
    if error:
        raise RuntimeError(f"iperf3 {' '.join(args)} in {client_netns}: {error}")
    return result, cpu


def tcp_throughput(client_netns: str, address: str, port: int, *, duration: float = 5.0, cgroup=None) -> dict:
    """One TCP stream client -> server with iperf3: Gbit/s received, retransmits, CPU seconds per GB.

    CPU is the whole machine's busy time over the run (/proc/stat), because the
    datapath's work happens in softirq context, in no process's rusage.  Run
    nothing else meanwhile.
    """
    result, cpu = _iperf3(client_netns, ["-c", address, "-p", str(port)], duration, cgroup)
    end = result["end"]
    received = end["sum_received"]
    gbytes = received["bytes"] / 1e9
    return {
        "gbit_per_s": received["bits_per_second"] / 1e9,
        "bytes": received["bytes"],
        "seconds": received["seconds"],
        "retransmits": end["sum_sent"].get("retransmits", 0),
        "cpu_seconds": cpu["total"],
        "cpu_softirq_seconds": cpu["softirq"],
        "cpu_seconds_per_gb": cpu["total"] / gbytes if gbytes else float("nan"),
        "iperf3_cpu_host_percent": end.get("cpu_utilization_percent", {}).get("host_total"),
        "iperf3_cpu_remote_percent": end.get("cpu_utilization_percent", {}).get("remote_total"),
    }


def net_counters(netns: str, table: str, group: str) -> dict[str, int]:
    """One group of a namespace's protocol counters: `table` "snmp" (Udp, Tcp, ...) or "netstat"
    (TcpExt, IpExt), as nstat reads them (header line, then values)."""
    def read() -> dict[str, int]:
        lines = [ln.split() for ln in Path(f"/proc/thread-self/net/{table}").read_text().splitlines()
                 if ln.startswith(f"{group}:")]
        return dict(zip(lines[0][1:], map(int, lines[1][1:])))

    return nsenter.run_in(netns, read)


def _udp_in(netns: str) -> int:
    """Datagrams that reached UDP in `netns`, delivered or dropped at a full socket."""
    fields = net_counters(netns, "snmp", "Udp")
    return fields["InDatagrams"] + fields["InErrors"]


def udp_packet_rate(client_netns: str, address: str, port: int, *, count: int = 3_000_000,
                    duration: float = 3.0, size: int = 64, server_netns: str | None = None) -> dict:
    """One UDP flow of `size`-byte datagrams at full speed to the echo server: packets/s that arrived.

    received_packets_per_s counts what the server process read; with
    `server_netns` (where the echo server runs), arrived_packets_per_s counts
    what reached that namespace's UDP layer, which does not depend on how fast
    a Python server reads, so it measures the path itself.  One flow, so
    through a Service every datagram goes to the same backend.
    """
    before_in = _udp_in(server_netns) if server_netns else None
    before = cpu_times()
    r = _client(client_netns, ["udp", address, str(port), "--count", str(count), "--duration", str(duration),
                               "--size", str(size)], duration)
    r["cpu_seconds"] = busy_seconds(before, cpu_times())["total"]
    seconds = r["seconds"] or float("nan")
    r["sent_packets_per_s"] = r["sent_packets"] / seconds
    if r["received_packets"] is not None:
        r["received_packets_per_s"] = r["received_packets"] / seconds
        r["lost_percent"] = 100.0 * (1 - r["received_packets"] / r["sent_packets"]) if r["sent_packets"] else 0.0
    if before_in is not None:
        # Minus the count queries: at most 25 of them.
        r["arrived_packets"] = _udp_in(server_netns) - before_in
        r["arrived_packets_per_s"] = r["arrived_packets"] / seconds
    return r


# --- the data-plane suite, in the report's metric names ------------------------------------

# (seconds, count) bounds per driver: full and quick (`make bench-quick`).
SUITE_BOUNDS = {
    "full": {"throughput": 5.0, "rr": (5.0, 200_000), "crr": (5.0, 20_000), "udp": (3.0, 3_000_000)},
    "quick": {"throughput": 1.0, "rr": (1.0, 50_000), "crr": (1.0, 5_000), "udp": (1.0, 1_000_000)},
}


def measure_suite(client_netns: str, echo: tuple[str, int], iperf: tuple[str, int], *,
                  server_netns: str | None = None, quick: bool = False,
                  bounds: dict | None = None) -> dict[str, float]:
    """Every data-plane metric once, keyed by ebpfsvc.bench.report's metric names.

    `echo` and `iperf` are the (address, port) to measure through: a ClusterIP
    for a datapath, the pod address itself for direct.  Both should lead to a
    single backend (see the module note on iperf3).  With `server_netns` (the
    echo server's), the UDP figure is what reached that namespace.  `bounds`
    (same keys as SUITE_BOUNDS' entries) overrides the full / quick ones.
    """
    b = bounds or SUITE_BOUNDS["quick" if quick else "full"]
    out: dict[str, float] = {}
    r = tcp_throughput(client_netns, *iperf, duration=b["throughput"])
    out["tcp_throughput_gbps"] = r["gbit_per_s"]
    out["cpu_s_per_gb"] = r["cpu_seconds_per_gb"]
    seconds, count = b["rr"]
    r = tcp_request_response(client_netns, *echo, count=count, duration=seconds)
    out["tcp_rr_p50_us"], out["tcp_rr_p99_us"] = r["latency_p50_us"], r["latency_p99_us"]
    out["tcp_rr_tps"] = r["transactions_per_s"]
    seconds, count = b["crr"]
    r = tcp_connect_rate(client_netns, *echo, count=count, duration=seconds)
    if r["errors"]:
        raise RuntimeError(f"connections failed through {echo}: {r['errors']}")
    out["tcp_crr_cps"] = r["connections_per_s"]
    seconds, count = b["udp"]
    r = udp_packet_rate(client_netns, *echo, count=count, duration=seconds, server_netns=server_netns)
    out["udp_pps"] = r.get("arrived_packets_per_s", r.get("received_packets_per_s", 0.0))
    return out


# --- command line (what the child processes run) ---------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ebpfsvc.bench.traffic")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="echo server (run inside a namespace)")
    serve.add_argument("--address", default="0.0.0.0")
    serve.add_argument("--port", type=int, required=True)
    client = sub.add_parser("client", help="one bounded client run, JSON on stdout")
    client.add_argument("mode", choices=["rr", "crr", "who", "udp", "watch"])
    client.add_argument("address")
    client.add_argument("port", type=int)
    client.add_argument("--count", type=int, required=True)
    client.add_argument("--duration", type=float, required=True)
    client.add_argument("--size", type=int, default=1)
    client.add_argument("--backend", help="watch: the backend address to wait for")
    client.add_argument("--interval", type=float, default=WATCH_INTERVAL, help="watch: seconds between attempts")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve_echo(args.address, args.port)
    elif args.mode == "rr":
        print(json.dumps(run_rr(args.address, args.port, args.count, args.duration, max(1, args.size))))
    elif args.mode == "watch":
        print(json.dumps(run_watch(args.address, args.port, args.backend, args.duration, args.interval)))
    elif args.mode == "udp":
        print(json.dumps(run_udp(args.address, args.port, args.count, args.duration, max(1, args.size))))
    else:
        op = OP_WHO if args.mode == "who" else OP_CLOSE
        print(json.dumps(run_crr(args.address, args.port, args.count, args.duration, op)))


if __name__ == "__main__":
    main()
