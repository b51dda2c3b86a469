"""The kernel/user ABI (bpf/include/abi.h) as seen from Python.

cffi parses the header itself, so there is one definition of every struct that
lives in a BPF map: the preprocessor lines are stripped (abi.h keeps them to
`#ifndef X / #define X value / #endif`), the struct declarations are handed to
`ffi.cdef`, and every `#define NAME <integer>` becomes a module constant.

tests/bpf/test_abi.py checks this layout against the one bcc derives from the
compiled program (its ctypes Key/Leaf types), map by map.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from pathlib import Path

import cffi

ABI_H = Path(__file__).resolve().parent.parent / "bpf" / "include" / "abi.h"

_DEFINE = re.compile(r"^\s*#\s*define\s+([A-Z][A-Z0-9_]*)\s+(0x[0-9a-fA-F]+|\d+)\b")
_TYPEDEFS = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef uint16_t __be16;
typedef uint32_t __be32;
"""


def _parse(text: str) -> tuple[dict[str, int], str]:
    constants: dict[str, int] = {}
    body: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("ABI_SIZE("):
            continue        # the C compiler's size checks: nothing for cffi
        if line.lstrip().startswith("#"):
            m = _DEFINE.match(line)
            if m:
                # First definition wins: the #ifndef guard makes it the default.
                constants.setdefault(m.group(1), int(m.group(2), 0))
            continue
        body.append(line)
    # cffi's cdef does not take comments inside declarations well: drop them.
    source = re.sub(r"/\*.*?\*/", "", "\n".join(body), flags=re.S)
    source = re.sub(r"//[^\n]*", "", source)
    return constants, source


CONSTANTS, _CDEF = _parse(ABI_H.read_text())
ffi = cffi.FFI()
ffi.cdef(_TYPEDEFS + _CDEF)

# Every constant as a module attribute: abi.LB_SVC_F_AFFINITY, abi.REASON_MAX, ...
globals().update(CONSTANTS)

#: REASON_* value -> lower-case name, for metrics labels and the CLI.
REASONS: dict[int, str] = {
    v: k[len("REASON_"):].lower() for k, v in CONSTANTS.items() if k.startswith("REASON_") and k != "REASON_MAX"
}

#: The struct each map holds: map name -> (key C type, value C type).
MAP_TYPES: dict[str, tuple[str, str]] = {
    "lb4_frontends": ("struct lb4_key", "struct lb4_service"),
    "lb4_backends": ("__u32", "struct lb4_backend"),
    "lb_maglev": ("__u32", "struct lb_maglev_pair"),
    "ct4": ("struct ct4_key", "struct ct4_entry"),
    "lb4_affinity": ("struct lb4_affinity_key", "struct lb_affinity_val"),
    "frag4": ("struct frag4_key", "struct frag4_ports"),
    "lb_service_names": ("__u32", "struct lb_service_name"),
    "lb_frontend_stats": ("__u32", "struct lb_traffic"),
    "lb_backend_stats": ("__u32", "struct lb_traffic"),
    "lb_drops": ("__u32", "__u64"),
    "lb4_snat": ("struct ct4_key", "struct snat4_entry"),
    "lb4_source_ranges": ("struct lb4_src_range_key", "__u32"),
    "lb4_affinity_match": ("struct lb4_affinity_match_key", "__u32"),
    "lb_service_status": ("struct lb_service_name", "struct lb_service_status"),
    "lb_agent_config": ("__u32", "__u32"),
    "lb_agent_cluster_cidr": ("__u32", "__u32"),
    "lb4_sock_revnat": ("struct lb4_sock_key", "struct lb4_sock_revnat"),
    "lb_sock_stats": ("__u32", "__u64"),
    "lb_sock_path": ("__u32", "struct lb_sock_path"),
    "lb6_frontends": ("struct lb6_key", "struct lb4_service"),
    "lb6_backends": ("__u32", "struct lb6_backend"),
    "ct6": ("struct ct6_key", "struct ct6_entry"),
    "lb6_affinity": ("struct lb6_affinity_key", "struct lb_affinity_val"),
    "frag6": ("struct frag6_key", "struct frag4_ports"),
    "lb6_source_ranges": ("struct lb6_src_range_key", "__u32"),
    "lb6_snat": ("struct ct6_key", "struct snat6_entry"),
    "lb_node_addrs": ("__u32", "struct lb_node_addrs"),
    "lb6_sock_revnat": ("struct lb6_sock_key", "struct lb6_sock_revnat"),
}


def slots_per_element(value_size: int) -> int:
    """Maglev slots per lb_maglev element of `value_size` bytes: two (struct lb_maglev_pair), or one
    in a map pinned by a build before it (read only to carry its tables over, datapath/migrate.py)."""
    return max(1, value_size // ffi.sizeof("__u32"))


def struct_fields(ctype: str) -> dict[str, tuple[int, int]]:
    """Field name -> (offset, size) of a struct type, for layout checks."""
    t = ffi.typeof(ctype)
    return {name: (f.offset, ffi.sizeof(f.type)) for name, f in t.fields}


# ---- __be32 / __be16 fields --------------------------------------------------------------------
# A network-order field read or written as a native integer (as bcc's ctypes and cffi see it)
# holds the byte-swapped value on a little-endian host: htonl/htons of the address or port.
# The one home of that conversion, for the writer, the loader's -D values and the inspection side.

def be32(addr) -> int:
    """An IPv4 address (IPv4Address, str or int) as the u32 a __be32 field holds."""
    if type(addr) is not ipaddress.IPv4Address and not isinstance(addr, ipaddress.IPv4Address):
        addr = ipaddress.IPv4Address(addr if isinstance(addr, int) else str(addr))
    return socket.htonl(int(addr))


def be16(port: int) -> int:
    """A port as the u16 a __be16 field holds."""
    return socket.htons(port)


def ip_of_be32(raw: int) -> str:
    """A __be32 field's value -> dotted quad."""
    return str(ipaddress.IPv4Address(socket.ntohl(raw)))


def port_of_be16(raw: int) -> int:
    """A __be16 field's value -> port number."""
    return socket.ntohs(raw)


# ---- IPv6 addresses: __be32[4] fields ------------------------------------------------------------
# An IPv6 address field is four network-order words; read natively (bcc's ctypes arrays, cffi,
# numpy records) each holds its 4 wire bytes as a native u32.

def be128(addr) -> tuple[int, int, int, int]:
    """An IPv6 address (IPv6Address or str) as the four u32 a __be32[4] field holds."""
    if not isinstance(addr, ipaddress.IPv6Address):
        addr = ipaddress.IPv6Address(str(addr))
    return struct.unpack("=4I", addr.packed)


def ip_of_be128(words) -> str:
    """A __be32[4] field's value (any sequence of four u32) -> IPv6 text."""
    return str(ipaddress.IPv6Address(struct.pack("=4I", *words)))
