"""Conntrack: an established flow keeps its backend whatever the tables say
now; removed backends reset TCP and re-balance UDP; lifetimes follow TCP state
and UDP replies, and the agent's --conntrack-* lifetimes change them;
terminating backends keep their flows but get no new ones; not-ready backends
keep their TCP flows, lose their UDP ones, and are never a fallback."""

from __future__ import annotations

import pytest

from ebpfsvc import abi
from ebpfsvc.datapath import stats
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.lbmodel import Protocol

from .conftest import TEST_LIMITS, age
from .limits import TUNED_LIMITS
from .packets import (
    BACKEND1, BACKEND2, BACKEND3, CLIENT, HAIRPIN, OK, REDIRECT, VIP, Case, be, check, expected_backend,
    from_pod, frontend, state, tcp, to_pod, udp,
)
from scapy.layers.inet import IP, TCP

pytestmark = pytest.mark.root

B1, B2, B3 = be(BACKEND1), be(BACKEND2), be(BACKEND3)
WEB2 = frontend(VIP, 80, [B1, B2])
WEB3 = frontend(VIP, 80, [B1, B2, B3])


def ct_flows(dp):
    """Conntrack entries by direction: {dir: [(key, entry)]}."""
    out = {abi.CT_DIR_FORWARD: [], abi.CT_DIR_REPLY: []}
    for k, v in dp.maps["ct4"].items():
        out[k.dir].append((k, v))
    return out


def dnat(client, b, sport, flags="A", seq=1001, ack=7001, port=8080, **kw):
    return (from_pod(tcp(client, VIP, sport, 80, flags, seq=seq, ack=ack, **kw)),
            from_pod(tcp(client, b, sport, port, flags, seq=seq, ack=ack, **kw)))


def flow(pair):
    """(input, expected) -> the Case fields (input, verdict OK, expected)."""
    return pair[0], OK, pair[1]


def test_established_flow_keeps_backend_after_table_change(datapath, writer):
    writer.apply(state(WEB2))
    # A flow that the 3-backend table would send elsewhere, so the test can tell.
    sport = next(p for p in range(40000, 42000)
                 if expected_backend(WEB3, CLIENT, p) != expected_backend(WEB2, CLIENT, p))
    old_b = expected_backend(WEB2, CLIENT, sport)
    new_b = expected_backend(WEB3, CLIENT, sport)
    syn, syn_out = dnat(CLIENT, old_b, sport, "S", seq=1000, ack=0)
    check(datapath, Case("SYN balanced by the 2-backend table", "from_pod", syn, OK, syn_out))
    check(datapath, Case("SYN-ACK", "to_pod", to_pod(tcp(old_b, CLIENT, 8080, sport, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, sport, "SA"))))

    st = writer.apply(state(WEB3))
    assert st.tables_written == 1
    seg, seg_out = dnat(CLIENT, old_b, sport)
    check(datapath, Case("tracked flow ignores the new table", "from_pod", seg, OK, seg_out))
    # The same 5-tuple, were it new, would go elsewhere now: prove it by forgetting the flow.
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_TCP_ESTABLISHED_S + 1)
    syn2, syn2_out = dnat(CLIENT, new_b, sport, "S", seq=1000, ack=0)
    check(datapath, Case("after expiry the flow is new and follows the new table", "from_pod",
                         syn2, OK, syn2_out))


def test_removed_backend_resets_tcp(datapath, writer):
    writer.apply(state(WEB3))
    b = expected_backend(WEB3, CLIENT, 40000)
    syn, syn_out = dnat(CLIENT, b, 40000, "S", seq=1000, ack=0)
    check(datapath, Case("SYN", "from_pod", syn, OK, syn_out))
    remaining = [x for x in (B1, B2, B3) if str(x.address) != b]
    writer.apply(state(frontend(VIP, 80, remaining)))

    seg = from_pod(tcp(CLIENT, VIP, 40000, 80, "PA", seq=1001, ack=7001, payload=b"data"))
    reset = to_pod(IP(src=VIP, dst=CLIENT, id=0, ttl=64) /
                   TCP(sport=80, dport=40000, flags="R", seq=7001, ack=0, window=0))
    check(datapath, Case("segment of a flow whose backend is gone: RST from the VIP", "from_pod",
                         seg, REDIRECT, reset))
    assert stats.drops(datapath.maps)["backend_gone"] == 1
    flows = ct_flows(datapath)
    assert flows[abi.CT_DIR_FORWARD] == [] and flows[abi.CT_DIR_REPLY] == [], "both CT entries deleted"


