"""IPv6 on the pod side through BPF_PROG_TEST_RUN (the same lb_pod.c object as IPv4): DNAT of new
and tracked flows, reverse NAT, Maglev and random choice, ClientIP affinity per /128, rejects of an
empty Service (TCP RST, ICMPv6 port unreachable), extension headers, fragments, truncated headers,
and what passes untouched (neighbour discovery, other destinations, too long a header chain).

Maps are filled only through MapWriter.apply(LBState); each row names its input packet, the exact
expected output packet (scapy computes the expected checksums, so a wrong incremental update over
the IPv6 pseudo-header shows as a byte difference) and the verdict.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, IPv6, IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ebpfsvc import abi
from ebpfsvc.datapath import stats
from ebpfsvc.lbmodel import Algorithm, Protocol

from .packets import (
    BACKEND1, BACKEND2, BACKEND6_1, BACKEND6_2, BACKEND6_3, CLIENT, CLIENT6, CLIENT6_2, OK, OTHER6, REDIRECT,
    SHOT, VIP, VIP6, Case, be, be6, check, expected_backend, from_pod, frontend, frontend6, run, state, tcp,
    tcp6, tcp_exchange_rows, to_pod, udp6, udp_exchange_rows,
)

pytestmark = pytest.mark.root

WEB6 = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2), be6(BACKEND6_3)])
DNS6 = frontend6(VIP6, 53, [be6(BACKEND6_1, 5353, Protocol.UDP), be6(BACKEND6_2, 5353, Protocol.UDP)],
                 proto=Protocol.UDP, name="dns6")
EMPTY6_TCP = frontend6(VIP6, 81, [], name="empty6")
EMPTY6_UDP = frontend6(VIP6, 54, [], proto=Protocol.UDP, name="empty6-udp")


def test_tcp_flow_dnat_and_reply_rev_nat(datapath, writer):
    writer.apply(state(WEB6))
    b = expected_backend(WEB6, CLIENT6, 40000)
    rows = tcp_exchange_rows(CLIENT6, VIP6, b, tcp6, "[{}]:80")
    for row in rows:
        check(datapath, row)
    fid, bid = writer.frontend_id(WEB6), writer.backend_id(next(x for x in WEB6.backends if str(x.address) == b))
    assert stats.traffic(datapath.maps, "frontend", fid)[0] == 4
    assert stats.traffic(datapath.maps, "backend", bid)[0] == 4
    flows = {(k.dir, bytes(bytearray(k.saddr)).hex()) for k in datapath.maps["ct6"].keys()}
    assert len(flows) == 2 and not list(datapath.maps["ct4"].keys())


def test_udp_dnat_and_reply(datapath, writer):
    writer.apply(state(DNS6))
    for row in udp_exchange_rows(CLIENT6_2, VIP6, expected_backend(DNS6, CLIENT6_2, 5000), udp6, "[{}]:53"):
        check(datapath, row)


def test_maglev_spreads_flows_as_predicted(datapath, writer):
    writer.apply(state(WEB6))
    seen = set()
    for sport in range(41000, 41030):
        b = expected_backend(WEB6, CLIENT6, sport)
        seen.add(b)
        check(datapath, Case(f"flow from port {sport}", "from_pod", from_pod(tcp6(CLIENT6, VIP6, sport, 80)), OK,
                             from_pod(tcp6(CLIENT6, b, sport, 8080))))
    assert seen == {BACKEND6_1, BACKEND6_2, BACKEND6_3}


def test_random_choice_is_kept_by_conntrack(datapath, writer):
    fe = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2), be6(BACKEND6_3)], algorithm=Algorithm.RANDOM)
    writer.apply(state(fe))
    out = run(datapath, "from_pod", from_pod(tcp6(CLIENT6, VIP6, 42000, 80)))
    got = Ether(out.data)[IPv6].dst
    assert out.verdict == "TC_ACT_OK" and got in {BACKEND6_1, BACKEND6_2, BACKEND6_3}
    for _ in range(5):
        check(datapath, Case("same flow, same backend", "from_pod",
                             from_pod(tcp6(CLIENT6, VIP6, 42000, 80, "A", seq=1001, ack=1)), OK,
                             from_pod(tcp6(CLIENT6, got, 42000, 8080, "A", seq=1001, ack=1))))


def test_client_ip_affinity_per_128(datapath, writer):
    fe = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2), be6(BACKEND6_3)], affinity_timeout=600)
    writer.apply(state(fe))
    first = expected_backend(fe, CLIENT6, 40000)
    other = next(p for p in range(40001, 41000) if expected_backend(fe, CLIENT6, p) != first)
    check(datapath, Case("first flow by Maglev", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 40000, 80)), OK,
                         from_pod(tcp6(CLIENT6, first, 40000, 8080))))
    check(datapath, Case("a new flow of the same client sticks to its backend", "from_pod",
                         from_pod(tcp6(CLIENT6, VIP6, other, 80)), OK, from_pod(tcp6(CLIENT6, first, other, 8080))))
    # Another /128, even in the same /64, is balanced on its own.
    other_client = next(p for p in range(40001, 41000) if expected_backend(fe, CLIENT6_2, p) != first)
    check(datapath, Case("another client of the same /64 is not sticky", "from_pod",
                         from_pod(tcp6(CLIENT6_2, VIP6, other_client, 80)), OK,
                         from_pod(tcp6(CLIENT6_2, expected_backend(fe, CLIENT6_2, other_client), other_client, 8080))))
    keys = list(datapath.maps["lb6_affinity"].keys())
    assert len(keys) == 2 and not list(datapath.maps["lb4_affinity"].keys())


def rst6(sport, dport, seq=0, ack=0, flags="R"):
    """The RST the VIP answers with, into the pod (MACs swapped), as Linux's tcp_v6_send_reset."""
    return to_pod(IPv6(src=VIP6, dst=CLIENT6, hlim=64) /
                  TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=0))


