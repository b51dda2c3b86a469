"""Control-plane cost at scale: Kubernetes objects -> maps, and one endpoint change.

The agent's path, stage by stage, on real pinned maps:

    raw API objects --on_relist--> ClusterState --snapshot--> desired_state --apply--> BPF maps

- full sync: N Services x K endpoints from an empty datapath (what an agent does
  on its first start on a busy cluster);
- one endpoint change at that scale: one EndpointSlice's endpoint replaced by
  another address, from the watch event to the moment the maps hold it, with
  the number of map entries written (it should be a handful, not N), stage by
  stage (event into the tracker, snapshot, desired state, map writes);
- an unchanged resync (a sync with nothing new: it must cost next to nothing), and the
  agent's periodic full apply (everything re-derived from the state and checked).

As the agent does (Agent.sync): one DesiredStateBuilder across syncs, its LBDelta passed to
MapWriter.apply.

    python -m ebpfsvc.bench.controlplane [N] [K]      # needs root (BPF maps)
"""

from __future__ import annotations

import copy
import gc
import ipaddress
import statistics
import sys
import time
import uuid
from pathlib import Path

from ebpfsvc.config import NodeConfig
from ebpfsvc.desired import DesiredStateBuilder
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterState

NODE = NodeConfig(node_name="node-1", node_addresses=("198.18.0.11",), zone="zone-a")


