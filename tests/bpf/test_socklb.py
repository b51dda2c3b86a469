"""Socket-level load balancing (bpf/lb_sock.c): real sockets in namespaces and a cgroup.

BPF_PROG_TEST_RUN does not run cgroup sock_addr programs (this kernel, 6.18,
answers ENOTSUPP: the first test shows it), so these tests make real
connect(), sendto(), recvfrom() and getpeername() calls from a process in a
cgroup of the test's own, under the cgroup2 mount:

    node namespace  <prefix>-node: the pod veths' host sides, with the TC
                    programs (from_pod/to_pod) attached as the agent does
    pods            <prefix>-cli (client), <prefix>-b1, <prefix>-b2 (backends),
                    dual-stack (198.18.x and 2001:2:0:x::), so the IPv6 hooks
                    (connect6...) and a dual-stack socket's IPv4-mapped
                    addresses are tested beside the IPv4 ones
    cgroup          <cgroup2>/ebpfsvc-<prefix>/node-1, socket programs attached;
                    the client process joins .../node-1/pods/default_cli

The maps are filled only through the real MapWriter, shared by both paths. A
client outside the node's cgroup shows the TC path still serving the same Service.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import threading

import pytest

from ebpfsvc import abi
from ebpfsvc.datapath import loader, socklb, tc
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import cgroups, network
from ebpfsvc.lbmodel import Protocol

from .conftest import TEST_LIMITS
from .packets import CLIENT as FIXTURE_CLIENT, HAIRPIN, OK, Case, be, check, expected_backend, from_pod, frontend, \
    state, tcp, to_pod
from .podservers import Servers

pytestmark = pytest.mark.root

VIP, EMPTY_VIP, LOCAL_VIP, STICKY_VIP = "198.19.0.10", "198.19.0.11", "198.19.0.12", "198.19.0.13"
ONE_VIP = "198.19.0.14"         # one backend, b1
SERVED_VIP, NODE_SERVED_VIP = "198.19.0.15", "198.19.0.16"      # a server in the cgroup: b1, the node
SERVED6 = "2001:2:0:ff::15"
CLIENT, B1, B2 = "198.18.1.5", "198.18.2.1", "198.18.2.2"
VIP6, EMPTY6, LOCAL6, STICKY6 = "2001:2:0:ff::10", "2001:2:0:ff::11", "2001:2:0:ff::12", "2001:2:0:ff::13"
CLIENT6, B16, B26 = "2001:2:0:1::5", "2001:2:0:2::1", "2001:2:0:2::2"
MAPPED_VIP = f"::ffff:{VIP}"     # what a dual-stack socket names an IPv4 ClusterIP by
GATEWAY = ipaddress.IPv4Address(HAIRPIN)
NAMES = {B1: "b1", B2: "b2", B16: "b1", B26: "b2"}
ENOTSUPP = 524      # the kernel's own errno for "operation not supported" (no Python name)


@pytest.fixture
def node(unique_prefix, compiled):
    """The node namespace with three pods, TC programs on their veths, socket programs on
    the node's cgroup; maps written by MapWriter. Everything removed afterwards. Both programs
    are the run's (compiled once, tests/bpf/conftest.py), on maps emptied for this test."""
    node_ns = f"{unique_prefix}-node"
    pods = {CLIENT: f"{unique_prefix}-cli", B1: f"{unique_prefix}-b1", B2: f"{unique_prefix}-b2"}
    pod6 = {CLIENT: CLIENT6, B1: B16, B2: B26}
    made: list[str] = []
    servers = None
    node_cg = cgroups.node_cgroup(unique_prefix, "node-1")
    try:
        network.create_namespace(node_ns, forwarding=True, ipv6=True)
        made.append(node_ns)
        network.add_pod_gateway(node_ns, GATEWAY)
        # Maps of their own: while the run holds the socket programs, they use these maps, and
        # the `datapath` fixture's stay those of a node without the socket path.
        pod_dp = compiled.load(TEST_LIMITS, maps="socket-lb", hairpin_addr=HAIRPIN)
        sock_dp = compiled.load(TEST_LIMITS, maps="socket-lb", hairpin_addr=HAIRPIN, source=socklb.SOURCE,
                                programs=socklb.PROGRAMS, attach_types=socklb.HOOKS)
        for i, (addr, ns) in enumerate(pods.items()):
            network.create_namespace(ns, ipv6=True)
            made.append(ns)
            link = f"lxc{unique_prefix[2:]}{i}"
            network.add_pod(node_ns, ns, link, [addr, pod6[addr]], GATEWAY)
            idx = nsenter.run_in(node_ns, lambda link=link: socket.if_nametoindex(link))
            tc.attach(idx, pod_dp.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns=node_ns)
            tc.attach(idx, pod_dp.programs["to_pod"].fd, "to_pod", tc.EGRESS, netns=node_ns)
        cgroups.create(node_cg)
        socklb.attach(sock_dp, node_cg)
        servers = Servers({B1: pods[B1], B2: pods[B2], B16: pods[B1], B26: pods[B2]}, NAMES)
        frontends = (*_services((VIP, EMPTY_VIP, LOCAL_VIP, STICKY_VIP), (B1, B2), ""),
                     *_services((VIP6, EMPTY6, LOCAL6, STICKY6), (B16, B26), "6"))
        writer = MapWriter(pod_dp.maps)
        writer.apply(state(*frontends))
        yield _Node(unique_prefix, pods[CLIENT], node_cg, pod_dp, sock_dp, writer, frontends)
    finally:
        if servers:
            servers.close()
        socklb.detach(node_cg)
        cgroups.remove(unique_prefix)
        for ns in reversed(made):
            network.remove_namespace(ns)