def test_removed_backend_keeps_tcp_as_kube_proxy_with_the_option(compiled):
    """--no-reset-removed-endpoint-tcp (no LB_CFG_RESET_REMOVED_TCP in lb_agent_config): the flow goes on to the address its
    conntrack entry holds, both ways, as kube-proxy never flushes TCP conntrack; new connections
    never reach the removed backend; UDP still moves on."""
    dp = compiled.load(TEST_LIMITS, hairpin_addr=HAIRPIN, reset_removed_endpoint_tcp=False)
    writer = MapWriter(dp.maps)
    writer.apply(state(WEB3))
    b = expected_backend(WEB3, CLIENT, 40000)
    syn, syn_out = dnat(CLIENT, b, 40000, "S", seq=1000, ack=0)
    check(dp, Case("SYN", "from_pod", syn, OK, syn_out))
    check(dp, Case("SYN-ACK", "to_pod", to_pod(tcp(b, CLIENT, 8080, 40000, "SA", seq=7000, ack=1001)), OK,
                   to_pod(tcp(VIP, CLIENT, 80, 40000, "SA", seq=7000, ack=1001))))
    remaining = frontend(VIP, 80, [x for x in (B1, B2, B3) if str(x.address) != b])
    writer.apply(state(remaining))
    assert writer.backend_id(be(b)) is None                 # gone from lb4_backends

    seg, seg_out = dnat(CLIENT, b, 40000, "PA", payload=b"data")
    check(dp, Case("segment of a flow whose backend is gone: still to it", "from_pod", seg, OK, seg_out))
    check(dp, Case("its reply: reverse-NATed", "to_pod",
                   to_pod(tcp(b, CLIENT, 8080, 40000, "A", seq=7001, ack=1005)), OK,
                   to_pod(tcp(VIP, CLIENT, 80, 40000, "A", seq=7001, ack=1005))))
    assert stats.drops(dp.maps)["backend_gone"] == 0
    flows = ct_flows(dp)
    assert len(flows[abi.CT_DIR_FORWARD]) == 1 and len(flows[abi.CT_DIR_REPLY]) == 1, "the flow is kept"
    sport = next(p for p in range(41000, 45000) if expected_backend(WEB3, CLIENT, p) == b)
    new, new_out = dnat(CLIENT, expected_backend(remaining, CLIENT, sport), sport, "S", seq=1000, ack=0)
    check(dp, Case("a new connection: a remaining backend", "from_pod", new, OK, new_out))

    dns = [be(a, 5353, Protocol.UDP) for a in (BACKEND1, BACKEND2)]
    writer.apply(state(remaining, frontend(VIP, 53, dns, proto=Protocol.UDP, name="dns")))
    first = expected_backend(frontend(VIP, 53, dns, proto=Protocol.UDP), CLIENT, 5000)
    check(dp, Case("a datagram", "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53)), OK,
                   from_pod(udp(CLIENT, first, 5000, 5353))))
    rest = frontend(VIP, 53, [x for x in dns if str(x.address) != first], proto=Protocol.UDP, name="dns")
    writer.apply(state(remaining, rest))
    nb = expected_backend(rest, CLIENT, 5000)
    check(dp, Case("UDP to a removed backend still moves on", "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53)),
                   OK, from_pod(udp(CLIENT, nb, 5000, 5353))))


def udp_flow_to_one_of_three(datapath, writer):
    """A DNS-like Service with three UDP backends and one flow (client port 5000) through it:
    (the backends, the address of the one the flow reached)."""
    B = [be(a, 5353, Protocol.UDP) for a in (BACKEND1, BACKEND2, BACKEND3)]
    dns3 = frontend(VIP, 53, B, proto=Protocol.UDP, name="dns")
    writer.apply(state(dns3))
    b = expected_backend(dns3, CLIENT, 5000)
    check(datapath, Case("first datagram", "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53)), OK,
                         from_pod(udp(CLIENT, b, 5000, 5353))))
    return B, b


