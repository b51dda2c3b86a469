"""The CRC32c shift table the loader gives the SCTP port rewrite (pure Python:
no root). The end-to-end check is the SCTP fixture in test_clusterip.py."""

from __future__ import annotations

import os
import struct

from scapy.layers.sctp import crc32c as scapy_crc32c

from ebpfsvc.datapath.loader import crc32c_shift_table

POLY = 0x82F63B78


def crc32c(data: bytes) -> int:
    # scapy returns the CRC byte-swapped, ready to be packed big-endian.
    return struct.unpack("<I", struct.pack(">I", scapy_crc32c(data)))[0]


def mul(a: int, b: int) -> int:
    p = 0
    for i in range(31, -1, -1):
        if (a >> i) & 1:
            p ^= b
        b = (b >> 1) ^ (POLY if b & 1 else 0)
    return p


def crc_word(w: int) -> int:
    for _ in range(32):
        w = (w >> 1) ^ (POLY if w & 1 else 0)
    return w


def test_table_starts_with_known_powers():
    t = crc32c_shift_table(5)
    assert t[0] == 1 << 31          # x^0
    assert t[1] == 1 << 23          # x^8
    assert t[4] == POLY             # x^32 = P - x^32, reflected


def test_port_change_predicted_from_the_table():
    table = crc32c_shift_table(2048)
    for length in (12, 13, 64, 1500):
        pkt = bytearray(os.urandom(length))
        pkt[8:12] = b"\0\0\0\0"                      # the CRC is computed over a zeroed field
        changed = bytearray(pkt)
        changed[2:4] = os.urandom(2)                 # a new destination port
        delta = struct.unpack("<I", bytes(a ^ b for a, b in zip(pkt[:4], changed[:4])))[0]
        predicted = crc32c(bytes(pkt)) ^ mul(int(table[length - 4]), crc_word(delta))
        assert predicted == crc32c(bytes(changed)), length