def port_unreachable6(original):
    """ICMPv6 destination unreachable, port unreachable (type 1 code 4), from the VIP, quoting the
    first 128 bytes of the invoking packet."""
    quote = bytes(original)[:128]
    return to_pod(IPv6(src=VIP6, dst=CLIENT6, hlim=64) / ICMPv6DestUnreach(code=4) / Raw(quote))


def test_empty_service_is_rejected(datapath, writer):
    writer.apply(state(EMPTY6_TCP, EMPTY6_UDP))
    long_udp = udp6(CLIENT6, VIP6, 5001, 54, b"q" * 300)
    rows = [
        Case("SYN: RST+ACK acknowledging the SYN", "from_pod",
             from_pod(tcp6(CLIENT6, VIP6, 40000, 81, "S", seq=1000)), REDIRECT, rst6(81, 40000, ack=1001, flags="RA")),
        Case("ACK with payload: RST with the segment's ack as sequence", "from_pod",
             from_pod(tcp6(CLIENT6, VIP6, 40001, 81, "PA", seq=1001, ack=9001, payload=b"x" * 100)), REDIRECT,
             rst6(81, 40001, seq=9001)),
        Case("SYN behind a destination-options header: the payload length counts from the TCP header", "from_pod",
             from_pod(tcp6(CLIENT6, VIP6, 40002, 81, "S", seq=77, payload=b"abc", ext=[IPv6ExtHdrDestOpt()])),
             REDIRECT, rst6(81, 40002, ack=81, flags="RA")),
        Case("UDP: ICMPv6 port unreachable quoting the whole short datagram", "from_pod",
             from_pod(udp6(CLIENT6, VIP6, 5000, 54, b"q" * 20)), REDIRECT,
             port_unreachable6(udp6(CLIENT6, VIP6, 5000, 54, b"q" * 20))),
        Case("UDP longer than the quote: its first 128 bytes", "from_pod",
             from_pod(long_udp), REDIRECT, port_unreachable6(long_udp)),
        Case("an RST is never answered", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 40003, 81, "R")), SHOT),
    ]
    for row in rows:
        check(datapath, row)
    assert stats.drops(datapath.maps)["no_backend"] == len(rows)


def test_extension_headers_are_walked_and_kept(datapath, writer):
    writer.apply(state(WEB6, DNS6))
    b = expected_backend(WEB6, CLIENT6, 40100)
    chain = [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(addresses=[], segleft=0)]
    check(datapath, Case("hop-by-hop, destination options, routing: translated behind them", "from_pod",
                         from_pod(tcp6(CLIENT6, VIP6, 40100, 80, ext=chain)), OK,
                         from_pod(tcp6(CLIENT6, b, 40100, 8080, ext=chain))))
    check(datapath, Case("the reply with a hop-by-hop header", "to_pod",
                         to_pod(tcp6(b, CLIENT6, 8080, 40100, "SA", ext=[IPv6ExtHdrHopByHop()])), OK,
                         to_pod(tcp6(VIP6, CLIENT6, 80, 40100, "SA", ext=[IPv6ExtHdrHopByHop()]))))
    atomic = [IPv6ExtHdrFragment(offset=0, m=0, id=7)]
    u = expected_backend(DNS6, CLIENT6, 5100)
    check(datapath, Case("an atomic fragment (fragment header, offset 0, no more) is a whole datagram", "from_pod",
                         from_pod(udp6(CLIENT6, VIP6, 5100, 53, b"q", ext=atomic)), OK,
                         from_pod(udp6(CLIENT6, u, 5100, 5353, b"q", ext=atomic))))


