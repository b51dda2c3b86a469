"""Attach datapath programs to an interface's TC hooks: TCX where the kernel has it, else clsact.

TCX (bpf_mprog, Linux >= 6.6) runs a device's BPF programs straight from the hook, with no qdisc
and no classifier around them: about 50 ns less a program run than a cls_bpf filter on clsact
(docs/datapath.md, "TCX"), and three runs make a same-node round trip. Our programs run after
any TCX program someone else attached before them, and in place of the clsact filters: a TCX
program's verdict ends the hook, as our direct-action filter's did for the filters after it.

Either way a re-attach after an agent restart or an upgrade REPLACES our program in one step
(BPF_F_REPLACE; the filter at our fixed priority and handle), so the old program serves packets
until the new one takes over: there is no window without a program (never detach first). An
agent that finds its clsact filter from before TCX attaches at TCX first, then removes the
filter. Ours at TCX are known by name (OURS); ours on clsact by priority and handle.

Interfaces are named by ifindex, in the current network namespace or in the
one given by `netns` (a name under /run/netns, or a path), entered through nsenter.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from typing import Iterator

from pyroute2.netlink.exceptions import NetlinkError

from ebpfsvc.datapath import bpfsys
from ebpfsvc.datapath.loader import NODE_PROGRAMS, PROGRAMS
from ebpfsvc.datapath.nsenter import netlink, run_in

INGRESS = "ingress"
EGRESS = "egress"
_PARENT = {INGRESS: 0xFFFFFFF2, EGRESS: 0xFFFFFFF3}   # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_{INGRESS,EGRESS})
_DIRECTION = {v: k for k, v in _PARENT.items()}
_TCX = {INGRESS: bpfsys.BPF_TCX_INGRESS, EGRESS: bpfsys.BPF_TCX_EGRESS}

#: The datapath's programs (bpf/lb_pod.c, lb_node.c; xdp_uplink never sits at TC): a TCX program
#: of one of these names is ours (cleanup removes it, a re-attach replaces it).
OURS = frozenset(PROGRAMS + NODE_PROGRAMS)

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
    prio: int           # 0 for a TCX program
    handle: int         # 0 for a TCX program
    name: str           # a filter's name as given at attach time; a TCX program's own name
    prog_id: int        # kernel BPF program id (0 if the kernel did not report it)
    tcx: bool = False   # a TCX program, not a cls_bpf filter on clsact

    @property
    def ours(self) -> bool:
        return self.name in OURS if self.tcx else (self.prio, self.handle) == (PRIO, HANDLE)


_tcx_supported: bool | None = None


def tcx_supported() -> bool:
    """Whether this kernel has TCX (asked once: a query of lo's ingress, which every namespace has)."""
    global _tcx_supported
    if _tcx_supported is None:
        try:
            bpfsys.prog_query(1, bpfsys.BPF_TCX_INGRESS)
            _tcx_supported = True
        except OSError as e:
            if e.errno != errno.EINVAL:     # an unknown attach type; EPERM is the caller's to see
                raise
            _tcx_supported = False
    return _tcx_supported


@contextlib.contextmanager
def without_tcx() -> Iterator[None]:
    """Attach as on a kernel without TCX (clsact filters) while inside: the bench's comparison of
    the two, and the tests of the older kernels' path. Not thread-safe: for one thread's use."""
    global _tcx_supported
    saved = tcx_supported()
    _tcx_supported = False
    try:
        yield
    finally:
        _tcx_supported = saved


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
    """Attach (or atomically replace) our program at `direction` with program `prog_fd`: at TCX
    where the kernel has it (`name` is then the program's own), else as our clsact filter `name`."""
    if not tcx_supported():
        netlink(netns, lambda ipr: _attach_filter(ipr, ifindex, prog_fd, name, direction))
        return

    def work() -> None:             # one entry into the namespace for both steps
        _attach_tcx(ifindex, prog_fd, direction)
        if _detach_filter(ifindex, direction, None):     # an agent from before TCX left it
            drop_empty_clsact(ifindex, None)

    _in(netns, work)


def _in(netns, fn):
    """fn() in namespace `netns` (None: the caller's): TCX names a device by its ifindex there."""
    return fn() if netns is None else run_in(netns, fn)


def _attach_tcx(ifindex: int, prog_fd: int, direction: str) -> None:
    """One program of ours on the hook, as one filter at our priority and handle on clsact: it
    takes the place of ours (or of one named as it is), else goes after everyone else's."""
    hook = _TCX[direction]
    prog_id, name = bpfsys.prog_fd_id_name(prog_fd)
    for other_id, old_fd, other in _attached(ifindex, hook):
        if other_id == prog_id:
            return                  # a restarted agent's pinned program: already in place
        if other in OURS | {name}:
            bpfsys.tcx_attach(ifindex, prog_fd, hook, replace_fd=old_fd)
            return
    bpfsys.tcx_attach(ifindex, prog_fd, hook)


def _attached(ifindex: int, hook: int) -> Iterator[tuple[int, int, str]]:
    """(id, fd, name) of each program at TCX `hook` of `ifindex`, in their order of running; the
    fd is closed when the caller moves on. A program unloaded since the query is skipped."""
    for prog_id in bpfsys.prog_query(ifindex, hook):
        try:
            fd = bpfsys.prog_get_fd(prog_id)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            continue
        try:
            yield prog_id, fd, bpfsys.prog_fd_id_name(fd)[1]
        finally:
            os.close(fd)


def _attach_filter(ipr, ifindex: int, prog_fd: int, name: str, direction: str) -> None:
    _ensure_clsact(ipr, ifindex)
    ipr.tc("replace-filter", "bpf", ifindex, HANDLE, fd=prog_fd, name=name,
           parent=_PARENT[direction], prio=PRIO, protocol=0x0003,   # ETH_P_ALL
           direct_action=True)


def detach(ifindex: int, direction: str, netns=None) -> bool:
    """Remove our programs from `direction` (at TCX and on clsact); False if there was none."""
    tcx = tcx_supported() and _in(netns, lambda: _detach_tcx(ifindex, direction))
    return _detach_filter(ifindex, direction, netns) or tcx


def _detach_tcx(ifindex: int, direction: str) -> bool:
    hook, done = _TCX[direction], False
    for _, fd, name in _attached(ifindex, hook):     # the ids were queried before the first detach
        if name in OURS:
            done |= bpfsys.tcx_detach(ifindex, fd, hook)
    return done


def _detach_filter(ifindex: int, direction: str, netns) -> bool:
    """Remove our clsact filter from `direction`; False if there was none."""
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
    """BPF programs on the interface's TC hooks: at TCX, then the filters on clsact (ours and
    anyone else's), each hook's in their order of running."""
    out: list[TcFilter] = []
    if tcx_supported():
        out += _in(netns, lambda: [TcFilter(ifindex=ifindex, direction=direction, prio=0, handle=0,
                                            name=name, prog_id=prog_id, tcx=True)
                                   for direction, hook in _TCX.items()
                                   for prog_id, _, name in _attached(ifindex, hook)])

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