def test_removed_backend_rebalances_udp(datapath, writer):
    B, b = udp_flow_to_one_of_three(datapath, writer)
    dns2 = frontend(VIP, 53, [x for x in B if str(x.address) != b], proto=Protocol.UDP, name="dns")
    writer.apply(state(dns2))
    nb = expected_backend(dns2, CLIENT, 5000)
    check(datapath, Case("next datagram goes to a live backend", "from_pod",
                         from_pod(udp(CLIENT, VIP, 5000, 53)), OK, from_pod(udp(CLIENT, nb, 5000, 5353))))
    check(datapath, Case("its answer is reverse-NATed", "to_pod", to_pod(udp(nb, CLIENT, 5353, 5000)), OK,
                         to_pod(udp(VIP, CLIENT, 53, 5000))))
    assert stats.drops(datapath.maps)["backend_gone"] == 0
    flows = ct_flows(datapath)
    assert len(flows[abi.CT_DIR_FORWARD]) == 1
    assert flows[abi.CT_DIR_FORWARD][0][1].backend_id == writer.backend_id(be(nb, 5353, Protocol.UDP))


def test_tcp_state_and_lifetimes(datapath, writer):
    writer.apply(state(WEB2))
    b = expected_backend(WEB2, CLIENT, 40000)
    check(datapath, Case("SYN", "from_pod", *flow(dnat(CLIENT, b, 40000, "S", seq=1000, ack=0))))
    fwd = ct_flows(datapath)[abi.CT_DIR_FORWARD][0][1]
    assert fwd.flags & abi.CT_F_SEEN_SYN and not fwd.flags & abi.CT_F_ESTABLISHED

    # Half-open: gone after the SYN lifetime.
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_TCP_SYN_S + 1)
    check(datapath, Case("reply after the SYN lifetime: not translated", "to_pod",
                         to_pod(tcp(b, CLIENT, 8080, 40000, "SA")), OK))

    check(datapath, Case("SYN again", "from_pod", *flow(dnat(CLIENT, b, 40000, "S", seq=1000, ack=0))))
    check(datapath, Case("SYN-ACK establishes", "to_pod", to_pod(tcp(b, CLIENT, 8080, 40000, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "SA"))))
    flows = ct_flows(datapath)
    for d in (abi.CT_DIR_FORWARD, abi.CT_DIR_REPLY):
        assert flows[d][0][1].flags & abi.CT_F_ESTABLISHED, "both entries know the flow is established"
    # Established flows outlive the SYN lifetime by far.
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_TCP_SYN_S * 10)
    check(datapath, Case("established flow still tracked", "from_pod", *flow(dnat(CLIENT, b, 40000))))

    check(datapath, Case("client FIN", "from_pod", *flow(dnat(CLIENT, b, 40000, "FA"))))
    check(datapath, Case("server FIN", "to_pod", to_pod(tcp(b, CLIENT, 8080, 40000, "FA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "FA"))))
    fwd = ct_flows(datapath)[abi.CT_DIR_FORWARD][0][1]
    assert fwd.flags & abi.CT_F_SEEN_FIN_FWD and fwd.flags & abi.CT_F_SEEN_FIN_REV
    check(datapath, Case("last ACK within the close lifetime", "from_pod", *flow(dnat(CLIENT, b, 40000))))
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_TCP_CLOSE_S + 1)
    check(datapath, Case("after the close lifetime the reply is no longer ours", "to_pod",
                         to_pod(tcp(b, CLIENT, 8080, 40000, "A")), OK))


def test_udp_lifetimes_follow_replies(datapath, writer):
    B, b = udp_flow_to_one_of_three(datapath, writer)
    reply, reply_out = to_pod(udp(b, CLIENT, 5353, 5000)), to_pod(udp(VIP, CLIENT, 53, 5000))
    # No reply yet: the short lifetime (nf_conntrack's udp_timeout).
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_UDP_S + 1)
    check(datapath, Case("unreplied flow expired: its late answer is not ours", "to_pod", reply, OK))
    check(datapath, Case("datagram again", "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53)), OK,
                         from_pod(udp(CLIENT, b, 5000, 5353))))
    check(datapath, Case("an answer makes it a stream", "to_pod", reply, OK, reply_out))
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_UDP_S + 1)
    check(datapath, Case("a stream outlives the unreplied lifetime", "to_pod", reply, OK, reply_out))
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_UDP_STREAM_S + 1)
    check(datapath, Case("and expires after the stream lifetime", "to_pod", reply, OK))


