"""The differential run of the uplink programs (bpf/lb_node.c: from_uplink, to_uplink at TC): a
reference model of north-south Service traffic and the same generated packets through the real
programs (BPF_PROG_TEST_RUN, inside a namespace that looks like node-1 of the lab:
tests/bpf/northsouth.py), compared packet by packet: verdict, exact output bytes, and every
conntrack and SNAT entry the packet touched (both maps, and the drop counters, compared whole at
the end of each epoch).

The model (UplinkModel) is written from docs/northsouth.md, docs/semantics.md and abi.h, on the
pod-side model's parsing, checksums, conntrack states and backend choice (tests/diff/model.py):

- a new flow to an EXTERNAL frontend (NodePort, externalIP, LoadBalancer IP), or to a ClusterIP
  routed to the node (its INTERNAL frontend of kind ClusterIP; the INTERNAL twins of the others
  never match), not to a port-0 address marker;
- loadBalancerSourceRanges: a new flow from a client outside them is dropped (source_range);
- no backend: traffic policy Local drops (no_local_backend), Cluster rejects (RST / ICMP port
  unreachable from the frontend, back out of the uplink); a TCP segment that is no SYN and has no
  flow is the kernel's (kube-proxy translated it): untouched;
- a backend on this node (LB_BE_F_LOCAL): DNAT only, TC_ACT_OK, the client address kept; the
  pod's reply leaving the uplink (to_uplink) gets the frontend back as its source;
- a backend on another node: SNAT to the node address + DNAT, sent by the program (TC_ACT_REDIRECT,
  MACs of the next hop, TTL - 1; TTL 1: dropped, ttl_exceeded). The source port: a TCP client's own
  from SNAT_KEEP_PORT_MIN when no live flow to that backend holds it, else SNAT_PORT_MIN + (flow
  hash + probe) % range for probe 0.. SNAT_PORT_PROBES - 1; a port whose flow is over is free
  again.  lb4_snat holds FORWARD (client -> frontend) -> (node, port) and REPLY (backend -> node:port)
  -> (client, port); the backend's reply is found by that and becomes frontend -> client, sent to
  the client (TTL - 1);
- flows carry CT_F_NODEPORT (| CT_F_SNAT), keep their backend, end and restart as on the pod side;
  a removed backend resets a TCP flow (RST from the frontend) and moves a datagram's (also off a
  not-ready one), removing every entry of the flow, SNAT halves included.

With `--xdp` (run(xdp=True)) packets from the uplink meet xdp_uplink first and from_uplink only if
passed: the two together must do what the model does.

ICMP errors about SNATed flows (fragmentation needed, unreachable; from the backend or a router)
are translated back to the client.  Not modelled (the generator sends none): other ICMP errors
(a local backend's, a client's about a reply), fragments, affinity, random frontends,
node clients.  `make fuzz` runs the pod side; `python -m tests.diff.uplink --packets 200000` this.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import struct
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from ebpfsvc import abi
from ebpfsvc.datapath import loader, nodeaddrs, nsenter, stats
from ebpfsvc.datapath.flowhash import flow_hash
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, FrontendKind, LBState, Protocol, Scope, ServicePortName

from . import model as M
from . import runner as R
from .generator import ip_packet, tcp_seg, udp_dgram

F_NODEPORT, F_SNAT = abi.CT_F_NODEPORT, abi.CT_F_SNAT
BE_LOCAL = abi.LB_BE_F_LOCAL
SVC_SOURCE_RANGES = abi.LB_SVC_F_SOURCE_RANGES
SVC_KINDS = abi.LB_SVC_F_NODEPORT | abi.LB_SVC_F_EXTERNAL_IP | abi.LB_SVC_F_LOADBALANCER | abi.LB_SVC_F_ADDRESS
SCOPE_EXTERNAL = abi.LB_SCOPE_EXTERNAL
PORT_RANGE = abi.SNAT_PORT_MAX - abi.SNAT_PORT_MIN + 1
XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
CHURN = 0.01          # chance, per packet, that a backend changes first (UplinkRunner.churn)

# node-1 of the lab, as tests/bpf/northsouth.py builds its namespace.
NODE, NODE2 = "198.18.0.11", "198.18.0.12"
CLIENTS = ["198.18.0.100", "198.18.0.101"]
MAC = {"node": bytes.fromhex("020000000011"), NODE2: bytes.fromhex("020000000012"),
       CLIENTS[0]: bytes.fromhex("020000000100"), CLIENTS[1]: bytes.fromhex("020000000101")}
LB_IP, EXT_IP, CLUSTER_IP = "198.18.200.10", "198.18.200.32", "198.19.0.10"
LOCAL = ["198.18.1.2", "198.18.1.3"]
REMOTE = ["198.18.2.2", "198.18.2.3", "198.18.2.4"]
A = ipaddress.IPv4Address
# Client source ports: few, so that the two clients' flows collide on kept SNAT ports and closed
# flows' ports are reused; some below SNAT_KEEP_PORT_MIN (always a range port).
SPORTS = [1000, 1001, 1023, 1024, 40000, 40001, 40002, 40003, 50000, 50001]


def _ab(a: str) -> bytes:
    return A(a).packed


def _dotted(a: bytes) -> str:
    return str(A(a))


def scenario() -> LBState:
    """Every kind of north-south frontend (and an INTERNAL NodePort twin that must not match)."""
    T, U = Protocol.TCP, Protocol.UDP

    def be(addr, port=8080, proto=T, **kw):
        return Backend(A(addr), port, proto, local=addr in LOCAL, **kw)

    def fe(addr, port, backends, proto=T, kind=FrontendKind.NODE_PORT, name="np", scope=Scope.EXTERNAL, **kw):
        return Frontend(key=FrontendKey(A(addr), port, proto, scope),
                        service=ServicePortName("default", name, "", proto), kind=kind,
                        backends=tuple(backends), **kw)

    return LBState.of([
        fe(NODE, 30080, [be(a) for a in REMOTE], name="remote"),
        fe(NODE, 30081, [be(LOCAL[0])], name="local"),
        fe(NODE, 30082, [be(LOCAL[0]), be(REMOTE[0]), be(LOCAL[1]), be(REMOTE[1])], name="mixed"),
        fe(NODE, 30083, [be(a) for a in LOCAL], name="etp-local", local_only=True),
        fe(NODE, 30084, [], name="etp-local-empty", local_only=True),
        fe(NODE, 30085, [], name="empty"),
        fe(NODE, 30053, [be(REMOTE[0], 5353, U), be(LOCAL[1], 5353, U)], proto=U, name="dns"),
        fe(NODE, 30086, [be(REMOTE[2])], name="internal-twin", scope=Scope.INTERNAL),
        fe(LB_IP, 80, [be(REMOTE[2]), be(LOCAL[1])], kind=FrontendKind.LOAD_BALANCER, name="lb",
           source_ranges=(ipaddress.IPv4Network(f"{CLIENTS[0]}/32"),)),
        fe(EXT_IP, 80, [be(LOCAL[0])], kind=FrontendKind.EXTERNAL_IP, name="ext"),
        fe(CLUSTER_IP, 80, [be(REMOTE[1]), be(LOCAL[1])], kind=FrontendKind.CLUSTER_IP, name="routed",
           scope=Scope.INTERNAL),
    ])


class UplinkModel(M.Model):
    """from_uplink and to_uplink over the shared maps (module docstring)."""

    def __init__(self, maps: M.Maps, ranges: set, lifetimes: M.Lifetimes):
        super().__init__(maps, bytes(4), lifetimes)
        self.node = _ab(NODE)
        self.ranges = ranges                # (frontend id, network) of loadBalancerSourceRanges
        self.snat: dict = {}                # ct key -> (address, port), lb4_snat

    # -- helpers
    def _set_snat(self, key, val):
        self.touched.add(("snat", key))
        if val is None:
            self.snat.pop(key, None)
        else:
            self.snat[key] = val

    def _hop(self, buf: bytearray) -> bool:
        """A packet the program sends on itself loses a hop (ip_decrease_ttl); False: TTL 1, not sent."""
        ttl = buf[M.L3 + 8]
        if ttl <= 1:
            return False
        old = bytes(buf[M.L3 + 8:M.L3 + 10])
        buf[M.L3 + 8] = ttl - 1
        ipc = int.from_bytes(buf[M.L3 + 10:M.L3 + 12], "big")
        buf[M.L3 + 10:M.L3 + 12] = M.csum_update(ipc, old, bytes(buf[M.L3 + 8:M.L3 + 10])).to_bytes(2, "big")
        return True

    def _send(self, buf: bytearray, to: bytes) -> tuple[int, bytes]:
        """Redirected out of the uplink towards `to`: its next hop's MAC (a remote pod: node-2)."""
        hop = NODE2 if _dotted(to) in REMOTE else _dotted(to)
        buf[0:12] = MAC[hop] + MAC["node"]
        return M.REDIRECT, bytes(buf)

    def _admitted(self, svc: M.Service, client: bytes) -> bool:
        addr = A(client)
        return any(fid == svc.frontend_id and addr in net for fid, net in self.ranges)

    def _frontend_of(self, addr, port, proto) -> M.Service | None:
        svc = self.m.frontends.get((addr, port, proto, SCOPE_EXTERNAL))
        if svc is not None:
            return svc
        svc = self.m.frontends.get((addr, port, proto, M.SCOPE_INTERNAL))
        if svc is not None and not svc.flags & SVC_KINDS:       # a ClusterIP routed to the node
            return svc
        return None

    def _snat_reply_key(self, flow: M.Flow, port: int, proto: int):
        return (flow.backend_addr, self.node, flow.backend_port, port, proto, M.REPLY)

    def _over(self, key) -> bool:
        """Whether the flow holding a SNAT port (its conntrack reply entry) is over."""
        flow = self._live(key)
        return flow is None or (key[4] == M.TCP and M.closing(flow.flags))

    def _claim(self, p: M.Pkt, be: M.BackendEntry) -> int | None:
        def free(port):
            k = (be.address, self.node, be.port, port, p.proto, M.REPLY)
            return k not in self.snat or self._over(k)

        if p.proto == M.TCP and p.sport >= abi.SNAT_KEEP_PORT_MIN and free(p.sport):
            return p.sport
        h = flow_hash(_dotted(p.saddr), _dotted(p.daddr), p.sport, p.dport, p.proto)
        for probe in range(abi.SNAT_PORT_PROBES):
            port = abi.SNAT_PORT_MIN + (h + probe) % PORT_RANGE
            if free(port):
                return port
        return None

    def _delete_nodeport_flow(self, fk, flow: M.Flow):
        if flow.flags & F_SNAT:
            out = self.snat.get(fk)
            if out is not None:
                self._set_ct(self._snat_reply_key(flow, out[1], fk[4]), None)
                self._set_snat(self._snat_reply_key(flow, out[1], fk[4]), None)
            self._set_snat(fk, None)
        else:
            self._set_ct(self._reply_key(fk, flow), None)
        self._set_ct(fk, None)

    # -- from_uplink
    def from_uplink(self, frame: bytes, pick=None) -> tuple[int, bytes]:
        p = self._begin(frame, M.FWD)
        if isinstance(p, tuple):
            return p
        fk = (p.saddr, p.daddr, p.sport, p.dport, p.proto, M.FWD)
        flow = self.m.ct.get(fk)
        if flow is not None and flow.flags & F_NODEPORT:
            if self._live(fk) is None or M.restarts_flow(flow.flags, p):
                self._delete_nodeport_flow(fk, flow)
                flow = None
        else:
            flow = None
        if flow is not None:
            if not self._usable(flow.backend_id, p.proto):
                self._delete_nodeport_flow(fk, flow)
                if p.proto == M.TCP:
                    return self._reject(frame, p, "backend_gone")
                return self._new(frame, p, fk)
            self._refresh(fk)
            flags = flow.flags | M.tcp_state(p, M.FWD)
            if flags != flow.flags:
                flow = replace(flow, flags=flags)
                self._set_ct(fk, flow)
                rk = self._flow_reply_key(fk, flow)
                if rk is not None and rk in self.m.ct:
                    self._set_ct(rk, replace(self.m.ct[rk], flags=self.m.ct[rk].flags | flags))
            return self._forward_nodeport(frame, p, fk, flow)
        if p.daddr == self.node:
            out = self._snat_reply(frame, p)
            if out is not None:
                return out
        return self._new(frame, p, fk)

    def _flow_reply_key(self, fk, flow: M.Flow):
        if flow.flags & F_SNAT:
            out = self.snat.get(fk)
            return None if out is None else self._snat_reply_key(flow, out[1], fk[4])
        return self._reply_key(fk, flow)

    def _forward_nodeport(self, frame, p: M.Pkt, fk, flow: M.Flow):
        buf = bytearray(frame)
        if not flow.flags & F_SNAT:
            M.rewrite(buf, p, dst=(flow.backend_addr, flow.backend_port))
            return M.OK, bytes(buf)
        if not self._hop(buf):
            return self._drop("ttl_exceeded")
        node, port = self.snat[fk]
        M.rewrite(buf, p, src=(node, port), dst=(flow.backend_addr, flow.backend_port))
        return self._send(buf, flow.backend_addr)

    def _snat_reply(self, frame, p: M.Pkt):
        rk = (p.saddr, p.daddr, p.sport, p.dport, p.proto, M.REPLY)
        client = self.snat.get(rk)
        flow = self._live(rk)
        if client is None or flow is None or not flow.flags & F_SNAT:
            return None
        # What the packet says of the connection counts even when its last hop ends here, as
        # conntrack sees a packet before the forwarding path drops it.
        self._note_reply(rk, flow, p, client=client)
        buf = bytearray(frame)
        if not self._hop(buf):
            return self._drop("ttl_exceeded")
        M.rewrite(buf, p, src=(flow.frontend_addr, flow.frontend_port), dst=client)
        return self._send(buf, client[0])

    def _new(self, frame, p: M.Pkt, fk, pick=None):
        svc = self._frontend_of(p.daddr, p.dport, p.proto)
        if svc is None or svc.flags & M.SVC_ADDRESS:
            return M.OK, frame
        if svc.flags & SVC_SOURCE_RANGES and not self._admitted(svc, p.saddr):
            return self._drop("source_range")
        if not svc.backend_count or not svc.maglev_size:
            if svc.flags & M.SVC_LOCAL_ONLY:
                return self._drop("no_local_backend")
            return self._reject(frame, p, "no_backend")
        if not M.starts_flow(p):
            return M.OK, frame
        bid = self._select(svc, p, pick)
        if bid is None:
            return self._drop("no_backend")
        be = self.m.backends[bid]
        flow = M.Flow(backend_id=bid, service_id=svc.service_id, frontend_id=svc.frontend_id,
                      frontend_addr=p.daddr, backend_addr=be.address, frontend_port=p.dport,
                      backend_port=be.port, flags=F_NODEPORT | M.tcp_state(p, M.FWD))
        if be.flags & BE_LOCAL or svc.flags & M.SVC_LOCAL_ONLY:     # source-preserving
            rk = self._reply_key(fk, flow)
        else:
            if frame[M.L3 + 8] <= 1:
                return self._drop("ttl_exceeded")
            port = self._claim(p, be)
            if port is None:
                return self._drop("snat_exhausted")
            flow = replace(flow, flags=flow.flags | F_SNAT)
            rk = self._snat_reply_key(flow, port, p.proto)
            self._set_snat(rk, (p.saddr, p.sport))
            self._set_snat(fk, (self.node, port))
        self._set_ct(fk, flow)
        self._set_ct(rk, flow)
        self._refresh(fk)
        self._refresh(rk)
        return self._forward_nodeport(frame, p, fk, flow)

    # -- ICMP errors
    def _icmp(self, frame, p: M.Pkt, direction: int) -> tuple[int, bytes]:
        """An ICMP error arriving for the node about a SNATed flow's packet (node:port -> backend;
        fragmentation needed on the way, the backend's port unreachable) is made to be about
        client -> frontend: quoted addresses, ports, quoted IP and L4 checksums, the ICMP checksum;
        its destination becomes the client, its source the frontend when the backend itself sent
        it; sent on to the client (a hop). Every other ICMP packet passes untouched here."""
        if direction != M.FWD or p.icmp_type not in M.ICMP_ERRORS or p.first_fragment or p.later_fragment:
            return M.OK, frame
        end = M.L3 + p.tot_len
        icmp_off = M.L3 + p.ihl
        q = icmp_off + 8
        if q + 20 > end or p.daddr != self.node:
            return M.OK, frame
        qihl = (frame[q] & 0xF) * 4
        qproto = frame[q + 9]
        if frame[q] >> 4 != 4 or qihl < 20 or qproto not in (M.TCP, M.UDP, M.SCTP) or q + qihl + 4 > end:
            return M.OK, frame
        ql4 = q + qihl
        qsrc, qdst = frame[q + 12:q + 16], frame[q + 16:q + 20]
        qsport, qdport = struct.unpack("!HH", frame[ql4:ql4 + 4])
        rk = (qdst, qsrc, qdport, qsport, qproto, M.REPLY)
        client = self.snat.get(rk)
        flow = self._live(rk)
        if client is None or flow is None or not flow.flags & F_SNAT:
            return M.OK, frame
        buf = bytearray(frame)
        old_icmp = bytes(buf[icmp_off:end])
        new_src, new_dst = (client[0], client[1]), (flow.frontend_addr, flow.frontend_port)
        l4c = {M.TCP: 16, M.UDP: 6}.get(qproto)
        if l4c is not None and ql4 + l4c + 2 <= end:
            hc = int.from_bytes(buf[ql4 + l4c:ql4 + l4c + 2], "big")
            if not (qproto == M.UDP and hc == 0):
                old = qsrc + qsport.to_bytes(2, "big") + qdst + qdport.to_bytes(2, "big")
                new = new_src[0] + new_src[1].to_bytes(2, "big") + new_dst[0] + new_dst[1].to_bytes(2, "big")
                buf[ql4 + l4c:ql4 + l4c + 2] = M.csum_update(hc, old, new).to_bytes(2, "big")
        buf[ql4:ql4 + 4] = struct.pack("!HH", new_src[1], new_dst[1])
        qc = int.from_bytes(buf[q + 10:q + 12], "big")
        buf[q + 10:q + 12] = M.csum_update(qc, qsrc + qdst, new_src[0] + new_dst[0]).to_bytes(2, "big")
        buf[q + 12:q + 16], buf[q + 16:q + 20] = new_src[0], new_dst[0]
        ic = int.from_bytes(buf[icmp_off + 2:icmp_off + 4], "big")
        new_icmp = bytes(buf[icmp_off:end])
        if len(old_icmp) % 2:
            old_icmp, new_icmp = old_icmp + b"\0", new_icmp + b"\0"
        buf[icmp_off + 2:icmp_off + 4] = M.csum_update(ic, old_icmp, new_icmp).to_bytes(2, "big")
        outer_src = bytes(buf[M.L3 + 12:M.L3 + 16])
        new_outer_src = flow.frontend_addr if outer_src == flow.backend_addr else outer_src
        oc = int.from_bytes(buf[M.L3 + 10:M.L3 + 12], "big")
        buf[M.L3 + 10:M.L3 + 12] = M.csum_update(oc, outer_src + self.node, new_outer_src + client[0]).to_bytes(2, "big")
        buf[M.L3 + 12:M.L3 + 16], buf[M.L3 + 16:M.L3 + 20] = new_outer_src, client[0]
        if not self._hop(buf):
            return self._drop("ttl_exceeded")
        return self._send(buf, client[0])

    # -- to_uplink
    def to_uplink(self, frame: bytes, pick=None) -> tuple[int, bytes]:
        p = self._begin(frame, M.REPLY)
        if isinstance(p, tuple):
            return p
        rk = (p.saddr, p.daddr, p.sport, p.dport, p.proto, M.REPLY)
        flow = self._live(rk)
        if flow is None or not flow.flags & F_NODEPORT or flow.flags & F_SNAT:
            return M.OK, frame
        if p.proto == M.TCP and M.closing(flow.flags) and p.tcp_flags & (M.T_SYN | M.T_ACK) == M.T_SYN | M.T_ACK:
            return M.OK, frame
        self._note_reply(rk, flow, p, client=(p.daddr, p.dport))
        buf = bytearray(frame)
        M.rewrite(buf, p, src=(flow.frontend_addr, flow.frontend_port))
        return M.OK, bytes(buf)


