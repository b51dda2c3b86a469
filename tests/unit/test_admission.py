"""Admission (ebpfsvc/admission.py): what fits goes into the maps, oldest first, never evicting a
Service the maps serve; what does not fit, and every conflict, is told once, by name."""

from __future__ import annotations

import logging

import pytest

from ebpfsvc.admission import CAPACITY, CONFLICT, Admission, Capacity
from ebpfsvc.config import NodeConfig
from ebpfsvc.datapath.loader import Limits
from ebpfsvc.desired import DesiredStateBuilder
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ClusterState

NODE = NodeConfig("node-1", node_addresses=("198.18.0.11",))
# Room for two Services of 3 endpoints: each table is 503 slots (maglev.table_size(3)).
SMALL = Capacity(frontends=100, service_ports=100, backends=100, maglev_slots=2 * 503,
                 source_ranges=100, affinity_backends=100)


def service(name, ip, created, node_port=None):
    port = {"port": 80, "targetPort": 8080}
    spec = {"clusterIP": ip, "ports": [port]}
    if node_port:
        spec["type"], port["nodePort"] = "NodePort", node_port
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created}, "spec": spec}


def slice_(name, *ips):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [ip]} for ip in ips]}


class Cluster:
    def __init__(self, capacity=SMALL):
        self.state = ClusterState(NODE)
        self.builder = DesiredStateBuilder(NODE)
        self.admission = Admission(capacity)
        self.served: set[str] = set()          # service names "in the maps" (the writer's ids)
        for kind in ("Service", "EndpointSlice"):
            self.state.on_synced(kind)

    def add(self, name, ip, created, n=3, base=1, **kw):
        for obj in (service(name, ip, created, **kw),
                    slice_(name, *(f"198.18.{base}.{i}" for i in range(1, n + 1)))):
            self.state.on_event(Event(obj["kind"], EventType.ADDED, obj))

    def delete(self, name):
        self.state.on_event(Event("Service", EventType.DELETED, service(name, "198.19.0.1", "2026-01-01T00:00:00Z")))

    def sync(self):
        snap = self.state.snapshot()
        out = self.admission.admit(self.builder.build(snap), snap.services, lambda spn: spn.name in self.served)
        self.served = {fe.service.name for fe in out.state.frontends.values()}
        return out

    @staticmethod
    def names(out):
        return sorted({fe.service.name for fe in out.state.frontends.values()})


def test_everything_fits_passes_the_desired_state_through():
    c = Cluster()
    c.add("a", "198.19.0.1", "2026-01-01T00:00:00Z")
    c.add("b", "198.19.0.2", "2026-01-02T00:00:00Z", base=2)
    snap = c.state.snapshot()
    result = c.builder.build(snap)
    out = c.admission.admit(result, snap.services, lambda spn: False)
    assert out.state is result.state and out.delta is result.delta and out.not_programmed == {}


def test_what_does_not_fit_is_left_out_oldest_first_and_told_once(caplog):
    c = Cluster()
    # Created in this order, named against it: age decides, not the name.
    c.add("zz-old", "198.19.0.1", "2026-01-01T00:00:00Z", base=1)
    c.add("mm-mid", "198.19.0.2", "2026-01-02T00:00:00Z", base=2)
    c.add("aa-new", "198.19.0.3", "2026-01-03T00:00:00Z", base=3)
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.admission"):
        out = c.sync()
        c.sync()                                   # the same again: not told twice
    assert c.names(out) == ["mm-mid", "zz-old"]
    assert dict(out.not_programmed) == {("default", "aa-new"): (CAPACITY, "does not fit (lb_maglev: 1006 maglev "
                                                                          "slots available, raise --max-maglev-slots)")}
    assert [r.getMessage() for r in caplog.records] == [
        "Service default/aa-new not programmed (capacity): does not fit (lb_maglev: 1006 maglev slots available, "
        "raise --max-maglev-slots)"]
    assert c.admission.counts[CAPACITY] == 1
    assert c.admission.pressure()["lb_maglev"] == pytest.approx(3 * 503 / SMALL.maglev_slots)
    assert "default/aa-new" in c.admission.details()["notProgrammed"]


