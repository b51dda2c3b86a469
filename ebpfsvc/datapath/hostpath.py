"""The node's own clients (hostNetwork pods, node daemons) to ClusterIPs: bpf/lib/host.h.

kube-proxy catches a node process's packet to a ClusterIP in iptables' OUTPUT chain. Here the
service CIDR is routed to a device of ours, `ebpfsvc0`, with the node address as preferred
source, and `from_host` runs at its egress: it DNATs the packet and sends it to the backend
itself. The device is one end of a veth pair (its peer `ebpfsvc1` is never used; a veth rather
than a dummy because not every kernel has the dummy driver) with ARP off, so packets to service
addresses reach the egress hook without a neighbour to resolve. It carries no address, so the
route cannot capture anything but packets to service addresses, and deleting the pair removes
the route with it.

    hostpath.setup(uplink_dp, "198.19.0.0/16", node_address)     # idempotent
    hostpath.teardown()                                            # `ebpfsvc cleanup`
"""

from __future__ import annotations

import ipaddress
import logging

from ebpfsvc.datapath import tc
from ebpfsvc.datapath.uplink import _netlink

log = logging.getLogger(__name__)

DEVICE = "ebpfsvc0"
PEER = "ebpfsvc1"
PROGRAM = "from_host"
_IFF_UP, _IFF_NOARP = 0x1, 0x80


def setup(dp, service_cidr: str, node_address: ipaddress.IPv4Address, netns=None) -> int:
    """Create the device (if missing), route `service_cidr` to it from `node_address`, attach
    from_host at its egress. Returns its ifindex."""
    cidr = ipaddress.IPv4Network(service_cidr)

    def configure(ipr) -> int:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            ipr.link("add", ifname=DEVICE, kind="veth", peer={"ifname": PEER})
            found = ipr.link_lookup(ifname=DEVICE)
        index = found[0]
        ipr.link("set", index=ipr.link_lookup(ifname=PEER)[0], state="up")
        ipr.link("set", index=index, flags=_IFF_UP | _IFF_NOARP, change=_IFF_UP | _IFF_NOARP)
        # replace: a restarted agent (or a changed node address) rewrites the same route.
        ipr.route("replace", dst=str(cidr), oif=index, prefsrc=str(node_address), scope="link")
        return index

    index = _netlink(netns, configure)
    tc.attach(index, dp.programs[PROGRAM].fd, PROGRAM, tc.EGRESS, netns)
    log.info("node clients to ClusterIPs: %s routed to %s (ifindex %d) from %s", cidr, DEVICE, index, node_address)
    return index


def teardown(netns=None) -> bool:
    """Remove the device pair (its route and program go with it). False if there was none."""
    def remove(ipr) -> bool:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True

    return _netlink(netns, remove)
