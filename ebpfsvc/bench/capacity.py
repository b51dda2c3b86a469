"""Capacity with the default map sizes: how large a cluster one node serves, and what happens past it.

The agent's path on real pinned maps compiled with the default limits (bpf/include/abi.h):

    ClusterState --DesiredStateBuilder--> Admission --MapWriter--> maps

- N Services x K endpoints (every backend distinct), from an empty datapath: how many Services are
  programmed, which map is the bound (ebpfsvc_map_pressure), and that no apply fails;
- recovery: the oldest D programmed Services deleted; the time until the waiting Services that now
  fit are programmed (syncs run back to back, as the agent runs them when admission defers).

    python -m ebpfsvc.bench.capacity [N] [K] [D]     # needs root (BPF maps); default 14000 10 1000
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

from ebpfsvc.admission import Admission, Capacity
from ebpfsvc.bench.controlplane import NODE, cluster_objects
from ebpfsvc.desired import DesiredStateBuilder
from ebpfsvc.tracker import ClusterState


def main(argv: list[str]) -> int:
    from ebpfsvc.datapath import loader
    from ebpfsvc.datapath.writer import MapWriter

    n, k, d = (int(a) for a in (argv + ["14000", "10", "1000"][len(argv):])[:3])
    limits = loader.Limits()
    pin_dir = Path("/sys/fs/bpf") / f"ebpfsvc-capacity-{uuid.uuid4().hex[:8]}"
    services, slices = cluster_objects(n, k)
    for i, svc in enumerate(services):       # ages in creation order: svc-0 is the oldest
        svc["metadata"]["creationTimestamp"] = f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z"
    dp = loader.load(pin_dir, limits=limits, cache=False)
    try:
        state = ClusterState(NODE)
        state.on_relist("Service", services)
        state.on_relist("EndpointSlice", slices)
        for kind in ("Service", "EndpointSlice"):
            state.on_synced(kind)
        builder, writer = DesiredStateBuilder(NODE), MapWriter(dp.maps)
        admission = Admission(Capacity.of(limits))

        def sync(full: bool = False):
            snap = state.snapshot()
            out = admission.admit(builder.build(snap), snap.services, lambda spn: writer.service_id(spn) is not None)
            writer.apply(out.state, full=full, delta=out.delta)
            return out

        t0 = time.monotonic()
        out = sync(full=True)
        first = time.monotonic() - t0
        served = {fe.service.name for fe in out.state.frontends.values()}
        print(f"default limits: {limits.frontends} frontends, {limits.services} service ports, {limits.backends} "
              f"backends, {limits.maglev_slots} Maglev slots")
        print(f"{n} Services x {k} endpoints: {len(served)} programmed, {len(out.not_programmed)} not "
              f"(first sync {first:.1f} s, no apply failed)")
        print("map pressure:", ", ".join(f"{m} {p:.2f}" for m, p in admission.pressure().items()))
        waiting = sorted(out.not_programmed)
        if waiting:
            print(f"first not programmed: {waiting[0][1]}: {out.not_programmed[waiting[0]][1]}")

        # Recovery: delete the D oldest programmed Services; sync until no more Services get in.
        gone = sorted(served, key=lambda s: int(s.split("-")[1]))[:d]
        from ebpfsvc.sources.base import Event, EventType
        t0 = time.monotonic()
        for name in gone:
            state.on_event(Event("Service", EventType.DELETED, {"kind": "Service",
                                                                "metadata": {"name": name, "namespace": "bench"}}))
        syncs = 0
        while True:
            out = sync()
            syncs += 1
            if not out.deferred:
                break
        recovered = time.monotonic() - t0
        now = {fe.service.name for fe in out.state.frontends.values()}
        print(f"recovery: {d} programmed Services deleted -> {len(now - served)} waiting ones programmed in "
              f"{recovered * 1000:.0f} ms ({syncs} syncs), {len(out.not_programmed)} still waiting")
    finally:
        dp.close()
        loader.unpin(pin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