def test_an_existing_service_is_never_evicted_for_an_older_newcomer():
    c = Cluster()
    c.add("b", "198.19.0.2", "2026-01-02T00:00:00Z", base=2)
    c.add("c", "198.19.0.3", "2026-01-03T00:00:00Z", base=3)
    assert c.names(c.sync()) == ["b", "c"]
    c.add("a", "198.19.0.1", "2026-01-01T00:00:00Z", base=1)   # older, but the maps serve b and c
    out = c.sync()
    assert c.names(out) == ["b", "c"] and list(out.not_programmed) == [("default", "a")]
    c.delete("c")                                              # room again: a gets in, on the next sync
    out = c.sync()
    assert c.names(out) == ["a", "b"] and out.not_programmed == {}


def test_an_update_that_does_not_fit_keeps_the_previous_version():
    c = Cluster()
    c.add("a", "198.19.0.1", "2026-01-01T00:00:00Z", base=1)
    c.add("b", "198.19.0.2", "2026-01-02T00:00:00Z", base=2)
    before = c.sync().state
    c.add("b", "198.19.0.2", "2026-01-02T00:00:00Z", n=6, base=2)    # 6 endpoints: a 1009-slot table
    out = c.sync()
    assert out.state.frontends == before.frontends
    reason, detail = out.not_programmed[("default", "b")]
    assert reason == CAPACITY and detail.startswith("its update does not fit (lb_maglev")


def test_conflicts_are_told_once_with_the_holder(caplog):
    c = Cluster(Capacity.of(Limits()))
    c.add("old", "198.19.0.1", "2026-01-01T00:00:00Z", node_port=30080)
    c.add("new", "198.19.0.2", "2026-01-02T00:00:00Z", base=2, node_port=30080)
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.admission"):
        out = c.sync()
        c.sync()
    assert out.not_programmed == {("default", "new"): (
        CONFLICT, "spec.ports[0].nodePort: 198.18.0.11:30080/TCP is already served by default/old; not programmed")}
    assert len(caplog.records) == 1 and "Service default/new not programmed (conflict)" in caplog.records[0].getMessage()
    assert c.admission.counts[CONFLICT] == 1


def test_default_limits_serve_ten_thousand_services_of_ten_endpoints():
    """The formula of abi.h's defaults: 10,000 ClusterIP Services x 10 endpoints fit with the
    Maglev reserve kept (the totals, not 10,000 objects: a table of 10 backends is 1,009 slots)."""
    from ebpfsvc import maglev
    cap = Capacity.of(Limits())
    assert 10_000 * maglev.table_size(10) <= cap.maglev_slots
    assert 10_000 * 10 <= cap.backends and 10_000 <= cap.frontends and 10_000 <= cap.service_ports


def test_what_a_sync_releases_counts_until_it_is_written_so_newcomers_wait_one_sync():
    """The writer writes new ids before it deletes unused ones: a Service deleted in the same sync as
    a waiting one gets in still holds its backends during that apply (the bench found it: 'all
    131071 ids in use').  The waiting Service goes in on the next sync, which is asked for."""
    c = Cluster(Capacity(frontends=100, service_ports=100, backends=6, maglev_slots=10_000,
                         source_ranges=10, affinity_backends=10))
    c.add("a", "198.19.0.1", "2026-01-01T00:00:00Z", base=1)
    c.add("b", "198.19.0.2", "2026-01-02T00:00:00Z", base=2)
    c.add("c", "198.19.0.3", "2026-01-03T00:00:00Z", base=3)
    out = c.sync()
    assert c.names(out) == ["a", "b"] and not out.deferred
    c.delete("a")
    out = c.sync()
    assert c.names(out) == ["b"] and out.deferred
    assert out.not_programmed[("default", "c")][1].startswith("waits for the next sync (lb4_backends: 3 backends")
    out = c.sync()
    assert c.names(out) == ["b", "c"] and not out.deferred and out.not_programmed == {}
    # Nothing released and still no room: no sync is asked for (no loop).
    c.add("d", "198.19.0.4", "2026-01-04T00:00:00Z", base=4)
    out = c.sync()
    assert list(out.not_programmed) == [("default", "d")] and not out.deferred