def test_longer_header_chain_than_the_bound_passes_untouched(datapath, writer):
    writer.apply(state(WEB6))
    chain = [IPv6ExtHdrDestOpt() for _ in range(5)]       # IPV6_MAX_HEADERS is 4
    check(datapath, Case("five extension headers: not parsed, left to the kernel", "from_pod",
                         from_pod(tcp6(CLIENT6, VIP6, 40200, 80, ext=chain)), OK))
    assert not list(datapath.maps["ct6"].keys())


def _frags6(src, dst, sport, dport, ident=0x42424242):
    """A UDP datagram over IPv6 in two fragments: the first carries the UDP header."""
    # The UDP checksum is over the whole datagram with the real destination: scapy's own.
    udp_whole = IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(b"A" * 40 + b"B" * 40)
    dgram = bytes(udp_whole[UDP])
    first = IPv6(src=src, dst=dst, nh=44) / IPv6ExtHdrFragment(nh=17, offset=0, m=1, id=ident) / Raw(dgram[:48])
    later = IPv6(src=src, dst=dst, nh=44) / IPv6ExtHdrFragment(nh=17, offset=6, m=0, id=ident) / Raw(dgram[48:])
    return first, later


def test_fragmented_datagram_is_translated_whole(datapath, writer):
    writer.apply(state(DNS6))
    b = expected_backend(DNS6, CLIENT6, 5200)
    first, later = _frags6(CLIENT6, VIP6, 5200, 53)
    want_first, want_later = _frags6(CLIENT6, b, 5200, 5353)
    check(datapath, Case("first fragment: DNAT with the UDP header", "from_pod", from_pod(first), OK,
                         from_pod(want_first)))
    check(datapath, Case("later fragment: the datagram's translation, address only", "from_pod", from_pod(later), OK,
                         from_pod(want_later)))


def test_later_fragment_without_its_first_is_dropped(datapath, writer):
    writer.apply(state(DNS6))
    _, later = _frags6(CLIENT6, VIP6, 5300, 53, ident=99)
    check(datapath, Case("later fragment to the VIP, first never seen", "from_pod", from_pod(later), SHOT))
    assert stats.drops(datapath.maps)["frag_untracked"] == 1
    _, other = _frags6(CLIENT6, OTHER6, 5300, 53, ident=99)
    check(datapath, Case("later fragment to a non-Service address passes", "from_pod", from_pod(other), OK))


def test_truncated_and_lying_headers_are_dropped(datapath, writer):
    """BPF_PROG_TEST_RUN refuses a frame shorter than Ethernet + the fixed IPv6 header (EINVAL), so
    cuts from there on: every one is dropped as malformed (the payload length no longer fits, or
    the extension or TCP header is cut), and so are headers that lie."""
    writer.apply(state(WEB6))
    pkt = bytes(from_pod(tcp6(CLIENT6, VIP6, 40300, 80, payload=b"abcd", ext=[IPv6ExtHdrHopByHop()])))
    first = 14 + 40
    for n in range(first, len(pkt)):
        assert run(datapath, "from_pod", pkt[:n]).verdict == "TC_ACT_SHOT", f"cut at {n} bytes"
    assert stats.drops(datapath.maps)["malformed"] == len(pkt) - first
    v4_nibble = bytearray(bytes(from_pod(tcp6(CLIENT6, VIP6, 40301, 80))))
    v4_nibble[14] = 0x40                        # version nibble 4
    short_doff = bytearray(bytes(from_pod(tcp6(CLIENT6, VIP6, 40304, 80))))
    short_doff[14 + 40 + 12] = 4 << 4           # TCP data offset: 4 words
    lying = [
        ("version 4 in an IPv6 frame", bytes(v4_nibble)),
        ("payload length past the end of the packet",
         bytes(from_pod(IPv6(src=CLIENT6, dst=VIP6, plen=200) / TCP(sport=40302, dport=80)))),
        ("payload length ends inside the TCP header",
         bytes(from_pod(IPv6(src=CLIENT6, dst=VIP6, plen=12) / TCP(sport=40303, dport=80)))),
        ("TCP data offset below 5 words", bytes(short_doff)),
    ]
    for desc, frame in lying:
        assert run(datapath, "from_pod", frame).verdict == "TC_ACT_SHOT", desc
    assert stats.drops(datapath.maps)["malformed"] == len(pkt) - first + len(lying)
    assert not list(datapath.maps["ct6"].keys())
    res = run(datapath, "from_pod", pkt)
    assert res.verdict == "TC_ACT_OK" and Ether(res.data)[IPv6].dst in {BACKEND6_1, BACKEND6_2, BACKEND6_3}


