"""kube-proxy's chain, map and set names, computed the way kube-proxy computes them.

The names matter beyond looks: a baseline whose chain names differ from what a
real node has cannot be compared rule by rule with `iptables-save` / `nft list
ruleset` output from a cluster, and the hash length sets how long every rule
lookup by name is.  Both modes hash the *ServicePortName string*
("namespace/name:portname") with the lower-case protocol:

- iptables mode: "KUBE-SVC-" + first 16 chars of base32(sha256(name + proto)),
  endpoints "KUBE-SEP-" + the same over (name + proto + "ip:port").  iptables
  chain names are limited to 28 characters, hence the hash instead of the name.
- nftables mode: chain names may be long, so they carry the readable name after
  an 8-character hash prefix: "service-ULMVA6XW-ns1/svc1/tcp/p80",
  "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80".
"""

from __future__ import annotations

import base64
import hashlib
from typing import NamedTuple

from ebpfsvc.lbmodel import Backend, ServicePortName

# nftables object names are at most 256 bytes; kube-proxy reserves 16 for its prefixes.
_NFT_NAME_MAX = 256
_NFT_PREFIX_MAX = 16


def _b32_sha256(text: str, chars: int) -> str:
    """The first `chars` (a multiple of 8) base32 characters of sha256(text).

    Every 5 digest bytes make 8 characters, so encoding only the bytes needed
    gives the same prefix as kube-proxy's full encoding, several times faster
    (this runs once per service and once per endpoint: 200,000 times at 50,000
    services).
    """
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[: chars * 5 // 8]).decode()


def protocol(spn: ServicePortName) -> str:
    """The protocol as kube-proxy spells it in names and rules: tcp, udp, sctp."""
    return spn.protocol.value.lower()


def endpoint_string(backend: Backend) -> str:
    """kube-proxy's Endpoint.String(): "ip:port"."""
    return f"{backend.address}:{backend.port}"


# --- iptables mode -------------------------------------------------------------

def port_proto_hash(spn: ServicePortName) -> str:
    return _b32_sha256(str(spn) + protocol(spn), 16)


class ServiceChains(NamedTuple):
    """The four per-service-port chains of iptables mode, from one hash."""

    svc: str    # endpoint selection, Cluster traffic policy
    svl: str    # endpoint selection, Local traffic policy (this node's endpoints)
    ext: str    # entry for NodePort, externalIPs and load-balancer IPs
    fw: str     # loadBalancerSourceRanges check in front of KUBE-EXT


def service_chains(spn: ServicePortName) -> ServiceChains:
    h = port_proto_hash(spn)
    return ServiceChains("KUBE-SVC-" + h, "KUBE-SVL-" + h, "KUBE-EXT-" + h, "KUBE-FW-" + h)


def svc_chain(spn: ServicePortName) -> str:
    """Endpoint selection for Cluster traffic policy."""
    return "KUBE-SVC-" + port_proto_hash(spn)


def svl_chain(spn: ServicePortName) -> str:
    """Endpoint selection for Local traffic policy (this node's endpoints only)."""
    return "KUBE-SVL-" + port_proto_hash(spn)


def ext_chain(spn: ServicePortName) -> str:
    """Entry for NodePort, externalIPs and load-balancer IPs."""
    return "KUBE-EXT-" + port_proto_hash(spn)


def fw_chain(spn: ServicePortName) -> str:
    """loadBalancerSourceRanges check in front of KUBE-EXT."""
    return "KUBE-FW-" + port_proto_hash(spn)


def sep_chain(spn: ServicePortName, backend: Backend) -> str:
    """One endpoint: masquerade hairpin traffic, then DNAT."""
    return "KUBE-SEP-" + _b32_sha256(str(spn) + protocol(spn) + endpoint_string(backend), 16)


# --- nftables mode -------------------------------------------------------------

def _hash_and_truncate(name: str) -> str:
    name = _b32_sha256(name, 8) + "-" + name
    limit = _NFT_NAME_MAX - _NFT_PREFIX_MAX
    return name if len(name) <= limit else name[: limit - 3] + "..."


def nft_service_base(spn: ServicePortName) -> str:
    """"HASH-namespace/name/protocol/portname", the suffix of every per-service chain."""
    return _hash_and_truncate(f"{spn.namespace}/{spn.name}/{protocol(spn)}/{spn.port}")


def nft_endpoint_base(spn: ServicePortName, backend: Backend) -> str:
    """"HASH-namespace/name/protocol/portname__ip/port", the suffix of endpoint chains and affinity sets."""
    return _hash_and_truncate(
        f"{spn.namespace}/{spn.name}/{protocol(spn)}/{spn.port}__{backend.address}/{backend.port}")