def _services(vips, backends, suffix: str) -> list:
    """The fixture's Services of one family: web (TCP 80) and dns (UDP 53) on `vips[0]`, both empty on
    `vips[1]`, Local with no local endpoint on `vips[2]`, ClientIP affinity on `vips[3]`; the names
    end in `suffix`."""
    vip, empty, local, sticky = vips
    tcp_be = [be(b) for b in backends]
    return [frontend(vip, 80, tcp_be, name=f"web{suffix}"),
            frontend(vip, 53, [be(b, 5353, Protocol.UDP) for b in backends], proto=Protocol.UDP, name=f"dns{suffix}"),
            frontend(empty, 80, [], name=f"empty{suffix}"),
            frontend(empty, 53, [], proto=Protocol.UDP, name=f"empty{suffix}-dns"),
            frontend(local, 80, [], name=f"local{suffix}", local_only=True),
            frontend(sticky, 80, tcp_be, name=f"sticky{suffix}", affinity_timeout=60)]


class _Node:
    def __init__(self, prefix, client_ns, node_cg, pod_dp, sock_dp, writer, frontends):
        self.prefix, self.client_ns, self.cgroup = prefix, client_ns, node_cg
        self.pod_dp, self.sock_dp = pod_dp, sock_dp
        self.pin_dir = pod_dp.pin_dir
        self.writer, self.frontends = writer, frontends

    def add(self, *frontends) -> None:
        """The fixture's frontends and these, written by the same MapWriter."""
        self.writer.apply(state(*self.frontends, *frontends))

    def client(self, op, addr, port, *, in_cgroup=True) -> dict:
        """One client operation (ebpfsvc/lab/sockprobe.py) in the client pod, a process in the
        node's cgroup or outside it."""
        cg = cgroups.pod_cgroup(self.prefix, "node-1", "default", "cli") if in_cgroup else None
        out = subprocess.run([sys.executable, "-m", "ebpfsvc.lab.sockprobe", op, addr, str(port)],
                             preexec_fn=cgroups.preexec(self.client_ns, cg),
                             capture_output=True, text=True, timeout=20, check=True)
        return json.loads(out.stdout)

    def flows(self, table="ct4") -> int:
        return len(list(self.pod_dp.maps[table].keys()))

    def revnat(self, table="lb4_sock_revnat") -> int:
        """Entries of the socket path's reverse map: the sockets it translated."""
        return len(list(self.sock_dp.maps[table].keys()))

    def hold(self, kind, addr, port, count) -> tuple[subprocess.Popen, list[int]]:
        """`count` sockets held open by a client process in the node's cgroup (sockprobe hold);
        returns the process and the sockets' cookies."""
        cg = cgroups.pod_cgroup(self.prefix, "node-1", "default", "cli")
        proc = subprocess.Popen([sys.executable, "-m", "ebpfsvc.lab.sockprobe", "hold", kind, addr, str(port),
                                 str(count)], preexec_fn=cgroups.preexec(self.client_ns, cg), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline()
        assert line, f"sockprobe hold {kind} {addr}:{port} failed (exit {proc.poll()})"
        return proc, json.loads(line)["cookies"]

    def serve(self, netns: str, cgroup, addr: str, port: int, count: int) -> subprocess.Popen:
        """A TCP server (sockprobe serve) of `count` connections on addr:port, a process of `netns`
        in `cgroup` (a kubelet's pod, or the node's own process), listening when this returns."""
        proc = subprocess.Popen([sys.executable, "-m", "ebpfsvc.lab.sockprobe", "serve", addr, str(port), str(count)],
                                preexec_fn=cgroups.preexec(netns, cgroup), stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line, f"sockprobe serve {addr}:{port} failed (exit {proc.poll()})"
        return proc

    def marked(self, cookie: int) -> bool:
        """Whether lb_sock_path marks the socket `cookie` (the TC programs' fast exit)."""
        m = self._slot(cookie)
        return m.cookie == cookie and m.proto == socket.IPPROTO_TCP

    def marked_accepted(self, cookie: int) -> bool:
        """Whether that mark says sock_ops' (a server's accepted socket): getpeername4 skips
        its reverse lookup."""
        return self.marked(cookie) and bool(self._slot(cookie).flags & abi.LB_SOCK_PATH_F_ACCEPTED)

    def _slot(self, cookie: int):
        table = self.pod_dp.maps["lb_sock_path"]
        return table[table.Key(cookie % len(table))]

    def backend_of(self, cookie) -> str | None:
        """The backend the socket path sent the socket `cookie` to (its lb4_sock_revnat or
        lb6_sock_revnat entry)."""
        for key in self.sock_dp.maps["lb4_sock_revnat"].keys():
            if key.cookie == cookie:
                return abi.ip_of_be32(key.address)
        for key in self.sock_dp.maps["lb6_sock_revnat"].keys():
            if key.cookie == cookie:
                return abi.ip_of_be128(key.address)
        return None


def test_prog_test_run_does_not_run_sock_addr_programs(node):
    # Why these tests use real sockets: the kernel refuses to test-run this program type.
    with pytest.raises(OSError) as exc:
        prog_test_run(node.sock_dp.programs["connect4"].fd, bytes(64))
    assert exc.value.errno == ENOTSUPP


def test_programs_attached_to_the_node_cgroup_only(node):
    ids = socklb.attached(node.cgroup)
    assert set(ids) == set(socklb.HOOKS) and all(len(v) == 1 for v in ids.values())
    assert all(v == [] for v in socklb.attached(node.cgroup.parent).values())


def _answers(node, mode: str, vip: str, port: int, times: int, shown: str, why: str) -> set:
    """The names of the backends that answered `times` requests of the client (`mode`); each
    answer succeeded and its `shown` address is the Service's (`why`)."""
    seen = set()
    for _ in range(times):
        out = node.client(mode, vip, port)
        assert "errno" not in out, out
        assert out[shown][:2] == [vip, port], why     # IPv6: [address, port, flowinfo, scope]
        seen.add(out["data"])
    return seen


def test_tcp_connect_is_translated_at_the_socket(node):
    seen = _answers(node, "tcp", VIP, 80, 12, "peer", "getpeername shows the Service, not the backend")
    assert seen == {"b1", "b2"}, "sockets spread over both backends by the Maglev table"
    assert node.flows() == 0, "the TC path saw backend addresses only: no conntrack entry"
    assert len(list(node.sock_dp.maps["lb4_sock_revnat"].keys())) == 12


def test_empty_service_refused_at_connect(node):
    assert node.client("tcp", EMPTY_VIP, 80) == {"errno": "ECONNREFUSED"}
    assert node.client("udp-connected", EMPTY_VIP, 53) == {"errno": "ECONNREFUSED"}
    assert node.flows() == 0


def test_local_policy_without_local_endpoint_left_to_tc_which_drops(node):
    # internalTrafficPolicy Local, no endpoint on this node: kube-proxy drops, so the socket
    # path does not refuse; the SYN reaches the TC path, which drops it, and connect() times out.
    assert node.client("tcp", LOCAL_VIP, 80) == {"errno": "TimeoutError"}


def test_udp_unconnected_sendto_and_recvfrom_show_the_service(node):
    seen = _answers(node, "udp", VIP, 53, 8, "src", "recvfrom shows the Service as the reply's source")
    assert seen <= {"b1", "b2"} and seen
    assert node.flows() == 0


def test_udp_connected(node):
    out = node.client("udp-connected", VIP, 53)
    assert out.get("data") in ("b1", "b2"), out
    assert out["peer"] == [VIP, 53] and out["src"] == [VIP, 53]
    assert node.flows() == 0


# ---- IPv6 sockets: connect6, sendmsg6, recvmsg6, getpeername6 over the lb6_* maps ----

def test_ipv6_tcp_connect_is_translated_at_the_socket(node):
    seen = _answers(node, "tcp", VIP6, 80, 12, "peer", "getpeername shows the IPv6 Service, not the backend")
    assert seen == {"b1", "b2"}, "sockets spread over both backends by the Maglev table"
    assert node.flows("ct6") == 0, "the TC path saw backend addresses only: no conntrack entry"
    assert node.revnat("lb6_sock_revnat") == 12 and node.revnat() == 0


def test_ipv6_udp_sendto_recvfrom_and_connected_show_the_service(node):
    seen = _answers(node, "udp", VIP6, 53, 8, "src", "recvfrom shows the IPv6 Service as the reply's source")
    assert seen <= {"b1", "b2"} and seen
    out = node.client("udp-connected", VIP6, 53)
    assert out.get("data") in ("b1", "b2"), out
    assert out["peer"] == [VIP6, 53, 0, 0] and out["src"] == [VIP6, 53, 0, 0]
    assert node.flows("ct6") == 0 and node.revnat("lb6_sock_revnat") >= 2


def test_ipv6_empty_service_refused_at_connect(node):
    assert node.client("tcp", EMPTY6, 80) == {"errno": "ECONNREFUSED"}
    assert node.client("udp-connected", EMPTY6, 53) == {"errno": "ECONNREFUSED"}
    assert node.flows("ct6") == 0


def test_ipv6_local_policy_and_affinity_left_to_tc(node):
    # As for IPv4: Local with no local endpoint is the TC path's drop; ClientIP affinity its entry.
    assert node.client("tcp", LOCAL6, 80) == {"errno": "TimeoutError"}
    answers = {node.client("tcp", STICKY6, 80)["data"] for _ in range(4)}
    assert len(answers) == 1 and node.revnat("lb6_sock_revnat") == 0
    assert node.flows("ct6") >= 2


def test_ipv6_client_outside_the_node_cgroup_still_served_by_tc(node):
    out = node.client("tcp", VIP6, 80, in_cgroup=False)
    assert out.get("data") in ("b1", "b2") and out["peer"] == [VIP6, 80, 0, 0], out
    assert node.flows("ct6") == 2 and node.revnat("lb6_sock_revnat") == 0


def test_ipv4_mapped_address_takes_the_ipv4_logic(node):
    """A dual-stack (AF_INET6) socket naming the IPv4 ClusterIP as ::ffff:a.b.c.d: connect6 serves
    it with the IPv4 frontend and lb4_sock_revnat, and getpeername6/recvmsg6 show the mapped
    Service; its packets are IPv4, untouched by TC."""
    # 16 sockets: each lands on a backend by its cookie's hash, so 8 of them all took one of the two
    # in about 1 run of 128 (a CI run on 2026-12-05 did); 16 do so in 1 of 32,768.
    seen = _answers(node, "tcp", MAPPED_VIP, 80, 16, "peer", "getpeername shows the mapped Service")
    assert seen == {"b1", "b2"}
    assert node.revnat() == 16 and node.revnat("lb6_sock_revnat") == 0
    _answers(node, "udp", MAPPED_VIP, 53, 3, "src", "recvfrom shows the mapped Service")
    out = node.client("udp-connected", MAPPED_VIP, 53)
    assert out["peer"] == [MAPPED_VIP, 53, 0, 0] and out["src"] == [MAPPED_VIP, 53, 0, 0], out
    assert node.client("tcp", f"::ffff:{EMPTY_VIP}", 80) == {"errno": "ECONNREFUSED"}
    assert node.flows() == 0 and node.flows("ct6") == 0


def test_client_ip_affinity_stays_with_the_tc_path(node):
    # The socket hooks cannot key affinity by a client address an unbound socket does not have:
    # they leave such a Service to TC, whose affinity entry then holds for every connection.
    answers = set()
    for _ in range(6):
        out = node.client("tcp", STICKY_VIP, 80)
        assert out["peer"] == [STICKY_VIP, 80], out
        answers.add(out["data"])
    assert len(answers) == 1
    assert node.flows() >= 2 and len(list(node.sock_dp.maps["lb4_sock_revnat"].keys())) == 0
    assert [k.client_addr for k in node.pod_dp.maps["lb4_affinity"].keys()] == [loader.be32(CLIENT)]


def test_client_outside_the_node_cgroup_still_served_by_tc(node):
    out = node.client("tcp", VIP, 80, in_cgroup=False)
    assert out.get("data") in ("b1", "b2") and out["peer"] == [VIP, 80], out
    assert node.flows() == 2, "forward and reply entries of the TC path's flow"
    assert len(list(node.sock_dp.maps["lb4_sock_revnat"].keys())) == 0


def test_translated_socket_passes_the_tc_programs_untouched(node):
    """connect4 marks the socket it translated (lb_sock_path); from_pod lets that socket's packets to
    its backend pass before any lookup. Shown with a frontend the TC path would otherwise apply to
    them: b1's own address and port, balanced to b2. A socket that was not translated (a process
    outside the cgroup) meets the same frontend and is translated by TC."""
    node.add(frontend(ONE_VIP, 80, [be(B1)], name="one"),
             frontend(ONE_VIP, 53, [be(B1, 5353, Protocol.UDP)], proto=Protocol.UDP, name="one-dns"),
             frontend(B1, 8080, [be(B2)], name="pod-address"),
             frontend(B1, 5353, [be(B2, 5353, Protocol.UDP)], proto=Protocol.UDP, name="pod-address-dns"))
    for _ in range(3):
        out = node.client("tcp", ONE_VIP, 80)
        assert (out.get("data"), out.get("peer")) == ("b1", [ONE_VIP, 80]), out
        out = node.client("udp-connected", ONE_VIP, 53)
        assert (out.get("data"), out.get("src")) == ("b1", [ONE_VIP, 53]), out
    assert node.flows() == 0, "no TC flow for the marked sockets' packets, though they matched a frontend"
    # Unconnected UDP is balanced per datagram by sendmsg4 and not marked: its datagram to b1 meets
    # the frontend at b1's address in from_pod, which sends it on to b2.
    out = node.client("udp", ONE_VIP, 53)
    assert out.get("data") == "b2" and node.flows() == 2, out
    out = node.client("tcp", B1, 8080, in_cgroup=False)
    assert (out.get("data"), out.get("peer")) == ("b2", [B1, 8080]), "an unmarked socket: TC translates"
    assert node.flows() == 4


def _accepted(server: subprocess.Popen) -> list[dict]:
    out, _ = server.communicate(timeout=20)
    assert out, f"the server did not accept every connection (exit {server.returncode})"
    return json.loads(out)["accepted"]


@pytest.mark.parametrize("vip,backend,client", [(SERVED_VIP, B1, CLIENT), (SERVED6, B16, CLIENT6)],
                         ids=["ipv4", "ipv6"])
def test_server_socket_marked_when_no_conntrack_entry_describes_it(node, vip, backend, client):
    """sock_ops: b1's server is a process in the node's cgroup (as a kubelet's pod is). The socket
    path's client leaves no conntrack entry, so the accepted socket is marked and its replies pass
    from_pod unparsed; a TC-path client (outside the cgroup) leaves the flow's entries, so that
    accepted socket is not. Both are answered, and see the Service as their peer."""
    node.add(frontend(vip, 80, [be(backend, 8082)], name="served"))
    server = node.serve(f"{node.prefix}-b1", cgroups.pod_cgroup(node.prefix, "node-1", "default", "b1"),
                        backend, 8082, 2)
    try:
        socket_path = node.client("tcp", vip, 80)
        tc_path = node.client("tcp", vip, 80, in_cgroup=False)
        first, second = _accepted(server)
    finally:
        server.kill()
        server.wait()
    peer = [vip, 80] if ":" not in vip else [vip, 80, 0, 0]
    assert socket_path == {"peer": peer, "data": "served\n"}, socket_path
    assert tc_path == {"peer": peer, "data": "served\n"}, tc_path
    assert first["peer"][0] == second["peer"][0] == client
    assert node.marked(first["cookie"]), "the socket path's connection: marked on the server side"
    assert node.marked_accepted(first["cookie"]), "... as an accepted socket: accept()'s getpeername4 ends there"
    assert not node.marked(second["cookie"]), "the TC path's connection: its entries describe it"
    assert node.flows("ct6" if ":" in vip else "ct4") == 2


def test_node_process_serving_a_tc_client_keeps_its_reverse_nat(node):
    """A process of the node's own namespace, in its cgroup, is the backend (a hostNetwork pod on the
    node's address): its replies to a TC-path client leave through the client's to_pod, which must
    give them the Service's address back. Its accepted socket has the flow's reply entry, so it is
    not marked; a socket-path client's is, and its replies need nothing."""
    node.add(frontend(NODE_SERVED_VIP, 80, [be(HAIRPIN, 8083)], name="node-served"))
    server = node.serve(f"{node.prefix}-node", node.cgroup, HAIRPIN, 8083, 2)
    try:
        tc_path = node.client("tcp", NODE_SERVED_VIP, 80, in_cgroup=False)
        socket_path = node.client("tcp", NODE_SERVED_VIP, 80)
        first, second = _accepted(server)
    finally:
        server.kill()
        server.wait()
    assert tc_path == {"peer": [NODE_SERVED_VIP, 80], "data": "served\n"}, "reverse NAT at to_pod"
    assert socket_path == {"peer": [NODE_SERVED_VIP, 80], "data": "served\n"}, socket_path
    assert not node.marked(first["cookie"]) and node.marked(second["cookie"])


def test_detach_leaves_no_program(node):
    assert sorted(socklb.detach(node.cgroup)) == sorted(socklb.HOOKS)
    assert all(v == [] for v in socklb.attached(node.cgroup).values())
    assert socklb.detach(node.cgroup) == []
    out = node.client("tcp", VIP, 80)       # the TC path takes over
    assert out["peer"] == [VIP, 80] and node.flows() == 2


def test_cleanup_detaches_the_socket_programs(node):
    from ebpfsvc.datapath.cleanup import cleanup

    pin_dir = node.pin_dir

    report = cleanup(pin_dir, netns=f"{node.prefix}-node", dry_run=True, socket_lb_cgroup=node.cgroup)
    assert sorted(f.split()[2] for f in report.filters if f.startswith("cgroup program")) == sorted(socklb.HOOKS)
    assert all(socklb.attached(node.cgroup).values()), "a dry run detaches nothing"
    cleanup(pin_dir, netns=f"{node.prefix}-node", socket_lb_cgroup=node.cgroup)
    assert all(v == [] for v in socklb.attached(node.cgroup).values())
    assert not pin_dir.exists()


class Holders:
    """A TCP server on port 8081 in each backend pod that keeps every connection open."""

    def __init__(self, netns_of: dict[str, str]):
        self.listeners, self.conns = [], []
        for addr, ns in netns_of.items():
            s = nsenter.socket_in(ns, socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, 8081))
            s.listen(64)
            self.listeners.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s):
        while True:
            try:
                self.conns.append(s.accept()[0])
            except OSError:
                return

    def close(self):
        for s in self.listeners + self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _command(proc, command: str) -> list:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())["sockets"]


