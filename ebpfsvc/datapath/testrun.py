"""Run a loaded BPF program on a packet without any interface: BPF_PROG_TEST_RUN.

bcc has no wrapper for it and libbcc does not export libbpf's
bpf_prog_test_run_opts, so this goes through bpf(2) (ebpfsvc/datapath/bpfsys.py). Used by
the packet fixtures (tests/bpf) and by the benchmark (ebpfsvc/bench/datapath.py):
`repeat` runs the program that many times in the kernel and reports the mean
duration per run.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ebpfsvc.datapath import bpfsys

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
VERDICTS = {TC_ACT_OK: "TC_ACT_OK", TC_ACT_SHOT: "TC_ACT_SHOT", TC_ACT_REDIRECT: "TC_ACT_REDIRECT"}


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
    out_size = out_size or max(len(packet) + 256, 1514)
    data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
    data_out = ctypes.create_string_buffer(out_size)
    ctx = None
    if ifindex is not None:
        ctx = (ctypes.c_uint8 * (_SKB_IFINDEX_OFF + 4))()
        ctypes.c_uint32.from_buffer(ctx, _SKB_IFINDEX_OFF).value = ifindex
    retval, size, duration = bpfsys.prog_test_run(prog_fd, data_in, len(packet), data_out, out_size, repeat=repeat,
                                                  ctx_in=ctx, ctx_size_in=len(ctx) if ctx is not None else 0)
    return RunResult(retval=retval, data=data_out.raw[:size], duration_ns=duration)