def test_neighbour_discovery_and_other_traffic_pass_untouched(datapath, writer):
    writer.apply(state(WEB6, EMPTY6_TCP))
    rows = [
        Case("neighbour solicitation for the VIP", "from_pod",
             from_pod(IPv6(src=CLIENT6, dst="ff02::1:ff00:10", hlim=255) / ICMPv6ND_NS(tgt=VIP6)), OK),
        Case("neighbour advertisement into the pod", "to_pod",
             to_pod(IPv6(src=BACKEND6_1, dst=CLIENT6, hlim=255) / ICMPv6ND_NA(tgt=BACKEND6_1)), OK),
        Case("echo request to the VIP", "from_pod",
             from_pod(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoRequest(id=1, seq=1)), OK),
        Case("TCP to a port the VIP does not serve", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 40400, 8443)), OK),
        Case("TCP to another address", "from_pod", from_pod(tcp6(CLIENT6, OTHER6, 40401, 80)), OK),
        Case("a mid-stream segment no flow knows (the kernel's)", "from_pod",
             from_pod(tcp6(CLIENT6, VIP6, 40402, 80, "A", seq=5, ack=6)), OK),
        Case("a reply no flow knows", "to_pod", to_pod(tcp6(BACKEND6_1, CLIENT6, 8080, 40403, "SA")), OK),
    ]
    for row in rows:
        check(datapath, row)
    assert sum(stats.drops(datapath.maps).values()) == 0


def test_a_syn_on_a_flow_whose_reply_entry_is_gone_starts_a_new_one(datapath, writer):
    """As test_conntrack's IPv4 case: the reply entry evicted, a new connection on the same
    ports gets new entries, so its SYN-ACK is translated back."""
    writer.apply(state(WEB6))
    b = expected_backend(WEB6, CLIENT6, 40600)
    check(datapath, Case("SYN", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 40600, 80)), OK,
                         from_pod(tcp6(CLIENT6, b, 40600, 8080))))
    check(datapath, Case("SYN-ACK", "to_pod", to_pod(tcp6(b, CLIENT6, 8080, 40600, "SA")), OK,
                         to_pod(tcp6(VIP6, CLIENT6, 80, 40600, "SA"))))
    table = datapath.maps["ct6"]
    for k in [k for k in table.keys() if k.dir == abi.CT_DIR_REPLY]:
        del table[k]
    check(datapath, Case("new SYN on the same ports", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 40600, 80, seq=9)),
                         OK, from_pod(tcp6(CLIENT6, b, 40600, 8080, seq=9))))
    check(datapath, Case("its SYN-ACK is translated back", "to_pod",
                         to_pod(tcp6(b, CLIENT6, 8080, 40600, "SA", seq=77, ack=10)), OK,
                         to_pod(tcp6(VIP6, CLIENT6, 80, 40600, "SA", seq=77, ack=10))))


def test_removed_backend_resets_its_tracked_tcp_flow(datapath, writer):
    writer.apply(state(WEB6))
    b = expected_backend(WEB6, CLIENT6, 40500)
    check(datapath, Case("SYN", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 40500, 80)), OK,
                         from_pod(tcp6(CLIENT6, b, 40500, 8080))))
    writer.apply(state(frontend6(VIP6, 80, [x for x in WEB6.backends if str(x.address) != b])))
    check(datapath, Case("next segment: the backend is gone, RST", "from_pod",
                         from_pod(tcp6(CLIENT6, VIP6, 40500, 80, "A", seq=1001, ack=5)), REDIRECT,
                         rst6(80, 40500, seq=5)))
    assert stats.drops(datapath.maps)["backend_gone"] == 1


