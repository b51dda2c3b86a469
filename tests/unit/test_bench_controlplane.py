"""The control-plane benchmark's own parts that need no BPF maps: its cold start and its floor."""

from __future__ import annotations

import ipaddress

from ebpfsvc import maglev
from ebpfsvc.bench import controlplane
from ebpfsvc.k8s import fields
from ebpfsvc.lbmodel import Protocol, backend_name


def test_each_full_sync_starts_with_the_caches_a_starting_agent_has_not_filled():
    maglev.name_hashes("198.18.0.1:80/TCP")
    assert maglev.name_hashes.cache_info().currsize
    controlplane._cold_caches()
    assert maglev.name_hashes.cache_info().currsize == 0
    # Addresses are parsed afresh each time: nothing of them to warm up.
    assert not hasattr(fields.ip_address, "cache_info")


def test_the_floor_reads_every_object_and_builds_every_table(monkeypatch):
    services, slices = controlplane.cluster_objects(5, 3)
    built = []
    real = maglev.build_tables
    monkeypatch.setattr(maglev, "build_tables", lambda tables: built.append(tables) or real(tables))
    assert controlplane.floor_sync(services, slices) > 0
    (tables,) = built
    # One table per Service, of its ready endpoints' names as the writer names them, sorted.
    assert len(tables) == 5
    names, size, _ = tables[0]
    assert names == sorted(backend_name(ipaddress.ip_address(ep["addresses"][0]), 8080, Protocol.TCP)
                           for ep in slices[0]["endpoints"])
    assert size == maglev.table_size(3)


def test_the_report_states_the_full_sync_against_its_floor():
    spread = {"median": 1.0, "min": 1.0, "max": 1.0}
    full = {k: spread for k in ("total", "cpu", *controlplane._STAGES, *(f"{s}_cpu" for s in controlplane._STAGES))}
    r = {"services": 10_000, "endpoints_per_service": 10, "frontends": 10_000, "load_average": 0.1, "full": full,
         "full_repeats": 3, "full_writes": 1, "floor": {"median": 350.0, "min": 340.0, "max": 360.0},
         "over_floor": {"median": 5.5, "min": 5.4, "max": 5.7}, "change_total_ms": 0.3, "change_p99_ms": 0.4,
         "change_max_ms": 1.0, "change_cpu_ms": 0.3, "change_repeats": 201, "change_writes": 3, "change_stats": {},
         "change_stages_ms": {}, "health_checks_first_ms": 1.0, "noop_total_ms": 0.0, "noop_writes": 0, "verify_total_ms": 1.0, "verify_writes": 0,
         "map_mib": 1.0, "rss_mib": 1.0, "peak_rss_mib": 1.0, "gc_full_ms": 0.0, "gc_unfrozen_ms": None}
    text = "\n".join(controlplane.report(r))
    assert "the floor (fields read once, names, Maglev tables; nothing else): 350 ms (340-360)" in text
    assert "the full sync is 5.50x it (5.40-5.70, paired by run)" in text
    assert "full sync 10,000 x 10 <= 1000 ms: 1 ms median (1-1): met" in text
