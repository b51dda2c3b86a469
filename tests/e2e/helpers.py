"""Helpers for the Service e2e tests: manifests, clients in pod namespaces, bounded polls, map reads.

Clients are real sockets created inside a pod's network namespace from the test
process (ebpfsvc.datapath.nsenter.socket_in): the kernel treats them exactly like a
program running in the pod, the packets cross the pod's veth and the node's TC
programs, and the test needs no helper process per connection.

The pinned maps of a node's agent are read read-only (ebpfsvc.inspect, the
same reader as `ebpfsvc inspect`): tests use them to wait until an agent has
programmed a change (instead of sleeping) and to prove that something was *not*
programmed. Behaviour itself is always checked on the wire.

Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

from ebpfsvc.inspect.node import FrontendRow, NodeMaps
from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, names

T = TypeVar("T")

# Generous bounds: the suite shares two cores with whatever else runs; these are upper limits
# for something that normally takes a second, never a timing assertion.
READY_TIMEOUT = 90.0          # pods started and probed ready
SYNC_TIMEOUT = 60.0           # an agent programs an applied change


# -- manifests --------------------------------------------------------------------------------


def service(name: str, ports: list[dict], selector: dict | None = None, **spec: Any) -> dict:
    """A v1 Service; `selector=None` makes it selectorless. Extra keyword args go into spec."""
    body: dict[str, Any] = {"ports": ports, **spec}
    if selector is not None:
        body["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": body}


def bare_pod(name: str, node: str, labels: dict | None = None, command: list[str] | None = None,
             ports: list[dict] | None = None) -> dict:
    """A Pod running `command` (or nothing: a namespace with an IP, e.g. a pure client).

    Without a readinessProbe the lab counts it ready once started.
    """
    container: dict[str, Any] = {"name": "c"}
    if command:
        container["command"] = command
    if ports:
        container["ports"] = ports
    meta: dict[str, Any] = {"name": name, "labels": labels or {"app": name}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "containers": [container]}}


# -- bounded waiting ---------------------------------------------------------------------------


def answered_by(ask: Callable[[], str], want: Iterable[str], limit: int = 40) -> set[str]:
    """The backends that answered `ask` (one new connection per call, returning the answering pod),
    asked until every one of `want` has answered, at most `limit` times. New connections land on a
    backend by a hash: a fixed count of, say, 12 leaves a 1 in 2,048 chance that two backends look
    like one (a CI failure seen on 2026-12-03); 40 makes it 1 in 10^12, and a backend that is never
    chosen still fails."""
    want, seen = set(want), set()
    for _ in range(limit):
        seen.add(ask())
        if seen >= want:
            break
    return seen


def wait_for(check: Callable[[], T], timeout: float = SYNC_TIMEOUT, interval: float = 0.2, what: str = "") -> T:
    """Call `check` until it returns something truthy (returned), at most `timeout` seconds.

    Exceptions from `check` count as "not yet" until the deadline, then the last one is raised
    with the description; so does a last falsy value.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / max(interval, 0.01)) + 2):
        try:
            last = check()
            if last:
                return last
        except (OSError, AssertionError, ValueError, KeyError) as exc:
            last = exc
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    if isinstance(last, BaseException):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last!r}") from last
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: last value {last!r}")


# -- clients inside pods ----------------------------------------------------------------------


