"""IPv4 fragments of Service traffic: the first fragment is translated and its
ports remembered under (saddr, daddr, IP id, proto); later fragments borrow
them and get the same address translation; a later fragment to a frontend
address whose first fragment was not seen is dropped (frag_untracked)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP, fragment
from scapy.packet import Raw

from ebpfsvc.datapath import stats
from ebpfsvc.lbmodel import Protocol

from .packets import (
    BACKEND1, BACKEND2, CLIENT, OK, OTHER, REDIRECT, SHOT, VIP, Case, be, check, expected_backend, from_pod,
    frontend, state, to_pod,
)

pytestmark = pytest.mark.root

DNS = frontend(VIP, 53, [be(BACKEND1, 5353, Protocol.UDP), be(BACKEND2, 5353, Protocol.UDP)],
               proto=Protocol.UDP, name="dns")
PAYLOAD = bytes(range(256)) * 12      # 3072 bytes: four fragments of 800


def frags(src, dst, sport, dport, ip_id=0x4242):
    return fragment(IP(src=src, dst=dst, id=ip_id) / UDP(sport=sport, dport=dport) / Raw(PAYLOAD), fragsize=800)


def test_fragmented_datagram_is_translated_whole(datapath, writer):
    writer.apply(state(DNS))
    b = expected_backend(DNS, CLIENT, 5000)
    ins, outs = frags(CLIENT, VIP, 5000, 53), frags(CLIENT, b, 5000, 5353)
    assert len(ins) == 4 and ins[0].flags.MF and ins[1].frag > 0
    for i, (fin, fout) in enumerate(zip(ins, outs)):
        # The first fragment carries the UDP checksum of the whole datagram: its
        # incremental update must equal scapy's checksum of the translated one.
        check(datapath, Case(f"fragment {i}", "from_pod", from_pod(fin), OK, from_pod(fout)))


def test_fragmented_reply_is_reverse_natted(datapath, writer):
    writer.apply(state(DNS))
    b = expected_backend(DNS, CLIENT, 5000)
    check(datapath, Case("query", "from_pod", from_pod(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53)), OK,
                         from_pod(IP(src=CLIENT, dst=b) / UDP(sport=5000, dport=5353))))
    for i, (fin, fout) in enumerate(zip(frags(b, CLIENT, 5353, 5000, 0x77), frags(VIP, CLIENT, 53, 5000, 0x77))):
        check(datapath, Case(f"reply fragment {i}", "to_pod", to_pod(fin), OK, to_pod(fout)))


def test_later_fragment_without_first_is_dropped(datapath, writer):
    writer.apply(state(DNS))
    later = frags(CLIENT, VIP, 5000, 53)[2]
    check(datapath, Case("later fragment to a frontend address, first never seen", "from_pod",
                         from_pod(later), SHOT))
    assert stats.drops(datapath.maps)["frag_untracked"] == 1


def test_later_fragment_of_other_id_is_not_borrowed(datapath, writer):
    writer.apply(state(DNS))
    check(datapath, Case("first fragment of datagram A", "from_pod", from_pod(frags(CLIENT, VIP, 5000, 53, 1)[0]),
                         OK, from_pod(frags(CLIENT, expected_backend(DNS, CLIENT, 5000), 5000, 5353, 1)[0])))
    check(datapath, Case("later fragment of datagram B", "from_pod", from_pod(frags(CLIENT, VIP, 5000, 53, 2)[1]),
                         SHOT))
    assert stats.drops(datapath.maps)["frag_untracked"] == 1


def test_fragments_of_non_service_traffic_pass(datapath, writer):
    writer.apply(state(DNS))
    for i, f in enumerate(frags(CLIENT, OTHER, 5000, 53)):
        check(datapath, Case(f"fragment {i} to a non-frontend address", "from_pod", from_pod(f), OK))
    check(datapath, Case("later reply fragment of no tracked flow", "to_pod",
                         to_pod(frags(OTHER, CLIENT, 53, 5000)[1]), OK))
    assert stats.drops(datapath.maps)["frag_untracked"] == 0


def test_first_fragment_to_empty_frontend_is_rejected_later_ones_dropped(datapath, writer):
    writer.apply(state(frontend(VIP, 53, [], proto=Protocol.UDP, name="dns")))
    ins = frags(CLIENT, VIP, 5000, 53)
    res = check(datapath, Case("first fragment: ICMP port unreachable", "from_pod", from_pod(ins[0]),
                               REDIRECT,
                               to_pod(IP(src=VIP, dst=CLIENT, id=0, ttl=64, tos=0xC0) /
                                      ICMP(type=3, code=3) /
                                      Raw(bytes(ins[0])[:28]))))
    assert res.verdict == "TC_ACT_REDIRECT"
    check(datapath, Case("later fragment: dropped", "from_pod", from_pod(ins[1]), SHOT))


def test_fragment_entry_older_than_reassembly_timeout_is_not_borrowed(datapath, writer):
    from ebpfsvc import abi
    from .conftest import age

    writer.apply(state(DNS))
    b = expected_backend(DNS, CLIENT, 5000)
    check(datapath, Case("first fragment", "from_pod", from_pod(frags(CLIENT, VIP, 5000, 53, 9)[0]), OK,
                         from_pod(frags(CLIENT, b, 5000, 5353, 9)[0])))
    # Long after, a later fragment with the same IP id (ids wrap) is another datagram's.
    assert age(datapath, "frag4", "first_seen_ns", abi.FRAG_TIMEOUT_S + 1) == 1
    check(datapath, Case("later fragment after the reassembly timeout", "from_pod",
                         from_pod(frags(CLIENT, VIP, 5000, 53, 9)[1]), SHOT))
    assert stats.drops(datapath.maps)["frag_untracked"] == 1