@pytest.fixture
def tuned(compiled):
    """A datapath compiled with lifetimes set the way the agent's --conntrack-* flags set them
    (limits.TUNED_LIMITS)."""
    dp = compiled.load(TUNED_LIMITS, hairpin_addr=HAIRPIN)
    return dp, MapWriter(dp.maps)


def test_configured_lifetimes_take_effect(tuned):
    datapath, writer = tuned
    assert abi.CT_TIMEOUT_UDP_S > 6 and abi.CT_TIMEOUT_UDP_STREAM_S > 21 and abi.CT_TIMEOUT_TCP_CLOSE_WAIT_S > 10
    B, b = udp_flow_to_one_of_three(datapath, writer)
    reply, reply_out = to_pod(udp(b, CLIENT, 5353, 5000)), to_pod(udp(VIP, CLIENT, 53, 5000))
    age(datapath, "ct4", "last_seen_ns", 6)
    check(datapath, Case("6 s without a reply > --conntrack-udp-timeout 5s: expired", "to_pod", reply, OK))
    check(datapath, Case("datagram again", "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53)), OK,
                         from_pod(udp(CLIENT, b, 5000, 5353))))
    check(datapath, Case("answered: a stream", "to_pod", reply, OK, reply_out))
    age(datapath, "ct4", "last_seen_ns", 19)
    check(datapath, Case("19 s < --conntrack-udp-timeout-stream 20s: tracked", "to_pod", reply, OK, reply_out))
    age(datapath, "ct4", "last_seen_ns", 21)
    check(datapath, Case("21 s > 20s: expired", "to_pod", reply, OK))

    writer.apply(state(WEB2))
    tb = expected_backend(WEB2, CLIENT, 40000)
    check(datapath, Case("SYN", "from_pod", *flow(dnat(CLIENT, tb, 40000, "S", seq=1000, ack=0))))
    check(datapath, Case("SYN-ACK", "to_pod", to_pod(tcp(tb, CLIENT, 8080, 40000, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "SA"))))
    # Each entry ages with the packets of its own direction: both directions idle 39 s.
    age(datapath, "ct4", "last_seen_ns", 39)
    check(datapath, Case("established, idle 39 s < --conntrack-tcp-timeout-established 40s: tracked",
                         "from_pod", *flow(dnat(CLIENT, tb, 40000))))
    check(datapath, Case("and its reply", "to_pod", to_pod(tcp(tb, CLIENT, 8080, 40000, "A")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "A"))))
    check(datapath, Case("client FIN: half-closed", "from_pod", *flow(dnat(CLIENT, tb, 40000, "FA"))))
    age(datapath, "ct4", "last_seen_ns", 8)
    check(datapath, Case("half-closed, idle 8 s < --conntrack-tcp-timeout-close-wait 9s: the server's data "
                         "still comes back", "to_pod", to_pod(tcp(tb, CLIENT, 8080, 40000, "PA", payload=b"x")),
                         OK, to_pod(tcp(VIP, CLIENT, 80, 40000, "PA", payload=b"x"))))
    age(datapath, "ct4", "last_seen_ns", 10)
    check(datapath, Case("idle 10 s > 9s: expired", "to_pod", to_pod(tcp(tb, CLIENT, 8080, 40000, "A")), OK))

    tb = expected_backend(WEB2, CLIENT, 40001)
    check(datapath, Case("another flow", "from_pod", *flow(dnat(CLIENT, tb, 40001, "S", seq=1000, ack=0))))
    check(datapath, Case("established", "to_pod", to_pod(tcp(tb, CLIENT, 8080, 40001, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40001, "SA"))))
    age(datapath, "ct4", "last_seen_ns", 41)
    check(datapath, Case("idle 41 s > 40s: expired", "to_pod", to_pod(tcp(tb, CLIENT, 8080, 40001, "A")), OK))


def test_syn_reusing_a_closed_flow_starts_a_new_one(datapath, writer):
    writer.apply(state(WEB2))
    b = expected_backend(WEB2, CLIENT, 40000)
    check(datapath, Case("SYN", "from_pod", *flow(dnat(CLIENT, b, 40000, "S", seq=1000, ack=0))))
    check(datapath, Case("client RST closes", "from_pod", *flow(dnat(CLIENT, b, 40000, "R"))))
    assert ct_flows(datapath)[abi.CT_DIR_FORWARD][0][1].flags & abi.CT_F_SEEN_RST
    before = ct_flows(datapath)[abi.CT_DIR_FORWARD][0][1].last_seen_ns
    check(datapath, Case("new SYN on the same 5-tuple", "from_pod",
                         *flow(dnat(CLIENT, b, 40000, "S", seq=5000, ack=0))))
    fwd = ct_flows(datapath)[abi.CT_DIR_FORWARD][0][1]
    assert not fwd.flags & abi.CT_F_SEEN_RST and fwd.last_seen_ns >= before


