"""Control-plane cost at scale: Kubernetes objects -> maps, and one endpoint change.

The agent's path, stage by stage, on real pinned maps:

    raw API objects --on_relist--> ClusterState --snapshot--> desired_state --admit--> --apply--> BPF maps

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

    python -m ebpfsvc.bench.controlplane [N] [K] [FULL_REPEATS]      # needs root (BPF maps)

Each target of issue 12 is printed with its figure, met or missed; full syncs are repeated
(median, min-max) and the endpoint change 201 times (median, p99, worst).
"""

from __future__ import annotations

import copy
import gc
import ipaddress
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path

from ebpfsvc import heap
from ebpfsvc.config import NodeConfig
from ebpfsvc.desired import DesiredStateBuilder
from ebpfsvc.health import LocalEndpointCounts
from ebpfsvc.metrics import Metrics
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterState

NODE = NodeConfig(node_name="node-1", node_addresses=("198.18.0.11",), zone="zone-a")


# One Service in a thousand is a LoadBalancer with externalTrafficPolicy Local; the others ClusterIP.
LOAD_BALANCER_EVERY, NODE_PORTS, HEALTH_CHECK_PORTS = 1000, 30100, 31000


def cluster_objects(n_services: int, endpoints: int) -> tuple[list[dict], list[dict]]:
    """N Services (ClusterIP, one in LOAD_BALANCER_EVERY a LoadBalancer with externalTrafficPolicy
    Local) with one EndpointSlice of K ready endpoints each, as the API server
    returns them: with the fields it sets or defaults (uid, creationTimestamp, clusterIPs,
    ipFamilies, ipFamilyPolicy, sessionAffinity, ...) and, on each slice, what the EndpointSlice
    controller writes (its labels, owner, last-change-trigger-time, every condition, targetRef).
    The agent reads or checks each of those; the fields nobody reads (managedFields) are left out."""
    # 32,766 ClusterIPs in 198.19.0.0/17; past that (100,000 Services) the same addresses again
    # with another service port, so every frontend stays distinct within 198.18.0.0/15.
    vips = [str(a) for a in ipaddress.IPv4Network("198.19.0.0/17").hosts()]
    # 98k pod addresses in the rest of 198.18.0.0/15; past that, the same addresses again on
    # another target port, so every (address, port) backend stays distinct.
    pool = [*ipaddress.IPv4Network("198.18.0.0/16").hosts(), *ipaddress.IPv4Network("198.19.128.0/17").hosts()]
    pool = pool[:-1]       # the last address is kept free: measure() moves an endpoint there
    cycle = len(pool) // endpoints * endpoints
    created = "2026-12-01T10:00:00Z"
    services, slices = [], []
    for i in range(n_services):
        name = f"svc-{i}"
        uid = f"00000000-0000-4000-8000-{i:012d}"
        first = i * endpoints
        port = 8080 + first // cycle
        vip = vips[i % len(vips)]
        services.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench", "uid": uid, "resourceVersion": "1",
                         "creationTimestamp": created, "labels": {"app": name}},
            "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ipFamilies": ["IPv4"],
                     "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
                     "sessionAffinity": "None", "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80 + i // len(vips), "targetPort": port, "protocol": "TCP"}]},
            "status": {"loadBalancer": {}},
        })
        if i % LOAD_BALANCER_EVERY == 1:
            # As the API server completes a LoadBalancer Service with externalTrafficPolicy Local
            # (no address assigned yet): a nodePort and a healthCheckNodePort, which every sync
            # then serves (LocalEndpointCounts).
            spec = services[-1]["spec"]
            spec.update(type="LoadBalancer", externalTrafficPolicy="Local",
                        healthCheckNodePort=HEALTH_CHECK_PORTS + i // LOAD_BALANCER_EVERY)
            spec["ports"][0]["nodePort"] = NODE_PORTS + i // LOAD_BALANCER_EVERY
        slices.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-abcde", "generateName": f"{name}-", "namespace": "bench",
                         "uid": f"00000000-0000-4000-9000-{i:012d}", "resourceVersion": "1",
                         "creationTimestamp": created,
                         "labels": {"kubernetes.io/service-name": name, "app": name,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": created},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": uid,
                                              "controller": True, "blockOwnerDeletion": True}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [str(pool[(first + j) % cycle])],
                           "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": "node-2" if j % 2 else "node-1",
                           "targetRef": {"kind": "Pod", "namespace": "bench", "name": f"{name}-{j}",
                                         "uid": f"00000000-0000-4000-a000-{first + j:012d}"}}
                          for j in range(endpoints)],
        })
    return services, slices


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


