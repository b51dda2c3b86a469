"""Wiring a lab's namespaces together: fabric bridge, node uplinks, pod veths, routes.

This is the host-gw CNI of the lab (see docs/lab.md for the picture):

- the fabric namespace holds one Linux bridge, the L2 segment every node and
  external client is plugged into with a veth (`eth0` on their side);
- a node owns its pods' gateway address (first host of its pod CIDR) as a /32
  on `lo`, so the pods' ARP for the gateway is answered on every host veth like
  for any local address (arp_ignore=0), with no per-pod address to manage;
  it routes each local pod /32 to the pod's host veth and every other node's
  pod CIDR via that node's fabric address;
- a pod's `eth0` carries its /32 and a default route via the gateway, onlink.

Every link is created inside a lab namespace (a veth's peer is created directly
in its target namespace), so nothing ever appears in the root namespace, even
for a moment.  Nothing here shells out to ip(8): pyroute2 speaks netlink, from
a thread that has entered the namespace (nsenter.run_in) with a plain IPRoute:
several times cheaper than pyroute2's NetNS, which matters at hundreds of pods.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, TypeVar

from pyroute2 import IPRoute, netns

from ebpfsvc.datapath import nsenter

BRIDGE = "br0"            # in the fabric namespace
UPLINK = "eth0"           # a node's / client's side of its fabric veth (the agent's --uplink)
SCOPE_LINK = 253

# rp_filter off: with service NAT and asymmetric hairpin paths, strict reverse-path
# checks would drop legitimate lab traffic.  Set on `default` before any link is
# created, so every link inherits it.
_NAMESPACE_SYSCTLS = {
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
}

T = TypeVar("T")


def _in(name: str, configure: Callable[[IPRoute], T]) -> T:
    """Run configure(ipr) with an IPRoute whose netlink socket lives in namespace `name`."""
    def run() -> T:
        with IPRoute() as ipr:
            return configure(ipr)

    return nsenter.run_in(name, run)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no link {ifname}")
    return found[0]


def create_namespace(name: str, forwarding: bool = False) -> None:
    """A new network namespace with `lo` up and rp_filter off (and routing on if `forwarding`)."""
    netns.create(name)
    sysctls = dict(_NAMESPACE_SYSCTLS)
    if forwarding:
        sysctls["net.ipv4.ip_forward"] = 1

    def configure(ipr: IPRoute) -> None:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        nsenter.write_own_sysctls(sysctls)

    _in(name, configure)


def remove_namespace(name: str) -> None:
    """Remove a namespace if it exists; its veths go with it once no process is inside."""
    if nsenter.exists(name):
        netns.remove(name)


def build_fabric(fabric: str) -> None:
    create_namespace(fabric)

    def configure(ipr: IPRoute) -> None:
        ipr.link("add", ifname=BRIDGE, kind="bridge")
        ipr.link("set", index=_index(ipr, BRIDGE), state="up")

    _in(fabric, configure)


def plug_into_fabric(fabric: str, member: str, port: str, address: ipaddress.IPv4Address,
                     prefixlen: int) -> None:
    """Connect namespace `member` to the fabric bridge: `eth0` there, `port` on the bridge."""
    def member_side(ipr: IPRoute) -> None:
        ipr.link("add", ifname=UPLINK, kind="veth", peer={"ifname": port, "net_ns_fd": fabric})
        idx = _index(ipr, UPLINK)
        ipr.addr("add", index=idx, address=str(address), prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")

    def fabric_side(ipr: IPRoute) -> None:
        ipr.link("set", index=_index(ipr, port), master=_index(ipr, BRIDGE), state="up")

    _in(member, member_side)
    _in(fabric, fabric_side)


def add_pod_gateway(node: str, gateway: ipaddress.IPv4Address) -> None:
    # On lo rather than a dummy link: lo always exists (dummy is a module some kernels lack).
    _in(node, lambda ipr: ipr.addr("add", index=_index(ipr, "lo"), address=str(gateway), prefixlen=32))


def add_routes_via(member: str, routes: list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address]]) -> None:
    """Routes `dst via gateway` on the uplink: a node's peers' pod CIDRs, a client's upstream."""
    def configure(ipr: IPRoute) -> None:
        idx = _index(ipr, UPLINK)
        for dst, gateway in routes:
            ipr.route("add", dst=str(dst), gateway=str(gateway), oif=idx)

    _in(member, configure)


def add_pod(node: str, pod: str, host_link: str, pod_ip: ipaddress.IPv4Address | str,
            gateway: ipaddress.IPv4Address) -> None:
    """Give pod namespace `pod` an `eth0` with `pod_ip`/32, its host side `host_link` in `node`."""
    def node_side(ipr: IPRoute) -> None:
        ipr.link("add", ifname=host_link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
        idx = _index(ipr, host_link)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst=f"{pod_ip}/32", oif=idx, scope=SCOPE_LINK)

    def pod_side(ipr: IPRoute) -> None:
        idx = _index(ipr, "eth0")
        ipr.addr("add", index=idx, address=str(pod_ip), prefixlen=32)
        ipr.link("set", index=idx, state="up")
        # onlink: the gateway is not in the pod's (/32) subnet, but it is one hop away on eth0.
        ipr.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=idx, flags=["onlink"])

    _in(node, node_side)
    _in(pod, pod_side)


def remove_link(namespace: str, ifname: str) -> None:
    """Delete a link (a veth's peer goes with it) if the namespace and link still exist."""
    if not nsenter.exists(namespace):
        return

    def configure(ipr: IPRoute) -> None:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])

    _in(namespace, configure)
