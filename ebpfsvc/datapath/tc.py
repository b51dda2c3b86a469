"""Attach datapath programs to an interface's TC hooks (clsact), with pyroute2.

Programs are attached in direct-action mode (the program's return value is the
verdict) at a fixed priority and handle, so that re-attaching after an agent
restart or an upgrade REPLACES the filter in one netlink request: the old
program serves packets until the new one takes over, there is no window
without a program (never detach first).

Interfaces are named by ifindex, in the current network namespace or in the
one given by `netns` (a name under /run/netns, or a path), entered through nsenter.netlink.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from ebpfsvc.datapath.nsenter import netlink

INGRESS = "ingress"
EGRESS = "egress"
_PARENT = {INGRESS: 0xFFFFFFF2, EGRESS: 0xFFFFFFF3}   # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_{INGRESS,EGRESS})
_DIRECTION = {v: k for k, v in _PARENT.items()}

def _decode_bpf_prog_ids() -> None:
    """Teach pyroute2 the cls_bpf attributes after TCA_BPF_FLAGS (uapi pkt_cls.h:
    TCA_BPF_FLAGS_GEN = 9, TCA_BPF_TAG = 10, TCA_BPF_ID = 11), which 0.9 leaves
    undecoded, so a listing can say which program a filter runs. Positional:
    entry i of nla_map decodes attribute type i. Done at import, before any
    filter dump compiles the table."""
    from pyroute2.netlink.rtnl.tcmsg import sched_bpf

    names = [name for name, _ in sched_bpf.options.nla_map]
    if names[-1] == "TCA_BPF_FLAGS" and len(names) == 9:
        sched_bpf.options.nla_map = sched_bpf.options.nla_map + (
            ("TCA_BPF_FLAGS_GEN", "uint32"), ("TCA_BPF_TAG", "hex"), ("TCA_BPF_ID", "uint32"))


_decode_bpf_prog_ids()

#: Our filters' priority and handle: fixed, so a re-attach replaces in place.
PRIO = 0xE5
HANDLE = 0xE5


@dataclass(frozen=True)
class TcFilter:
    ifindex: int
    direction: str      # INGRESS / EGRESS
    prio: int
    handle: int
    name: str           # program name as given at attach time
    prog_id: int        # kernel BPF program id (0 if the kernel did not report it)


def ensure_clsact(ifindex: int, netns=None) -> None:
    """Add the clsact qdisc to the interface unless it has one."""
    netlink(netns, lambda ipr: _ensure_clsact(ipr, ifindex))


def _ensure_clsact(ipr, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def attach(ifindex: int, prog_fd: int, name: str, direction: str, netns=None) -> None:
    """Attach (or atomically replace) our filter at `direction` with program `prog_fd`."""
    def work(ipr) -> None:
        _ensure_clsact(ipr, ifindex)
        ipr.tc("replace-filter", "bpf", ifindex, HANDLE, fd=prog_fd, name=name,
               parent=_PARENT[direction], prio=PRIO, protocol=0x0003,   # ETH_P_ALL
               direct_action=True)

    netlink(netns, work)


def detach(ifindex: int, direction: str, netns=None) -> bool:
    """Remove our filter from `direction`; False if there was none."""
    def work(ipr) -> bool:
        try:
            ipr.tc("del-filter", "bpf", ifindex, HANDLE, parent=_PARENT[direction],
                   prio=PRIO, protocol=0x0003)
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.EINVAL):
                return False
            raise
        return True

    return netlink(netns, work)


def drop_empty_clsact(ifindex: int, netns=None) -> None:
    """Remove the clsact qdisc if no filter is left on it (anyone else's keeps it)."""
    def work(ipr) -> None:
        for parent in _PARENT.values():
            try:
                if any(m.get_attr("TCA_KIND") for m in ipr.get_filters(index=ifindex, parent=parent)):
                    return      # someone else's filters live there: keep their qdisc
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise
        try:
            ipr.tc("del", "clsact", ifindex)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise

    netlink(netns, work)


def list_filters(ifindex: int, netns=None) -> list[TcFilter]:
    """BPF filters on the interface's clsact hooks (ours and anyone else's)."""
    out: list[TcFilter] = []

    def work(ipr) -> None:
        for direction, parent in _PARENT.items():
            try:
                msgs = list(ipr.get_filters(index=ifindex, parent=parent))
            except NetlinkError as e:
                if e.code in (errno.ENOENT, errno.EINVAL):
                    continue
                raise
            for msg in msgs:
                if msg.get_attr("TCA_KIND") != "bpf":
                    continue
                opts = msg.get_attr("TCA_OPTIONS")
                if opts is None:
                    continue
                out.append(TcFilter(
                    ifindex=ifindex,
                    direction=direction,
                    prio=(msg["info"] >> 16) & 0xFFFF,
                    handle=msg["handle"],
                    name=opts.get_attr("TCA_BPF_NAME") or "",
                    prog_id=opts.get_attr("TCA_BPF_ID") or 0,
                ))

    netlink(netns, work)
    return out