@pytest.mark.parametrize("vip,b1,b2,named", [
    (VIP, B1, B2, VIP),
    (VIP6, B16, B26, VIP6),
    (VIP, B1, B2, MAPPED_VIP),        # dual-stack sockets (AF_INET6) on the IPv4 Service
], ids=["ipv4", "ipv6", "ipv4-mapped"])
def test_removed_backend_resets_socket_path_sockets(node, vip, b1, b2, named):
    """B2 leaves both Services: the socket path's TCP connections and connected UDP sockets to it
    are destroyed (SOCK_DESTROY), as the TC path resets flows whose conntrack entry names it; the
    ones to B1, and a connection straight to B2's address (never translated), are left alone.
    The client names the Service `named`: IPv6 sockets are found in lb6_sock_revnat, dual-stack
    ones on an IPv4 Service (an IPv4-mapped peer) in lb4_sock_revnat."""
    held = frontend(vip, 81, [be(b1, 8081), be(b2, 8081)], name="held")
    dns = frontend(vip, 53, [be(b1, 5353, Protocol.UDP), be(b2, 5353, Protocol.UDP)], proto=Protocol.UDP, name="dns")
    writer = MapWriter(node.pod_dp.maps)
    writer.apply(state(held, dns))
    holders = Holders({b1: f"{node.prefix}-b1", b2: f"{node.prefix}-b2"})
    direct = f"::ffff:{b2}" if named == MAPPED_VIP else b2
    # getpeername of an AF_INET6 socket: [address, port, flowinfo, scope id]
    tail = [0, 0] if ":" in named else []
    procs = []
    try:
        (tcp_proc, tcp_cookies), (udp_proc, udp_cookies), (direct_proc, _) = (
            procs.append(h) or h for h in (node.hold("tcp", named, 81, 16), node.hold("udp", named, 53, 16),
                                           node.hold("tcp", direct, 8081, 1)))
        tcp_to = [node.backend_of(c) for c in tcp_cookies]
        udp_to = [node.backend_of(c) for c in udp_cookies]
        # 16 sockets over two backends with ~half the table each: one unused, p = 2 * 2^-16.
        assert set(tcp_to) == {b1, b2} and set(udp_to) == {b1, b2}, (tcp_to, udp_to)
        keeps = socklb.keeps_in_maps(writer)

        report = socklb.reset_removed(node.cgroup, node.sock_dp.maps, keeps)
        assert not report and report.namespaces == 1 and report.errors == [], "nothing removed: nothing reset"

        stats = writer.apply(state(held._replace(backends=(be(b1, 8081),)),
                                   dns._replace(backends=(be(b1, 5353, Protocol.UDP),))))
        assert stats.backends_deleted == 2
        report = socklb.reset_removed(node.cgroup, node.sock_dp.maps, keeps)
        assert report.errors == []
        assert report.destroyed == {"TCP": tcp_to.count(b2), "UDP": udp_to.count(b2)}

        for kind, proc, backends, port in (("TCP", tcp_proc, tcp_to, 81), ("UDP", udp_proc, udp_to, 53)):
            for backend, sock in zip(backends, _command(proc, "check")):
                if backend == b2:
                    assert sock == {"error": "ECONNABORTED", "peer": "ENOTCONN"}, (kind, sock)
                else:
                    assert sock == {"error": None, "peer": [named, port, *tail]}, (kind, sock)
        assert _command(direct_proc, "check") == [{"error": None, "peer": [direct, 8081, *tail]}], \
            "a pod's own connection to a pod address is no socket-path socket"
        # The UDP sockets that lived on answer through B1 still.
        answers = _command(udp_proc, "ask")
        assert {a for a, backend in zip(answers, udp_to) if backend == b1} == {"b1"}, answers
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()
        holders.close()