def _linger_rst(sock: socket.socket) -> None:
    # close() then sends RST instead of FIN: the client keeps no TIME_WAIT, so a test can
    # reuse a source port at once (the datapath starts a new flow on a fresh SYN).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def family_of(host: str) -> socket.AddressFamily:
    """The socket family a client of `host` (an IPv4 or IPv6 literal) needs."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _any(family: socket.AddressFamily) -> str:
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def tcp_socket(lab: Lab, pod: str, sport: int | None = None, timeout: float = 10.0,
               family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = nsenter.socket_in(lab.pod_netns(pod), family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if sport is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_any(family), sport))
    return sock


def exchange(lab: Lab, pod: str, host: str, port: int, request: bytes = b"", sport: int | None = None,
             timeout: float = 10.0) -> bytes:
    """A new TCP connection from `pod` (of `host`'s family): send `request`, read until the server closes, reset."""
    sock = tcp_socket(lab, pod, sport, timeout, family_of(host))
    try:
        sock.connect((host, port))
        if request:
            sock.sendall(request)
        data = b""
        for _ in range(1000):                    # reads until the server closes
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        _linger_rst(sock)
    finally:
        sock.close()
    return data


def http_get(lab: Lab, pod: str, host: str, port: int, sport: int | None = None,
             timeout: float = 10.0) -> dict:
    """One HTTP request on a new connection from `pod`; the http-echo JSON answer."""
    authority = f"[{host}]" if ":" in host else host
    request = f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode()
    data = exchange(lab, pod, host, port, request, sport, timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        raise ValueError(f"bad HTTP answer from {host}:{port}: {data[:200]!r}")
    return json.loads(body)


def line_get(lab: Lab, pod: str, host: str, port: int, timeout: float = 10.0) -> str:
    """What a one-shot TCP server (socat ... EXEC:...) sends on a new connection."""
    return exchange(lab, pod, host, port, timeout=timeout).decode().strip()


def connect_outcome(lab: Lab, pod: str, host: str, port: int, timeout: float = 3.0) -> str:
    """'connected', 'refused' (RST), 'timeout' (no answer: dropped) or another errno name."""
    sock = tcp_socket(lab, pod, None, timeout, family_of(host))
    try:
        sock.connect((host, port))
        _linger_rst(sock)
        return "connected"
    except ConnectionRefusedError:
        return "refused"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()


def udp_socket(lab: Lab, pod: str, timeout: float = 5.0,
               family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = nsenter.socket_in(lab.pod_netns(pod), family, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    sock.bind((_any(family), 0))
    return sock


def udp_ask(sock: socket.socket, host: str, port: int, payload: bytes = b"hi") -> dict:
    """One datagram to host:port on `sock`'s flow; the udp-echo JSON answer."""
    sock.sendto(payload, (host, port))
    data, source = sock.recvfrom(65535)
    # The answer must come from the address the client sent to (reverse NAT), or the
    # client's socket could not tell it from an unrelated datagram. (An IPv6 source is
    # (address, port, flowinfo, scope id).)
    if source[:2] != (host, port):
        raise ValueError(f"answer from {source}, expected {(host, port)}")
    return json.loads(data)


def udp_ask_once(lab: Lab, pod: str, host: str, port: int, timeout: float = 5.0) -> dict:
    sock = udp_socket(lab, pod, timeout, family_of(host))
    try:
        return udp_ask(sock, host, port)
    finally:
        sock.close()


def wait_udp_bound(lab: Lab, client: str, pods, port: int) -> None:
    """Wait until each udp-echo pod answers on its own address: "ready" means only started for a
    UDP app (no probe), and a flow that reaches it before it binds gets port unreachable."""
    for pod in pods:
        probe = udp_socket(lab, client, timeout=1)
        try:
            wait_for(lambda: udp_ask(probe, lab.pod_ip(pod), port), what=f"{pod} bound")
        finally:
            probe.close()


class TcpStream:
    """A long-lived connection to a tcp-echo server: every line comes back prefixed by the pod name.
    From `pod`, or with external=True from the lab's external client of that name."""

    def __init__(self, lab: Lab, pod: str, host: str, port: int, timeout: float = 10.0, external: bool = False):
        if external:
            self.sock = nsenter.socket_in(lab.external_netns(pod), family_of(host), socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
        else:
            self.sock = tcp_socket(lab, pod, None, timeout, family_of(host))
        self.sock.connect((host, port))
        self.local = self.sock.getsockname()
        self._buf = b""

    def ask(self, text: str) -> str:
        """Send one line, return the echo 'pod: text'. Raises on reset, close or timeout."""
        self.sock.sendall(text.encode() + b"\n")
        for _ in range(1000):
            if b"\n" in self._buf:
                break
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"stream from {self.local} closed by the peer")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def backend(self) -> str:
        return self.ask("who").split(":", 1)[0]

    def close(self) -> None:
        try:
            _linger_rst(self.sock)
        except OSError:
            pass
        self.sock.close()


class Chatter(threading.Thread):
    """Runs exchanges over open flows in a loop (a round every 20 ms) until halted: traffic that
    goes on while the test changes things.  Records who answered each exchange and the first
    error (a reset, a close, a lost datagram); bounded in rounds and time."""

    def __init__(self, exchanges: dict[str, Callable[[], str]], max_seconds: float = 300):
        super().__init__(daemon=True, name="chatter")
        self.exchanges = exchanges
        self.answers: dict[str, list[str]] = {name: [] for name in exchanges}
        self.rounds = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._deadline = time.monotonic() + max_seconds

    def run(self) -> None:
        try:
            for _ in range(100_000):
                if self._halt.is_set() or time.monotonic() > self._deadline:
                    return
                for name, exchange in self.exchanges.items():
                    self.answers[name].append(exchange())
                self.rounds += 1
                self._halt.wait(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_rounds(self, more: int) -> None:
        """Wait until `more` further rounds went through (or an error stopped them)."""
        target = self.rounds + more
        wait_for(lambda: self.rounds >= target or self.error, what=f"{more} more rounds of traffic")

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def who_answered(self) -> dict[str, set[str]]:
        return {name: set(a) for name, a in self.answers.items()}


# -- the agents' pinned maps (read-only, through ebpfsvc.inspect) ---------------------------


@contextmanager
def node_maps(lab: Lab, node: str) -> Iterator[NodeMaps]:
    """The pinned maps of `node`'s agent, opened read-only."""
    with NodeMaps.open(names.pin_dir(lab.prefix, node)) as maps:
        yield maps


def rewrite_ct4(lab: Lab, node: str, edit: Callable[[Any, Any], bool | None]) -> int:
    """Change `node`'s ebpfsvc conntrack map in place, as eviction or a lost update would:
    `edit(key, entry)` gets each entry's struct ct4_key and a writable struct ct4_entry (cffi) and
    returns True to write the entry back, False to delete it, None to leave it. How many changed."""
    import ctypes
    import os

    from bcc import libbcc

    from ebpfsvc import abi

    with node_maps(lab, node) as maps:
        entries = list(maps.maps["ct4"].items())
    fd = libbcc.lib.bpf_obj_get(str(names.pin_dir(lab.prefix, node) / "ct4").encode())
    assert fd >= 0, "cannot open the pinned ct4 map"
    changed = 0
    try:
        for kb, vb in entries:
            entry = abi.ffi.from_buffer("struct ct4_entry *", bytearray(vb))
            verdict = edit(abi.ffi.from_buffer("struct ct4_key *", kb), entry)
            key = ctypes.create_string_buffer(kb, len(kb))
            if verdict is False:
                changed += libbcc.lib.bpf_delete_elem(fd, key) == 0
            elif verdict:
                value = bytes(abi.ffi.buffer(entry))
                changed += libbcc.lib.bpf_update_elem(fd, key, ctypes.create_string_buffer(value, len(value)), 0) == 0
    finally:
        os.close(fd)
    return changed


def frontend(lab: Lab, node: str, address: str, port: int, proto: str = "TCP") -> FrontendRow | None:
    """The pod-facing (internal scope) frontend address:port/proto on `node`, or None."""
    with node_maps(lab, node) as maps:
        return maps.frontend(address, port, proto, "internal")


def table_backends(lab: Lab, node: str, fe: FrontendRow) -> set[tuple[str, int]]:
    """(address, port) of every backend in a frontend's Maglev table on `node`."""
    with node_maps(lab, node) as maps:
        backends = maps.backends()
        return {(backends[i].address, backends[i].port) for i in set(maps.maglev_table(fe)) if i in backends}


def drops(lab: Lab, node: str) -> dict[str, int]:
    """The datapath's drop / reject counters on `node`, by reason."""
    with node_maps(lab, node) as maps:
        return maps.drops()


def programmed_services(lab: Lab, node: str) -> set[str]:
    """Names ("namespace/name:port/PROTO") of the service ports `node`'s agent has frontends for."""
    with node_maps(lab, node) as maps:
        return {fe.service for fe in maps.frontends() if fe.service}


def cluster_ip(lab: Lab, svc: str, family: int | None = None) -> str:
    """The Service's clusterIP: the primary, or the one of IP version `family` (4, 6) of its clusterIPs."""
    spec = lab.service(svc)["spec"]
    if family is None:
        return spec["clusterIP"]
    found = [ip for ip in spec.get("clusterIPs") or [spec["clusterIP"]] if (":" in ip) == (family == 6)]
    if not found:
        raise AssertionError(f"{svc} has no IPv{family} clusterIP: {spec.get('clusterIPs')}")
    return found[0]


def wait_programmed(lab: Lab, svc: str, port: int, backends: int, nodes: Iterable[str] | None = None,
                    proto: str = "TCP", timeout: float = SYNC_TIMEOUT, family: int | None = None) -> None:
    """Wait until every node's agent serves svc's clusterIP:port (the primary, or that of IP version
    `family`) with `backends` backends in its table."""
    vip = cluster_ip(lab, svc, family)
    for node in nodes or [n.name for n in lab.spec.nodes]:
        def done() -> bool:
            fe = frontend(lab, node, vip, port, proto)
            # A new node's agent writes its maps while its programs compile: served once they load.
            return fe is not None and fe.backend_count == backends and not lab.programs_compiling(node)

        wait_for(done, timeout, what=f"{node}: {svc} {vip}:{port}/{proto} with {backends} backends")


# The UDP query a hostNetwork client sends (a Python one-liner run in a node's namespace), either family.
NODE_UDP_QUERY = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"from the node")
print(s.recv(65535).decode())
"""


def wait_backend_gone(lab: Lab, address: str, nodes: Iterable[str] | None = None,
                      timeout: float = SYNC_TIMEOUT) -> None:
    """Wait until no node's backends map holds `address` (the writer deletes a backend after the
    frontends that used it, so a frontend's count can drop a moment before)."""
    for node in nodes or [n.name for n in lab.spec.nodes]:
        def done() -> bool:
            with node_maps(lab, node) as maps:
                return all(b.address != address for b in maps.backends().values())

        wait_for(done, timeout, what=f"{node}: backend {address} removed")


def wait_affinity(lab: Lab, svc: str, port: int, seconds: int, nodes: Iterable[str] | None = None,
                  timeout: float = SYNC_TIMEOUT, family: int | None = None) -> None:
    vip = cluster_ip(lab, svc, family)
    for node in nodes or [n.name for n in lab.spec.nodes]:
        def done() -> bool:
            fe = frontend(lab, node, vip, port)
            return fe is not None and fe.affinity_timeout == seconds

        wait_for(done, timeout, what=f"{node}: {svc} affinity timeout {seconds}")


def tc_programs(lab: Lab, node: str, link: str) -> list:
    """The BPF programs on `link`'s TC hooks in `node`'s namespace (TCX and clsact: tc.list_filters;
    `tc filter show` lists clsact filters only); [] when the link is not there (yet)."""
    import socket

    from ebpfsvc.datapath import nsenter, tc

    netns = lab.node_netns(node)
    try:
        ifindex = nsenter.run_in(netns, socket.if_nametoindex, link)
    except OSError:
        return []
    return tc.list_filters(ifindex, netns=netns)


def wait_agents_attached(lab: Lab, pods: Iterable[str], timeout: float = SYNC_TIMEOUT) -> None:
    """Wait until each pod's veth has the agent's TC programs (ingress and egress)."""
    for pod in pods:
        obj = lab.pod(pod)
        link = names.pod_host_link(obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
        node = obj["spec"]["nodeName"]

        def attached() -> bool:
            return {"from_pod", "to_pod"} <= {f.name for f in tc_programs(lab, node, link)}

        wait_for(attached, timeout, interval=0.3, what=f"TC programs on {link} ({pod})")


def wait_ready(lab: Lab, pods: Iterable[str]) -> None:
    lab.wait_ready(list(pods), timeout=READY_TIMEOUT)


@contextmanager
def tcp_udp_chatter(lab: Lab, prefix: str, client: str) -> Iterator["Chatter"]:
    """Pod `client` on node-1; a TCP echo Service `prefix`-tcp (port 7000) and a UDP echo Service
    `prefix`-udp (port 53) with their pod on node-2, programmed everywhere; a long-lived TCP stream
    and a UDP socket from the client to them, and a Chatter over both, running (5 rounds through)
    while the block runs. On the way out, also on failure, the chatter halts and both flows close,
    so a failed test leaves no thread talking into the lab it tears down."""
    from ebpfsvc.lab import apps

    tcp_app, udp_app = f"{prefix}-tcp", f"{prefix}-udp"
    lab.apply([bare_pod(client, "node-1"),
               apps.pod(tcp_app, "tcp-echo", 7000, node="node-2", labels={"app": tcp_app}),
               apps.pod(udp_app, "udp-echo", 5353, node="node-2", labels={"app": udp_app}),
               service(tcp_app, [{"port": 7000}], selector={"app": tcp_app}),
               service(udp_app, [{"port": 53, "targetPort": 5353, "protocol": "UDP"}], selector={"app": udp_app})])
    wait_ready(lab, [tcp_app, udp_app])
    wait_programmed(lab, tcp_app, 7000, backends=1)
    wait_programmed(lab, udp_app, 53, backends=1, proto="UDP")
    tcp_vip, udp_vip = cluster_ip(lab, tcp_app), cluster_ip(lab, udp_app)
    stream = wait_for(lambda: TcpStream(lab, client, tcp_vip, 7000), what="a stream")
    udp = udp_socket(lab, client, timeout=1)
    try:
        wait_for(lambda: udp_ask(udp, udp_vip, 53), what="a UDP answer (app binding)")
        udp.settimeout(5)
        chatter = Chatter({"tcp": stream.backend, "udp": lambda: udp_ask(udp, udp_vip, 53)["pod"]})
        chatter.start()
        try:
            chatter.wait_rounds(5)
            yield chatter
        finally:
            chatter.halt()
    finally:
        stream.close()
        udp.close()


def add_clients(lab: Lab, clients: dict[str, str]) -> Lab:
    """Process-less client pods {name: node}, returned once the agents' programs are on their veths."""
    lab.apply([bare_pod(name, node) for name, node in clients.items()])
    wait_agents_attached(lab, clients)
    return lab