def _open_flow(datapath, b, sport):
    check(datapath, Case("SYN", "from_pod", *flow(dnat(CLIENT, b, sport, "S", seq=1000, ack=0))))
    check(datapath, Case("SYN-ACK", "to_pod", to_pod(tcp(b, CLIENT, 8080, sport, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, sport, "SA"))))


def _new_connection_on_the_same_ports(datapath, b, sport):
    """A new SYN on the ports of an earlier flow is DNATed, and its SYN-ACK comes back from the VIP."""
    check(datapath, Case("new SYN on the same 5-tuple", "from_pod",
                         *flow(dnat(CLIENT, b, sport, "S", seq=90000, ack=0))))
    check(datapath, Case("its SYN-ACK is translated back", "to_pod",
                         to_pod(tcp(b, CLIENT, 8080, sport, "SA", seq=5000, ack=90001)), OK,
                         to_pod(tcp(VIP, CLIENT, 80, sport, "SA", seq=5000, ack=90001))))
    fwd, rep = (ct_flows(datapath)[d][0][1] for d in (abi.CT_DIR_FORWARD, abi.CT_DIR_REPLY))
    assert fwd.flags == rep.flags == abi.CT_F_SEEN_SYN | abi.CT_F_ESTABLISHED, (fwd.flags, rep.flags)


def test_a_syn_on_a_flow_whose_reply_entry_expired_first_starts_a_new_one(datapath, writer):
    """The state a lost flag update left (2026-12-03, wrk at ~9,000 connections/s): the forward
    entry "established" without the client's FIN, its reply entry closed and, 10 s later, expired.
    A new connection on the same ports must not keep the forward entry: nothing would translate
    its SYN-ACK back (the client resets it, on every retry, for the forward entry's 24 h)."""
    writer.apply(state(WEB2))
    b = expected_backend(WEB2, CLIENT, 40000)
    _open_flow(datapath, b, 40000)
    table = datapath.maps["ct4"]
    for k, v in list(table.items()):
        v.flags |= abi.CT_F_SEEN_FIN_REV | (abi.CT_F_SEEN_FIN_FWD if k.dir == abi.CT_DIR_REPLY else 0)
        if k.dir == abi.CT_DIR_REPLY:
            v.last_seen_ns -= 65 * 10**9        # closed 65 s ago: past the 10 s close lifetime
        table[k] = v
    _new_connection_on_the_same_ports(datapath, b, 40000)


def test_a_syn_on_a_flow_whose_reply_entry_was_evicted_starts_a_new_one(datapath, writer):
    """The two entries of a flow are separate LRU elements: the reply entry alone may go."""
    writer.apply(state(WEB2))
    b = expected_backend(WEB2, CLIENT, 40000)
    _open_flow(datapath, b, 40000)
    table = datapath.maps["ct4"]
    for k, _ in list(table.items()):
        if k.dir == abi.CT_DIR_REPLY:
            del table[k]
    _new_connection_on_the_same_ports(datapath, b, 40000)