# ---------------------------------------------------------------- the generator

class UplinkGenerator:
    """Seeded north-south traffic: clients open flows to every frontend (and to ports of nobody),
    carry data, close or reset them and reuse their ports; backends answer (remote ones to the SNAT
    port, local ones through to_uplink); segments of flows never seen, TTLs of 1 and 2, stray
    replies to the SNAT range.  (The runner turns backends terminating, not ready, removed and
    back now and then.)"""

    KINDS = {"new": 20, "data": 22, "reply": 26, "close": 8, "midstream": 4, "stray": 4, "ttl": 3, "other": 4,
             "icmp_error": 5}

    def __init__(self, seed: int, model: UplinkModel):
        self.rng = np.random.default_rng(seed)
        self.model = model
        self.targets = [(k[0], k[1], k[2]) for k in model.m.frontends if k[1]] + [
            (_ab(NODE), 22, M.TCP), (_ab(NODE), 30999, M.TCP), (_ab(NODE), 30080, M.UDP), (_ab(LB_IP), 81, M.TCP)]
        self.flows: list = []           # forward ct keys of flows the generator started
        names = list(self.KINDS)
        w = np.array([self.KINDS[n] for n in names], dtype=float)
        self.names, self.weights = names, w / w.sum()

    def _pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def forget_flows(self):
        self.flows.clear()

    def _frame(self, src_mac, l3: bytes) -> bytes:
        return MAC["node"] + src_mac + b"\x08\x00" + l3

    def _client_pkt(self, client, dst, sport, dport, proto, flags=M.T_ACK, ttl=64, payload=b"") -> bytes:
        seq = int(self.rng.integers(1 << 32))
        if proto == M.TCP:
            l4 = tcp_seg(client, dst, sport, dport, flags, seq=seq, ack=seq ^ 0x5555, payload=payload)
        else:
            l4 = udp_dgram(client, dst, sport, dport, payload or b"q")
        return self._frame(MAC[_dotted(client)], ip_packet(client, dst, proto, l4, ttl=ttl,
                                                           ip_id=int(self.rng.integers(65536))))

    def next(self) -> tuple[str, str, bytes]:
        kind = self.names[int(self.rng.choice(len(self.names), p=self.weights))]
        if kind in ("data", "reply", "close") and not self.flows:
            kind = "new"
        return (kind, *getattr(self, "_k_" + kind)())

    def _k_new(self):
        client = _ab(self._pick(CLIENTS))
        dst, dport, proto = self._pick(self.targets)
        sport = self._pick(SPORTS)
        self.flows.append((client, dst, sport, dport, proto, M.FWD))
        flags = M.T_SYN
        return "from_uplink", self._client_pkt(client, dst, sport, dport, proto, flags)

    def _k_ttl(self):
        client = _ab(self._pick(CLIENTS))
        dst, dport, proto = self._pick(self.targets)
        sport = self._pick(SPORTS)
        return "from_uplink", self._client_pkt(client, dst, sport, dport, proto, M.T_SYN, ttl=self._pick([1, 2]))

    def _k_data(self):
        client, dst, sport, dport, proto, _ = self._pick(self.flows)
        return "from_uplink", self._client_pkt(client, dst, sport, dport, proto, M.T_ACK | 0x08, payload=b"data")

    def _k_close(self):
        client, dst, sport, dport, proto, _ = self._pick(self.flows)
        flags = self._pick([M.T_FIN | M.T_ACK, M.T_RST, M.T_FIN | M.T_ACK])
        if self.rng.random() < 0.5:
            return "from_uplink", self._client_pkt(client, dst, sport, dport, proto, flags)
        return self._reply(client, dst, sport, dport, proto, flags)

    def _k_reply(self):
        client, dst, sport, dport, proto, _ = self._pick(self.flows)
        return self._reply(client, dst, sport, dport, proto, self._pick([M.T_SYN | M.T_ACK, M.T_ACK | 0x08]))

    def _reply(self, client, dst, sport, dport, proto, flags):
        """The backend's answer, addressed as the backend sees the flow (the model's entries)."""
        fk = (client, dst, sport, dport, proto, M.FWD)
        flow = self.model.m.ct.get(fk)
        if flow is None:        # a flow never made (or over): a stray answer from some backend
            return self._k_stray()
        seq = int(self.rng.integers(1 << 32))
        if flow.flags & F_SNAT:
            node, port = self.model.snat.get(fk, (_ab(NODE), 61000))
            l4 = (tcp_seg(flow.backend_addr, node, flow.backend_port, port, flags, seq=seq, ack=seq ^ 1)
                  if proto == M.TCP else udp_dgram(flow.backend_addr, node, flow.backend_port, port, b"answer"))
            l3 = ip_packet(flow.backend_addr, node, proto, l4, ttl=self._pick([64, 64, 64, 1]))
            return "from_uplink", self._frame(MAC[NODE2], l3)
        l4 = (tcp_seg(flow.backend_addr, client, flow.backend_port, sport, flags, seq=seq, ack=seq ^ 1)
              if proto == M.TCP else udp_dgram(flow.backend_addr, client, flow.backend_port, sport, b"answer"))
        return "to_uplink", MAC[_dotted(client)] + MAC["node"] + b"\x08\x00" + ip_packet(flow.backend_addr, client,
                                                                                         proto, l4)

    def _k_icmp_error(self):
        """An ICMP error for the node about a packet it sent for a flow (mostly a SNATed one, as the
        backend or node-2 on the way answers it), quoting 8 bytes of L4 or all of it; or an echo."""
        flows = [fk for fk in self.flows if fk in self.model.snat]
        if not flows or self.rng.random() < 0.1:
            echo = struct.pack("!BBHI", 8, 0, 0, 1) + b"ping"
            echo = echo[:2] + M.csum(echo).to_bytes(2, "big") + echo[4:]
            return "from_uplink", self._client_pkt_raw(_ab(self._pick(CLIENTS)), _ab(NODE), M.ICMP, echo)
        fk = self._pick(flows)
        flow = self.model.m.ct.get(fk)
        node, port = self.model.snat[fk]
        if flow is None:
            return self._k_stray()
        proto = fk[4]
        l4 = (tcp_seg(node, flow.backend_addr, port, flow.backend_port, M.T_ACK | 0x08, payload=b"z" * 24)
              if proto == M.TCP else udp_dgram(node, flow.backend_addr, port, flow.backend_port, b"z" * 24))
        quoted = ip_packet(node, flow.backend_addr, proto, l4, ttl=63)
        if self.rng.random() < 0.5:
            quoted = quoted[:28]                        # RFC 792: the IP header and 8 bytes
        code, rest = self._pick([(4, 1400), (3, 0), (1, 0)])     # frag needed, port / host unreachable
        icmp = struct.pack("!BBHHH", 3, code, 0, 0, rest) + quoted
        icmp = icmp[:2] + M.csum(icmp).to_bytes(2, "big") + icmp[4:]
        sender = flow.backend_addr if self.rng.random() < 0.5 else _ab(NODE2)
        return "from_uplink", self._frame(MAC[NODE2], ip_packet(sender, node, M.ICMP, icmp,
                                                                ttl=self._pick([64, 64, 64, 1])))

    def _client_pkt_raw(self, client, dst, proto, l4):
        return self._frame(MAC[_dotted(client)], ip_packet(client, dst, proto, l4))

    def _k_stray(self):
        be = _ab(self._pick(REMOTE))
        port = self._pick([abi.SNAT_PORT_MIN + int(self.rng.integers(PORT_RANGE)), self._pick(SPORTS)])
        l4 = tcp_seg(be, _ab(NODE), 8080, port, M.T_SYN | M.T_ACK)
        return "from_uplink", self._frame(MAC[NODE2], ip_packet(be, _ab(NODE), M.TCP, l4))

    def _k_midstream(self):
        client = _ab(self._pick(CLIENTS))
        dst, dport, proto = self._pick(self.targets)
        return "from_uplink", self._client_pkt(client, dst, self._pick(SPORTS), dport, M.TCP, M.T_ACK, payload=b"x")

    def _k_other(self):
        client = _ab(self._pick(CLIENTS))
        if self.rng.random() < 0.5:     # a pod's own traffic leaving the uplink, not a NodePort flow's
            src = _ab(self._pick(LOCAL))
            l4 = tcp_seg(src, client, 8080, self._pick(SPORTS), M.T_SYN | M.T_ACK)
            return "to_uplink", MAC[_dotted(client)] + MAC["node"] + b"\x08\x00" + ip_packet(src, client, M.TCP, l4)
        return "from_uplink", self._client_pkt(client, _ab(self._pick(LOCAL)), 40000, 8080, M.TCP, M.T_SYN)


