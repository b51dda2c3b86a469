"""Python twin of the datapath's flow hash (bpf/lib/lb.h lb4_flow_hash, lb6_flow_hash).

Lets tests and tools predict which Maglev slot, hence which backend, a new flow
gets: slot = flow_hash(...) % maglev_size. Words are the packet's bytes read as
native-endian u32 / u16, exactly as the BPF program reads them; an IPv6 address is
its four words xor-folded into one (lb6_addr_fold).
"""

from __future__ import annotations

import ipaddress

from ebpfsvc.abi import be16, be32, be128

from ebpfsvc import abi

LB_HASH_SEED = abi.LB_HASH_SEED
_M = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    a = (a + 0xDEADBEEF + (3 << 2) + initval) & _M
    b = (b + 0xDEADBEEF + (3 << 2) + initval) & _M
    c = (c + 0xDEADBEEF + (3 << 2) + initval) & _M
    c ^= b; c = (c - _rol(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M  # noqa: E702
    return c


def _word(addr) -> int:
    """An address as the hash reads it: an IPv4 address's __be32, an IPv6 address's words folded."""
    a = ipaddress.ip_address(str(addr))
    if a.version == 4:
        return be32(a)
    w = be128(a)
    return w[0] ^ w[1] ^ w[2] ^ w[3]


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, proto: int, seed: int = LB_HASH_SEED) -> int:
    """Hash of a client's 5-tuple (addresses of either family as text, ports host order)."""
    return jhash_3words(_word(saddr), _word(daddr), (be16(sport) << 16) | be16(dport), seed ^ proto)
