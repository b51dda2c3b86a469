"""Cluster state as the data plane sees it: validated objects, change tracking, merged endpoints.

ClusterState is the Sink every source delivers to.  It is the counterpart of
kube-proxy's ServiceChangeTracker + EndpointsChangeTracker:

- every raw object is parsed and validated (ebpfsvc.k8s); a bad object is
  reported once (log line + on_invalid callback) and skipped, and if an earlier
  version was good that one stays in force.  The API server never stores an
  invalid object, so a bad one comes from a manifest typo: dropping the
  Service would turn a typo into an outage, keeping the last good version
  does not;
- per object it keeps {previous, current} until the next snapshot() and drops
  changes that net to nothing (an update that only bumps resourceVersion, or an
  add followed by a delete), so such events never wake the agent;
- a Service's endpoints are merged from all its EndpointSlices, or from its v1
  Endpoints when it has no slice (selectorless Services with manual Endpoints);
- nothing should be programmed before Services and EndpointSlices have both
  synced once (`synced`), or the first sync would briefly drop every backend
  that has not been listed yet;
- like kube-proxy's trackers it notes when each change was triggered (the
  endpoints controllers' last-change-trigger-time annotation, else when it
  arrived), and a snapshot checks those times out with the changes it takes,
  for the network programming latency metric.

Thread-safe: sources call in from their own threads, the agent takes snapshots.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Generic, Hashable, Mapping, TypeVar

from ebpfsvc import heap
from ebpfsvc.config import NodeConfig
from ebpfsvc.k8s.endpointmerge import merge_endpoint_slices
from ebpfsvc.k8s.endpoints import Endpoints, parse_endpoints
from ebpfsvc.k8s.endpointslice import Endpoint, EndpointSlice, last_change_trigger_time, parse_endpoint_slice
from ebpfsvc.k8s.fields import Invalid, Problem, object_key
from ebpfsvc.k8s.node import Node, parse_node
from ebpfsvc.k8s.service import Service, parse_service
from ebpfsvc.k8s.servicecidr import ServiceCIDR, parse_service_cidr
from ebpfsvc.lbmodel import ServicePortName
from ebpfsvc.sources.base import Event, EventType

log = logging.getLogger(__name__)

ServiceKey = tuple[str, str]        # (namespace, name)
T = TypeVar("T")

# Programming may start once these kinds have been listed in full (kube-proxy waits for the
# Service and EndpointSlice informers).  Endpoints, Node and ServiceCIDR sync are reported but not
# waited for: not every source serves them.
REQUIRED_KINDS = frozenset({"Service", "EndpointSlice"})
# The kinds whose changes kube-proxy counts and times (sync_proxy_rules_*_changes, programming latency).
SERVICE_KINDS = frozenset({"Service", "EndpointSlice", "Endpoints"})


_GONE = object()        # an Overlay's "deleted" value
_OVERLAY_MIN = 64       # changed entries an Overlay may always carry before a new base is copied


class Overlay(Mapping):
    """A read-only mapping: `base` with `changes` on top (a change to _GONE deletes).  Neither is
    changed after it was handed in; lookups cost two dict probes."""

    __slots__ = ("_base", "_changes")

    def __init__(self, base: Mapping, changes: dict):
        self._base, self._changes = base, changes

    def __getitem__(self, key):
        value = self._changes.get(key, self)
        if value is self:
            return self._base[key]
        if value is _GONE:
            raise KeyError(key)
        return value

    def get(self, key, default=None):
        value = self._changes.get(key, self)
        if value is self:
            return self._base.get(key, default)
        return default if value is _GONE else value

    def __contains__(self, key) -> bool:
        value = self._changes.get(key, self)
        return key in self._base if value is self else value is not _GONE

    def __iter__(self):
        changes = self._changes
        yield from (k for k in self._base if k not in changes)
        yield from (k for k, v in changes.items() if v is not _GONE)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def overlay_view(base: dict, current: dict, since: set) -> tuple[Mapping, dict]:
    """`current` as a mapping to hand out, without copying it each time: `base` (a copy taken
    earlier, never changed once handed out) with the keys in `since` (changed after it) on top.
    When the changes outgrow an eighth of the mapping (or _OVERLAY_MIN), a new base is copied and
    `since` emptied, so a change costs at most about eight of its own entries.  Returns (mapping, the base to keep);
    the mapping is the base itself when nothing changed since."""
    if len(since) > max(_OVERLAY_MIN, len(current) // 8):
        base = dict(current)
        since.clear()
    if not since:
        return base, base
    return Overlay(base, {k: current.get(k, _GONE) for k in since}), base


@dataclass(frozen=True)
class ClusterSnapshot:
    """An immutable view of the cluster for one desired-state computation."""

    services: Mapping[ServiceKey, Service] = field(default_factory=lambda: MappingProxyType({}))
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=lambda: MappingProxyType({}))
    nodes: Mapping[str, Node] = field(default_factory=lambda: MappingProxyType({}))
    synced: bool = False
    service_cidrs: Mapping[str, ServiceCIDR] = field(default_factory=lambda: MappingProxyType({}))
    changed: frozenset[ServiceKey] = frozenset()   # Services whose object or endpoints changed since the last snapshot
    # Which ClusterState took the snapshot, and its count: `changed` is relative to the snapshot of
    # generation - 1 of the same origin.  A consumer that saw exactly that one (DesiredStateBuilder)
    # may look at `changed` only; any other must compare the objects.  0/None: a standalone snapshot.
    origin: object | None = field(default=None, compare=False, repr=False)
    generation: int = field(default=0, compare=False)
    # When the changes this snapshot is the first to show were triggered (Unix times; see ClusterState).
    trigger_times: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, services=(), endpoints=None, nodes=(), synced=True) -> "ClusterSnapshot":
        """Build a snapshot directly (tests, the lab): services/nodes as iterables, endpoints by ServicePortName."""
        return cls(MappingProxyType({s.key: s for s in services}), MappingProxyType(dict(endpoints or {})),
                   MappingProxyType({n.name: n for n in nodes}), synced)

    def health_check_node_ports(self) -> dict[ServiceKey, int]:
        """healthCheckNodePort of every Service that has one (LoadBalancer, externalTrafficPolicy Local)."""
        return {key: svc.health_check_node_port for key, svc in self.services.items() if svc.health_check_node_port}


class ChangeTracker(Generic[T]):
    """Current objects of one kind plus {previous, current} per object changed since the last take()."""

    def __init__(self) -> None:
        self.current: dict[Hashable, T] = {}
        self._pending: dict[Hashable, tuple[T | None, T | None]] = {}

    def update(self, key: Hashable, obj: T | None) -> None:
        """Set (obj) or delete (None) an object; a change back to what was last taken is dropped."""
        previous = self.current.get(key)
        if obj is None:
            self.current.pop(key, None)
        else:
            self.current[key] = obj
        first = self._pending[key][0] if key in self._pending else previous
        # (None first: a new object, which never equals None; asking its __eq__ costs a call each.)
        if first is obj or (first is not None and first == obj):
            self._pending.pop(key, None)
        else:
            self._pending[key] = (first, obj)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def take(self) -> dict[Hashable, tuple[T | None, T | None]]:
        pending, self._pending = self._pending, {}
        return pending


class ClusterState:
    """Implements sources.base.Sink.  See the module docstring."""

    def __init__(self, config: NodeConfig | None = None,
                 on_invalid: Callable[[Problem], None] | None = None, *,
                 on_received: Callable[[str], None] | None = None,
                 on_node: Callable[[Node | None], None] | None = None,
                 clock: Callable[[], float] = time.time):
        """on_invalid: every new validation problem; on_received: (kind, how many) of the Service,
        EndpointSlice or Endpoints objects received (a re-list's included, as kube-proxy counts them:
        an event's one at a time, a re-list's at once);
        on_node: this node's own Node (config.node_name) as a valid version arrives, None when an
        event deletes it (a re-list without it changes nothing: kube-proxy keeps the last state it saw)."""
        # Validation needs the cluster's service CIDR and NodePort range, which come from the node config.
        self.config = config or NodeConfig(node_name="")
        self.on_invalid = on_invalid
        self.on_received = on_received
        self.on_node = on_node
        self.clock = clock
        # Like kube-proxy, changes triggered before we started are not ours to time.
        self._started = clock()
        self._trigger_times: list[float] = []
        self._parsers: dict[str, Callable[[dict], Any]] = {
            "Service": lambda obj: parse_service(obj, self.config),
            "EndpointSlice": parse_endpoint_slice,
            "Endpoints": parse_endpoints,
            "Node": parse_node,
            "ServiceCIDR": parse_service_cidr,
        }
        self._services: ChangeTracker[Service] = ChangeTracker()
        self._slices: ChangeTracker[EndpointSlice] = ChangeTracker()
        self._endpoints_objs: ChangeTracker[Endpoints] = ChangeTracker()
        self._nodes: ChangeTracker[Node] = ChangeTracker()
        self._service_cidrs: ChangeTracker[ServiceCIDR] = ChangeTracker()
        self._trackers = {"Service": self._services, "EndpointSlice": self._slices,
                          "Endpoints": self._endpoints_objs, "Node": self._nodes,
                          "ServiceCIDR": self._service_cidrs}
        self._slices_by_service: dict[ServiceKey, set[Hashable]] = {}
        self._merged: dict[ServiceKey, dict[ServicePortName, tuple[Endpoint, ...]]] = {}
        self._endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        # What snapshots hand out for the endpoints: a base copy, shared and never changed again,
        # plus the service ports remerged since it was taken (an Overlay), so one endpoint change
        # costs its own entries and not a copy of every Service's.
        self._endpoints_base: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        self._endpoints_since: set[ServicePortName] = set()
        self._problems: dict[tuple[str, str, str], Problem] = {}
        self._synced_kinds: set[str] = set()
        self._sync_news = False          # `synced` became true and no snapshot has shown it yet
        self._generation = 0             # snapshots taken so far
        # The read-only copies the last snapshot handed out, reused while nothing in them changed:
        # an endpoint change then copies the endpoints only, and a consumer can tell an unchanged
        # mapping (node zones) by identity.
        self._views: dict[str, Mapping] = {}
        self._cond = threading.Condition()

    # --- Sink -------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        new_problems: list[Problem] = []
        node: list[Node | None] = []
        with self._cond:
            if self._known(event.kind):
                key = object_key(event.kind, event.obj)
                if event.type is EventType.DELETED:
                    self._delete(event.kind, key)
                else:
                    self._upsert(event.kind, event.obj, key, new_problems)
                self._received(event.kind, event.obj, key, node, listed=False)
                self._notify()
        self._report(new_problems, node)

    def on_synced(self, kind: str) -> None:
        with self._cond:
            was = self._is_synced()
            self._synced_kinds.add(kind)
            if not was and self._is_synced():
                self._sync_news = True
                self._notify()

    def on_relist(self, kind: str, objects: list[dict[str, Any]]) -> None:
        new_problems: list[Problem] = []
        node: list[Node | None] = []
        with self._cond, heap.bulk():
            if self._known(kind):
                seen = set()
                for obj in objects:
                    key = object_key(kind, obj)
                    seen.add(key)
                    self._upsert(kind, obj, key, new_problems)
                    self._received(kind, obj, key, node, listed=True)
                if self.on_received is not None and kind in SERVICE_KINDS and objects:
                    self.on_received(kind, len(objects))
                for key in [k for k in self._trackers[kind].current if k not in seen]:
                    self._delete(kind, key)
                for pkey in [p for p in self._problems if p[0] == kind and p[1:] not in seen]:
                    del self._problems[pkey]
                self._notify()
        self._report(new_problems, node)

    # --- agent side -------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """Services AND EndpointSlices have been listed in full at least once."""
        with self._cond:
            return self._is_synced()

    @property
    def synced_kinds(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._synced_kinds)

    @property
    def problems(self) -> list[Problem]:
        """Current validation problems, one per object, sorted."""
        with self._cond:
            return sorted(self._problems.values())

    def pending_changes(self) -> tuple[int, int]:
        """(Services, EndpointSlices and Endpoints) changed since the last snapshot(), changes that
        net to nothing left out: kube-proxy's sync_proxy_rules_{service,endpoint}_changes_pending."""
        with self._cond:
            return (self._services.pending_count,
                    self._slices.pending_count + self._endpoints_objs.pending_count)

    def node(self, name: str) -> Node | None:
        """The current (valid) Node object of that name, without taking a snapshot."""
        with self._cond:
            return self._nodes.current.get(("", name))

    def service_cidrs(self) -> tuple[ServiceCIDR, ...]:
        """The current (valid) ServiceCIDR objects, without taking a snapshot."""
        with self._cond:
            return tuple(self._service_cidrs.current.values())

    def wait_changed(self, timeout: float) -> bool:
        """Block until something relevant changed since the last snapshot(); False on timeout."""
        with self._cond:
            return self._cond.wait_for(self._has_changes, timeout)

    def snapshot(self) -> ClusterSnapshot:
        """The current state; also marks every change so far as seen (see wait_changed)."""
        with self._cond, heap.bulk_for(self._slices.pending_count + self._services.pending_count):
            # After a relist every Service is remerged: no cycle collection meanwhile (ebpfsvc.heap).
            services_changed = set(self._services.take())
            dirty: set[ServiceKey] = set()
            for prev, cur in self._slices.take().values():
                dirty.update(s.service_key for s in (prev, cur) if s is not None and s.service_key)
            dirty.update(self._endpoints_objs.take())
            remerged = {svc for svc in dirty if self._remerge(svc)}
            changed = services_changed | remerged
            views = self._views
            if services_changed or "services" not in views:
                views["services"] = MappingProxyType(dict(self._services.current))
            if remerged or "endpoints" not in views:
                views["endpoints"] = self._endpoints_view()
            if self._nodes.take() or "nodes" not in views:
                views["nodes"] = MappingProxyType({key[1]: n for key, n in self._nodes.current.items()})
            if self._service_cidrs.take() or "service_cidrs" not in views:
                views["service_cidrs"] = MappingProxyType({key[1]: c for key, c in self._service_cidrs.current.items()})
            self._sync_news = False
            self._generation += 1
            triggers, self._trigger_times = tuple(self._trigger_times), []
            return ClusterSnapshot(
                services=views["services"],
                endpoints=views["endpoints"],
                nodes=views["nodes"],
                synced=self._is_synced(),
                service_cidrs=views["service_cidrs"],
                changed=frozenset(changed),
                origin=self,
                generation=self._generation,
                trigger_times=triggers,
            )

    # --- internals (called with the lock held) ------------------------------------------------

    def _received(self, kind: str, obj: Any, key: tuple[str, str], node: list, listed: bool) -> None:
        """Note what the data plane's telemetry wants of an object just received (event or re-list)."""
        if kind == "Node":
            if self.on_node is not None and key[1] == self.config.node_name and key[1]:
                current = self._nodes.current.get(key)
                if current is not None or not listed:
                    node.append(current)     # reported outside the lock, like problems
            return
        if kind not in SERVICE_KINDS:
            return
        if self.on_received is not None and not listed:     # (a re-list's: on_relist tells them at once)
            self.on_received(kind)
        t = last_change_trigger_time(obj) if kind != "Service" else None
        if t is None and not listed:
            t = self.clock()            # no annotation: from when we received the change
        if t is not None and t >= self._started:
            self._trigger_times.append(t)

    def _known(self, kind: str) -> bool:
        if kind not in self._trackers:
            log.debug("ignoring object of kind %r: not used by the data plane", kind)
            return False
        return True

    def _is_synced(self) -> bool:
        return REQUIRED_KINDS <= self._synced_kinds

    def _has_changes(self) -> bool:
        return self._sync_news or any(t.pending for t in self._trackers.values())

    def _notify(self) -> None:
        if self._has_changes():
            self._cond.notify_all()

    def _upsert(self, kind: str, obj: Any, key: tuple[str, str], new_problems: list[Problem]) -> None:
        """The object at `key` (object_key(kind, obj)) parsed, or its problem noted."""
        pkey = (kind, *key)
        try:
            parsed = self._parsers[kind](obj)
        except Invalid as err:
            problem = Problem(kind, key[0], key[1], err.field, err.message)
        except Exception as err:  # a parser bug must cost one object, not the event stream
            log.exception("parsing %s %s/%s failed", kind, *key)
            problem = Problem(kind, key[0], key[1], "", f"cannot be parsed ({type(err).__name__}: {err})")
        else:
            problem = None
        if problem is not None:
            if self._problems.get(pkey) != problem:
                self._problems[pkey] = problem
                new_problems.append(problem)
            return          # the last good version (if any) stays in force
        self._problems.pop(pkey, None)
        self._set(kind, key, parsed)

    def _delete(self, kind: str, key: tuple[str, str]) -> None:
        self._problems.pop((kind, *key), None)
        self._set(kind, key, None)

    def _set(self, kind: str, key: tuple[str, str], obj: Any) -> None:
        if kind == "EndpointSlice":
            old = self._slices.current.get(key)
            if old is not None and old.service_key:
                self._slices_by_service.get(old.service_key, set()).discard(key)
            if obj is not None and obj.service_key:
                self._slices_by_service.setdefault(obj.service_key, set()).add(key)
        self._trackers[kind].update(key, obj)

    def _endpoints_view(self) -> Mapping[ServicePortName, tuple[Endpoint, ...]]:
        view, self._endpoints_base = overlay_view(self._endpoints_base, self._endpoints, self._endpoints_since)
        return MappingProxyType(view) if view is self._endpoints_base else view

    def _remerge(self, svc: ServiceKey) -> bool:
        """Recompute a Service's endpoints; True if they changed."""
        slice_keys = self._slices_by_service.get(svc)
        if slice_keys:
            # EndpointSlices win over v1 Endpoints: with mirroring on, both describe the same endpoints.
            slices = [self._slices.current[k] for k in slice_keys]
        else:
            self._slices_by_service.pop(svc, None)
            manual = self._endpoints_objs.current.get(svc)
            slices = list(manual.slices) if manual else []
        merged = merge_endpoint_slices(svc[0], svc[1], slices)
        old = self._merged.get(svc, {})
        if merged == old:
            return False
        for spn in old:
            self._endpoints.pop(spn, None)
        self._endpoints.update(merged)
        self._endpoints_since.update(old)
        self._endpoints_since.update(merged)
        if merged:
            self._merged[svc] = merged
        else:
            self._merged.pop(svc, None)
        return True

    def _report(self, problems: list[Problem], node: list[Node | None] = ()) -> None:
        # Outside the lock: the callbacks may well read `problems`.
        for current in node:
            try:
                self.on_node(current)
            except Exception:  # a broken health hook must not stop event delivery
                log.exception("on_node callback failed")
        for problem in problems:
            log.warning("skipping invalid object (last good version stays in force): %s", problem)
            if self.on_invalid is not None:
                try:
                    self.on_invalid(problem)
                except Exception:  # a broken metrics hook must not stop event delivery
                    log.exception("on_invalid callback failed for %s", problem)