# Issue 12's targets.  The memory budget is for 100,000 Services x 10 endpoints: the maps are
# sized for that load (Limits below: 1.25 x the Maglev slots it needs), the agent's RSS is its
# Python heap (objects, trackers, desired state, writer bookkeeping) at that load.
TARGET_FULL_SYNC_MS = 1000.0          # 10,000 Services x 10 endpoints from empty
TARGET_CHANGE_MEDIAN_MS = 1.0         # one endpoint change at 10,000 Services, event to maps
# At 100,000 x 10 the Maglev array alone is 100,000 tables of 1009 slots, 4 bytes each in the
# kernel (two to an 8-byte element, abi.h struct lb_maglev_pair), 0.4 GiB, plus a quarter of room
# for churn; the budget was set when a slot took 8 bytes.
BUDGET_MAP_MIB_PER_100K = 1536        # map memory at 100,000 Services x 10 endpoints
BUDGET_RSS_MIB_PER_100K = 6144        # agent RSS at 100,000 Services x 10 endpoints


def limits_for(n_services: int, endpoints: int):
    """Map sizes for N Services x K endpoints: what they need with room for churn, not more
    (array maps are allocated in full at load, the Maglev one is the largest)."""
    from ebpfsvc import maglev
    from ebpfsvc.datapath import loader

    slots = n_services * maglev.table_size(endpoints)
    return loader.Limits(frontends=max(2 * n_services, 1024), services=max(2 * n_services, 1024),
                         backends=max(2 * n_services * endpoints, 1024),
                         maglev_slots=max(slots + slots // 4, 1 << 16))


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process, MiB (/proc/self/status VmRSS, VmHWM)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1]) / 1024
    return round(out["VmRSS"], 1), round(out["VmHWM"], 1)


def map_memory_mib(maps) -> float:
    """Kernel memory charged to the datapath's maps (the `memlock` of each map fd's fdinfo)."""
    total = 0
    for table in maps.values():
        for line in Path(f"/proc/self/fdinfo/{table.map_fd}").read_text().splitlines():
            if line.startswith("memlock:"):
                total += int(line.split()[1])
    return round(total / (1 << 20), 1)


def _spread(values: list[float], digits: int = 1) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cold_caches() -> None:
    """Forget what an earlier full sync of this process taught its caches: a starting agent has
    hashed no backend name yet.  Since 2026-12-05 that cache serves only where the C hashes cannot
    be built (maglev.hasher), and addresses are no longer cached; warm, the two caches took 0.15 s
    off the figure at 10,000 x 10."""
    from ebpfsvc import maglev

    maglev.name_hashes.cache_clear()


def _full_sync(dp, limits, services, slices) -> tuple[dict, tuple]:
    """One full sync from an empty datapath, as a starting agent does it: cold caches included."""
    from ebpfsvc.admission import Admission, Capacity
    from ebpfsvc.datapath.writer import MapWriter

    _cold_caches()
    writer = MapWriter(dp.maps)
    # Received objects counted as the agent counts them (its telemetry's Metrics.changed).
    state = ClusterState(NODE, on_received=Metrics().changed)
    builder = DesiredStateBuilder(NODE)
    admission = Admission(Capacity.of(limits))
    # Wall and CPU time per stage: on a shared machine the wall time says how busy it was, the
    # CPU time what the stage costs.
    marks = [(time.perf_counter(), time.process_time())]
    state.on_relist("Service", services)
    state.on_relist("EndpointSlice", slices)
    for kind in ("Service", "EndpointSlice", "Endpoints", "Node"):
        state.on_synced(kind)
    marks.append((time.perf_counter(), time.process_time()))
    snap = state.snapshot()
    result = builder.build(snap)
    marks.append((time.perf_counter(), time.process_time()))
    writer.prepare(result.state)        # as Agent.sync: the tables begin on the other cores
    marks.append((time.perf_counter(), time.process_time()))
    admitted = _admit(admission, writer, result, snap)
    marks.append((time.perf_counter(), time.process_time()))
    stats = writer.apply(admitted.state, delta=admitted.delta)
    marks.append((time.perf_counter(), time.process_time()))
    timing = {"writes": stats.writes, "frontends": len(result.state.frontends)}
    for i, stage in enumerate(_STAGES):
        timing[stage] = round((marks[i + 1][0] - marks[i][0]) * 1000, 2)
        timing[f"{stage}_cpu"] = round((marks[i + 1][1] - marks[i][1]) * 1000, 2)
    timing["total"] = round((marks[-1][0] - marks[0][0]) * 1000, 2)
    timing["cpu"] = round((marks[-1][1] - marks[0][1]) * 1000, 2)
    return timing, (writer, state, builder, admission, snap)