def cluster_objects(n_services: int, endpoints: int) -> tuple[list[dict], list[dict]]:
    """N ClusterIP Services with one EndpointSlice of K ready endpoints each (API-shaped dicts)."""
    vips = ipaddress.IPv4Network("198.19.0.0/17").hosts()
    # 98k pod addresses in the rest of 198.18.0.0/15; past that, the same addresses again on
    # another target port, so every (address, port) backend stays distinct.
    pool = [*ipaddress.IPv4Network("198.18.0.0/16").hosts(), *ipaddress.IPv4Network("198.19.128.0/17").hosts()]
    pool = pool[:-1]       # the last address is kept free: measure() moves an endpoint there
    cycle = len(pool) // endpoints * endpoints
    services, slices = [], []
    for i in range(n_services):
        name = f"svc-{i}"
        first = i * endpoints
        port = 8080 + first // cycle
        services.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench", "resourceVersion": "1"},
            "spec": {"clusterIP": str(next(vips)), "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": port, "protocol": "TCP"}]},
        })
        slices.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-abcde", "namespace": "bench", "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [str(pool[(first + j) % cycle])], "conditions": {"ready": True},
                           "nodeName": "node-2" if j % 2 else "node-1"} for j in range(endpoints)],
        })
    return services, slices


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def measure(n_services: int = 10_000, endpoints: int = 10, pin_root: Path = Path("/sys/fs/bpf"),
            repeats: int = 21) -> dict:
    from ebpfsvc.datapath import loader
    from ebpfsvc.datapath.writer import MapWriter

    services, slices = cluster_objects(n_services, endpoints)
    pin_dir = pin_root / f"esbench-cp-{uuid.uuid4().hex[:6]}"
    limits = loader.Limits(frontends=max(4 * n_services, 1024), services=max(2 * n_services, 1024),
                           backends=max(2 * n_services * endpoints, 1024),
                           maglev_slots=max(4 * n_services * 1009, 1 << 16))
    out: dict = {"services": n_services, "endpoints_per_service": endpoints}
    dp = loader.load(pin_dir, limits=limits, cache=False)
    try:
        writer = MapWriter(dp.maps)
        state = ClusterState(NODE)
        builder = DesiredStateBuilder(NODE)

        t0 = time.perf_counter()
        state.on_relist("Service", services)
        state.on_relist("EndpointSlice", slices)
        for kind in ("Service", "EndpointSlice", "Endpoints", "Node"):
            state.on_synced(kind)
        out["full_ingest_ms"] = _ms(t0)
        t1 = time.perf_counter()
        result = builder.build(state.snapshot())
        out["full_desired_ms"] = _ms(t1)
        t2 = time.perf_counter()
        stats = writer.apply(result.state, delta=result.delta)
        out["full_apply_ms"] = _ms(t2)
        out["full_total_ms"] = _ms(t0)
        out["full_writes"] = stats.writes
        out["frontends"] = len(result.state.frontends)

        # One endpoint of one service moves to a new address (a pod was replaced), and back,
        # `repeats` times: median and worst reported (a shared machine is noisy).
        totals, stages = [], []
        for i in range(repeats):
            changed = copy.deepcopy(slices[n_services // 2])
            changed["metadata"]["resourceVersion"] = str(2 + i)
            # The pool's last, unused address (every other time: back to the original one).
            if i % 2 == 0:
                changed["endpoints"][0]["addresses"] = ["198.19.255.254"]
            t0 = time.perf_counter()
            state.on_event(Event("EndpointSlice", EventType.MODIFIED, changed))
            t1 = time.perf_counter()
            snap = state.snapshot()
            t2 = time.perf_counter()
            result = builder.build(snap)
            t3 = time.perf_counter()
            stats = writer.apply(result.state, delta=result.delta)
            t4 = time.perf_counter()
            totals.append((t4 - t0) * 1000)
            stages.append([(t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000, (t4 - t3) * 1000])
            if i == 0:
                out["change_writes"] = stats.writes
                out["change_stats"] = {k: v for k, v in vars(stats).items() if v}
        out["change_total_ms"] = round(statistics.median(totals), 3)
        out["change_max_ms"] = round(max(totals), 3)
        out["change_stages_ms"] = {name: round(statistics.median(s[j] for s in stages), 3)
                                   for j, name in enumerate(("event", "snapshot", "desired", "apply"))}

        # And nothing at all: a sync of an unchanged cluster.
        t0 = time.perf_counter()
        result = builder.build(state.snapshot())
        stats = writer.apply(result.state, delta=result.delta)
        out["noop_total_ms"] = _ms(t0)
        out["noop_writes"] = stats.writes

        # The agent's periodic full apply: every frontend re-derived and checked, nothing to write.
        t0 = time.perf_counter()
        stats = writer.apply(builder.build(state.snapshot()).state, full=True)
        out["verify_total_ms"] = _ms(t0)
        out["verify_writes"] = stats.writes
        # Python's own pause at this heap size: a full (generation 2) collection, which the
        # interpreter runs now and then whatever the agent does.
        t0 = time.perf_counter()
        gc.collect()
        out["gc_full_ms"] = _ms(t0)
    finally:
        dp.close()
        loader.unpin(pin_dir)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 10_000
    k = int(argv[1]) if len(argv) > 1 else 10
    r = measure(n, k)
    print(f"{r['services']} services x {r['endpoints_per_service']} endpoints ({r['frontends']} frontends)")
    print(f"  full sync from empty: {r['full_total_ms']:.0f} ms (ingest {r['full_ingest_ms']:.0f}, "
          f"desired {r['full_desired_ms']:.0f}, map writes {r['full_apply_ms']:.0f}; {r['full_writes']} entries)")
    print(f"  one endpoint change:  {r['change_total_ms']:.2f} ms median (worst {r['change_max_ms']:.1f}), "
          f"{r['change_writes']} entries written {r['change_stats']}")
    print(f"    stages, median ms: {r['change_stages_ms']}")
    print(f"  unchanged resync:     {r['noop_total_ms']:.2f} ms, {r['noop_writes']} entries written")
    print(f"  periodic full apply:  {r['verify_total_ms']:.0f} ms, {r['verify_writes']} entries written")
    print(f"  (a full Python GC pass at this heap size: {r['gc_full_ms']:.0f} ms)")


if __name__ == "__main__":
    main()
