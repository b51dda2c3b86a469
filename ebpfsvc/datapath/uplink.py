"""The north-south programs (bpf/lb_node.c) on a node's uplinks: load, attach, detach.

    dp = uplink.load(pin_dir)          # shares the pod datapath's pinned maps (lb_node_addrs too)
    uplink.attach(dp, ifindex, mode="tc")                       # TC ingress + egress
    uplink.attach(dp, ifindex, mode="xdp")                      # + XDP (native) in front of TC ingress

Modes (the agent's --uplink-mode):
- "tc": from_uplink at TC ingress, to_uplink at TC egress. Works on any device.
- "xdp": the same TC programs, plus xdp_uplink in native (driver) mode. XDP does
  the common translations before an skb exists and passes everything else
  (ICMP, fragments, rejects, unresolved neighbours) up to the TC program, which
  stays the complete path. Replies of source-preserving flows leave through TC
  egress in both modes (XDP has no egress hook).

Attaching replaces in place (a TC filter by fixed prio/handle, an XDP program by
writing the new fd), so an agent restart never leaves the uplink bare. Switching
to "tc" removes an XDP program only if it is ours (named xdp_uplink).
"""

from __future__ import annotations

import errno
import logging

from pyroute2.netlink.exceptions import NetlinkError

from ebpfsvc.datapath import bpfsys, loader, nsenter, tc

log = logging.getLogger(__name__)

MODES = ("tc", "xdp")
XDP_FLAGS_DRV_MODE = 1 << 2      # include/uapi/linux/if_link.h: native XDP, fail rather than fall back
XDP_PROG_NAME = "xdp_uplink"


def load(pin_dir, *, limits: loader.Limits | None = None, cache: bool = True, program_cache: bool = False,
         maps_unit=None, compile_apart: bool = False):
    """Compile (or take from the program cache: loader.load) and load bpf/lb_node.c against the maps
    pinned in `pin_dir`. The SNAT address is the node's, from lb_node_addrs (nodeaddrs.write); the
    options (SNAT port, node clients, masquerade, cluster CIDR) are lb_agent_config's
    (loader.publish_options)."""
    return loader.load(pin_dir, limits=limits, cache=cache,
                       source=loader.NODE_SOURCE, programs=loader.NODE_PROGRAMS,
                       program_cache=program_cache, maps_unit=maps_unit, compile_apart=compile_apart)


def ifindex_of(ifname: str, netns=None) -> int | None:
    found = nsenter.netlink(netns, lambda ipr: ipr.link_lookup(ifname=ifname))
    return found[0] if found else None


def attach(dp, ifindex: int, mode: str = "tc", netns=None) -> None:
    """Attach the uplink programs of `dp` to interface `ifindex` in `mode` ("tc" or "xdp")."""
    if mode not in MODES:
        raise ValueError(f"uplink mode {mode!r}: one of {', '.join(MODES)}")
    progs = dp.programs
    tc.attach(ifindex, progs["from_uplink"].fd, "from_uplink", tc.INGRESS, netns)
    tc.attach(ifindex, progs["to_uplink"].fd, "to_uplink", tc.EGRESS, netns)
    if mode == "xdp":
        if link_kind(ifindex, netns) == "veth":
            log.warning("XDP on veth (ifindex %d): slower than TC here (docs/northsouth.md), and XDP_TX "
                        "needs the veth peer to run XDP or have GRO on", ifindex)
        attach_xdp(ifindex, progs[XDP_PROG_NAME].fd, netns)
    elif xdp_program(ifindex, netns) == XDP_PROG_NAME:
        detach_xdp(ifindex, netns)


def detach(ifindex: int, netns=None) -> None:
    """Remove the uplink programs (TC filters, and our XDP program if attached)."""
    tc.detach(ifindex, tc.INGRESS, netns)
    tc.detach(ifindex, tc.EGRESS, netns)
    if xdp_program(ifindex, netns) == XDP_PROG_NAME:
        detach_xdp(ifindex, netns)


def link_kind(ifindex: int, netns=None) -> str:
    """The link's kind ("veth", "bridge", ...), "" for a physical device."""
    link = nsenter.netlink(netns, lambda ipr: ipr.get_links(ifindex)[0])
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def attach_xdp(ifindex: int, prog_fd: int, netns=None) -> None:
    """Attach (or replace) the XDP program of an interface, native mode only."""
    nsenter.netlink(netns, lambda ipr: ipr.link("set", index=ifindex, xdp_fd=prog_fd, xdp_flags=XDP_FLAGS_DRV_MODE))


def detach_xdp(ifindex: int, netns=None) -> None:
    try:
        nsenter.netlink(netns, lambda ipr: ipr.link("set", index=ifindex, xdp_fd=-1, xdp_flags=XDP_FLAGS_DRV_MODE))
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL):
            raise


def xdp_prog_id(ifindex: int, netns=None) -> int:
    """Id of the XDP program attached to the interface, 0 when none."""
    link = nsenter.netlink(netns, lambda ipr: ipr.get_links(ifindex)[0])
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return 0
    return xdp.get_attr("IFLA_XDP_PROG_ID") or 0


def xdp_program(ifindex: int, netns=None) -> str | None:
    """Name of the XDP program attached to the interface (kernel name, 15 chars), None when none."""
    prog_id = xdp_prog_id(ifindex, netns)
    if not prog_id:
        return None
    return bpfsys.prog_name(prog_id)
