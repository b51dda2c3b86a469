"""Per-packet cost of the ClusterIP datapath, measured in the kernel with
BPF_PROG_TEST_RUN (no interface, no traffic generator), against a
pass-through program, with 1 and with 10,000 services in the maps.

Two ways of timing, because a TC program run with `repeat` sees the same skb
every time, already rewritten by the previous run:

- repeat mode (`repeat` runs, one syscall): exact for paths that leave the
  packet as it was. Used for the pass-through baseline and for the miss path
  (a packet to a non-Service address: parse, CT miss, frontend miss).
- single mode (`samples` syscalls of one run each, kernel-timed, averaged):
  for paths that rewrite the packet: a new flow (frontend + Maglev + CT
  create + DNAT; every sample a new source port), an established flow's
  packet (CT hit + DNAT) and a reply (CT reply hit + reverse NAT). The
  pass-through program is timed the same way, so the difference is the
  datapath's own cost.

    python -m ebpfsvc.bench.datapath          # prints a table, needs root
"""

from __future__ import annotations

import ipaddress
import os
import statistics
import time
import uuid
from pathlib import Path

from ebpfsvc import maglev
from ebpfsvc.datapath import loader
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.lbmodel import Backend, Frontend, FrontendKey, LBState, ServicePortName

CLIENT = "198.18.1.5"
_PASS_SOURCE = b"int pass(struct __sk_buff *skb) { return 0; /* TC_ACT_OK */ }\n"


def services_state(n: int, backends_per_service: int = 2) -> LBState:
    """n ClusterIP services 198.19.x.y:80, each with its own backends in 198.18.128.0/17."""
    from ebpfsvc.lab.labfile import DEFAULT_SERVICE_CIDR

    vips = ipaddress.IPv4Network(DEFAULT_SERVICE_CIDR).hosts()
    bes = ipaddress.IPv4Network("198.18.128.0/17").hosts()
    fes = []
    for i in range(n):
        vip = next(vips)
        fes.append(Frontend(
            key=FrontendKey(vip, 80),
            service=ServicePortName("bench", f"svc{i}"),
            backends=tuple(Backend(next(bes), 8080) for _ in range(backends_per_service)),
        ))
    return LBState.of(fes)


def _packets(vip: str, backend: str, sport: int):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    eth = Ether(src="02:00:00:00:01:05", dst="02:00:00:00:00:fe")
    return {
        "syn": lambda p: bytes(eth / IP(src=CLIENT, dst=vip) / TCP(sport=p, dport=80, flags="S")),
        "established": bytes(eth / IP(src=CLIENT, dst=vip) / TCP(sport=sport, dport=80, flags="A") / (b"x" * 64)),
        "reply": bytes(eth / IP(src=backend, dst=CLIENT) / TCP(sport=8080, dport=sport, flags="A") / (b"y" * 64)),
        "miss": bytes(eth / IP(src=CLIENT, dst="198.18.3.3") / TCP(sport=sport, dport=80, flags="A") / (b"x" * 64)),
    }


def _single(fd: int, packets, samples: int) -> float:
    """Mean kernel-measured ns of `samples` one-run invocations (packets: bytes or callable(i)).

    Packets are built before timing starts: building one with scapy between
    runs would evict the maps from the caches and time cold lookups.
    """
    pkts = [packets(i) for i in range(samples)] if callable(packets) else [packets] * samples
    durations = [prog_test_run(fd, pkt).duration_ns for pkt in pkts]
    return statistics.fmean(durations)


def _measure_services(n: int, pass_fd: int, repeat: int, samples: int, pin_root: Path) -> dict:
    pin = pin_root / f"ebpfsvc-bench-{uuid.uuid4().hex[:8]}"
    limits = loader.Limits(ct_entries=max(262144, 4 * samples))
    dp = loader.load(pin, limits=limits, cache=False)
    try:
        state = services_state(n)
        t0 = time.perf_counter()
        MapWriter(dp.maps).apply(state)
        apply_s = time.perf_counter() - t0
        # Measure against the last service written: nothing special about it.
        fe = list(state.frontends.values())[-1]
        vip = str(fe.key.address)
        from_pod, to_pod = dp.programs["from_pod"].fd, dp.programs["to_pod"].fd
        pk = _packets(vip, "0.0.0.0", 20000)
        # The established flow: create it, then learn its backend from the output.
        first = prog_test_run(from_pod, pk["established"])
        from scapy.layers.l2 import Ether
        from scapy.layers.inet import IP
        backend = Ether(first.data)[IP].dst
        pk = _packets(vip, backend, 20000)
        out = {
            "services": n,
            "apply_s": apply_s,
            "maglev_slots": sum(maglev.table_size(len(f.backends)) for f in state.frontends.values()),
            "miss_repeat_ns": prog_test_run(from_pod, pk["miss"], repeat=repeat).duration_ns,
            "pass_single_ns": _single(pass_fd, pk["established"], samples),
            "new_flow_ns": _single(from_pod, lambda i: pk["syn"](21000 + i % 40000), samples),
            "established_ns": _single(from_pod, pk["established"], samples),
            "reply_ns": _single(to_pod, pk["reply"], samples),
        }
        return out
    finally:
        dp.close()
        loader.unpin(pin)


def measure(repeat: int = 1_000_000, samples: int = 20_000, services=(1, 10_000),
            pin_root: str = "/sys/fs/bpf", show: bool = True) -> dict:
    """Measure and return {"pass_repeat_ns": ..., "runs": [per services count]}; print a table."""
    from bcc import BPF

    os.environ.setdefault("BCC_KERNEL_SOURCE", loader.DEFAULT_KERNEL_SOURCE)
    passthrough = BPF(text=_PASS_SOURCE)
    try:
        pass_fd = passthrough.load_func(b"pass", BPF.SCHED_CLS).fd
        pk = _packets("198.19.0.1", "198.18.2.1", 20000)
        result = {
            "repeat": repeat,
            "samples": samples,
            "pass_repeat_ns": prog_test_run(pass_fd, pk["miss"], repeat=repeat).duration_ns,
            "runs": [_measure_services(n, pass_fd, repeat, samples, Path(pin_root)) for n in services],
        }
    finally:
        passthrough.cleanup()
    if show:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = [
        f"pass-through program, repeat={result['repeat']}: {result['pass_repeat_ns']} ns/packet",
        "",
        "| services | miss (repeat) | pass (single) | new flow | established | reply | apply |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['services']} | {r['miss_repeat_ns']} ns | {r['pass_single_ns']:.0f} ns | "
            f"{r['new_flow_ns']:.0f} ns | {r['established_ns']:.0f} ns | {r['reply_ns']:.0f} ns | "
            f"{r['apply_s']:.2f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    measure()
