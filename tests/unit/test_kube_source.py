"""KubeSource against a fake API server that speaks the real list/watch protocol.

The real `kubernetes` client does the HTTP, so these tests exercise the production
request path. Each test says which failure it proves is handled. Every wait is
bounded (WAIT seconds) and no test asserts on how long anything took.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Any, Callable

import pytest
from kubernetes import client, watch

from ebpfsvc.sources.backoff import Backoff
from ebpfsvc.sources.base import KINDS, Event, EventType
from ebpfsvc.sources import kube
from ebpfsvc.sources.kube import AGENT_KINDS, KubeSource
from fakeapi import FakeApiServer  # tests/ is on sys.path: pytest adds the folder of tests/conftest.py

WAIT = 10.0   # upper bound for any wait; a healthy run needs a fraction of a second


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll `predicate` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class RecordingSink:
    """Records every call in order and keeps the resulting state per kind (thread-safe)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.calls: list[tuple] = []                       # ("event", Event) | ("relist", kind, objs) | ("synced", kind)
        self.state: dict[str, dict[tuple[str, str], dict]] = {k: {} for k in KINDS}
        self.fail_next_event = False

    def on_event(self, event: Event) -> None:
        with self._cond:
            if self.fail_next_event:
                self.fail_next_event = False
                raise RuntimeError("sink bug")
            self.calls.append(("event", event))
            if event.type is EventType.DELETED:
                self.state[event.kind].pop(event.key, None)
            else:
                self.state[event.kind][event.key] = event.obj
            self._cond.notify_all()

    def on_synced(self, kind: str) -> None:
        with self._cond:
            self.calls.append(("synced", kind))
            self._cond.notify_all()

    def on_relist(self, kind: str, objects: list[dict]) -> None:
        with self._cond:
            self.calls.append(("relist", kind, objects))
            self.state[kind] = {Event(kind, EventType.ADDED, o).key: o for o in objects}
            self._cond.notify_all()

    def events(self, kind: str) -> list[Event]:
        with self._cond:
            return [c[1] for c in self.calls if c[0] == "event" and c[1].kind == kind]

    def relists(self, kind: str) -> list[list[dict]]:
        with self._cond:
            return [c[2] for c in self.calls if c[0] == "relist" and c[1] == kind]

    def synced(self, kind: str) -> int:
        with self._cond:
            return sum(1 for c in self.calls if c == ("synced", kind))

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; calls: {self.calls}")
            return predicate()


def svc(name: str, namespace: str = "default", port: int = 80) -> dict:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": port, "protocol": "TCP"}]}}


def names(objects: list[dict]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects)


@pytest.fixture
def api():
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def make_source(api):
    """Builds KubeSources pointed at the fake (fast backoff), stops them after the test."""
    sources: list[KubeSource] = []

    def make(sink, **overrides) -> KubeSource:
        configuration = client.Configuration()
        configuration.host = api.url
        options = dict(api_client=client.ApiClient(configuration), request_timeout=(2, 10),
                       backoff_initial=0.02, backoff_max=0.1)
        options.update(overrides)
        source = KubeSource(sink, **options)
        sources.append(source)
        return source

    yield make
    for source in sources:
        source.stop()


def start_synced(make_source, sink, api, **overrides) -> KubeSource:
    """Start a source and wait until every kind is listed and watching."""
    source = make_source(sink, **overrides)
    source.start()
    for kind in overrides.get("kinds", AGENT_KINDS):
        sink.wait(lambda: sink.synced(kind), f"{kind} synced")
        api.wait_for_request(kind, "watch", 1)
    return source


# ---- list -----------------------------------------------------------------------------------


