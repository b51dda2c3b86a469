"""Fixtures for the north-south (uplink) datapath tests: bpf/lb_node.c.

The uplink programs send SNATed packets to their next hop themselves
(bpf_fib_lookup + bpf_redirect), so what they write depends on routes and
neighbours. Each test therefore runs its programs inside a private network
namespace, `<prefix>-np`, that looks like node-1 of the lab: an uplink with
198.18.0.11/24 and a fixed MAC, permanent neighbours for node-2 and the
external client, a route to node-2's pod CIDR. BPF_PROG_TEST_RUN resolves
routes in the caller's namespace, so the run happens on a thread inside it
(ebpfsvc.datapath.nsenter.run_in); nothing touches the root namespace.

Address plan (198.18.0.0/15 only): node 198.18.0.11 (uplink, NodePort and SNAT
address), node-2 198.18.0.12, external client 198.18.0.100 (second client
.101), local pods 198.18.1.x, node-2's pods 198.18.2.x, LB/external IPs
198.18.200.x.
"""

from __future__ import annotations

import ipaddress

import pytest
from pyroute2 import IPRoute, netns
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from ebpfsvc import abi
from ebpfsvc.datapath import loader
from ebpfsvc.datapath.flowhash import flow_hash
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.datapath import nsenter
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, FrontendKind, Protocol, Scope, ServicePortName

from .conftest import TEST_LIMITS
from .packets import HAIRPIN, OK, REDIRECT, SHOT, tcp, udp

NODE = "198.18.0.11"
NODE2 = "198.18.0.12"
CLIENT = "198.18.0.100"
CLIENT2 = "198.18.0.101"
LOCAL_BE = "198.18.1.2"
LOCAL_BE2 = "198.18.1.3"
REMOTE_BE = "198.18.2.2"
REMOTE_BE2 = "198.18.2.3"
LB_IP = "198.18.200.10"
EXT_IP = "198.18.200.32"

# IPv6 twins (2001:2::/48, RFC 5180): the uplink's 2001:2::/64, local pods 2001:2:0:1::/64,
# node-2's pods 2001:2:0:2::/64 (routed via node-2), external addresses 2001:2:0:c8::/64.
NODE6 = "2001:2::11"
NODE2_6 = "2001:2::12"
CLIENT6 = "2001:2::100"
CLIENT2_6 = "2001:2::101"
LOCAL_BE6 = "2001:2:0:1::2"
LOCAL_BE6_2 = "2001:2:0:1::3"
REMOTE_BE6 = "2001:2:0:2::2"
LB_IP6 = "2001:2:0:c8::10"
EXT_IP6 = "2001:2:0:c8::32"

NODE_MAC = "02:00:00:00:00:11"
POD_VETH_MAC = "02:00:00:00:02:fe"    # the host side of a test's pod veth (pod_veth)
LOCAL_POD_MAC = "02:00:00:00:02:01"   # the local pod behind it
NODE2_MAC = "02:00:00:00:00:12"
CLIENT_MAC = "02:00:00:00:01:00"
CLIENT2_MAC = "02:00:00:00:01:01"

A = ipaddress.IPv4Address
LIMITS = loader.Limits(**{**TEST_LIMITS.__dict__, "snat_entries": 4096, "source_ranges": 256})

XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
XDP_NAMES = {1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}

__all__ = ["OK", "SHOT", "REDIRECT", "XDP_DROP", "XDP_PASS", "XDP_TX", "XDP_REDIRECT"]


def ext_frontend(addr=NODE, port=30080, backends=(), proto=Protocol.TCP, kind=FrontendKind.NODE_PORT,
                 name="web", **kw) -> Frontend:
    return Frontend(key=FrontendKey(ipaddress.ip_address(addr), port, proto, Scope.EXTERNAL),
                    service=ServicePortName("default", name, "", proto), kind=kind,
                    backends=tuple(backends), **kw)


def be(addr, port=8080, proto=Protocol.TCP, local=False, **kw) -> Backend:
    return Backend(ipaddress.ip_address(addr), port, proto, local=local, **kw)


# externalTrafficPolicy Local and pods of other nodes (--cluster-cidr, issue 17 item 8).
NODE2_POD = "198.18.2.50"          # a client pod on node-2: inside the cluster CIDR below
CLUSTER_CIDR = "198.18.2.0/23"     # node-2's pods (the fixture's fabric routes 198.18.2.0/24 via node-2)


