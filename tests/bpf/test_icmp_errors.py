"""ICMP errors about translated flows reach the client about the VIP: the
embedded packet (client -> backend after DNAT) becomes client -> VIP again, with
its IP and L4 checksums, the outer source if the backend sent it, and the ICMP
checksum all consistent (scapy recomputes every one of them for the expected
packet)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from ebpfsvc.lbmodel import Protocol

from .packets import (
    BACKEND1, CLIENT, OK, VIP, Case, be, check, from_pod, frontend, state, tcp, to_pod, udp,
)

pytestmark = pytest.mark.root

ROUTER = "198.18.3.1"
WEB = frontend(VIP, 80, [be(BACKEND1)])
DNS = frontend(VIP, 53, [be(BACKEND1, 5353, Protocol.UDP)], proto=Protocol.UDP, name="dns")


def icmp_error(src, type_, code, inner, **icmpkw):
    return to_pod(IP(src=src, dst=CLIENT, id=9) / ICMP(type=type_, code=code, **icmpkw) / inner)


@pytest.fixture
def tcp_flow(datapath, writer):
    writer.apply(state(WEB))
    check(datapath, Case("SYN", "from_pod", from_pod(tcp(CLIENT, VIP, 40000, 80, "S")), OK,
                         from_pod(tcp(CLIENT, BACKEND1, 40000, 8080, "S"))))


@pytest.fixture
def udp_flow(datapath, writer):
    writer.apply(state(DNS))
    check(datapath, Case("query", "from_pod", from_pod(udp(CLIENT, VIP, 5000, 53, b"q")), OK,
                         from_pod(udp(CLIENT, BACKEND1, 5000, 5353, b"q"))))


def test_frag_needed_from_a_router(datapath, tcp_flow):
    inner_in = IP(src=CLIENT, dst=BACKEND1, id=1) / TCP(sport=40000, dport=8080, flags="PA", seq=1001, ack=1)
    inner_out = IP(src=CLIENT, dst=VIP, id=1) / TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=1)
    check(datapath, Case("fragmentation needed, full embedded TCP header", "to_pod",
                         icmp_error(ROUTER, 3, 4, inner_in, nexthopmtu=1400), OK,
                         icmp_error(ROUTER, 3, 4, inner_out, nexthopmtu=1400)))


def test_time_exceeded_quoting_8_bytes(datapath, tcp_flow):
    # RFC 792 minimum quote: IP header + 8 bytes (ports and sequence, no TCP checksum).
    full_in = bytes(IP(src=CLIENT, dst=BACKEND1, id=1, ttl=1) / TCP(sport=40000, dport=8080, flags="S"))
    full_out = bytes(IP(src=CLIENT, dst=VIP, id=1, ttl=1) / TCP(sport=40000, dport=80, flags="S"))
    check(datapath, Case("time exceeded in transit", "to_pod",
                         icmp_error(ROUTER, 11, 0, Raw(full_in[:28])), OK,
                         icmp_error(ROUTER, 11, 0, Raw(full_out[:28]))))


def test_port_unreachable_from_the_backend_itself(datapath, udp_flow):
    inner_in = IP(src=CLIENT, dst=BACKEND1, id=1) / UDP(sport=5000, dport=5353) / Raw(b"q")
    inner_out = IP(src=CLIENT, dst=VIP, id=1) / UDP(sport=5000, dport=53) / Raw(b"q")
    check(datapath, Case("the backend's own port unreachable speaks as the VIP", "to_pod",
                         icmp_error(BACKEND1, 3, 3, inner_in), OK,
                         icmp_error(VIP, 3, 3, inner_out)))


def test_icmp_error_about_unknown_flow_is_untouched(datapath, tcp_flow):
    inner = IP(src=CLIENT, dst=BACKEND1) / TCP(sport=40001, dport=8080, flags="S")
    check(datapath, Case("no such flow", "to_pod", icmp_error(ROUTER, 3, 1, inner), OK))


def test_icmp_echo_reply_is_untouched(datapath, tcp_flow):
    check(datapath, Case("echo reply", "to_pod", to_pod(IP(src=BACKEND1, dst=CLIENT) / ICMP(type=0)), OK))


def client_error(dst, type_, code, inner):
    """An ICMP error the client pod sends (leaving the pod)."""
    return from_pod(IP(src=CLIENT, dst=dst, id=9) / ICMP(type=type_, code=code) / inner)


def test_client_port_unreachable_about_a_reply_reaches_the_backend(datapath, udp_flow):
    # The reply came from VIP:53 (after reverse NAT); the client's socket is gone.
    inner_in = IP(src=VIP, dst=CLIENT, id=3) / UDP(sport=53, dport=5000) / Raw(b"answer")
    inner_out = IP(src=BACKEND1, dst=CLIENT, id=3) / UDP(sport=5353, dport=5000) / Raw(b"answer")
    check(datapath, Case("client's port unreachable about VIP:53 -> backend:5353", "from_pod",
                         client_error(VIP, 3, 3, inner_in), OK, client_error(BACKEND1, 3, 3, inner_out)))


def test_client_error_about_unknown_reply_is_untouched(datapath, udp_flow):
    inner = IP(src=VIP, dst=CLIENT) / UDP(sport=53, dport=5999) / Raw(b"answer")
    check(datapath, Case("no such flow", "from_pod", client_error(VIP, 3, 3, inner), OK))


def test_client_echo_request_to_vip_is_untouched(datapath, udp_flow):
    check(datapath, Case("ping to the VIP", "from_pod", from_pod(IP(src=CLIENT, dst=VIP) / ICMP()), OK))
