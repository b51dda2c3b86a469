"""Control-plane cost at scale: Kubernetes objects -> maps, and one endpoint change.

The agent's path, stage by stage, on real pinned maps:

    raw API objects --on_relist--> ClusterState --snapshot--> desired_state --apply--> BPF maps

- full sync: N Services x K endpoints from an empty datapath (what an agent does
  on its first start on a busy cluster);
- one endpoint change at that scale: one EndpointSlice's endpoint replaced by
  another address, from the watch event to the moment the maps hold it, with
  the number of map entries written (it should be a handful, not N).

    python -m ebpfsvc.bench.controlplane [N] [K]      # needs root (BPF maps)
"""

from __future__ import annotations

import copy
import ipaddress
import sys
import time
import uuid
from pathlib import Path

from ebpfsvc.config import NodeConfig
from ebpfsvc.desired import desired_state
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


def measure(n_services: int = 10_000, endpoints: int = 10, pin_root: Path = Path("/sys/fs/bpf")) -> dict:
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

        t0 = time.perf_counter()
        state.on_relist("Service", services)
        state.on_relist("EndpointSlice", slices)
        for kind in ("Service", "EndpointSlice", "Endpoints", "Node"):
            state.on_synced(kind)
        out["full_ingest_ms"] = _ms(t0)
        t1 = time.perf_counter()
        desired = desired_state(state.snapshot(), NODE)
        out["full_desired_ms"] = _ms(t1)
        t2 = time.perf_counter()
        stats = writer.apply(desired)
        out["full_apply_ms"] = _ms(t2)
        out["full_total_ms"] = _ms(t0)
        out["full_writes"] = stats.writes
        out["frontends"] = len(desired.frontends)

        # One endpoint of one service moves to a new address (a pod was replaced).
        changed = copy.deepcopy(slices[n_services // 2])
        changed["metadata"]["resourceVersion"] = "2"
        changed["endpoints"][0]["addresses"] = ["198.19.255.254"]   # the pool's last, unused address
        t0 = time.perf_counter()
        state.on_event(Event("EndpointSlice", EventType.MODIFIED, changed))
        desired = desired_state(state.snapshot(), NODE)
        stats = writer.apply(desired)
        out["change_total_ms"] = _ms(t0)
        out["change_writes"] = stats.writes
        out["change_stats"] = {k: v for k, v in vars(stats).items() if v}

        # And nothing at all: the periodic resync of an unchanged cluster.
        t0 = time.perf_counter()
        stats = writer.apply(desired_state(state.snapshot(), NODE))
        out["noop_total_ms"] = _ms(t0)
        out["noop_writes"] = stats.writes
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
    print(f"  one endpoint change:  {r['change_total_ms']:.1f} ms, {r['change_writes']} entries written "
          f"{r['change_stats']}")
    print(f"  unchanged resync:     {r['noop_total_ms']:.1f} ms, {r['noop_writes']} entries written")


if __name__ == "__main__":
    main()