def test_ipv4_is_served_beside_ipv6(datapath, writer):
    web4 = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2)])
    writer.apply(state(web4, WEB6))
    b4 = expected_backend(web4, CLIENT, 40600)
    b6 = expected_backend(WEB6, CLIENT6, 40600)
    check(datapath, Case("IPv4 SYN", "from_pod", from_pod(tcp(CLIENT, VIP, 40600, 80)), OK,
                         from_pod(tcp(CLIENT, b4, 40600, 8080))))
    check(datapath, Case("IPv6 SYN", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 40600, 80)), OK,
                         from_pod(tcp6(CLIENT6, b6, 40600, 8080))))
    check(datapath, Case("IPv4 reply", "to_pod", to_pod(tcp(b4, CLIENT, 8080, 40600, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40600, "SA"))))
    check(datapath, Case("IPv6 reply", "to_pod", to_pod(tcp6(b6, CLIENT6, 8080, 40600, "SA")), OK,
                         to_pod(tcp6(VIP6, CLIENT6, 80, 40600, "SA"))))
    assert len(list(datapath.maps["ct4"].keys())) == 2 and len(list(datapath.maps["ct6"].keys())) == 2
    # Both families' backends hold ids of one space (one lb_backend_stats): no clash.
    ids = [writer.backend_id(x) for x in web4.backends + WEB6.backends]
    assert len(set(ids)) == len(ids)


def test_bpf_lb_list_and_ct_list_show_ipv6_entries(datapath, writer, pin_dir):
    import json

    from click.testing import CliRunner

    from ebpfsvc.cli import main

    def cli_json(*args):
        res = CliRunner().invoke(main, [*args, "--pin-dir", str(pin_dir), "-o", "json"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        return json.loads(res.output)

    web4 = frontend(VIP, 80, [be(BACKEND1)])
    writer.apply(state(web4, WEB6))
    b = expected_backend(WEB6, CLIENT6, 43000)
    check(datapath, Case("SYN", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 43000, 80)), OK,
                         from_pod(tcp6(CLIENT6, b, 43000, 8080))))
    by_fe = {r["frontend"]: r for r in cli_json("bpf", "lb", "list")}
    assert set(by_fe) == {f"{VIP}:80/TCP", f"{VIP}:0/TCP", f"[{VIP6}]:80/TCP", f"[{VIP6}]:0/TCP"}
    assert {x["backend"] for x in by_fe[f"[{VIP6}]:80/TCP"]["backends"]} == \
        {f"[{a}]:8080/TCP" for a in (BACKEND6_1, BACKEND6_2, BACKEND6_3)}
    services = {s["service"]: s for s in cli_json("service", "list")}
    fe6 = next(f for s in services.values() for f in s["frontends"] if f["frontend"] == f"[{VIP6}]:80/TCP")
    assert {x["backend"]: x["flows"] for x in fe6["backends"]}[f"[{b}]:8080/TCP"] == 1
    ct = cli_json("bpf", "ct", "list")
    assert {(e["direction"], e["src"], e["dst"], e["frontend"], e["backend"]) for e in ct} == {
        ("forward", f"[{CLIENT6}]:43000", f"[{VIP6}]:80", f"[{VIP6}]:80", f"[{b}]:8080"),
        ("reply", f"[{b}]:8080", f"[{CLIENT6}]:43000", f"[{VIP6}]:80", f"[{b}]:8080")}


