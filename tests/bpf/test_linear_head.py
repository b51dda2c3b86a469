"""The pod-side programs leave a TCP segment's head as the sender's stack built it.

A local TCP socket's segment is a clone (the original waits in the retransmit queue) whose
linear part ends where its payload begins; bpf_skb_pull_data makes what it covers linear AND
writable, so pulling past the headers un-clones the segment: pskb_expand_head, an allocation
and a copy of its head, for every data segment, also those that pass untouched (lb4_parse,
lb4_linear_want in bpf/lib/parse.h). A translated segment is made writable by its rewrite,
but only as far as the headers.

Real sockets through from_pod / to_pod attached to pod veths as the agent attaches them:

    node namespace  <prefix>-nl: the host sides h-cli, h-srv, a /32 route per pod, forwarding on
    pods            <prefix>-cl (client 198.18.1.5), <prefix>-sl (server 198.18.2.1)

A recorder on the server pod's eth0 (ingress, in its own namespace: after both programs) notes
for every TCP segment that carries payload how far its linear part reaches past its headers.
Everything is in the test's namespaces and removed afterwards, also on failure.
"""

from __future__ import annotations

import socket
import threading

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as netns_mod

from ebpfsvc.datapath import nsenter, tc
from ebpfsvc.datapath.writer import MapWriter

from .conftest import TEST_LIMITS
from .packets import HAIRPIN, be, frontend, state

pytestmark = pytest.mark.root

CLIENT, SERVER, VIP = "198.18.1.5", "198.18.2.1", "198.19.0.10"
GATEWAY = "198.18.0.254"
PORT = 8080

# Per TCP segment with payload seen at the server's eth0: how many, and the most bytes of
# payload any of them had in its linear part.
RECORDER = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(seen, u64, 2);      /* 0: data segments, 1: most payload bytes in the linear part */

int record(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
    struct iphdr *iph = data + ETH_HLEN;
    struct tcphdr *th;
    u32 hdrs, k0 = 0, k1 = 1;
    u64 *n, *most, extra;

    if ((void *)(iph + 1) > data_end || iph->protocol != IPPROTO_TCP || iph->ihl != 5)
        return TC_ACT_OK;
    th = (void *)(iph + 1);
    if ((void *)(th + 1) > data_end)
        return TC_ACT_OK;
    hdrs = 20 + th->doff * 4;
    if (bpf_ntohs(iph->tot_len) <= hdrs)
        return TC_ACT_OK;                       /* no payload: nothing to pull */
    extra = (u64)(data_end - data) - ETH_HLEN - hdrs;
    n = seen.lookup(&k0);
    most = seen.lookup(&k1);
    if (n && most) {
        __sync_fetch_and_add(n, 1);
        if (extra > *most)
            *most = extra;
    }
    return TC_ACT_OK;
}
"""


@pytest.fixture
def pods(unique_prefix, compiled):
    from bcc import BPF

    node, client_ns, server_ns = f"{unique_prefix}-nl", f"{unique_prefix}-cl", f"{unique_prefix}-sl"
    made: list[str] = []
    try:
        for ns in (node, client_ns, server_ns):
            netns_mod.create(ns)
            made.append(ns)
        nsenter.write_sysctls(node, {"net.ipv4.ip_forward": 1})
        # The run's programs (tests/bpf/conftest.py) on maps of this test's own.
        dp = compiled.load(TEST_LIMITS, maps="linear-head", hairpin_addr=HAIRPIN)
        with IPRoute(netns=node) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for addr, ns, host in ((CLIENT, client_ns, "h-cli"), (SERVER, server_ns, "h-srv")):
                ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
                idx = ipr.link_lookup(ifname=host)[0]
                ipr.addr("add", index=idx, address=GATEWAY, prefixlen=32)
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst=f"{addr}/32", oif=idx)
                tc.attach(idx, dp.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns=node)
                tc.attach(idx, dp.programs["to_pod"].fd, "to_pod", tc.EGRESS, netns=node)
        for addr, ns in ((CLIENT, client_ns), (SERVER, server_ns)):
            with IPRoute(netns=ns) as ipr:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.addr("add", index=idx, address=addr, prefixlen=32)
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst=f"{GATEWAY}/32", oif=idx, scope=253)     # link scope: on the veth
                ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=idx)
        recorder = BPF(text=RECORDER.encode())
        try:
            fn = recorder.load_func(b"record", BPF.SCHED_CLS)
            with IPRoute(netns=server_ns) as ipr:
                eth0 = ipr.link_lookup(ifname="eth0")[0]
            tc.attach(eth0, fn.fd, "record", tc.INGRESS, netns=server_ns)
            yield dp, client_ns, server_ns, recorder[b"seen"]
        finally:
            recorder.cleanup()
    finally:
        for ns in made:
            netns_mod.remove(ns)


def _sink(server_ns: str) -> tuple[socket.socket, threading.Thread, list[int]]:
    """A server that reads one connection to the end; got[0]: bytes read."""
    srv = nsenter.socket_in(server_ns)
    srv.bind((SERVER, PORT))
    srv.listen(8)
    srv.settimeout(10)
    got = [0]

    def serve():
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                while chunk := conn.recv(65536):
                    got[0] += len(chunk)
        except OSError:
            return          # closed by the test, or nothing came: the byte count says so

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t, got


def _send(client_ns: str, addr: str, writes: int, size: int) -> None:
    s = nsenter.socket_in(client_ns)
    with s:
        s.settimeout(10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)      # a segment per write
        s.connect((addr, PORT))
        for i in range(writes):
            s.sendall(bytes([i % 256]) * size)


@pytest.mark.parametrize("target", ["pod address (passes untouched)", "ClusterIP (translated)"])
def test_tcp_data_segments_keep_their_payload_out_of_the_head(pods, target):
    dp, client_ns, server_ns, seen = pods
    MapWriter(dp.maps).apply(state(frontend(VIP, PORT, [be(SERVER, PORT)])))
    addr = SERVER if target.startswith("pod") else VIP
    srv, thread, got = _sink(server_ns)
    try:
        _send(client_ns, addr, writes=50, size=300)
        thread.join(timeout=10)
    finally:
        srv.close()
    assert got[0] == 50 * 300, "every byte reached the server"
    segments, most = seen[seen.Key(0)].value, seen[seen.Key(1)].value
    # TCP may coalesce writes (autocorking) whatever TCP_NODELAY says: many segments, not 50.
    assert segments >= 10, f"the recorder saw {segments} data segments"
    # lb4_parse needs the IP and TCP headers only: none of the payload is pulled into the head
    # (LB_PULL_LEN, the IPv4 parser's most, reaches 28 bytes past a timestamped TCP header).
    assert most == 0, f"a data segment reached the server with {most} payload bytes in its linear part"