_STAGES = ("ingest", "desired", "prepare", "admit", "apply")


def floor_sync(services: list[dict], slices: list[dict]) -> float:
    """The least a full sync in Python costs, in ms: the baseline the agent's path is measured
    against in the same run.  Each object's fields are read once (addresses parsed, nothing else
    checked), every backend's name is made as Maglev hashes it, and the tables are hashed and
    filled (caches cold, the fill in C, as the writer does); no validation, no objects per stage,
    no bookkeeping for later changes, no map writes.  What the agent's path costs above it is the
    price of those (docs/bench.md, "The floor")."""
    from ebpfsvc import maglev

    _cold_caches()
    with heap.bulk():
        t0 = time.perf_counter()
        ports = {}
        for svc in services:
            meta, spec = svc["metadata"], svc["spec"]
            socket.inet_pton(socket.AF_INET, spec["clusterIP"])
            ports[(meta["namespace"], meta["name"])] = [
                (p.get("name", ""), p.get("protocol", "TCP"), p["port"]) for p in spec["ports"]]
        endpoints = {}
        for sl in slices:
            meta, rows = sl["metadata"], []
            for ep in sl["endpoints"]:
                cond = ep.get("conditions") or {}
                text = ep["addresses"][0]
                socket.inet_pton(socket.AF_INET, text)          # parsed (checked), its text kept
                rows.append((text, cond.get("ready") is not False,
                             cond.get("serving") is not False, cond.get("terminating") is True,
                             ep.get("nodeName") or "", ep.get("zone") or ""))
            key = (meta["namespace"], meta["labels"]["kubernetes.io/service-name"])
            endpoints[key] = ({p.get("name", ""): p["port"] for p in sl["ports"]}, rows)
        tables = []
        for key, service_ports in ports.items():
            numbers, rows = endpoints.get(key, ({}, []))
            for name, protocol, _ in service_ports:
                target = numbers.get(name)
                if target is None or not rows:
                    continue
                # lbmodel.backend_name's text, from the address's text as the agent makes it (no
                # IPv4Address made: tests/unit/test_bench_controlplane.py checks they agree).
                suffix = f":{target}/{protocol}"
                names = sorted([r[0] + suffix for r in rows if r[1]])
                tables.append((names, maglev.table_size(len(names)), range(len(names))))
        maglev.build_tables(tables)
        return (time.perf_counter() - t0) * 1000


def _admit(admission, writer, result, snap):
    """The agent's admission step (ebpfsvc/admission.py): which Services fit in the maps."""
    return admission.admit(result, snap.services, lambda spn: writer.service_id(spn) is not None)