def test_flags_both_directions_add_are_all_kept(datapath, writer):
    """Each direction adds its TCP flags to both entries (ct_flags_add, atomic: in a
    simultaneous close the two FINs are handled on two CPUs at once)."""
    writer.apply(state(WEB2))
    b = expected_backend(WEB2, CLIENT, 40000)
    _open_flow(datapath, b, 40000)
    check(datapath, Case("backend FIN", "to_pod", to_pod(tcp(b, CLIENT, 8080, 40000, "FA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "FA"))))
    check(datapath, Case("client FIN", "from_pod", *flow(dnat(CLIENT, b, 40000, "FA"))))
    closed = abi.CT_F_SEEN_SYN | abi.CT_F_ESTABLISHED | abi.CT_F_SEEN_FIN_FWD | abi.CT_F_SEEN_FIN_REV
    fwd, rep = (ct_flows(datapath)[d][0][1] for d in (abi.CT_DIR_FORWARD, abi.CT_DIR_REPLY))
    assert fwd.flags == rep.flags == closed, (fwd.flags, rep.flags)
    assert (fwd.pad0, fwd.pad1, fwd.pad2, rep.pad0, rep.pad1, rep.pad2) == (0,) * 6   # the word's other bytes


def test_a_syn_sent_again_after_its_syn_ack_was_translated_keeps_its_backend(datapath, writer):
    """A client whose SYN-ACK was lost past the hook sends its SYN again: the flow starts over
    (it saw a reply), on the same backend, and the backend's SYN-ACK is translated."""
    writer.apply(state(WEB3))
    for sport in range(40000, 40040):
        b = expected_backend(WEB3, CLIENT, sport)
        _open_flow(datapath, b, sport)
        check(datapath, Case("the same SYN again", "from_pod", *flow(dnat(CLIENT, b, sport, "S", seq=1000, ack=0))))
        check(datapath, Case("SYN-ACK again", "to_pod", to_pod(tcp(b, CLIENT, 8080, sport, "SA")), OK,
                             to_pod(tcp(VIP, CLIENT, 80, sport, "SA"))))


def test_an_entry_stamped_after_the_packet_read_the_clock_is_fresh(datapath, writer):
    """Another CPU may refresh a flow's entry between this packet's clock read and its lookup.
    That entry is fresh: an unsigned `now - last_seen` wrapped to ages ago and restarted busy
    flows mid-stream (a random-algorithm flow would even have moved to another backend)."""
    writer.apply(state(WEB2))
    b = expected_backend(WEB2, CLIENT, 40000)
    check(datapath, Case("SYN", "from_pod", *flow(dnat(CLIENT, b, 40000, "S", seq=1000, ack=0))))
    check(datapath, Case("SYN-ACK", "to_pod", to_pod(tcp(b, CLIENT, 8080, 40000, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "SA"))))
    assert age(datapath, "ct4", "last_seen_ns", -5) == 2            # stamped 5 s "later"
    stamped = ct_flows(datapath)[abi.CT_DIR_FORWARD][0][1].last_seen_ns
    check(datapath, Case("next segment", "from_pod", *flow(dnat(CLIENT, b, 40000))))
    fwd = ct_flows(datapath)[abi.CT_DIR_FORWARD][0][1]
    assert fwd.flags & abi.CT_F_SEEN_SYN and fwd.flags & abi.CT_F_ESTABLISHED, "the flow was not started over"
    assert fwd.last_seen_ns == stamped


def test_terminating_backend_keeps_flows_gets_no_new_ones(datapath, writer):
    writer.apply(state(WEB3))
    sport = next(p for p in range(40000, 42000) if expected_backend(WEB3, CLIENT, p) == BACKEND1)
    check(datapath, Case("flow to backend 1", "from_pod", *flow(dnat(CLIENT, BACKEND1, sport, "S", seq=1, ack=0))))
    draining = frontend(VIP, 80, [be(BACKEND1, terminating=True), B2, B3])
    writer.apply(state(draining))
    check(datapath, Case("its flow continues to the terminating backend", "from_pod",
                         *flow(dnat(CLIENT, BACKEND1, sport))))
    for p in range(41000, 41040):
        res_b = expected_backend(draining, CLIENT, p)
        assert res_b != BACKEND1
        check(datapath, Case("new flow avoids it", "from_pod", *flow(dnat(CLIENT, res_b, p, "S", seq=1, ack=0))))


def test_all_terminating_backends_are_used(datapath, writer):
    # kube-proxy's fallback: when only terminating endpoints are left, use them.
    only = frontend(VIP, 80, [be(BACKEND1, terminating=True), be(BACKEND2, terminating=True)])
    writer.apply(state(only))
    b = expected_backend(only, CLIENT, 40000)
    check(datapath, Case("new flow to a terminating backend", "from_pod",
                         *flow(dnat(CLIENT, b, 40000, "S", seq=1, ack=0))))


def test_not_ready_backend_keeps_tcp_flows_gets_no_new_ones(datapath, writer):
    """A readiness blip (kube-proxy keeps the TCP conntrack of a not-ready endpoint): the
    established connection carries on, new ones go elsewhere, affinity does not apply."""
    writer.apply(state(WEB3))
    sport = next(p for p in range(40000, 42000) if expected_backend(WEB3, CLIENT, p) == BACKEND1)
    check(datapath, Case("flow to backend 1", "from_pod", *flow(dnat(CLIENT, BACKEND1, sport, "S", seq=1, ack=0))))
    blip = frontend(VIP, 80, [be(BACKEND1, not_ready=True), B2, B3])
    writer.apply(state(blip))
    assert datapath.maps["lb4_backends"][datapath.maps["lb4_backends"].Key(
        writer.backend_id(B1))].flags & abi.LB_BE_F_NOT_READY
    check(datapath, Case("its TCP flow continues to the not-ready backend", "from_pod",
                         *flow(dnat(CLIENT, BACKEND1, sport))))
    check(datapath, Case("and its replies are reverse-NATed", "to_pod",
                         to_pod(tcp(BACKEND1, CLIENT, 8080, sport, "A", seq=7001, ack=1001)), OK,
                         to_pod(tcp(VIP, CLIENT, 80, sport, "A", seq=7001, ack=1001))))
    for p in range(41000, 41040):
        res_b = expected_backend(blip, CLIENT, p)
        assert res_b != BACKEND1
        check(datapath, Case("new flow avoids it", "from_pod", *flow(dnat(CLIENT, res_b, p, "S", seq=1, ack=0))))
    assert stats.drops(datapath.maps)["backend_gone"] == 0


def test_udp_flow_to_not_ready_backend_moves_on(datapath, writer):
    """kube-proxy clears a not-ready endpoint's UDP conntrack: the next datagram is balanced again."""
    B, b = udp_flow_to_one_of_three(datapath, writer)
    blip = frontend(VIP, 53, [be(x.address, 5353, Protocol.UDP, not_ready=str(x.address) == b) for x in B],
                    proto=Protocol.UDP, name="dns")
    writer.apply(state(blip))
    nb = expected_backend(blip, CLIENT, 5000)
    assert nb != b
    check(datapath, Case("next datagram goes to a ready backend", "from_pod",
                         from_pod(udp(CLIENT, VIP, 5000, 53)), OK, from_pod(udp(CLIENT, nb, 5000, 5353))))
    flows = ct_flows(datapath)
    assert [e.backend_id for _, e in flows[abi.CT_DIR_FORWARD]] == [writer.backend_id(be(nb, 5353, Protocol.UDP))]


def test_only_not_ready_backends_reject_new_flows_keep_tcp_ones(datapath, writer):
    """No ready endpoint and no serving-terminating one: not-ready endpoints are never a
    fallback, so a new connection is refused at once, while the established one goes on."""
    writer.apply(state(WEB2))
    b = expected_backend(WEB2, CLIENT, 40000)
    check(datapath, Case("SYN", "from_pod", *flow(dnat(CLIENT, b, 40000, "S", seq=1000, ack=0))))
    down = frontend(VIP, 80, [be(BACKEND1, not_ready=True), be(BACKEND2, not_ready=True)])
    writer.apply(state(down))
    check(datapath, Case("established flow carries on", "from_pod", *flow(dnat(CLIENT, b, 40000))))
    reset = to_pod(IP(src=VIP, dst=CLIENT, id=0, ttl=64) /
                   TCP(sport=80, dport=40001, flags="RA", seq=0, ack=1001, window=0))
    check(datapath, Case("new SYN: RST from the VIP", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40001, 80, "S", seq=1000)), REDIRECT, reset))
    assert stats.drops(datapath.maps)["no_backend"] == 1


# ---- connections this datapath never balanced (kube-proxy's, from before the takeover) ---------

STICKY2 = frontend(VIP, 80, [B1, B2], affinity_timeout=10800)
# Segments of a connection kube-proxy's rules DNATed before ebpfsvc attached: no CT entry here.
MID_STREAM = [
    ("ACK", dict(flags="A", seq=1001, ack=7001)),
    ("data", dict(flags="PA", seq=1001, ack=7001, payload=b"GET / HTTP/1.1\r\n\r\n")),
    ("FIN", dict(flags="FA", seq=1001, ack=7001)),
    ("RST", dict(flags="R", seq=1001)),
    ("SYN-ACK", dict(flags="SA", seq=1000, ack=7001)),      # not a SYN alone: starts nothing either
]


@pytest.mark.parametrize("desc,fields", MID_STREAM, ids=[d for d, _ in MID_STREAM])
def test_segment_of_a_connection_never_balanced_here_is_left_to_the_kernel(datapath, writer, desc, fields):
    """A mid-stream segment with no conntrack entry leaves as it came: nf_conntrack, which holds
    kube-proxy's translation of that connection, goes on translating it (to kube-proxy's backend,
    which Maglev need not pick). Nothing is tracked, counted or remembered for affinity."""
    writer.apply(state(STICKY2))
    check(datapath, Case(f"{desc} without a CT entry: untouched", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40000, 80, **fields)), OK))
    flows = ct_flows(datapath)
    assert flows[abi.CT_DIR_FORWARD] == [] and flows[abi.CT_DIR_REPLY] == []
    assert list(datapath.maps["lb4_affinity"].items()) == []
    assert not any(stats.drops(datapath.maps).values())
    assert stats.traffic(datapath.maps, "frontend", writer.frontend_id(STICKY2)) == (0, 0)
    # The backend's answer (kube-proxy's DNAT is undone by the kernel after this hook) is not ours.
    check(datapath, Case("its reply: untouched", "to_pod", to_pod(tcp(BACKEND1, CLIENT, 8080, 40000, "A")), OK))