# ---------------------------------------------------------------- the run

class UplinkRunner(R.Runner):
    """The pod-side runner's comparison over the uplink programs and lb4_snat."""

    def __init__(self, dp, xdp: bool = False):
        self.dp = dp
        self.xdp = xdp
        self.maps = R.read_model_maps(dp)
        ranges = set()
        for k in dp.maps["lb4_source_ranges"].keys():
            ranges.add((k.frontend_id, ipaddress.IPv4Network((A(struct.pack("=I", k.address)), k.prefixlen - 32))))
        self.model = UplinkModel(self.maps, ranges, R.lifetimes())
        self.fds = {name: dp.programs[name].fd for name in ("from_uplink", "to_uplink", "xdp_uplink")}
        self.drops_before = stats.drops(dp.maps)
        self.original_backends = {k.value: (k, v) for k, v in dp.maps["lb4_backends"].items()}

    def churn(self, rng) -> str:
        """One backend changes behind the tables' back (as between the writer's steps, or an endpoint
        removed): terminating, not ready, removed, or back as it was; both sides see the same."""
        table = self.dp.maps["lb4_backends"]
        bid = sorted(self.original_backends)[int(rng.integers(len(self.original_backends)))]
        key, leaf = self.original_backends[bid]
        action = ["terminating", "not_ready", "removed", "restored", "restored"][int(rng.integers(5))]
        if action == "removed":
            self.put_backend(bid, None)
        else:
            flags = {"terminating": M.BE_TERMINATING | leaf.flags,
                     "not_ready": M.BE_NOT_READY | leaf.flags}.get(action, leaf.flags)
            self.put_backend(bid, table.Leaf(leaf.address, leaf.port, leaf.proto, flags))
        self.maps.version += 1
        return action

    def restore_backends(self):
        for bid, (_, leaf) in self.original_backends.items():
            self.put_backend(bid, leaf)
        self.maps.version += 1

    def reset_flows(self):
        for name in ("ct4", "lb4_snat"):
            self.dp.maps[name].clear()
        self.maps.ct.clear()
        self.maps.age.clear()
        self.model.snat.clear()

    AGED = (("ct4", "last_seen_ns"),)     # lb4_snat has no clock: a port's flow is judged by its conntrack entry

    def real_snat(self, key):
        t = self.dp.maps["lb4_snat"]
        v = t.get(R._ct_key(t, key))
        return None if v is None else (R._a(v.address), R._p(v.port))

    def kernel(self, prog: str, frame: bytes) -> tuple[int, bytes]:
        """The real programs' (verdict, bytes): with `xdp`, a packet from the uplink meets xdp_uplink
        first and from_uplink only if passed (XDP_PASS, as rewritten); XDP_TX and XDP_REDIRECT send it
        out as TC's redirect does, XDP_DROP drops it. Either way the outcome must be the model's."""
        if prog == "from_uplink" and self.xdp:
            res = prog_test_run(self.fds["xdp_uplink"], frame)
            if res.retval == XDP_DROP:
                return M.SHOT, b""
            if res.retval in (XDP_TX, XDP_REDIRECT):
                return M.REDIRECT, res.data
            if res.retval != XDP_PASS:
                return 1000 + res.retval, res.data
            frame = res.data
        res = prog_test_run(self.fds[prog], frame)
        return res.retval, res.data

    def touched_entries(self):
        for kind, key in self.model.touched:
            if kind == "snat":
                yield kind, key, self.model.snat.get(key), self.real_snat(key)
            else:
                yield kind, key, self.maps.ct.get(key), R.real_entry(self.dp, "ct", key)

    def passed_on(self, verdict: int) -> bool:
        return verdict != M.SHOT       # TC_ACT_OK, or sent by the program (TC_ACT_REDIRECT)

    def one(self, index: int, prog: str, frame: bytes):
        kverdict, kdata = self.kernel(prog, frame)
        verdict, data = getattr(self.model, prog)(frame)
        if self.xdp and prog == "from_uplink":
            prog = "xdp_uplink+from_uplink"
        return self.compare_packet(index, prog, frame, (kverdict, kdata), (verdict, data)), kverdict, kdata

    def compare_all(self, index: int) -> list:
        ct = {(R._a(k.saddr), R._a(k.daddr), R._p(k.sport), R._p(k.dport), k.proto, k.dir): R._flow(v)
              for k, v in self.dp.maps["ct4"].items()}
        snat = {(R._a(k.saddr), R._a(k.daddr), R._p(k.sport), R._p(k.dport), k.proto, k.dir):
                (R._a(v.address), R._p(v.port)) for k, v in self.dp.maps["lb4_snat"].items()}
        return self.compare_maps(index, (("ct4", ct, self.maps.ct), ("lb4_snat", snat, self.model.snat)))