def local_policy_with_only_a_remote_endpoint(node: str = NODE, remote: str = REMOTE_BE) -> tuple[Frontend, Frontend]:
    """ETP Local on node-1's NodePort 30085 with no endpoint here, and its INTERNAL twin (as desired.py
    makes it) with the cluster-wide one, REMOTE_BE on node-2 (NODE6 and REMOTE_BE6: the IPv6 pair)."""
    external = ext_frontend(node, 30085, [], local_only=True, name="etp-local-remote")
    internal = Frontend(key=FrontendKey(ipaddress.ip_address(node), 30085, Protocol.TCP, Scope.INTERNAL),
                        service=ServicePortName("default", "etp-local-remote", "", Protocol.TCP),
                        kind=FrontendKind.NODE_PORT, backends=(be(remote),))
    return external, internal


def snat_port(client: str, frontend: str, sport: int, dport: int, proto: int = 6, probe: int | None = None) -> int:
    """The SNAT source port the datapath gives a new flow (np4_snat_alloc). `probe` None: its
    first choice, a TCP client's own port (from SNAT_KEEP_PORT_MIN) or else the range port its
    hash names; `probe` k: the range port k past that hash (the ports before were taken)."""
    if probe is None:
        if proto == 6 and sport >= abi.SNAT_KEEP_PORT_MIN:
            return sport
        probe = 0
    n = abi.SNAT_PORT_MAX - abi.SNAT_PORT_MIN + 1
    return abi.SNAT_PORT_MIN + (flow_hash(client, frontend, sport, dport, proto) + probe) % n


def from_client(l3: Packet, mac: str = CLIENT_MAC) -> Packet:
    return Ether(src=mac, dst=NODE_MAC) / l3


def hop(l3: Packet) -> Packet:
    """`l3` after a router's hop: TTL - 1 (scapy recomputes the header checksum), or the hop limit
    - 1 for IPv6."""
    from scapy.layers.inet6 import IPv6

    out = l3.copy()
    if IPv6 in out:
        out[IPv6].hlim -= 1
        return out
    out[IP].ttl -= 1
    del out[IP].chksum
    return out


def to_client(l3: Packet, mac: str = CLIENT_MAC) -> Packet:
    return Ether(src=NODE_MAC, dst=mac) / l3


def forwarded_to_client(l3: Packet, mac: str = CLIENT_MAC) -> Packet:
    """A packet we forward to the client ourselves (np4_redirect / XDP_TX): one hop less."""
    return to_client(hop(l3), mac)


def from_node2(l3: Packet) -> Packet:
    return Ether(src=NODE2_MAC, dst=NODE_MAC) / l3


def to_local_pod(l3: Packet) -> Packet:
    """A packet sent into the local pod behind the test's pod veth (pod_veth)."""
    return Ether(src=POD_VETH_MAC, dst=LOCAL_POD_MAC) / l3


def to_node2(l3: Packet) -> Packet:
    """A packet we forward to node-2 ourselves (np4_redirect / XDP_TX): one hop less."""
    return Ether(src=NODE_MAC, dst=NODE2_MAC) / hop(l3)


