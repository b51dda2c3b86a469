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

IPv6 (dual-stack and IPv6 labs, docs/lab.md) follows the same plan with one difference: a
node answers neighbour solicitations only for addresses on the interface they arrive on (no
`arp_ignore=0` for NDP), so the IPv6 pod gateway is the link-local fe80::1 on every host veth
(as Calico and Cilium do), and a pod's IPv6 default route goes via fe80::1 on its `eth0`.
DAD is off in every lab namespace (accept_dad=0, and IFA_F_NODAD on each address), so an
address is usable the moment it is added instead of ~1 s later, tentative until then.

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
from pyroute2 import config as pyroute2_config

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

# What a lab with IPv6 adds: IPv6 on (whatever the host's default), no DAD on any link made later.
_IPV6_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": 0,
    "net.ipv6.conf.default.disable_ipv6": 0,
    "net.ipv6.conf.all.accept_dad": 0,
    "net.ipv6.conf.default.accept_dad": 0,
}
IFA_F_NODAD = 0x02
# The IPv6 gateway of every pod: on each host veth, link-local, so the same on all of them.
POD_GATEWAY6 = "fe80::1"

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


def create_namespace(name: str, forwarding: bool = False, ipv6: bool = False) -> None:
    """A new network namespace with `lo` up and rp_filter off (and routing on if `forwarding`);
    with `ipv6`, IPv6 on without DAD (and IPv6 routing on if `forwarding`)."""
    # pyroute2 creates the namespace in a child process and gives up on it after
    # config.default_communicate_timeout (2 s): a busy 2-core machine took longer once in CI
    # (2026-12-04, "no response from the child"). A lab waits for its namespace instead.
    pyroute2_config.default_communicate_timeout = max(pyroute2_config.default_communicate_timeout, 30)
    netns.create(name)
    sysctls = dict(_NAMESPACE_SYSCTLS)
    if ipv6:
        sysctls.update(_IPV6_SYSCTLS)
    if forwarding:
        sysctls["net.ipv4.ip_forward"] = 1
        if ipv6:
            sysctls["net.ipv6.conf.all.forwarding"] = 1

    def configure(ipr: IPRoute) -> None:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        nsenter.write_own_sysctls(sysctls)

    _in(name, configure)


def remove_namespace(name: str) -> None:
    """Remove a namespace if it exists; its veths go with it once no process is inside."""
    if nsenter.exists(name):
        netns.remove(name)


def flush_conntrack(name: str) -> int:
    """Empty the kernel's conntrack table of namespace `name` (netlink, as `conntrack -F`); how many
    entries it held."""
    from pyroute2 import Conntrack

    def flush() -> int:
        ct = Conntrack()
        try:
            held = ct.count()
            ct.flush()
            return held
        finally:
            ct.close()

    return nsenter.run_in(name, flush)


def _add_address(ipr: IPRoute, index: int, address, prefixlen: int) -> None:
    flags = IFA_F_NODAD if ipaddress.ip_address(str(address)).version == 6 else 0
    ipr.addr("add", index=index, address=str(address), prefixlen=prefixlen, flags=flags)


def build_fabric(fabric: str, ipv6: bool = False) -> None:
    create_namespace(fabric, ipv6=ipv6)

    def configure(ipr: IPRoute) -> None:
        # No multicast snooping: the bridge floods neighbour solicitations to every port
        # rather than trusting MLD reports it may not have seen yet.
        ipr.link("add", ifname=BRIDGE, kind="bridge", **({"br_mcast_snooping": 0} if ipv6 else {}))
        ipr.link("set", index=_index(ipr, BRIDGE), state="up")

    _in(fabric, configure)


def plug_into_fabric(fabric: str, member: str, port: str, addresses: list[tuple[ipaddress._BaseAddress, int]]) -> None:
    """Connect namespace `member` to the fabric bridge: `eth0` there with `addresses`
    ((address, prefixlen) per family), `port` on the bridge."""
    def member_side(ipr: IPRoute) -> None:
        ipr.link("add", ifname=UPLINK, kind="veth", peer={"ifname": port, "net_ns_fd": fabric})
        idx = _index(ipr, UPLINK)
        for address, prefixlen in addresses:
            _add_address(ipr, idx, address, prefixlen)
        ipr.link("set", index=idx, state="up")

    def fabric_side(ipr: IPRoute) -> None:
        ipr.link("set", index=_index(ipr, port), master=_index(ipr, BRIDGE), state="up")

    _in(member, member_side)
    _in(fabric, fabric_side)


def add_pod_gateway(node: str, gateway: ipaddress.IPv4Address) -> None:
    # On lo rather than a dummy link: lo always exists (dummy is a module some kernels lack).
    _in(node, lambda ipr: ipr.addr("add", index=_index(ipr, "lo"), address=str(gateway), prefixlen=32))


def add_routes_via(member: str, routes: list[tuple[ipaddress._BaseNetwork, ipaddress._BaseAddress]]) -> None:
    """Routes `dst via gateway` on the uplink: a node's peers' pod CIDRs, a client's upstream."""
    def configure(ipr: IPRoute) -> None:
        idx = _index(ipr, UPLINK)
        for dst, gateway in routes:
            ipr.route("add", dst=str(dst), gateway=str(gateway), oif=idx)

    _in(member, configure)


def add_pod(node: str, pod: str, host_link: str,
            pod_ips: list[ipaddress._BaseAddress | str] | ipaddress._BaseAddress | str,
            gateway: ipaddress.IPv4Address | None, node_addresses: tuple = ()) -> None:
    """Give pod namespace `pod` an `eth0` with `pod_ips` (one address, or one per family) as
    host routes (/32, /128), its host side `host_link` in `node`; `gateway` is the IPv4 one
    (IPv6: POD_GATEWAY6). The host routes carry the node's address of their family as preferred
    source (`node_addresses`): without it the kernel would pick the first global address of the
    node, the pods' gateway on `lo`, for the node's own connections to its pods (a socket-path
    node client's connect() goes straight to the backend's route)."""
    ips = [ipaddress.ip_address(str(ip)) for ip in (pod_ips if isinstance(pod_ips, (list, tuple)) else [pod_ips])]

    def node_side(ipr: IPRoute) -> None:
        ipr.link("add", ifname=host_link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
        idx = _index(ipr, host_link)
        if any(ip.version == 6 for ip in ips):
            _add_address(ipr, idx, POD_GATEWAY6, 64)
        ipr.link("set", index=idx, state="up")
        sources = {ipaddress.ip_address(str(a)).version: str(a) for a in node_addresses}
        for ip in ips:
            extra = {"prefsrc": sources[ip.version]} if ip.version in sources else {}
            ipr.route("add", dst=f"{ip}/{ip.max_prefixlen}", oif=idx, scope=SCOPE_LINK if ip.version == 4 else 0,
                      **extra)

    def pod_side(ipr: IPRoute) -> None:
        idx = _index(ipr, "eth0")
        for ip in ips:
            _add_address(ipr, idx, ip, ip.max_prefixlen)
        ipr.link("set", index=idx, state="up")
        for ip in ips:
            if ip.version == 4:
                # onlink: the gateway is not in the pod's (/32) subnet, but it is one hop away on eth0.
                ipr.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=idx, flags=["onlink"])
            else:
                ipr.route("add", dst="::/0", gateway=POD_GATEWAY6, oif=idx)

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