def test_initial_list_of_every_kind_then_synced_then_watch_from_list_version(api, sink, make_source):
    """Proves: each kind is listed once, delivered whole (with the kind/apiVersion the API omits
    on list items) BEFORE synced, and watched from the list's resourceVersion with bookmarks."""
    api.create("Service", svc("web"))
    api.create("EndpointSlice", {"metadata": {"name": "web-abc", "namespace": "default",
                                              "labels": {"kubernetes.io/service-name": "web"}},
                                 "addressType": "IPv4", "endpoints": []})
    api.create("Node", {"metadata": {"name": "node-1"}})
    list_rv = str(api.resource_version)
    start_synced(make_source, sink, api, watch_timeout_seconds=123)

    for kind in AGENT_KINDS:
        calls = [c for c in sink.calls if c[1] == kind]
        assert [c[0] for c in calls] == ["relist", "synced"], kind
        assert api.count(kind, "list") == 1
        watch = api.requests(kind, "watch")[0]
        assert watch.params["resourceVersion"] == list_rv
        assert watch.params["allowWatchBookmarks"] == "true"
        assert watch.params["timeoutSeconds"] == "123"
    [services] = sink.relists("Service")
    assert services[0]["kind"] == "Service" and services[0]["apiVersion"] == "v1"
    assert services[0]["spec"]["clusterIP"] == "198.19.0.10"          # camelCase, as the API sends
    [slices] = sink.relists("EndpointSlice")
    assert slices[0]["apiVersion"] == "discovery.k8s.io/v1" and slices[0]["addressType"] == "IPv4"
    assert names(sink.relists("Node")[0]) == ["node-1"]


def test_the_agent_watches_what_kube_proxy_watches_and_no_v1_endpoints(api, sink, make_source):
    """Proves (issue 10): no v1 Endpoints request at all (they reach a cluster's agents as
    EndpointSlices, through the mirroring controller), and the Node watch asks for this node
    only (list AND watch carry the field selector), so other Nodes are never delivered."""
    api.create("Node", {"metadata": {"name": "node-1", "labels": {"zone": "a"}}})
    api.create("Node", {"metadata": {"name": "node-2"}})
    start_synced(make_source, sink, api, node_name="node-1")

    assert api.requests("Endpoints") == []
    assert set(AGENT_KINDS) == {"Service", "EndpointSlice", "Node", "ServiceCIDR"}
    for request in api.requests("Node"):
        assert request.params["fieldSelector"] == "metadata.name=node-1", request
    assert [r.params.get("fieldSelector") for r in api.requests("Service")] == [None, None]
    assert names(sink.relists("Node")[0]) == ["node-1"]

    api.update("Node", {"metadata": {"name": "node-2", "labels": {"zone": "b"}}})
    api.update("Node", {"metadata": {"name": "node-1", "labels": {"zone": "c"}}})
    [event] = sink.wait(lambda: sink.events("Node"), "node-1's update")
    assert event.key == ("", "node-1") and event.obj["metadata"]["labels"] == {"zone": "c"}
    api.delete("Node", {"metadata": {"name": "node-2"}})
    api.send_bookmark("Node")
    assert [e.key for e in sink.events("Node")] == [("", "node-1")]


def test_service_cidrs_are_followed_and_an_api_without_them_is_no_error(sink, make_source, monkeypatch):
    """Proves: an API server that does not serve ServiceCIDRs (404, before Kubernetes 1.33) gives
    an empty, synced set and no error (the agent then routes ClusterIPs itself), and the source
    asks again later and follows them once served."""
    monkeypatch.setattr(kube, "ABSENT_RETRY_SECONDS", 0.2)
    with FakeApiServer(without=("ServiceCIDR",)) as old:
        source = make_source_for(old, sink, make_source)
        source.start()
        sink.wait(lambda: sink.synced("ServiceCIDR"), "ServiceCIDR synced although absent")
        assert sink.relists("ServiceCIDR")[0] == []
        stats = source.stats["ServiceCIDR"]
        assert stats["absent"] and stats["errors"] == 0 and stats["synced"]
        old.wait_for_request("ServiceCIDR", "list", 2)             # asked again
        assert old.count("ServiceCIDR", "watch") == 0

        old.without = frozenset()                                   # upgraded
        old.create("ServiceCIDR", {"metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/12"]}})
        sink.wait(lambda: any(sink.relists("ServiceCIDR")[1:]), "the ServiceCIDR once served")
        old.wait_for_request("ServiceCIDR", "watch", 1)
        old.create("ServiceCIDR", {"metadata": {"name": "extra"}, "spec": {"cidrs": ["10.100.0.0/16"]}})
        [added] = sink.wait(lambda: sink.events("ServiceCIDR"), "a second ServiceCIDR by watch")
        assert added.obj["spec"]["cidrs"] == ["10.100.0.0/16"]
        assert source.stats["ServiceCIDR"]["absent"] is False
        source.stop()


def make_source_for(server, sink, make_source):
    configuration = client.Configuration()
    configuration.host = server.url
    return make_source(sink, api_client=client.ApiClient(configuration))