def build_netns(name: str) -> None:
    """node-1's view of the fabric, with everything the FIB lookups need resolved."""
    netns.create(name)
    try:
        nsenter.run_in(name, _configure_netns)
        nsenter.write_sysctls(name, {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
    except BaseException:
        netns.remove(name)
        raise


def _configure_netns() -> None:
    # Run on a thread inside the namespace (nsenter.run_in): pyroute2's NetNS(name) would fork a
    # helper, and a forked copy of pytest must never reach the cleanup above.
    with IPRoute() as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        ns.link("add", ifname="eth0", kind="veth", peer={"ifname": "peer0"})
        idx = ns.link_lookup(ifname="eth0")[0]
        peer = ns.link_lookup(ifname="peer0")[0]
        ns.link("set", index=idx, address=NODE_MAC)
        ns.addr("add", index=idx, address=NODE, prefixlen=24)
        ns.link("set", index=peer, state="up")
        ns.link("set", index=idx, state="up")
        ns.addr("add", index=idx, address=NODE6, prefixlen=64, flags=0x02)      # IFA_F_NODAD
        for addr, mac in ((NODE2, NODE2_MAC), (CLIENT, CLIENT_MAC), (CLIENT2, CLIENT2_MAC),
                          (NODE2_6, NODE2_MAC), (CLIENT6, CLIENT_MAC), (CLIENT2_6, CLIENT2_MAC)):
            ns.neigh("add", dst=addr, lladdr=mac, ifindex=idx, state=0x80)   # NUD_PERMANENT
        ns.route("add", dst="198.18.2.0/24", gateway=NODE2, oif=idx)
        ns.route("add", dst="2001:2:0:2::/64", gateway=NODE2_6, oif=idx)


class Uplink:
    """The loaded uplink programs, their maps' writer, and a runner inside the test namespace."""

    def __init__(self, dp, netns_name: str):
        self.dp = dp
        self.netns = netns_name
        self.writer = MapWriter(dp.maps)

    def run(self, prog: str, packet, ifindex: int | None = None):
        fd = self.dp.programs[prog].fd
        return nsenter.run_in(self.netns, lambda: prog_test_run(fd, bytes(packet), ifindex=ifindex))

    def ifindex(self, ifname: str) -> int:
        """An interface's index in the test namespace (to run a program as if on that device)."""
        def lookup() -> int:
            with IPRoute() as ipr:
                return ipr.link_lookup(ifname=ifname)[0]

        return nsenter.run_in(self.netns, lookup)

    def check(self, desc: str, prog: str, packet, verdict: int, expect=None, ifindex: int | None = None):
        res = self.run(prog, packet, ifindex)
        names = {OK: "TC_ACT_OK", SHOT: "TC_ACT_SHOT", REDIRECT: "TC_ACT_REDIRECT"}
        assert res.verdict == names[verdict], f"{desc}: verdict {res.verdict}"
        if verdict != SHOT:
            want = bytes(expect if expect is not None else packet)
            assert res.data == want, f"{desc}:\n got  {Ether(res.data)!r}\n want {Ether(want)!r}"
        return res

    def check_xdp(self, desc: str, packet, action: int, expect=None):
        """Run xdp_uplink: `action` is XDP_* (numbers below); output compared unless dropped."""
        res = self.run("xdp_uplink", packet)
        assert res.retval == action, f"{desc}: XDP action {XDP_NAMES.get(res.retval, res.retval)}, " \
                                     f"want {XDP_NAMES[action]}"
        if action != XDP_DROP:
            want = bytes(expect if expect is not None else packet)
            assert res.data == want, f"{desc}:\n got  {Ether(res.data)!r}\n want {Ether(want)!r}"
        return res

    def drops(self, reason: int) -> int:
        return sum(self.dp.maps["lb_drops"][self.dp.maps["lb_drops"].Key(reason)])


def remote_tcp_flow(uplink: Uplink, frontend: str, fport: int, *, xdp: bool = False,
                    payload: bytes = b"GET / HTTP/1.1\r\n\r\n") -> int:
    """The client's connection to frontend:fport, served by REMOTE_BE:8080 on node-2, at TC or
    at XDP: SYN, the backend's SYN-ACK, a data segment. The client's packets are SNATed to the
    node and DNATed out to node-2, the backend's come back to the client from frontend:fport.
    Every frontend kind served on the uplink must walk this the same way; returns the SNAT port."""
    port = snat_port(CLIENT, frontend, 40000, fport)
    forward = _forwarder(uplink, xdp)
    forward(f"SYN to {frontend}:{fport}, backend on node-2: SNAT to the node + DNAT, out to node-2",
            from_client(tcp(CLIENT, frontend, 40000, fport, "S")), to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))
    forward(f"SYN-ACK from the backend to the SNAT port: back to the client from {frontend}:{fport}",
            from_node2(tcp(REMOTE_BE, NODE, 8080, port, "SA", seq=7000, ack=1001)),
            forwarded_to_client(tcp(frontend, CLIENT, fport, 40000, "SA", seq=7000, ack=1001)))
    forward("a later segment keeps its SNAT port and backend",
            from_client(tcp(CLIENT, frontend, 40000, fport, "PA", seq=1001, ack=7001, payload=payload)),
            to_node2(tcp(NODE, REMOTE_BE, port, 8080, "PA", seq=1001, ack=7001, payload=payload)))
    return port


def remote_udp_exchange(uplink: Uplink, frontend: str, fport: int, *, xdp: bool = False) -> int:
    """remote_tcp_flow's UDP twin: a query from CLIENT:5000 to frontend:fport goes to
    REMOTE_BE:5353 on node-2 from the node's SNAT port; the answer comes back from frontend:fport."""
    port = snat_port(CLIENT, frontend, 5000, fport, 17)
    forward = _forwarder(uplink, xdp)
    forward(f"UDP to {frontend}:{fport}, backend on node-2: SNAT to the node + DNAT",
            from_client(udp(CLIENT, frontend, 5000, fport, b"query")),
            to_node2(udp(NODE, REMOTE_BE, port, 5353, b"query")))
    forward(f"UDP answer: to the client from {frontend}:{fport}",
            from_node2(udp(REMOTE_BE, NODE, 5353, port, b"answer")),
            forwarded_to_client(udp(frontend, CLIENT, fport, 5000, b"answer")))
    return port


def _forwarder(uplink: Uplink, xdp: bool):
    """Check a packet the uplink forwards itself: XDP_REDIRECT at XDP, TC_ACT_REDIRECT at TC."""
    if xdp:
        return lambda desc, packet, expect: uplink.check_xdp(desc, packet, XDP_REDIRECT, expect)
    return lambda desc, packet, expect: uplink.check(desc, "from_uplink", packet, REDIRECT, expect)


def local_tcp_flow(uplink: Uplink, frontend: str, fport: int, backend: str = LOCAL_BE) -> None:
    """The client's connection to frontend:fport, served by a pod on this node at backend:8080:
    DNAT only (the client address kept) for the kernel to deliver, the pod's reply leaving the
    uplink from frontend:fport again, and the next client segment following the flow."""
    uplink.check(f"SYN to {frontend}:{fport}, backend on this node: DNAT only, the kernel delivers it",
                 "from_uplink", from_client(tcp(CLIENT, frontend, 40000, fport, "S")), OK,
                 from_client(tcp(CLIENT, backend, 40000, 8080, "S")))
    uplink.check(f"the pod's reply leaving the uplink gets {frontend}:{fport} back", "to_uplink",
                 to_client(tcp(backend, CLIENT, 8080, 40000, "SA")), OK,
                 to_client(tcp(frontend, CLIENT, fport, 40000, "SA")))
    uplink.check("the next client segment follows the flow", "from_uplink",
                 from_client(tcp(CLIENT, frontend, 40000, fport, "A", seq=1001)), OK,
                 from_client(tcp(CLIENT, backend, 40000, 8080, "A", seq=1001)))


def uplink_fixture(compiled, unique_prefix, **options):
    """The `uplink` fixture (registered in conftest.py): the run's compiled uplink programs on maps
    as new (conftest.compiled), and a test namespace built, removed after. `options`: the agent's
    datapath options the test publishes (loader.agent_options: snat_keep_client_port, ...)."""
    dp = compiled.load(LIMITS, hairpin_addr=HAIRPIN, source=loader.NODE_SOURCE, programs=loader.NODE_PROGRAMS,
                       snat_addr=NODE, snat6=NODE6, **options)
    name = f"{unique_prefix}-np"
    build_netns(name)
    try:
        yield Uplink(dp, name)
    finally:
        netns.remove(name)


@pytest.fixture
def pod_veth(uplink):
    """A pod veth in the `uplink` test namespace: LOCAL_BE/32 routed to it, its neighbour
    resolved; its ifindex (a test imports the fixture: `from .northsouth import pod_veth`)."""
    def build():
        with IPRoute() as ipr:
            ipr.link("add", ifname="pod0", kind="veth", peer={"ifname": "pod0p"})
            idx = ipr.link_lookup(ifname="pod0")[0]
            ipr.link("set", index=idx, address=POD_VETH_MAC)
            ipr.link("set", index=ipr.link_lookup(ifname="pod0p")[0], state="up")
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=f"{LOCAL_BE}/32", oif=idx, scope=253)
            ipr.neigh("add", dst=LOCAL_BE, lladdr=LOCAL_POD_MAC, ifindex=idx, state=0x80)    # NUD_PERMANENT
            return idx

    return nsenter.run_in(uplink.netns, build)


# Also importable as a fixture (`from .northsouth import uplink`); conftest.py registers it for every module.
def _uplink(compiled, unique_prefix):
    yield from uplink_fixture(compiled, unique_prefix)


uplink = pytest.fixture(_uplink, name="uplink")