def test_a_syn_on_the_same_ports_is_balanced_by_ebpfsvc(datapath, writer):
    """Once kube-proxy's connection is over, the client's next connection from the same port
    is a new flow: balanced, tracked, translated here."""
    writer.apply(state(WEB2))
    check(datapath, Case("old connection's ACK: untouched", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40000, 80, "A", seq=1001, ack=7001)), OK))
    b = expected_backend(WEB2, CLIENT, 40000)
    check(datapath, Case("SYN: balanced", "from_pod", *flow(dnat(CLIENT, b, 40000, "S", seq=5000, ack=0))))
    check(datapath, Case("SYN-ACK: reverse NAT", "to_pod", to_pod(tcp(b, CLIENT, 8080, 40000, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "SA"))))
    check(datapath, Case("its ACK: tracked, translated", "from_pod", *flow(dnat(CLIENT, b, 40000, seq=5001))))
    assert len(ct_flows(datapath)[abi.CT_DIR_FORWARD]) == 1


def test_an_expired_flow_is_not_restarted_mid_stream(datapath, writer):
    """The same rule for a flow of ours whose entry expired (idle past its lifetime) or was
    evicted: its next segment is not balanced anew but left to the kernel, whose service-CIDR
    route to ebpfsvc0 brings it to the node-client hook (host.h), which does balance it."""
    writer.apply(state(WEB2))
    b = expected_backend(WEB2, CLIENT, 40000)
    check(datapath, Case("SYN", "from_pod", *flow(dnat(CLIENT, b, 40000, "S", seq=1000, ack=0))))
    check(datapath, Case("SYN-ACK", "to_pod", to_pod(tcp(b, CLIENT, 8080, 40000, "SA")), OK,
                         to_pod(tcp(VIP, CLIENT, 80, 40000, "SA"))))
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_TCP_ESTABLISHED_S + 1)
    check(datapath, Case("segment after the established lifetime: untouched", "from_pod",
                         from_pod(tcp(CLIENT, VIP, 40000, 80, "PA", seq=1001, ack=7001, payload=b"x")), OK))
    flows = ct_flows(datapath)
    assert flows[abi.CT_DIR_FORWARD] == [] and flows[abi.CT_DIR_REPLY] == [], "the expired entries are gone"


def test_mid_stream_segment_to_a_service_without_backends_is_still_rejected(datapath, writer):
    """No backend anywhere: whatever the kernel holds, there is nothing to reach; the reset is
    immediate, as before (tests/bpf/test_reject.py's rows, with a tracked-nowhere ACK)."""
    writer.apply(state(frontend(VIP, 80, [])))
    res = check(datapath, Case("ACK to an empty Service: RST", "from_pod",
                               from_pod(tcp(CLIENT, VIP, 40000, 80, "A", seq=1001, ack=7001)), REDIRECT,
                               to_pod(IP(src=VIP, dst=CLIENT, id=0, ttl=64) /
                                      TCP(sport=80, dport=40000, flags="R", seq=7001, ack=0, window=0))))
    assert res.verdict == "TC_ACT_REDIRECT"
    assert stats.drops(datapath.maps)["no_backend"] == 1
