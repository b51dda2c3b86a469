"""`ebpfsvc cleanup`: remove what the agent attached and pinned.

Our TC programs are recognised as ebpfsvc/datapath/tc.py does (TcFilter.ours: at TCX by
their names, on clsact by the fixed priority and handle the datapath attaches with), on every
interface of the namespace (lo's `from_loopback` included), so interfaces that no longer match
the agent's patterns are cleaned too; programs and filters of anyone else are left alone, and
so is the clsact qdisc unless nothing is left on it. The node clients' device (ebpfsvc/datapath/hostpath.py) goes, and its routes
with it, and lo's accept_local, which the agent sets for the node's replies to
itself, goes back to the kernel's default (0). An XDP program is removed only
when it is ours by name (ebpfsvc/datapath/uplink.py XDP_PROG_NAME). Pins are
removed by loader.unpin() (the maps', and the programs' the agent keeps for its next start),
which refuses to delete anything it does not know.
With --socket-lb-cgroup, the socket programs on that cgroup (datapath/socklb.py) are detached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ebpfsvc.datapath import nsenter, tc


@dataclass
class CleanupReport:
    filters: list[str] = field(default_factory=list)   # "tc program IFNAME ingress NAME (prog id N, tcx)", "xdp program ..."
    pins: list[str] = field(default_factory=list)


def our_filters(netns=None) -> list[tuple[str, tc.TcFilter]]:
    """(ifname, program) for every TC program of ours in the namespace (at TCX or on clsact)."""
    out = []
    for ifindex, ifname in _links(netns):
        for f in tc.list_filters(ifindex, netns=netns):
            if f.ours:
                out.append((ifname, f))
    return out


def _links(netns) -> list[tuple[int, str]]:
    return nsenter.netlink(netns, lambda ipr: [(link["index"], link.get_attr("IFLA_IFNAME"))
                                               for link in ipr.get_links()])


def cleanup(pin_dir, *, netns=None, dry_run: bool = False, socket_lb_cgroup=None) -> CleanupReport:
    """`socket_lb_cgroup`: the agent's --socket-lb-cgroup, whose socket programs are detached too
    (whichever program sits on their hooks: the hooks are the agent's, attached without
    BPF_F_ALLOW_MULTI, so nothing else can share them)."""
    from ebpfsvc.datapath import loader

    from ebpfsvc.datapath import uplink

    report = CleanupReport()
    touched: set[int] = set()
    for ifindex, ifname in _links(netns):
        if uplink.xdp_program(ifindex, netns) == uplink.XDP_PROG_NAME:
            report.filters.append(f"xdp program {uplink.XDP_PROG_NAME} on {ifname}")
            if not dry_run:
                uplink.detach_xdp(ifindex, netns)
    from ebpfsvc.datapath import hostpath

    on_lo = False
    for ifname, f in our_filters(netns):
        report.filters.append(f"tc program {ifname} {f.direction} {f.name or '?'} "
                              f"(prog id {f.prog_id}, {'tcx' if f.tcx else 'clsact filter'})")
        on_lo |= ifname == hostpath.LOOPBACK
        if not dry_run:
            tc.detach(f.ifindex, f.direction, netns=netns)
            touched.add(f.ifindex)
    if not dry_run:
        for ifindex in touched:
            tc.drop_empty_clsact(ifindex, netns)
    device = hostpath.DEVICE in {name for _, name in _links(netns)}
    if device:
        report.filters.append(f"device {hostpath.DEVICE} (the service CIDR's route for node clients)")
    if device or on_lo:
        report.filters.append(f"setting {hostpath.LO_SYSCTL}=1 (for the node's own NodePorts; back to 0)")
        if not dry_run:
            hostpath.teardown(netns)
    if socket_lb_cgroup:
        from ebpfsvc.datapath import socklb

        cgroup = socklb.resolve_cgroup(socket_lb_cgroup)
        for hook, ids in socklb.attached(cgroup).items():
            report.filters += [f"cgroup program {hook} on {cgroup} (prog id {i})" for i in ids]
        if not dry_run:
            socklb.detach(cgroup)
    pin_dir = Path(pin_dir)
    if pin_dir.exists():
        from ebpfsvc.datapath import progcache

        report.pins = [str(pin_dir / n) for n in loader.MAPS if (pin_dir / n).exists()]
        report.pins += [str(p) for p in progcache.program_pins(pin_dir)]
        if not dry_run:
            loader.unpin(pin_dir)
    return report
