"""bpf/include/abi.h's ABI_SIZE _Static_asserts name the sizes cffi reads from the same header (no root:
the compiler checks the C side when a program compiles, tests/bpf/test_abi.py the compiled maps)."""

from __future__ import annotations

import re

from ebpfsvc import abi

ASSERT = re.compile(r"\bABI_SIZE\((\w+), (\d+)\);")
STRUCT = re.compile(r"^struct (\w+) \{", re.M)


def test_every_struct_has_its_size_asserted_as_cffi_reads_it():
    text = abi.ABI_H.read_text()
    asserted = {name: int(size) for name, size in ASSERT.findall(text)}
    assert set(asserted) == set(STRUCT.findall(text))
    assert asserted == {name: abi.ffi.sizeof(f"struct {name}") for name in asserted}
