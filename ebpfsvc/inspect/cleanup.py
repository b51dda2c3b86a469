"""`ebpfsvc cleanup`: remove what the agent attached and pinned.

Our TC filters are recognised by the fixed priority and handle the datapath
attaches with (ebpfsvc/datapath/tc.py PRIO / HANDLE), on every interface of the
namespace, so interfaces that no longer match the agent's patterns are cleaned
too; filters of anyone else (other priorities or handles) are left alone, and
so is the clsact qdisc unless nothing is left on it. The dummy device of node
clients (ebpfsvc/datapath/hostpath.py) goes, and its route with it. An XDP program is removed
only when it is ours by name (ebpfsvc/datapath/uplink.py XDP_PROG_NAME). Pins are removed by
loader.unpin(), which refuses to delete anything it does not know.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from ebpfsvc.datapath import tc


@dataclass
class CleanupReport:
    filters: list[str] = field(default_factory=list)   # "tc filter IFNAME ingress NAME (prog id N)", "xdp program ..."
    pins: list[str] = field(default_factory=list)


def our_filters(netns=None) -> list[tuple[str, tc.TcFilter]]:
    """(ifname, filter) for every TC filter at our priority and handle in the namespace."""
    out = []
    for ifindex, ifname in _links(netns):
        for f in tc.list_filters(ifindex, netns=netns):
            if f.prio == tc.PRIO and f.handle == tc.HANDLE:
                out.append((ifname, f))
    return out


def _links(netns) -> list[tuple[int, str]]:
    from pyroute2 import IPRoute

    with (IPRoute(netns=netns) if netns else IPRoute()) as ipr:
        return [(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]


def cleanup(pin_dir, *, netns=None, dry_run: bool = False) -> CleanupReport:
    from ebpfsvc.datapath import loader

    from ebpfsvc.datapath import uplink

    report = CleanupReport()
    touched: set[int] = set()
    for ifindex, ifname in _links(netns):
        if uplink.xdp_program(ifindex, netns) == uplink.XDP_PROG_NAME:
            report.filters.append(f"xdp program {uplink.XDP_PROG_NAME} on {ifname}")
            if not dry_run:
                uplink.detach_xdp(ifindex, netns)
    for ifname, f in our_filters(netns):
        report.filters.append(f"tc filter {ifname} {f.direction} {f.name or '?'} (prog id {f.prog_id})")
        if not dry_run:
            tc.detach(f.ifindex, f.direction, netns=netns)
            touched.add(f.ifindex)
    if not dry_run:
        for ifindex in touched:
            _drop_empty_clsact(ifindex, netns)
    from ebpfsvc.datapath import hostpath

    if hostpath.DEVICE in {name for _, name in _links(netns)}:
        report.filters.append(f"device {hostpath.DEVICE} (the service CIDR's route for node clients)")
        if not dry_run:
            hostpath.teardown(netns)
    pin_dir = Path(pin_dir)
    if pin_dir.exists():
        report.pins = [str(pin_dir / n) for n in loader.MAPS if (pin_dir / n).exists()]
        if not dry_run:
            loader.unpin(pin_dir)
    return report


def _drop_empty_clsact(ifindex: int, netns) -> None:
    from pyroute2 import IPRoute
    with (IPRoute(netns=netns) if netns else IPRoute()) as ipr:
        for parent in (0xFFFFFFF2, 0xFFFFFFF3):         # clsact ingress / egress
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