def test_pagination_gathers_every_page_into_one_relist(api, sink, make_source):
    """Proves: a list larger than one page is followed through its continue tokens and
    delivered as ONE relist (a partial relist would withdraw services on later pages)."""
    for i in range(7):
        api.create("Service", svc(f"s{i}"))
    start_synced(make_source, sink, api, kinds=("Service",), list_page_size=3)

    lists = api.requests("Service", "list")
    assert [r.params.get("limit") for r in lists] == ["3", "3", "3"]
    assert "continue" not in lists[0].params and all("continue" in r.params for r in lists[1:])
    assert [names(objs) for objs in sink.relists("Service")] == [[f"s{i}" for i in range(7)]]


def test_change_during_paginated_list_arrives_by_watch(api, sink, make_source):
    """Proves: the watch starts from the list's snapshot resourceVersion, so an object created
    while the pages were being fetched is neither in the list nor lost."""
    for i in range(4):
        api.create("Service", svc(f"s{i}"))
    api.on_list_page = lambda kind, page: page == 1 and api.create("Service", svc("late"))
    start_synced(make_source, sink, api, kinds=("Service",), list_page_size=2)

    assert names(sink.relists("Service")[0]) == ["s0", "s1", "s2", "s3"]
    [added] = sink.wait(lambda: sink.events("Service"), "the late Service by watch")
    assert (added.type, added.key) == (EventType.ADDED, ("default", "late"))


def test_expired_continue_token_restarts_the_list_unpaginated(api, sink, make_source):
    """Proves: a 410 on a continue page (snapshot compacted mid-list) restarts the list in full
    instead of delivering a partial list or failing."""
    for i in range(4):
        api.create("Service", svc(f"s{i}"))

    def compact_after_first_page(kind, page):
        if page == 1 and api.count("Service", "list") == 0:
            api.create("Service", svc("late"))
            api.compact()
    api.on_list_page = compact_after_first_page
    start_synced(make_source, sink, api, kinds=("Service",), list_page_size=2)

    assert [(r.params.get("limit"), r.status) for r in api.requests("Service", "list")] == [
        ("2", 200), ("2", 410), (None, 200)]
    assert [names(objs) for objs in sink.relists("Service")] == [["late", "s0", "s1", "s2", "s3"]]
    assert sink.synced("Service") == 1


# ---- watch ----------------------------------------------------------------------------------


