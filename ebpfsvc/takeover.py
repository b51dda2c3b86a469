"""What another proxy (kube-proxy) leaves in the kernel's conntrack that harms ebpfsvc's new
connections, cleared once the agent's programs serve the node.

kube-proxy's connections live in the kernel's conntrack (nf_conntrack): client:port -> frontend,
replies from the endpoint -> client:port. A closed one stays there in TIME_WAIT for 120 s (CLOSE:
10 s). ebpfsvc translates at TC, before netfilter, so the kernel sees a new connection from the same
client port as client:port -> endpoint, whose reply tuple is the old entry's. Where the kernel's NAT
runs (iptables mode leaves its nat chains, after `--cleanup` too; a CNI's masquerade rules), netfilter
gives that connection another source port, and the endpoint's TIME_WAIT sockets on that port hold TCP
timestamps of other client sockets: it drops later SYNs as old (PAWS), each then waits 1 s for its
retransmission (docs/deploy.md, "New connections during the switch"; measured in the bench's lab,
docs/bench.md, "Why the flush").

A closed connection's entry serves nothing but to absorb its last stray segments: deleting it does
early what its timeout does. Only entries of closed TCP connections (TIME_WAIT, CLOSE) to a frontend
the agent serves that were translated (their replies come from another address or port) are deleted:
open and half-closed connections keep their entries, and with them kube-proxy's translation, as
docs/deploy.md's migration relies on.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Iterable

from pyroute2.netlink.nfnetlink.nfctsocket import TCP_CONNTRACK_CLOSE, TCP_CONNTRACK_TIME_WAIT, NFCTAttrTuple

from ebpfsvc.lbmodel import LBState, Protocol

log = logging.getLogger(__name__)

CLOSED_STATES = frozenset({TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE})


def tcp_frontends(state: LBState) -> set[tuple[str, int]]:
    """(address, port) of every TCP frontend of `state`, addresses as the kernel's netlink prints them."""
    return {(str(k.address), k.port) for k in state.frontends if k.protocol is Protocol.TCP}


def is_closed_translation(entry, frontends: set[tuple[str, int]]) -> bool:
    """Is a kernel conntrack entry (pyroute2's ConntrackEntry) a closed TCP connection to one of
    `frontends` that someone translated?"""
    orig, reply = entry.tuple_orig, entry.tuple_reply
    return (orig.proto == socket.IPPROTO_TCP and entry.protoinfo is not None
            and entry.protoinfo.state in CLOSED_STATES
            and (orig.daddr, orig.dport) in frontends
            and (reply.saddr, reply.sport) != (orig.daddr, orig.dport))


def forget_closed_translations(frontends: set[tuple[str, int]],
                               families: Iterable[int] = (socket.AF_INET, socket.AF_INET6)) -> int:
    """Delete the kernel's conntrack entries of closed TCP connections translated from one of
    `frontends`, in the calling thread's network namespace. Returns how many were deleted."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError

    deleted = 0
    for family in families:
        ct = Conntrack(nfgen_family=family)
        try:
            # TCP only, filtered by the kernel (5.8+): the UDP and ICMP entries are never parsed.
            tcp = NFCTAttrTuple(family=family, proto=socket.IPPROTO_TCP)
            stale = [e for e in ct.dump_entries(tuple_orig=tcp) if is_closed_translation(e, frontends)]
            for entry in stale:
                try:
                    ct.delete(entry)
                    deleted += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:      # expired meanwhile: what was wanted
                        raise
        finally:
            ct.close()
    return deleted


def clear_after_takeover(state: LBState) -> None:
    """forget_closed_translations for `state`'s frontends, logged in one line; a failure (no
    nf_conntrack, no CAP_NET_ADMIN) is a warning: the datapath serves either way."""
    frontends = tcp_frontends(state)
    t0 = time.monotonic()
    try:
        deleted = forget_closed_translations(frontends)
    except Exception as exc:    # noqa: BLE001 - only a bounded slowdown of some new connections is at stake
        log.warning("takeover: the kernel's conntrack entries of closed connections to Services were not "
                    "cleared (%s); a client reusing their ports within 2 minutes may wait 1 s per SYN", exc)
        return
    log.info("takeover: deleted %d kernel conntrack entries of closed connections another proxy translated "
             "to %d TCP frontends, in %.2fs", deleted, len(frontends), time.monotonic() - t0)
