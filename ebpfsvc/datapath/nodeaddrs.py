"""The node's own addresses as the datapath sees them: the map lb_node_addrs (bpf/lib/nodeaddr.h).

    nodeaddrs.write(dp.maps, NodeAddrs(hairpin4="198.18.0.1", snat4="198.18.0.1",
                                       hairpin6="2001:2::1", snat6="2001:2::1"))

The programs read the hairpin source and the node's SNAT address of each family from this one-entry
array instead of having them compiled in, so a program does not depend on the node it runs on (one
program-cache entry serves every node, datapath/progcache.py), and a node address that changes is
one map write, not a compile and a reload. This module is the map's one writer: the agent calls it
whenever its NodeInfo changes, the test fixtures to set up a node. None is written as all zero,
which the programs read as "none" (that feature off).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ebpfsvc.abi import be32, be128, ip_of_be32, ip_of_be128

MAP = "lb_node_addrs"


@dataclass(frozen=True)
class NodeAddrs:
    """struct lb_node_addrs (bpf/include/abi.h) in Python terms; None = none."""

    hairpin4: IPv4Address | None = None      # source of IPv4 hairpin flows
    snat4: IPv4Address | None = None         # NodePort SNAT and node-client source, IPv4
    hairpin6: IPv6Address | None = None
    snat6: IPv6Address | None = None

    def __post_init__(self) -> None:
        for name, cls in (("hairpin4", IPv4Address), ("snat4", IPv4Address),
                          ("hairpin6", IPv6Address), ("snat6", IPv6Address)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                value = ipaddress.ip_address(str(value))
                if not isinstance(value, cls):
                    raise ValueError(f"node address {name}: {value} is not {cls.__name__[:4]}")
                object.__setattr__(self, name, value)


def write(maps, addrs: NodeAddrs) -> None:
    """Write `addrs` into the lb_node_addrs of `maps` (a Datapath's or open_maps()'s tables)."""
    table = maps[MAP]
    leaf = table.Leaf()
    leaf.hairpin4 = be32(addrs.hairpin4) if addrs.hairpin4 is not None else 0
    leaf.snat4 = be32(addrs.snat4) if addrs.snat4 is not None else 0
    for name in ("hairpin6", "snat6"):
        value = getattr(addrs, name)
        getattr(leaf, name)[:] = be128(value) if value is not None else (0, 0, 0, 0)
    table[table.Key(0)] = leaf


def read(maps) -> NodeAddrs:
    """What lb_node_addrs holds now (for inspection and tests)."""
    table = maps[MAP]
    leaf = table[table.Key(0)]
    v4 = {name: ip_of_be32(getattr(leaf, name)) if getattr(leaf, name) else None for name in ("hairpin4", "snat4")}
    v6 = {name: ip_of_be128(getattr(leaf, name)) if any(getattr(leaf, name)) else None
          for name in ("hairpin6", "snat6")}
    return NodeAddrs(**v4, **v6)


__all__ = ["MAP", "NodeAddrs", "read", "write"]