def test_icmpv6_errors_about_translated_flows_are_translated_back(datapath, writer):
    from scapy.layers.inet6 import ICMPv6PacketTooBig

    writer.apply(state(WEB6, DNS6))
    b = expected_backend(DNS6, CLIENT6, 5400)
    t = expected_backend(WEB6, CLIENT6, 40700)
    check(datapath, Case("datagram", "from_pod", from_pod(udp6(CLIENT6, VIP6, 5400, 53, b"q")), OK,
                         from_pod(udp6(CLIENT6, b, 5400, 5353, b"q"))))
    check(datapath, Case("SYN", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 40700, 80, payload=b"x" * 40)), OK,
                         from_pod(tcp6(CLIENT6, t, 40700, 8080, payload=b"x" * 40))))
    rows = [
        Case("the backend's port unreachable: outer source and quote become the VIP's", "to_pod",
             to_pod(IPv6(src=b, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / udp6(CLIENT6, b, 5400, 5353, b"q")), OK,
             to_pod(IPv6(src=VIP6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / udp6(CLIENT6, VIP6, 5400, 53, b"q"))),
        Case("a router's packet too big: only the quote changes", "to_pod",
             to_pod(IPv6(src=OTHER6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) /
                    tcp6(CLIENT6, t, 40700, 8080, payload=b"x" * 40)), OK,
             to_pod(IPv6(src=OTHER6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) /
                    tcp6(CLIENT6, VIP6, 40700, 80, payload=b"x" * 40))),
        Case("the client's port unreachable about a reply goes to the backend, about the backend", "from_pod",
             from_pod(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6DestUnreach(code=4) / udp6(VIP6, CLIENT6, 53, 5400, b"a")), OK,
             from_pod(IPv6(src=CLIENT6, dst=b) / ICMPv6DestUnreach(code=4) / udp6(b, CLIENT6, 5353, 5400, b"a"))),
        Case("an error about a flow nobody translated passes untouched", "to_pod",
             to_pod(IPv6(src=OTHER6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / udp6(CLIENT6, OTHER6, 5401, 53)), OK),
        Case("a quote cut inside the TCP header (no checksum quoted): addresses and ports still translated",
             "to_pod",
             to_pod(IPv6(src=OTHER6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) /
                    Raw(bytes(tcp6(CLIENT6, t, 40700, 8080))[:40 + 8])), OK,
             to_pod(IPv6(src=OTHER6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) /
                    Raw(bytes(tcp6(CLIENT6, VIP6, 40700, 80))[:40 + 8]))),
    ]
    for row in rows:
        check(datapath, row)


def test_inspection_of_pins_without_the_ipv6_maps(datapath, writer, pin_dir):
    """An agent of a version before IPv6 pinned no lb6_* map: the views read what is there."""
    from click.testing import CliRunner

    from ebpfsvc.cli import main
    from ebpfsvc.inspect.node import NodeMaps

    writer.apply(state(frontend(VIP, 80, [be(BACKEND1)])))
    for name in ("lb6_frontends", "lb6_backends", "ct6", "lb6_affinity", "frag6", "lb6_source_ranges", "lb6_snat"):
        (pin_dir / name).unlink()           # put back for the next test by the tier's fixtures
    with NodeMaps.open(pin_dir) as node:
        assert {f.name for f in node.frontends()} == {f"{VIP}:80/TCP", f"{VIP}:0/TCP"}
        assert node.frontend(VIP6, 80, "TCP", "internal") is None and node.ct() == []
    res = CliRunner().invoke(main, ["bpf", "lb", "list", "--pin-dir", str(pin_dir)])
    assert res.exit_code == 0 and f"{VIP}:80/TCP" in res.output, res.output


def test_why_follows_an_ipv6_flow(datapath, writer, pin_dir):
    import json

    from click.testing import CliRunner

    from ebpfsvc.cli import main

    def why(*args):
        res = CliRunner().invoke(main, ["why", *args, "--pin-dir", str(pin_dir), "-o", "json"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        return json.loads(res.output)

    fe = frontend6(VIP6, 80, [be6(BACKEND6_1), be6(BACKEND6_2), be6(BACKEND6_3)], affinity_timeout=600)
    writer.apply(state(fe))
    b = expected_backend(fe, CLIENT6, 43100)
    r = why(CLIENT6, f"[{VIP6}]:80/TCP", "--sport", "43100")
    assert (r["verdict"], r["reason"], r["backend"]) == ("dnat", "maglev", f"[{b}]:8080/TCP")
    check(datapath, Case("SYN", "from_pod", from_pod(tcp6(CLIENT6, VIP6, 43100, 80)), OK,
                         from_pod(tcp6(CLIENT6, b, 43100, 8080))))
    r = why(CLIENT6, f"[{VIP6}]:80/TCP", "--sport", "43100")
    assert (r["reason"], r["backend"]) == ("conntrack", f"[{b}]:8080/TCP")
    r = why(CLIENT6, f"[{VIP6}]:80/TCP", "--sport", "43101")
    assert (r["reason"], r["backend"]) == ("affinity", f"[{b}]:8080/TCP")
    r = why(CLIENT6, f"[{VIP6}]:80/TCP", "--sport", "43101", "--scope", "external")
    assert (r["verdict"], r["reason"]) == ("pass", "not a service")
    bad = CliRunner().invoke(main, ["why", CLIENT6, f"{VIP6}:80/TCP", "--pin-dir", str(pin_dir)])
    assert bad.exit_code == 2 and "[ADDRESS]:PORT for IPv6" in bad.output and "Traceback" not in bad.output
