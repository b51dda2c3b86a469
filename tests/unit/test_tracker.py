"""ClusterState: change tracking, last-good versions, relist, endpoint merging, sync, threads."""

from __future__ import annotations

import logging
import threading
from ipaddress import IPv4Address

import pytest

from ebpfsvc.config import NodeConfig
from ebpfsvc.k8s import Problem
from ebpfsvc.lbmodel import Protocol, ServicePortName
from ebpfsvc.sources.base import Event, EventType
from ebpfsvc.tracker import ChangeTracker, ClusterSnapshot, ClusterState

ADDED, MODIFIED, DELETED = EventType.ADDED, EventType.MODIFIED, EventType.DELETED
WEB_HTTP = ServicePortName("default", "web", "http", Protocol.TCP)


def service(name="web", cluster_ip="198.19.0.10", port=80, **meta):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", **meta},
            "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": port, "targetPort": 8080}]}}


def endpoint(ip, ready=True, node="node-1", **conditions):
    return {"addresses": [ip], "nodeName": node, "conditions": {"ready": ready, **conditions}}


def slice_(name, *endpoints, service="web", port=8080, port_name="http"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": port_name, "port": port}], "endpoints": list(endpoints)}


def manual_endpoints(name, *ips, port=8080, port_name="http"):
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": "default"},
            "subsets": [{"addresses": [{"ip": ip} for ip in ips], "ports": [{"name": port_name, "port": port}]}]}


def send(state, type_, obj):
    state.on_event(Event(obj["kind"], type_, obj))


def addresses(snapshot, spn=WEB_HTTP):
    return [(str(e.address), e.port, e.ready) for e in snapshot.endpoints.get(spn, ())]


@pytest.fixture
def state():
    return ClusterState(NodeConfig("node-1"))


# --- ChangeTracker -------------------------------------------------------------------------

def test_change_tracker_keeps_first_previous_and_drops_net_zero():
    t: ChangeTracker[int] = ChangeTracker()
    t.update("a", 1)
    t.update("a", 2)
    assert t.take() == {"a": (None, 2)}
    t.update("a", 3)
    t.update("a", 2)            # back to what was taken: nothing to report
    assert not t.pending
    t.update("b", 1)
    t.update("b", None)         # added and deleted before anyone looked
    assert not t.pending and t.take() == {}
    t.update("a", None)
    assert t.take() == {"a": (2, None)} and t.current == {}


# --- wake-ups ----------------------------------------------------------------------------------

