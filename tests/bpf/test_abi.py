"""The ABI header seen two ways must agree: cffi's parse of bpf/include/abi.h
(ebpfsvc/abi.py, what the writer and tools use) and bcc's ctypes Key/Leaf types
of the compiled program's maps (what the kernel was given). Sizes and the
offset and size of every field, map by map."""

from __future__ import annotations

import ctypes

import pytest

from ebpfsvc import abi
from ebpfsvc.datapath import loader

pytestmark = pytest.mark.root


def _ctypes_layout(t) -> tuple[int, dict[str, tuple[int, int]]]:
    if not (isinstance(t, type) and issubclass(t, ctypes.Structure)):
        return ctypes.sizeof(t), {}
    return ctypes.sizeof(t), {name: (getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_}


def _cffi_layout(ctype: str) -> tuple[int, dict[str, tuple[int, int]]]:
    if not ctype.startswith("struct "):
        return abi.ffi.sizeof(ctype), {}
    return abi.ffi.sizeof(ctype), abi.struct_fields(ctype)


@pytest.mark.parametrize("name", loader.MAPS)
def test_map_layout_matches_header(datapath, name):
    table = datapath.maps[name]
    key_type, leaf_type = abi.MAP_TYPES[name]
    leaf = getattr(table, "sLeaf", table.Leaf)       # per-CPU maps: one CPU's value
    assert _ctypes_layout(table.Key) == _cffi_layout(key_type), f"{name} key"
    assert _ctypes_layout(leaf) == _cffi_layout(leaf_type), f"{name} value"


def test_every_map_in_maps_h_is_described():
    import re
    text = (loader.BPF_DIR / "lib" / "maps.h").read_text()
    declared = re.findall(r'^BPF_TABLE_PINNED\("[a-z_]+",\s*[^,]+,\s*[^,]+,\s*(\w+),', text, flags=re.M)
    assert declared and set(declared) == set(abi.MAP_TYPES)


def test_structs_have_no_implicit_padding():
    # abi.h's rule: explicit padding only, so sizes equal the sum of the fields.
    for ctype in sorted({t for pair in abi.MAP_TYPES.values() for t in pair if t.startswith("struct ")}):
        fields = abi.struct_fields(ctype)
        assert sum(size for _, size in fields.values()) == abi.ffi.sizeof(ctype), ctype


def test_constants_are_read():
    assert abi.REASON_MAX > max(abi.REASONS)
    assert abi.LB_SCOPE_INTERNAL == 1 and abi.CT_DIR_REPLY == 1
    assert abi.LB_SVC_F_ADDRESS and abi.CT_F_HAIRPIN