def test_socket_connects_counted_per_frontend_and_path_shown(node):
    """lb_sock_stats counts what the socket path translated per frontend (the TC counters never see
    these flows); `service list` and `why` read it and say which path east-west traffic takes."""
    from click.testing import CliRunner

    from ebpfsvc.cli import main
    from ebpfsvc.inspect import views
    from ebpfsvc.inspect.node import NodeMaps

    pin_dir = node.pin_dir
    for _ in range(5):
        assert "errno" not in node.client("tcp", VIP, 80)
    for _ in range(2):
        assert "errno" not in node.client("tcp", VIP6, 80)
    for op in ("udp", "udp", "udp", "udp-connected", "udp-connected"):
        assert "errno" not in node.client(op, VIP, 53)
    assert node.client("tcp", EMPTY_VIP, 80) == {"errno": "ECONNREFUSED"}      # refused: a drop, no connect
    out = CliRunner().invoke(main, ["service", "list", "--pin-dir", str(pin_dir), "-o", "json"])
    assert out.exit_code == 0, out.output
    rows = {fe["frontend"]: fe for svc in json.loads(out.output) for fe in svc["frontends"]}
    assert (rows[f"{VIP}:80/TCP"]["path"], rows[f"{VIP}:80/TCP"]["socket_connects"]) == ("socket", 5)
    # three datagrams of unconnected sockets, two connect()s
    assert (rows[f"{VIP}:53/UDP"]["path"], rows[f"{VIP}:53/UDP"]["socket_connects"]) == ("socket", 5)
    assert rows[f"{VIP}:80/TCP"]["packets"] == 0, "no packet of theirs met a TC program"
    assert (rows[f"{EMPTY_VIP}:80/TCP"]["path"], rows[f"{EMPTY_VIP}:80/TCP"]["socket_connects"]) == ("socket", 0)
    assert rows[f"{STICKY_VIP}:80/TCP"]["path"] == "tc (sessionAffinity)"
    assert rows[f"{LOCAL_VIP}:80/TCP"]["path"] == "tc (Local, no local endpoint)"
    assert (rows[f"[{VIP6}]:80/TCP"]["path"], rows[f"[{VIP6}]:80/TCP"]["socket_connects"]) == ("socket", 2)
    assert rows[f"[{STICKY6}]:80/TCP"]["path"] == "tc (sessionAffinity)"
    assert rows[f"[{LOCAL6}]:80/TCP"]["path"] == "tc (Local, no local endpoint)"
    from prometheus_client import CollectorRegistry

    from ebpfsvc.collectors import DatapathCollector

    registry = CollectorRegistry()
    collector = DatapathCollector(pin_dir)
    registry.register(collector)
    try:
        assert registry.get_sample_value("ebpfsvc_service_socket_connects_total",
                                         {"service_port": "default/dns/UDP"}) == 5
        assert registry.get_sample_value("ebpfsvc_frontend_socket_connects_total", {
            "service_port": "default/web/TCP", "frontend": f"{VIP}:80/TCP", "scope": "internal",
            "kind": "ClusterIP"}) == 5
    finally:
        collector.close()
    with NodeMaps.open(pin_dir) as maps:
        # the four that translate (recvmsg and getpeername read the reverse maps only)
        assert maps.socket_programs() == ["connect4", "connect6", "sendmsg4", "sendmsg6"]
        (sock_step,) = [s for s in views.why(maps, CLIENT, VIP, 80, "TCP")["steps"] if s["step"] == "socket path"]
        assert sock_step["path"] == "socket" and "connect()" in sock_step["outcome"]
        (sock_step,) = [s for s in views.why(maps, CLIENT, STICKY_VIP, 80, "TCP")["steps"]
                        if s["step"] == "socket path"]
        assert sock_step["path"] == "tc (sessionAffinity)"
        (sock_step,) = [s for s in views.why(maps, CLIENT6, VIP6, 80, "TCP")["steps"] if s["step"] == "socket path"]
        assert sock_step["path"] == "socket"