def test_irrelevant_update_does_not_wake(state):
    send(state, ADDED, service())
    state.snapshot()
    bumped = service()
    bumped["metadata"]["resourceVersion"] = "1234"
    bumped["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}
    send(state, MODIFIED, bumped)
    assert state.wait_changed(0.01) is False


def test_relevant_update_wakes_and_is_listed_as_changed(state):
    send(state, ADDED, service())
    state.snapshot()
    send(state, MODIFIED, service(port=81))
    assert state.wait_changed(0.01) is True
    snap = state.snapshot()
    assert snap.changed == {("default", "web")}
    assert snap.services["default", "web"].ports[0].port == 81
    assert state.wait_changed(0.01) is False          # the snapshot consumed the change


def test_add_then_delete_before_snapshot_nets_to_nothing(state):
    state.snapshot()
    send(state, ADDED, service())
    send(state, DELETED, service())
    assert state.wait_changed(0.01) is False


def test_wait_changed_is_woken_by_another_thread(state):
    state.snapshot()
    timer = threading.Timer(0.05, lambda: send(state, ADDED, service()))
    timer.start()
    assert state.wait_changed(5.0) is True
    timer.join()


def test_endpoint_change_marks_its_service_changed(state):
    send(state, ADDED, service())
    send(state, ADDED, slice_("web-1", endpoint("198.18.1.10")))
    state.snapshot()
    send(state, MODIFIED, slice_("web-1", endpoint("198.18.1.10"), endpoint("198.18.2.10", node="node-2")))
    snap = state.snapshot()
    assert snap.changed == {("default", "web")}
    assert addresses(snap) == [("198.18.1.10", 8080, True), ("198.18.2.10", 8080, True)]


def test_snapshots_are_numbered_and_share_what_did_not_change(state):
    send(state, ADDED, service())
    send(state, ADDED, slice_("web-1", endpoint("198.18.1.10")))
    first = state.snapshot()
    assert first.origin is state and first.generation == 1
    send(state, MODIFIED, slice_("web-1", endpoint("198.18.1.11")))
    second = state.snapshot()
    assert second.origin is state and second.generation == 2 and second.changed == {("default", "web")}
    # Only the endpoints changed: the Services and Nodes mappings are the very same objects ...
    assert second.services is first.services and second.nodes is first.nodes
    assert second.endpoints is not first.endpoints
    # ... and an earlier snapshot never sees a later change.
    assert addresses(first) == [("198.18.1.10", 8080, True)]
    assert addresses(second) == [("198.18.1.11", 8080, True)]
    send(state, MODIFIED, service(port=81))
    third = state.snapshot()
    assert third.services is not second.services and third.endpoints is second.endpoints
    assert second.services["default", "web"].ports[0].port == 80
    # Nothing new: the same mappings again, and nothing named as changed.
    again = state.snapshot()
    assert again.generation == 4 and again.changed == frozenset()
    assert (again.services, again.endpoints, again.nodes) == (third.services, third.endpoints, third.nodes)


# --- validation: skip, report once, keep the last good version -----------------------------------

def test_invalid_add_is_skipped_and_reported_once(caplog):
    seen: list[Problem] = []
    state = ClusterState(NodeConfig("node-1"), on_invalid=seen.append)
    bad = service()
    bad["spec"]["ports"].append({"name": "b", "port": 70000})
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.tracker"):
        send(state, ADDED, bad)
        send(state, MODIFIED, bad)        # the same problem again: no second report
    expected = Problem("Service", "default", "web", "spec.ports[1].port", "70000 is out of range 1-65535")
    assert seen == [expected]
    assert str(expected) == "Service default/web: spec.ports[1].port: 70000 is out of range 1-65535"
    assert state.problems == [expected]
    assert [r.getMessage() for r in caplog.records] == \
        ["skipping invalid object (last good version stays in force): " + str(expected)]
    assert state.snapshot().services == {}


def test_lone_surrogate_name_is_one_line_naming_the_object_and_costs_only_that_object(caplog):
    # A name with a lone surrogate cannot be encoded: it used to reach the writer and stop every
    # sync with UnicodeEncodeError.  Now the model refuses it, in one printable line.
    seen: list[Problem] = []
    state = ClusterState(NodeConfig("node-1"), on_invalid=seen.append)
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.tracker"):
        send(state, ADDED, service(name="bad\ud800"))
        send(state, ADDED, service(name="ok", cluster_ip="198.19.0.11"))
    assert [p.field for p in seen] == ["metadata.name"]
    line = caplog.records[0].getMessage()
    assert len(caplog.records) == 1 and "\n" not in line
    assert line.startswith("skipping invalid object (last good version stays in force): "
                           "Service default/bad\\ud800: metadata.name: ")
    line.encode("utf-8")            # printable as it is
    assert list(state.snapshot().services) == [("default", "ok")]


def test_invalid_update_keeps_last_good_version(state):
    send(state, ADDED, service())
    state.snapshot()
    bad = service()
    bad["spec"]["clusterIP"] = "127.0.0.1"
    send(state, MODIFIED, bad)
    assert state.wait_changed(0.01) is False
    assert state.snapshot().services["default", "web"].cluster_ip == IPv4Address("198.19.0.10")
    assert [p.field for p in state.problems] == ["spec.clusterIP"]
    send(state, MODIFIED, service(port=81))          # fixed: the problem goes away
    assert state.problems == []
    assert state.snapshot().services["default", "web"].ports[0].port == 81


def test_delete_clears_problem_and_object(state):
    send(state, ADDED, service())
    bad = service()
    bad["spec"]["ports"][0]["protocol"] = "ICMP"
    send(state, MODIFIED, bad)
    send(state, DELETED, bad)
    assert state.problems == [] and state.snapshot().services == {}


def test_broken_callback_does_not_stop_delivery(caplog):
    def boom(problem):
        raise RuntimeError("metrics down")
    state = ClusterState(NodeConfig("node-1"), on_invalid=boom)
    bad = service()
    bad["spec"]["clusterIP"] = "x"
    with caplog.at_level(logging.ERROR, logger="ebpfsvc.tracker"):
        send(state, ADDED, bad)
    send(state, ADDED, service(name="ok", cluster_ip="198.19.0.11"))
    assert ("default", "ok") in state.snapshot().services


def test_service_cidrs_are_tracked_by_name(state):
    cidr = {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": ["10.96.0.0/12"]}}
    send(state, ADDED, cidr)
    assert [str(c) for c in state.snapshot().service_cidrs["kubernetes"].cidrs] == ["10.96.0.0/12"]
    send(state, MODIFIED, cidr)                       # unchanged: wakes nobody
    assert state.wait_changed(0.01) is False
    send(state, DELETED, cidr)
    assert state.wait_changed(0.01) is True and state.snapshot().service_cidrs == {}


def test_unknown_kinds_are_ignored(state):
    state.on_event(Event("Pod", ADDED, {"kind": "Pod", "metadata": {"name": "p"}}))
    assert state.wait_changed(0.01) is False


def test_validation_uses_the_node_config():
    state = ClusterState(NodeConfig("n", service_cidr="10.96.0.0/12"))
    send(state, ADDED, service(cluster_ip="10.96.0.10"))
    assert ("default", "web") in state.snapshot().services


# --- relist ------------------------------------------------------------------------------------

def test_relist_replaces_the_set_of_a_kind(state):
    send(state, ADDED, service("a", "198.19.0.1"))
    send(state, ADDED, service("b", "198.19.0.2"))
    send(state, ADDED, slice_("a-1", endpoint("198.18.1.1"), service="a"))
    state.snapshot()
    state.on_relist("Service", [service("b", "198.19.0.2"), service("c", "198.19.0.3")])
    snap = state.snapshot()
    assert sorted(snap.services) == [("default", "b"), ("default", "c")]
    assert snap.changed == {("default", "a"), ("default", "c")}
    assert ServicePortName("default", "a", "http", Protocol.TCP) in snap.endpoints   # other kinds untouched


def test_relist_with_nothing_new_does_not_wake(state):
    send(state, ADDED, service())
    send(state, ADDED, slice_("web-1", endpoint("198.18.1.10")))
    state.snapshot()
    state.on_relist("Service", [service()])
    state.on_relist("EndpointSlice", [slice_("web-1", endpoint("198.18.1.10"))])
    assert state.wait_changed(0.01) is False


def test_relist_keeps_last_good_of_an_invalid_object_and_forgets_problems_of_gone_ones(state):
    send(state, ADDED, service())
    bad_other = service("other", "224.1.2.3")
    send(state, ADDED, bad_other)
    assert len(state.problems) == 1
    bad = service()
    bad["spec"]["ports"][0]["port"] = -1
    state.on_relist("Service", [bad])
    assert state.snapshot().services["default", "web"].ports[0].port == 80
    assert [(p.name, p.field) for p in state.problems] == [("web", "spec.ports[0].port")]


def test_relist_of_endpoint_slices_deletes_missing_ones(state):
    send(state, ADDED, slice_("web-1", endpoint("198.18.1.10")))
    send(state, ADDED, slice_("web-2", endpoint("198.18.2.10", node="node-2")))
    state.snapshot()
    state.on_relist("EndpointSlice", [slice_("web-2", endpoint("198.18.2.10", node="node-2"))])
    snap = state.snapshot()
    assert addresses(snap) == [("198.18.2.10", 8080, True)]
    assert snap.changed == {("default", "web")}


# --- endpoint merging --------------------------------------------------------------------------

def test_endpoints_merge_across_slices_dedup_ready_copy_wins(state):
    send(state, ADDED, slice_("web-b", endpoint("198.18.1.10", ready=False), endpoint("198.18.1.11")))
    send(state, ADDED, slice_("web-a", endpoint("198.18.1.10"), endpoint("198.18.1.11", ready=False)))
    send(state, ADDED, slice_("web-c", endpoint("198.18.1.12", ready=False)))
    assert addresses(state.snapshot()) == [
        ("198.18.1.10", 8080, True), ("198.18.1.11", 8080, True), ("198.18.1.12", 8080, False)]


def test_duplicate_address_prefers_the_copy_that_is_not_terminating(state):
    """The pod network reused the address of a pod still terminating for a new pod, not ready yet:
    as kube-proxy v1.37.2, the new pod's (not terminating) copy counts, whatever the slices' names."""
    old = endpoint("198.18.1.10", ready=False, node="node-2", serving=True, terminating=True)
    new = endpoint("198.18.1.10", ready=False, node="node-1")
    for first, second in (("web-a", "web-b"), ("web-b", "web-a")):
        send(state, ADDED, slice_(first, old))
        send(state, ADDED, slice_(second, new))
        (ep,) = state.snapshot().endpoints[WEB_HTTP]
        assert (ep.node_name, ep.terminating) == ("node-1", False)
        send(state, DELETED, slice_(first, old))
        send(state, DELETED, slice_(second, new))


def test_slices_of_other_services_and_namespaces_stay_apart(state):
    send(state, ADDED, slice_("web-1", endpoint("198.18.1.10")))
    send(state, ADDED, slice_("api-1", endpoint("198.18.1.20"), service="api"))
    other_ns = slice_("web-1", endpoint("198.18.1.30"))
    other_ns["metadata"]["namespace"] = "prod"
    send(state, ADDED, other_ns)
    unlabelled = slice_("orphan", endpoint("198.18.1.40"))
    del unlabelled["metadata"]["labels"]
    send(state, ADDED, unlabelled)
    snap = state.snapshot()
    assert addresses(snap) == [("198.18.1.10", 8080, True)]
    assert addresses(snap, ServicePortName("prod", "web", "http", Protocol.TCP)) == [("198.18.1.30", 8080, True)]
    assert addresses(snap, ServicePortName("default", "api", "http", Protocol.TCP)) == [("198.18.1.20", 8080, True)]


def test_slice_relabelled_to_another_service_moves(state):
    send(state, ADDED, slice_("s", endpoint("198.18.1.10")))
    state.snapshot()
    send(state, MODIFIED, slice_("s", endpoint("198.18.1.10"), service="api"))
    snap = state.snapshot()
    assert addresses(snap) == []
    assert snap.changed == {("default", "web"), ("default", "api")}


def test_ports_resolve_per_slice_by_name(state):
    # A named targetPort resolves differently per Pod: each slice carries its own number.
    send(state, ADDED, slice_("web-old", endpoint("198.18.1.10"), port=8080))
    send(state, ADDED, slice_("web-new", endpoint("198.18.1.11"), port=9090))
    send(state, ADDED, slice_("web-metrics", endpoint("198.18.1.10"), port=9100, port_name="metrics"))
    snap = state.snapshot()
    assert addresses(snap) == [("198.18.1.10", 8080, True), ("198.18.1.11", 9090, True)]
    assert addresses(snap, ServicePortName("default", "web", "metrics", Protocol.TCP)) == [("198.18.1.10", 9100, True)]


def test_manual_endpoints_serve_selectorless_services(state):
    send(state, ADDED, manual_endpoints("web", "198.18.1.11", "198.18.2.22"))
    assert addresses(state.snapshot()) == [("198.18.1.11", 8080, True), ("198.18.2.22", 8080, True)]


def test_endpoint_slices_win_over_manual_endpoints(state):
    send(state, ADDED, manual_endpoints("web", "198.18.1.11"))
    state.snapshot()
    send(state, ADDED, slice_("web-1", endpoint("198.18.1.99")))
    assert addresses(state.snapshot()) == [("198.18.1.99", 8080, True)]
    send(state, DELETED, slice_("web-1", endpoint("198.18.1.99")))
    assert addresses(state.snapshot()) == [("198.18.1.11", 8080, True)]    # back to the Endpoints


def test_deleting_everything_empties_the_endpoints(state):
    send(state, ADDED, slice_("web-1", endpoint("198.18.1.10")))
    state.snapshot()
    send(state, DELETED, slice_("web-1"))
    snap = state.snapshot()
    assert dict(snap.endpoints) == {} and snap.changed == {("default", "web")}


# --- sync --------------------------------------------------------------------------------------

def test_synced_needs_services_and_endpoint_slices(state):
    assert not state.synced
    state.on_synced("Service")
    state.on_synced("Endpoints")
    assert not state.synced
    state.snapshot()
    state.on_synced("EndpointSlice")
    assert state.synced and state.wait_changed(0.01) is True     # becoming synced is news
    assert state.snapshot().synced
    assert state.synced_kinds == {"Service", "Endpoints", "EndpointSlice"}
    state.on_synced("Node")
    assert state.wait_changed(0.01) is False


def test_nodes_are_in_the_snapshot(state):
    send(state, ADDED, {"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
    assert state.snapshot().nodes["node-1"].zone == "zone-a"


def test_snapshot_is_immutable(state):
    send(state, ADDED, service())
    snap = state.snapshot()
    with pytest.raises(TypeError):
        snap.services["default", "x"] = None
    send(state, DELETED, service())
    assert ("default", "web") in snap.services        # later events do not leak into an old snapshot


# --- threads -------------------------------------------------------------------------------------

def test_concurrent_sources_and_snapshots():
    state = ClusterState(NodeConfig("node-1"))
    errors: list[BaseException] = []

    def produce(offset):
        try:
            for i in range(200):
                name = f"s{offset}-{i}"
                send(state, ADDED, service(name, f"198.19.{offset}.{i}"))
                send(state, ADDED, slice_(f"{name}-1", endpoint(f"198.18.{offset + 1}.{i}"), service=name))
                if i % 3 == 0:
                    send(state, DELETED, service(name, f"198.19.{offset}.{i}"))
        except BaseException as err:   # pragma: no cover - reported below
            errors.append(err)

    def consume(stop):
        while not stop.is_set():
            state.wait_changed(0.01)
            state.snapshot()

    stop = threading.Event()
    reader = threading.Thread(target=consume, args=(stop,))
    reader.start()
    writers = [threading.Thread(target=produce, args=(k,)) for k in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert not errors
    snap = state.snapshot()
    assert len(snap.services) == 3 * (200 - 67)
    assert len(snap.endpoints) == 3 * 200          # slices outlive their deleted Services
    # The incremental, interleaved merge ends where a from-scratch one would.
    expected = {ServicePortName("default", f"s{k}-{i}", "http", Protocol.TCP): [(f"198.18.{k + 1}.{i}", 8080, True)]
                for k in range(3) for i in range(200)}
    assert {spn: addresses(snap, spn) for spn in snap.endpoints} == expected


def test_snapshot_can_be_built_directly_for_tests_and_the_lab():
    from ebpfsvc.k8s import merge_endpoint_slices, parse_endpoint_slice, parse_service
    svc = parse_service(service(), NodeConfig("n"))
    endpoints = merge_endpoint_slices("default", "web", [parse_endpoint_slice(slice_("web-1", endpoint("198.18.1.10")))])
    snap = ClusterSnapshot.of([svc], endpoints)
    assert snap.synced and snap.services == {("default", "web"): svc}
    assert addresses(snap) == [("198.18.1.10", 8080, True)]


def test_a_parser_bug_costs_one_object_not_the_stream(state, caplog):
    real = state._parsers["Service"]

    def flaky(obj):
        if obj["metadata"]["name"] == "boom":
            raise KeyError("surprise")
        return real(obj)

    state._parsers["Service"] = flaky
    with caplog.at_level(logging.ERROR, logger="ebpfsvc.tracker"):
        send(state, ADDED, service("boom", "198.19.0.9"))
    send(state, ADDED, service())
    assert [(p.name, p.message) for p in state.problems] == [("boom", "cannot be parsed (KeyError: 'surprise')")]
    assert list(state.snapshot().services) == [("default", "web")]


# --- snapshots' endpoints: a shared base plus what changed (tracker.Overlay) -----------------

def test_a_snapshot_keeps_its_endpoints_while_later_changes_and_new_bases_come(state, monkeypatch):
    import ebpfsvc.tracker as tracker_mod
    monkeypatch.setattr(tracker_mod, "_OVERLAY_MIN", 3)     # a new base after a few changes
    names = [f"svc{i}" for i in range(6)]
    for i, name in enumerate(names):
        send(state, ADDED, service(name, f"198.19.0.{10 + i}"))
        send(state, ADDED, slice_(f"{name}-a", endpoint(f"198.18.0.{i + 1}"), service=name))
    first = state.snapshot()
    spn = {name: ServicePortName("default", name, "http", Protocol.TCP) for name in names}
    seen = [(first, {n: addresses(first, spn[n]) for n in names})]
    for round_ in range(4):
        for i, name in enumerate(names[:round_ + 2]):
            send(state, MODIFIED, slice_(f"{name}-a", endpoint(f"198.18.{round_ + 1}.{i + 1}"), service=name))
        send(state, DELETED, slice_(f"{names[-1]}-a", service=names[-1]))
        snap = state.snapshot()
        seen.append((snap, {n: addresses(snap, spn[n]) for n in names}))
    for snap, expected in seen:                 # every snapshot still shows what it showed
        assert {n: addresses(snap, spn[n]) for n in names} == expected
        assert set(snap.endpoints) == {spn[n] for n in names if expected[n]}
        assert len(snap.endpoints) == sum(1 for n in names if expected[n])
    last = seen[-1][1]
    assert last[names[0]] == [("198.18.4.1", 8080, True)] and last[names[-1]] == []
    assert spn[names[-1]] not in seen[-1][0].endpoints and spn[names[-1]] in seen[0][0].endpoints


def test_a_change_after_the_first_sync_carries_only_its_own_entries():
    # The first snapshot after a full list must take a new base: else every later snapshot would
    # carry all the endpoints as changes (what a small cluster did before).
    from ebpfsvc.tracker import Overlay, overlay_view
    current = {i: (i,) for i in range(1000)}
    view, base = overlay_view({}, current, set(current))
    assert base == current and view is base
    since = {7}
    current[7] = ("new",)
    view, base2 = overlay_view(base, current, since)
    assert base2 is base and isinstance(view, Overlay) and view._changes == {7: ("new",)}
    assert view[7] == ("new",) and view[8] == (8,) and len(view) == 1000


@pytest.mark.parametrize("started", [1_700_000_000.25, 1_700_000_000.0])     # 2023-11-14T22:13:20(.25)Z
def test_a_relists_trigger_times_are_those_from_the_agents_start_on(started):
    """A re-list's slices changed before the agent started are not timed (kube-proxy's rule): one in
    the API's own form and a second or more earlier is left unparsed; every other form is parsed."""
    from datetime import datetime

    state = ClusterState(clock=lambda: started)
    times = ["2023-11-14T22:13:19Z", "2023-11-14T22:13:20Z", "2023-11-14T22:13:21Z", "2020-01-01T00:00:00Z",
             "2023-11-14T22:13:20.5Z", "2023-11-14T22:13:20.1Z", "2023-11-14T23:13:21+01:00",
             "2023-11-14T23:13:19+01:00", "2023-11-14T22:13:19.999999Z", "not a time", "2023-13-45T00:00:00Z"]
    slices = []
    for i, when in enumerate(times):
        sl = slice_(f"web-{i}", endpoint("198.18.1.1"))
        sl["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": when}
        slices.append(sl)
    state.on_relist("EndpointSlice", slices)

    def parsed(when):
        try:
            return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None

    want = sorted(t for t in map(parsed, times) if t is not None and t >= started)
    assert sorted(state.snapshot().trigger_times) == want
    assert len(want) == (3 if started % 1 else 5)       # at an even second, its own second counts too
