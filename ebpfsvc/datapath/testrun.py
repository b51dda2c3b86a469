"""Run a loaded BPF program on a packet without any interface: BPF_PROG_TEST_RUN.

bcc has no wrapper for it and libbcc does not export libbpf's
bpf_prog_test_run_opts, so this calls bpf(2) directly through ctypes. Used by
the packet fixtures (tests/bpf) and by the benchmark (ebpfsvc/bench/datapath.py):
`repeat` runs the program that many times in the kernel and reports the mean
duration per run.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

BPF_PROG_TEST_RUN = 10

# bpf(2) syscall numbers; the architectures Debian builds bcc for.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
VERDICTS = {TC_ACT_OK: "TC_ACT_OK", TC_ACT_SHOT: "TC_ACT_SHOT", TC_ACT_REDIRECT: "TC_ACT_REDIRECT"}


class _TestAttr(ctypes.Structure):
    """The `test` member of union bpf_attr (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint8 * 44),   # the union is larger; the kernel wants the rest zero
    ]


_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class RunResult:
    retval: int          # the program's return value (TC_ACT_*)
    data: bytes          # the packet after the program
    duration_ns: int     # mean ns per run, as the kernel measured it

    @property
    def verdict(self) -> str:
        return VERDICTS.get(self.retval, str(self.retval))


# struct __sk_buff up to `ifindex` (include/uapi/linux/bpf.h: the 11th __u32); the kernel takes a
# shorter context as zero-filled, and only a few fields may be non-zero (ifindex is one).
_SKB_IFINDEX_OFF = 40


def prog_test_run(prog_fd: int, packet: bytes, *, repeat: int = 1, out_size: int | None = None,
                  ifindex: int | None = None) -> RunResult:
    """Run program `prog_fd` once (or `repeat` times) on `packet` (from its Ethernet header).

    `ifindex`: the device the packet is on (skb->ifindex), an interface of the caller's network
    namespace; default: the kernel's choice, lo."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(f"bpf(2) syscall number unknown for {platform.machine()}")
    out_size = out_size or max(len(packet) + 256, 1514)
    data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
    data_out = ctypes.create_string_buffer(out_size)
    attr = _TestAttr()
    attr.prog_fd = prog_fd
    attr.data_size_in = len(packet)
    attr.data_size_out = out_size
    attr.data_in = ctypes.addressof(data_in)
    attr.data_out = ctypes.addressof(data_out)
    attr.repeat = repeat
    if ifindex is not None:
        ctx = (ctypes.c_uint8 * (_SKB_IFINDEX_OFF + 4))()
        ctypes.c_uint32.from_buffer(ctx, _SKB_IFINDEX_OFF).value = ifindex
        attr.ctx_in = ctypes.addressof(ctx)
        attr.ctx_size_in = len(ctx)
    ret = _libc.syscall(nr, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return RunResult(retval=attr.retval, data=data_out.raw[: attr.data_size_out], duration_ns=attr.duration)
