"""The frontends the pinned maps hold, read back as lbmodel objects, per Service.

The maps outlive the agent: after a restart they still hold the last state the previous run
applied.  A Service whose current version is invalid has no good version in the new process's
memory, yet the maps hold its last good one; admission (ebpfsvc/admission.py) keeps that in
force until the Service becomes valid again or the API says it is gone, instead of letting the
first full apply withdraw it.

What is read back is what the datapath serves: each frontend's key, kind and flags, affinity,
source ranges, and the backends of its Maglev table (backends kept only for their established
flows are not in a table, and are not recovered).  A service name too long for the map (stored
hashed, writer.service_name) cannot be read back; its frontends are not recovered.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from urllib.parse import unquote

from ebpfsvc import abi
from ebpfsvc.datapath.batch import read_slots
from ebpfsvc.lbmodel import (Algorithm, Backend, Frontend, FrontendKey, FrontendKind, Protocol, Scope,
                             ServicePortName)

ServiceKey = tuple[str, str]

_PROTOCOLS = {p.number: p for p in Protocol}
_KINDS = ((abi.LB_SVC_F_NODEPORT, FrontendKind.NODE_PORT), (abi.LB_SVC_F_EXTERNAL_IP, FrontendKind.EXTERNAL_IP),
          (abi.LB_SVC_F_LOADBALANCER, FrontendKind.LOAD_BALANCER))


def parse_service_name(text: str) -> ServicePortName | None:
    """The inverse of writer.service_name ("ns/name:port/PROTO", parts percent-escaped); None for
    a hashed (too long) or foreign name."""
    if "#" in text:
        return None
    head, _, proto = text.rpartition("/")
    ns, _, rest = head.partition("/")
    name, _, port = rest.partition(":")
    if not (ns and name and proto in Protocol.__members__):
        return None
    return ServicePortName(unquote(ns, errors="surrogatepass"), unquote(name, errors="surrogatepass"),
                           unquote(port, errors="surrogatepass"), Protocol(proto))


def _addr(raw) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A __be32 field (int) or a __be32[4] one (four words) as an address."""
    if isinstance(raw, int):
        return ipaddress.IPv4Address(struct.pack("=I", raw))
    return ipaddress.IPv6Address(struct.pack("=4I", *raw))


def pinned_frontends(maps) -> dict[ServiceKey, tuple[Frontend, ...]]:
    """Service (namespace, name) -> the frontends the maps serve for it."""
    names = {k.value: v.name.decode(errors="replace") for k, v in maps["lb_service_names"].items()}
    # Both families: ids are one space, an IPv6 address is a tuple of four words (_addr).
    backends = {k.value: (v.address, v) for k, v in maps["lb4_backends"].items()}
    if "lb6_backends" in maps:
        backends.update((k.value, (tuple(v.address), v)) for k, v in maps["lb6_backends"].items())
    ranges: dict[int, list] = {}
    for name, words in (("lb4_source_ranges", lambda a: a), ("lb6_source_ranges", tuple)):
        for k in maps[name].keys() if name in maps else ():
            ranges.setdefault(k.frontend_id, []).append(
                ipaddress.ip_network((_addr(words(k.address)), k.prefixlen - 32)))
    entries = [(k.address, k, v) for k, v in maps["lb4_frontends"].items() if not v.flags & abi.LB_SVC_F_ADDRESS]
    if "lb6_frontends" in maps:
        entries += [(tuple(k.address), k, v) for k, v in maps["lb6_frontends"].items()
                    if not v.flags & abi.LB_SVC_F_ADDRESS]
    high = max((v.maglev_offset + v.maglev_size for _, _, v in entries), default=0)
    slots = read_slots(maps["lb_maglev"], high) if high else None
    out: dict[ServiceKey, list[Frontend]] = {}
    for fe_addr, k, v in entries:
        spn = parse_service_name(names.get(v.service_id, ""))
        proto = _PROTOCOLS.get(k.proto)
        if spn is None or proto is None:
            continue
        ids = sorted(set(slots[v.maglev_offset: v.maglev_offset + v.maglev_size].tolist())) if v.maglev_size else []
        bes = []
        for i in ids:
            addr, b = backends.get(i, (None, None))
            if b is None or b.proto != k.proto:
                continue
            bes.append(Backend(_addr(addr), socket.ntohs(b.port), proto,
                               terminating=bool(b.flags & abi.LB_BE_F_TERMINATING),
                               local=bool(b.flags & abi.LB_BE_F_LOCAL)))
        kind = next((kd for flag, kd in _KINDS if v.flags & flag), FrontendKind.CLUSTER_IP)
        fe = Frontend(
            key=FrontendKey(_addr(fe_addr), socket.ntohs(k.port), proto, Scope(k.scope)),
            service=spn, kind=kind, backends=tuple(sorted(bes, key=lambda b: b.name)),
            algorithm=Algorithm.RANDOM if v.flags & abi.LB_SVC_F_RANDOM else Algorithm.MAGLEV,
            affinity_timeout=v.affinity_timeout if v.flags & abi.LB_SVC_F_AFFINITY else 0,
            local_only=bool(v.flags & abi.LB_SVC_F_LOCAL_ONLY),
            source_ranges=tuple(sorted(ranges.get(v.frontend_id, ()))) if v.flags & abi.LB_SVC_F_SOURCE_RANGES
            else ())
        out.setdefault((spn.namespace, spn.name), []).append(fe)
    return {key: tuple(fes) for key, fes in out.items()}