def run(dp, packets: int, seed: int, *, max_mismatches: int = 20, progress=None, xdp: bool = False) -> R.Result:
    """`packets` generated packets through both sides; call inside the node namespace (FIB lookups).
    `xdp`: packets from the uplink meet xdp_uplink before from_uplink (UplinkRunner.kernel)."""
    runner = UplinkRunner(dp, xdp)
    return R.drive(runner, UplinkGenerator(seed, runner.model), packets, CHURN, max_mismatches, progress)


class NodeDatapath:
    """The uplink programs loaded on fresh pins, the scenario written, and node-1's namespace
    (tests/bpf/northsouth.py) to run them in; removed on close (also after a failure)."""

    def __init__(self, prefix: str, program_cache: bool = False):
        """`program_cache`: the programs from the compiled-program cache when it holds them
        (loader.load), as the tests load them."""
        from tests.bpf.northsouth import build_netns

        self.pin = Path("/sys/fs/bpf") / prefix
        self.netns = f"{prefix}-np"
        limits = loader.Limits(**{**R.LIMITS.__dict__, "snat_entries": 16384})
        self.dp = loader.load(self.pin, limits=limits, source=loader.NODE_SOURCE, programs=loader.NODE_PROGRAMS,
                              cache=False, program_cache=program_cache)
        try:
            nodeaddrs.write(self.dp.maps, nodeaddrs.NodeAddrs(snat4=NODE))
            MapWriter(self.dp.maps).apply(scenario())
            build_netns(self.netns)
        except BaseException:
            self.close(netns=False)
            raise

    def run(self, packets: int, seed: int, **kw) -> R.Result:
        return nsenter.run_in(self.netns, lambda: run(self.dp, packets, seed, **kw))

    def close(self, netns: bool = True) -> None:
        from pyroute2 import netns as pr_netns

        if netns:
            try:
                pr_netns.remove(self.netns)
            except OSError:
                pass
        self.dp.close()
        loader.unpin(self.pin)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    ap.add_argument("--max-mismatches", type=int, default=20)
    ap.add_argument("--xdp", action="store_true", help="packets from the uplink meet xdp_uplink first")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    node = NodeDatapath("esfu" + uuid.uuid4().hex[:6])
    try:
        print(f"uplink differential run{' (XDP, then TC)' if args.xdp else ''}: {args.packets:,} packets, "
              f"seed {args.seed}", flush=True)
        res = node.run(args.packets, args.seed, max_mismatches=args.max_mismatches, progress=R.print_progress,
                       xdp=args.xdp)
    finally:
        node.close()
    return R.report(res, args.seed)


if __name__ == "__main__":
    sys.exit(main())