def measure(n_services: int = 10_000, endpoints: int = 10, pin_root: Path = Path("/sys/fs/bpf"),
            repeats: int = 201, full_repeats: int = 3) -> dict:
    from ebpfsvc.datapath import loader
    from ebpfsvc.lbmodel import LBState

    services, slices = cluster_objects(n_services, endpoints)
    pin_dir = pin_root / f"esbench-cp-{uuid.uuid4().hex[:6]}"
    out: dict = {"services": n_services, "endpoints_per_service": endpoints,
                 "load_average": round(os.getloadavg()[0], 2)}
    limits = limits_for(n_services, endpoints)
    dp = loader.load(pin_dir, limits=limits, cache=False)
    try:
        # Full syncs from an empty datapath, each with a new tracker, builder and writer (a
        # starting agent); between them the maps are emptied by applying an empty state.
        fulls, floors = [], []
        for i in range(full_repeats):
            # The agent's path and the floor in turns, so each ratio pairs two runs a second apart.
            timing, (writer, state, builder, admission, snap) = _full_sync(dp, limits, services, slices)
            fulls.append(timing)
            floors.append(floor_sync(services, slices))
            if i + 1 < full_repeats:
                writer.apply(LBState())
                del writer, state, builder, admission, snap
                gc.unfreeze()       # heap.bulk froze that state: let this collection free it
                gc.collect()
        out["full"] = {stage: _spread([f[stage] for f in fulls])
                       for stage in ("total", "cpu", *_STAGES, *(f"{s}_cpu" for s in _STAGES))}
        out["full_repeats"] = full_repeats
        out["floor"] = _spread(floors)
        out["over_floor"] = _spread([f["total"] / fl for f, fl in zip(fulls, floors)], 2)
        out["full_writes"] = fulls[-1]["writes"]
        out["frontends"] = fulls[-1]["frontends"]
        # As the agent does after its first full apply (Agent.sync): the long-lived heap is frozen,
        # so Python's full collections no longer walk it during an endpoint change.
        gc.collect()
        gc.freeze()
        out["rss_mib"], out["peak_rss_mib"] = rss_mib()
        out["map_mib"] = map_memory_mib(dp.maps)
        # The agent's first sync ends as every one does (Telemetry.sync_done): the
        # healthCheckNodePorts and their local endpoints, the frontends indexed anew.  (From the
        # sync's own snapshot: another one now would make the next build compare every Service.)
        health = LocalEndpointCounts()
        t0 = time.perf_counter()
        health.health_checks(snap, NODE, admission.last.state)
        out["health_checks_first_ms"] = _ms(t0)

        # One endpoint of one service moves to a new address (a pod was replaced), and back,
        # `repeats` times: median, p99 and worst reported (a shared machine is noisy).
        totals, stages, cpu = [], [], []
        for i in range(repeats):
            changed = copy.deepcopy(slices[n_services // 2])
            changed["metadata"]["resourceVersion"] = str(2 + i)
            # The pool's last, unused address (every other time: back to the original one).
            if i % 2 == 0:
                changed["endpoints"][0]["addresses"] = ["198.19.255.254"]
            t0, c0 = time.perf_counter(), time.process_time()
            state.on_event(Event("EndpointSlice", EventType.MODIFIED, changed))
            t1 = time.perf_counter()
            snap = state.snapshot()
            t2 = time.perf_counter()
            result = builder.build(snap)
            t3 = time.perf_counter()
            admitted = _admit(admission, writer, result, snap)
            t3a = time.perf_counter()
            stats = writer.apply(admitted.state, delta=admitted.delta)
            t4 = time.perf_counter()
            # What the agent's telemetry then does with the sync (Telemetry.sync_done): the
            # healthCheckNodePorts and their Services' local endpoints.
            health.health_checks(snap, NODE, admitted.state, admitted.delta)
            t5 = time.perf_counter()
            cpu.append((time.process_time() - c0) * 1000)
            totals.append((t5 - t0) * 1000)
            stages.append([(t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000, (t3a - t3) * 1000,
                           (t4 - t3a) * 1000, (t5 - t4) * 1000])
            if i == 0:
                out["change_writes"] = stats.writes
                out["change_stats"] = {k: v for k, v in vars(stats).items() if v}
        out["change_total_ms"] = round(statistics.median(totals), 3)
        out["change_p99_ms"] = round(_percentile(totals, 0.99), 3)
        out["change_max_ms"] = round(max(totals), 3)
        out["change_cpu_ms"] = round(statistics.median(cpu), 3)
        out["change_repeats"] = repeats
        out["change_stages_ms"] = {name: round(statistics.median(s[j] for s in stages), 3)
                                   for j, name in enumerate(("event", "snapshot", "desired", "admit", "apply",
                                                                   "health_checks"))}

        # And nothing at all: a sync of an unchanged cluster.
        t0 = time.perf_counter()
        snap = state.snapshot()
        admitted = _admit(admission, writer, builder.build(snap), snap)
        stats = writer.apply(admitted.state, delta=admitted.delta)
        out["noop_total_ms"] = _ms(t0)
        out["noop_writes"] = stats.writes

        # The agent's periodic full apply: every frontend re-derived and checked, nothing to write.
        t0 = time.perf_counter()
        stats = writer.apply(builder.build(state.snapshot()).state, full=True)
        out["verify_total_ms"] = _ms(t0)
        out["verify_writes"] = stats.writes
        # Python's own pause at this heap size: a full (generation 2) collection, which the
        # interpreter runs now and then whatever the agent does; frozen objects are not walked.
        t0 = time.perf_counter()
        gc.collect()
        out["gc_full_ms"] = _ms(t0)
        gc.unfreeze()
        out["gc_unfrozen_ms"] = None
        if n_services <= 10_000:
            t0 = time.perf_counter()
            gc.collect()
            out["gc_unfrozen_ms"] = _ms(t0)
    finally:
        dp.close()
        loader.unpin(pin_dir)
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(r: dict) -> list[str]:
    """The figures and, for each of issue 12's targets that this run measures, met or missed."""
    n, k = r["services"], r["endpoints_per_service"]
    full = r["full"]
    lines = [
        f"{n} services x {k} endpoints ({r['frontends']} frontends), load average {r['load_average']}",
        f"  full sync from empty: {full['total']['median']:.0f} ms median ({full['total']['min']:.0f}-"
        f"{full['total']['max']:.0f}, {r['full_repeats']} runs; CPU {full['cpu']['median']:.0f} ms; ingest {full['ingest']['median']:.0f}, "
        f"desired {full['desired']['median']:.0f}, admission {full['admit']['median']:.0f}, "
        f"map writes {full['apply']['median']:.0f} (+ {full['prepare']['median']:.0f} begun before admission); "
        f"{r['full_writes']} entries)",
        f"    CPU per stage, median ms: ingest {full['ingest_cpu']['median']:.0f}, desired "
        f"{full['desired_cpu']['median']:.0f}, admission {full['admit_cpu']['median']:.0f}, "
        f"map writes {full['apply_cpu']['median'] + full['prepare_cpu']['median']:.0f}",
        f"    the floor (fields read once, names, Maglev tables; nothing else): {r['floor']['median']:.0f} ms "
        f"({r['floor']['min']:.0f}-{r['floor']['max']:.0f}); the full sync is {r['over_floor']['median']:.2f}x it "
        f"({r['over_floor']['min']:.2f}-{r['over_floor']['max']:.2f}, paired by run)",
        f"  one endpoint change:  {r['change_total_ms']:.3f} ms median, p99 {r['change_p99_ms']:.3f}, "
        f"worst {r['change_max_ms']:.2f} ({r['change_repeats']} changes; CPU {r['change_cpu_ms']:.3f} ms median); "
        f"{r['change_writes']} entries written {r['change_stats']}",
        f"    stages, median ms: {r['change_stages_ms']}",
        f"  healthCheckNodePorts at the first sync (the applied frontends indexed): "
        f"{r['health_checks_first_ms']:.1f} ms",
        f"  unchanged resync:     {r['noop_total_ms']:.2f} ms, {r['noop_writes']} entries written",
        f"  periodic full apply:  {r['verify_total_ms']:.0f} ms, {r['verify_writes']} entries written",
        f"  memory: maps {r['map_mib']:.0f} MiB, agent RSS {r['rss_mib']:.0f} MiB (peak {r['peak_rss_mib']:.0f})",
        f"  full Python GC pass: {r['gc_full_ms']:.0f} ms with the state frozen"
        + (f", {r['gc_unfrozen_ms']:.0f} ms unfrozen" if r.get("gc_unfrozen_ms") is not None else ""),
        "targets (issue 12):",
    ]
    if (n, k) == (10_000, 10):
        t = full["total"]["median"]
        lines.append(f"  full sync 10,000 x 10 <= {TARGET_FULL_SYNC_MS:.0f} ms: {t:.0f} ms median "
                     f"({full['total']['min']:.0f}-{full['total']['max']:.0f}): {_verdict(t <= TARGET_FULL_SYNC_MS)}")
        c = r["change_total_ms"]
        lines.append(f"  endpoint change at 10,000 <= {TARGET_CHANGE_MEDIAN_MS} ms median: {c:.3f} ms "
                     f"(p99 {r['change_p99_ms']:.3f}): {_verdict(c <= TARGET_CHANGE_MEDIAN_MS)}")
    if n >= 100_000:
        scale = n * k / 1_000_000
        map_budget, rss_budget = BUDGET_MAP_MIB_PER_100K * scale, BUDGET_RSS_MIB_PER_100K * scale
        lines.append(f"  {n:,} x {k} programs: {r['frontends']} frontends, {r['full_writes']} entries: met")
        lines.append(f"  map memory <= {map_budget:.0f} MiB: {r['map_mib']:.0f} MiB: "
                     f"{_verdict(r['map_mib'] <= map_budget)}")
        lines.append(f"  agent RSS <= {rss_budget:.0f} MiB: {r['rss_mib']:.0f} MiB (peak {r['peak_rss_mib']:.0f}): "
                     f"{_verdict(r['peak_rss_mib'] <= rss_budget)}")
    if lines[-1] == "targets (issue 12):":
        lines.append("  (measured at 10,000 x 10 and at >= 100,000 x 10)")
    return lines


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ebpfsvc.bench.controlplane",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("services", nargs="?", type=int, default=10_000, help="N Services (default 10,000)")
    parser.add_argument("endpoints", nargs="?", type=int, default=10, help="K endpoints each (default 10)")
    parser.add_argument("full_repeats", nargs="?", type=int, default=None,
                        help="full syncs from empty (default 3 up to 10,000 Services, else 1)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    full_repeats = args.full_repeats or (3 if args.services <= 10_000 else 1)
    r = measure(args.services, args.endpoints, full_repeats=full_repeats)
    print("\n".join(report(r)))


if __name__ == "__main__":
    main()
