"""A fragmented reply of a pod balanced to itself (hairpin): every fragment, not only the first, is
turned back into VIP -> pod. Before, the first fragment's ports were not remembered, so the later
ones left untranslated towards the hairpin address and the datagram never reassembled in the pod.
Found by the differential run (tests/diff)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.packet import Raw

from ebpfsvc.lbmodel import Protocol

from .packets import CLIENT, HAIRPIN, OK, VIP, Case, be, check, from_pod, frontend, state, udp

pytestmark = pytest.mark.root

SELF_DNS = frontend(VIP, 53, [be(CLIENT, 5353, Protocol.UDP)], proto=Protocol.UDP, name="dns")
PAYLOAD = bytes(range(256)) * 8      # 2048 bytes: three fragments of 800


def frags(src, dst, sport, dport, ip_id=0x5151):
    return fragment(IP(src=src, dst=dst, id=ip_id) / UDP(sport=sport, dport=dport) / Raw(PAYLOAD), fragsize=800)


def test_fragmented_hairpin_reply_is_translated_whole(datapath, writer):
    writer.apply(state(SELF_DNS))
    check(datapath, Case("query to the pod's own Service: DNAT to itself, SNAT to the hairpin address",
                         "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53, b"q")), OK,
                         from_pod(udp(HAIRPIN, CLIENT, 5000, 5353, b"q"))))
    ins, outs = frags(CLIENT, HAIRPIN, 5353, 5000), frags(VIP, CLIENT, 53, 5000)
    assert len(ins) == 3 and ins[0].flags.MF and ins[2].frag > 0
    for i, (fin, fout) in enumerate(zip(ins, outs)):
        check(datapath, Case(f"reply fragment {i}: VIP:53 -> pod", "from_pod", from_pod(fin), OK, from_pod(fout)))