def test_without_socket_programs_east_west_takes_tc(datapath, writer):
    from ebpfsvc.inspect import views
    from ebpfsvc.inspect.node import NodeMaps

    writer.apply(state(frontend(VIP, 80, [be(B1)])))
    with NodeMaps.open(datapath.pin_dir) as maps:
        assert maps.socket_programs() == []
        (fe,) = views.service_list(maps)[0]["frontends"]
        assert (fe["path"], fe["socket_connects"]) == ("tc", 0)


def test_the_cgroup2_root_is_refused(node):
    with pytest.raises(socklb.CgroupError, match="cgroup2 root"):
        socklb.attach(node.sock_dp, socklb.cgroup2_mount())


# ---- the TC path meets a socket-path connection on a finished flow's ports (BPF_PROG_TEST_RUN) ----

def test_syn_ack_on_a_closed_flow_is_not_translated(datapath, writer):
    """A client's connection through the TC path closes; the client then connects straight to
    the backend (socket path) from the same port. The backend's SYN-ACK meets the closed flow's
    reply entry in to_pod: it must reach the client untranslated, or the client resets it."""
    web = frontend(VIP, 80, [be(B1), be(B2)])
    writer.apply(state(web))
    b = expected_backend(web, FIXTURE_CLIENT, 40000)
    check(datapath, Case("SYN to the Service", "from_pod", from_pod(tcp(FIXTURE_CLIENT, VIP, 40000, 80, "S")), OK,
                         from_pod(tcp(FIXTURE_CLIENT, b, 40000, 8080, "S"))))
    check(datapath, Case("its SYN-ACK: from the Service", "to_pod", to_pod(tcp(b, FIXTURE_CLIENT, 8080, 40000, "SA")),
                         OK, to_pod(tcp(VIP, FIXTURE_CLIENT, 80, 40000, "SA"))))
    check(datapath, Case("client RST closes it", "from_pod", from_pod(tcp(FIXTURE_CLIENT, VIP, 40000, 80, "R")), OK,
                         from_pod(tcp(FIXTURE_CLIENT, b, 40000, 8080, "R"))))
    check(datapath, Case("SYN straight to the backend: not a Service packet", "from_pod",
                         from_pod(tcp(FIXTURE_CLIENT, b, 40000, 8080, "S", seq=5000)), OK))
    check(datapath, Case("its SYN-ACK passes untranslated", "to_pod",
                         to_pod(tcp(b, FIXTURE_CLIENT, 8080, 40000, "SA", seq=9000, ack=5001)), OK))
    # A new connection through the Service on the same ports is translated again.
    check(datapath, Case("new SYN to the Service", "from_pod",
                         from_pod(tcp(FIXTURE_CLIENT, VIP, 40000, 80, "S", seq=7000)), OK,
                         from_pod(tcp(FIXTURE_CLIENT, b, 40000, 8080, "S", seq=7000))))
    check(datapath, Case("its SYN-ACK: from the Service", "to_pod",
                         to_pod(tcp(b, FIXTURE_CLIENT, 8080, 40000, "SA", seq=9500, ack=7001)), OK,
                         to_pod(tcp(VIP, FIXTURE_CLIENT, 80, 40000, "SA", seq=9500, ack=7001))))


def test_fast_exit_never_fires_for_a_packet_without_a_marked_socket(datapath, writer):
    """BPF_PROG_TEST_RUN's packet has no socket of ours (the kernel gives it a dummy one without
    storage), so the fast exit cannot be shown here, only that it leaves everything else to the
    full path: a packet to a frontend at a pod's own address is translated as before. The marked
    case is test_translated_socket_passes_the_tc_programs_untouched, with real sockets."""
    writer.apply(state(frontend(B1, 8080, [be(B2)], name="pod-address")))
    check(datapath, Case("SYN to a frontend at a pod address, no marked socket", "from_pod",
                         from_pod(tcp(FIXTURE_CLIENT, B1, 40000, 8080, "S")), OK,
                         from_pod(tcp(FIXTURE_CLIENT, B2, 40000, 8080, "S"))))
    check(datapath, Case("its SYN-ACK reverse-NATed", "to_pod", to_pod(tcp(B2, FIXTURE_CLIENT, 8080, 40000, "SA")),
                         OK, to_pod(tcp(B1, FIXTURE_CLIENT, 8080, 40000, "SA"))))