def test_watch_events_delivered_in_order_with_last_state_on_delete(api, sink, make_source):
    """Proves: ADDED/MODIFIED/DELETED reach the sink in resourceVersion order, whole, and a
    DELETED carries the object's last state."""
    start_synced(make_source, sink, api, kinds=("Service",))
    a = api.create("Service", svc("a"))
    a["spec"]["ports"][0]["port"] = 8080
    api.update("Service", a)
    api.create("Service", svc("b"))
    api.delete("Service", a)

    events = sink.wait(lambda: len(sink.events("Service")) == 4 and sink.events("Service"), "4 events")
    assert [(e.type, e.key[1]) for e in events] == [
        (EventType.ADDED, "a"), (EventType.MODIFIED, "a"), (EventType.ADDED, "b"), (EventType.DELETED, "a")]
    versions = [int(e.obj["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions)
    assert events[3].obj["spec"]["ports"][0]["port"] == 8080
    assert events[0].obj["kind"] == "Service"
    assert list(sink.state["Service"]) == [("default", "b")]


def test_bookmark_moves_the_resume_point_without_events(api, sink, make_source):
    """Proves: a BOOKMARK delivers nothing but advances the resourceVersion, so the next watch
    resumes from the bookmark (the server need not replay history we never cared about)."""
    source = start_synced(make_source, sink, api, kinds=("Service",))
    api.create("Node", {"metadata": {"name": "n1"}})       # moves the global version, not Services
    bookmark_rv = api.send_bookmark("Service")
    wait_until(lambda: source.stats["Service"]["bookmarks"] == 1, "the bookmark")
    assert source.stats["Service"]["resource_version"] == str(bookmark_rv)

    api.close_watches("Service")
    second = api.wait_for_request("Service", "watch", 2)
    assert second.params["resourceVersion"] == str(bookmark_rv)
    assert sink.events("Service") == [] and len(sink.relists("Service")) == 1


def test_server_closed_watch_resumes_from_last_version_without_relist(api, sink, make_source):
    """Proves: a watch the server ends normally (timeoutSeconds) is resumed from the last
    delivered resourceVersion, with no re-list and no event lost across the gap."""
    source = start_synced(make_source, sink, api, kinds=("Service",))
    first = api.create("Service", svc("a"))
    sink.wait(lambda: sink.events("Service"), "ADDED a")

    api.close_watches("Service")
    second = api.wait_for_request("Service", "watch", 2)
    assert second.params["resourceVersion"] == first["metadata"]["resourceVersion"]
    api.create("Service", svc("b"))
    sink.wait(lambda: len(sink.events("Service")) == 2, "ADDED b on the new watch")
    assert api.count("Service", "list") == 1 and len(sink.relists("Service")) == 1
    assert source.stats["Service"]["restarts"] >= 1 and source.stats["Service"]["relists"] == 0


def test_server_timeout_seconds_ends_watch_and_it_resumes(api, sink, make_source):
    """Proves: the server ending the stream on our timeoutSeconds is a normal close: watch again."""
    start_synced(make_source, sink, api, kinds=("Service",), watch_timeout_seconds=1)
    api.wait_for_request("Service", "watch", 2)
    assert api.count("Service", "list") == 1


@pytest.mark.parametrize("gone_as", ["event", "http"])
def test_gone_relists_and_the_relist_drops_objects_deleted_meanwhile(api, sink, make_source, gone_as):
    """Proves: 410 Gone, as an ERROR event or as an HTTP 410, triggers a re-list, and that
    re-list (not a DELETED event we never saw) removes an object deleted while we were away."""
    api.create("Service", svc("keep"))
    doomed = api.create("Service", svc("doomed"))
    source = start_synced(make_source, sink, api, kinds=("Service",))

    api.go_down()                                   # we miss everything from here...
    api.delete("Service", doomed)
    api.create("Service", svc("fresh"))
    api.compact(gone_as=gone_as)                    # ...and the history of it is gone
    api.come_up()

    relists = sink.wait(lambda: len(sink.relists("Service")) == 2 and sink.relists("Service"), "re-list")
    assert names(relists[1]) == ["fresh", "keep"]
    assert sorted(k[1] for k in sink.state["Service"]) == ["fresh", "keep"]
    assert sink.events("Service") == [] and sink.synced("Service") == 1
    old_rv = doomed["metadata"]["resourceVersion"]
    gone = [r for r in api.requests("Service", "watch") if r.params["resourceVersion"] == old_rv]
    assert gone[-1].status == (410 if gone_as == "http" else 200)
    wait_until(lambda: source.stats["Service"]["relists"] == 1, "the re-list counted")
    assert "410" in source.stats["Service"]["last_error"]


def test_gone_after_an_outage_relists_soon_not_after_the_backoff_the_outage_built(api, sink, make_source,
                                                                                 caplog):
    """Proves: a 410 when the API comes back after an outage is answered by a re-list after the
    *initial* backoff, not after the one the outage built up: the 410 is an answer, the API works.
    Found against the real API server: after a restart it answers every watch older than its new
    watch cache with 410, so every kind waited up to backoff_max (30 s) before re-listing."""
    caplog.set_level(logging.WARNING, logger="ebpfsvc.sources.kube")
    api.create("Service", svc("a"))
    source = start_synced(make_source, sink, api, kinds=("Service",), backoff_initial=0.02, backoff_max=2.0)
    api.go_down()
    wait_until(lambda: source.stats["Service"]["errors"] >= 8, "the backoff to grow to its maximum")
    api.create("Service", svc("b"))                  # the API server comes back with a new history
    api.compact()
    api.come_up()

    sink.wait(lambda: len(sink.relists("Service")) == 2, "re-list")
    [delay] = [float(m.group(1)) for r in caplog.records
               if "410" in r.getMessage() and (m := re.search(r"re-list in ([0-9.]+)s", r.getMessage()))]
    assert delay <= 0.02


def test_error_event_backs_off_and_relists(api, sink, make_source):
    """Proves: a non-410 ERROR event (server trouble) is counted and answered with a re-list,
    not ignored and not fatal to the reflector."""
    api.create("Service", svc("a"))
    source = start_synced(make_source, sink, api, kinds=("Service",))
    api.send_error("Service", code=500)

    relists = sink.wait(lambda: len(sink.relists("Service")) == 2 and sink.relists("Service"), "re-list")
    assert names(relists[1]) == ["a"]
    wait_until(lambda: source.stats["Service"]["relists"] == 1, "the re-list counted")
    stats = source.stats["Service"]
    assert stats["errors"] >= 1 and "500" in stats["last_error"]
    api.wait_for_request("Service", "watch", 2)      # and it watches again afterwards


def test_hung_watch_is_noticed_by_the_read_timeout_and_rewatched(api, sink, make_source):
    """Proves: a connection that stays open but silent (events stop arriving) is abandoned once it is
    silent past timeoutSeconds (when the server would have ended it) plus the client read timeout,
    and a new watch from the same version recovers the missed events."""
    source = start_synced(make_source, sink, api, kinds=("Service",), request_timeout=(2, 0.5),
                          watch_timeout_seconds=2)
    first = api.requests("Service", "watch")[-1]
    api.hang_watches("Service")
    api.create("Service", svc("during-hang"))        # the hung stream will never carry this

    [added] = sink.wait(lambda: sink.events("Service"), "the event via a new watch")
    assert added.key == ("default", "during-hang")
    assert api.requests("Service", "watch")[-1].params["resourceVersion"] == first.params["resourceVersion"]
    assert api.count("Service", "list") == 1
    assert "no data" in (source.stats["Service"]["last_error"] or "")


def test_quiet_watch_is_not_taken_for_a_dead_one(api, sink, make_source):
    """Proves: a healthy watch on which nothing happens is kept past the read timeout. The real API
    server sends a bookmark only when its revision has moved, so the stream of a kind that does not
    change stays silent until timeoutSeconds ends it; found against it: with the 60 s read timeout
    every quiet watch was dropped as a "silent connection" every minute, with a warning and an error."""
    source = start_synced(make_source, sink, api, kinds=("Service",), request_timeout=(2, 0.2),
                          watch_timeout_seconds=5)
    time.sleep(1.5)                                  # seven read timeouts of silence
    assert source.stats["Service"]["errors"] == 0, source.stats["Service"]["last_error"]
    assert api.count("Service", "watch") == 1


def test_sink_failure_is_healed_by_a_relist(api, sink, make_source):
    """Proves: if the sink raises on an event, the reflector survives and re-lists, so the sink
    gets the complete state instead of silently missing that event."""
    start_synced(make_source, sink, api, kinds=("Service",))
    sink.fail_next_event = True
    api.create("Service", svc("a"))

    relists = sink.wait(lambda: len(sink.relists("Service")) == 2 and sink.relists("Service"), "re-list")
    assert names(relists[1]) == ["a"] and ("default", "a") in sink.state["Service"]


@pytest.mark.parametrize("line", [b"{not json", b'{"type": "ADDED", "object": null}', b'{"type": "SURPRISE", "object": {}}'])
def test_malformed_watch_event_relists_and_the_reflector_survives(api, sink, make_source, line):
    """Proves: garbage on the stream (a broken proxy, a server bug) is not skipped silently,
    which could lose an event, nor fatal to the thread: the reflector re-lists and goes on."""
    source = start_synced(make_source, sink, api, kinds=("Service",))
    api.send_raw("Service", line)
    api.create("Service", svc("a"))

    sink.wait(lambda: ("default", "a") in sink.state["Service"], "Service a, via re-list or watch")
    wait_until(lambda: source.stats["Service"]["relists"] == 1, "the re-list counted")
    assert source.running
    assert "watch:" in source.stats["Service"]["last_error"]


# ---- API unreachable --------------------------------------------------------------------------


def test_api_down_at_start_backs_off_delivers_nothing_then_recovers(api, sink, make_source):
    """Proves: while the API refuses connections the source retries with backoff (attempts
    counted), delivers NOTHING (above all, no empty list), and syncs once the API is back."""
    api.create("Service", svc("a"))
    api.go_down()
    source = make_source(sink)
    source.start()
    wait_until(lambda: all(s["errors"] >= 3 for s in source.stats.values()), "3 failed attempts per kind")
    assert sink.calls == []
    assert all(not s["synced"] and s["lists"] == 0 for s in source.stats.values())
    assert "unreachable" in source.stats["Service"]["last_error"]

    api.come_up()
    for kind in AGENT_KINDS:
        sink.wait(lambda: sink.synced(kind), f"{kind} synced after recovery")
    assert names(sink.relists("Service")[0]) == ["a"]


def test_api_down_after_sync_keeps_state_and_resumes_watch(api, sink, make_source):
    """Proves: losing the API after sync delivers nothing (the data plane keeps its state), and
    when it returns the watch resumes from where it was: no re-list is needed when no history
    was lost."""
    api.create("Service", svc("a"))
    source = start_synced(make_source, sink, api, kinds=("Service",))
    api.go_down()
    errors_before = source.stats["Service"]["errors"]
    wait_until(lambda: source.stats["Service"]["errors"] >= errors_before + 3, "3 failed watch attempts")
    assert len(sink.relists("Service")) == 1 and sink.events("Service") == []

    api.come_up()
    api.create("Service", svc("b"))
    [added] = sink.wait(lambda: sink.events("Service"), "ADDED b after recovery")
    assert added.key == ("default", "b")
    assert len(sink.relists("Service")) == 1 and source.stats["Service"]["relists"] == 0


# ---- lifecycle --------------------------------------------------------------------------------


def test_stop_ends_open_watches_at_once(api, sink, make_source):
    """Proves: stop() does not wait for the (here 60 s) read timeout of open watches: the threads
    are gone when it returns (its join is bounded at 5 s), and stop() is idempotent."""
    source = start_synced(make_source, sink, api, request_timeout=(2, 60))
    assert source.running
    source.stop()
    assert not source.running
    source.stop()
    calls = len(sink.calls)
    api.create("Service", svc("after-stop"))
    assert len(sink.calls) == calls


def test_stop_interrupts_a_long_backoff(api, sink, make_source):
    """Proves: a reflector sleeping in backoff (here 30 s) wakes up for stop()."""
    api.go_down()
    source = make_source(sink, backoff_initial=30.0, backoff_max=30.0, kinds=("Service",))
    source.start()
    wait_until(lambda: source.stats["Service"]["errors"] >= 1, "the first failure")
    source.stop()
    assert not source.running


def test_kubeconfig_file_is_honoured(api, sink, tmp_path):
    """Proves: without an api_client the source loads the given kubeconfig (the path a user
    without a cluster-internal service account takes)."""
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    source = KubeSource(sink, kubeconfig=kubeconfig, in_cluster=False, kinds=("Node",))
    try:
        source.start()
        sink.wait(lambda: sink.synced("Node"), "Node synced")
    finally:
        source.stop()


def test_unknown_kind_is_rejected_up_front(sink):
    """Proves: a typo in `kinds` fails at construction, not silently in a thread."""
    with pytest.raises(ValueError, match="Pod"):
        KubeSource(sink, api_client=client.ApiClient(client.Configuration()), kinds=("Pod",))


def test_fake_api_server_satisfies_the_stock_client(api):
    """Proves the fake is faithful where the tests lean on it: the stock client's typed list and
    its own Watch helper (not our code) parse its answers, including a 410 ERROR event."""
    configuration = client.Configuration()
    configuration.host = api.url
    core = client.CoreV1Api(client.ApiClient(configuration))
    api.create("Service", svc("web", port=443))
    listed = core.list_service_for_all_namespaces()
    assert listed.metadata.resource_version == str(api.resource_version)
    assert listed.items[0].spec.ports[0].port == 443

    api.create("Service", svc("db"))
    stream = watch.Watch().stream(core.list_service_for_all_namespaces, timeout_seconds=5,
                                  resource_version=listed.metadata.resource_version)
    event = next(stream)
    assert (event["type"], event["object"].metadata.name) == ("ADDED", "db")
    stream.close()

    api.compact()
    with pytest.raises(client.ApiException) as gone:
        list(watch.Watch().stream(core.list_service_for_all_namespaces, timeout_seconds=5,
                                  resource_version=listed.metadata.resource_version))
    assert gone.value.status == 410


# ---- backoff ---------------------------------------------------------------------------------


def test_backoff_grows_exponentially_is_capped_and_resets():
    """Proves: delays double per failure, never exceed the cap even with jitter, and reset()
    starts over (so one outage does not slow down recovery from the next)."""
    backoff = Backoff(0.2, 3.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.2, 0.4, 0.8, 1.6, 3.0, 3.0]
    backoff.reset()
    assert backoff.next_delay() == 0.2


def test_backoff_jitter_stays_within_bounds_and_spreads():
    """Proves: jittered delays lie in [base*(1-jitter), base], and differ between agents."""
    rng = random.Random(7)
    delays = []
    for _ in range(200):
        backoff = Backoff(1.0, 1.0, jitter=0.5, rng=rng)
        delays.append(backoff.next_delay())
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 100
    with pytest.raises(ValueError):
        Backoff(0, 1)
