"""Prometheus collectors read at scrape time: the node's pinned maps (DatapathCollector) and
what the agent hands over of its sources, validation and sync loop (AgentCollector).

The metric names are listed in ebpfsvc/metrics.py, with the ones the agent observes as it works.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ebpfsvc.k8s.fields import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentReadings:
    """What telemetry reads from the agent when scraped or probed, handed over by the agent (so
    telemetry never reaches into it): each a callable, as the values change while it runs."""

    loops_alive: Callable[[], bool]                          # the sync loop runs (/livez)
    sync_failures: Callable[[], int] | None = None           # syncs that raised
    source_stats: Callable[[], dict | None] = lambda: None   # the API source's watch statistics per kind
    invalid_objects: Callable[[], int] = lambda: 0           # objects rejected so far
    problems: Callable[[], list[Problem]] = list             # objects whose current version is invalid
    # ClusterState.pending_changes: (Services, endpoint objects) changed since the last snapshot
    pending_changes: Callable[[], tuple[int, int]] | None = None
    admission: Callable[[], dict] = dict     # Services not programmed, maps under pressure (admission.py)


class DatapathCollector(Collector):
    """Reads the node's pinned maps at every scrape.

    `applied` returns the LBState the agent last wrote (None before the first
    sync), for the drift gauge; drift is computed at most every
    `drift_interval` seconds, since it reads every Maglev table."""

    def __init__(self, pin_dir, applied: Callable[[], Any] | None = None, drift_interval: float = 10.0):
        self.pin_dir = pin_dir
        self.applied = applied
        self.drift_interval = drift_interval
        self._node = None
        self._lock = threading.Lock()
        self._drift: tuple[float, Any, int] | None = None    # (when, state it was computed for, value)

    def _maps(self):
        from ebpfsvc.inspect.node import NodeMaps
        if self._node is None:
            self._node = NodeMaps.open(self.pin_dir)    # lazily: the agent pins its maps at start
        return self._node

    def close(self) -> None:
        with self._lock:
            if self._node is not None:
                self._node.close()
                self._node = None

    def describe(self):
        return []       # read at scrape time; no fixed set to announce at registration

    def collect(self):
        with self._lock:
            try:
                node = self._maps()
            except (OSError, ValueError) as e:
                log.debug("no datapath maps to collect from yet: %s", e)
                return
            yield from self._collect(node)

    def _collect(self, node):
        from ebpfsvc.inspect.views import drift

        names = node.service_names()
        fes = node.frontends(names)
        backends = node.backends()
        fe_traffic = node.traffic_all("frontend", max((f.frontend_id for f in fes), default=0))
        be_traffic = node.traffic_all("backend", max(backends, default=0))
        svc_p = CounterMetricFamily("ebpfsvc_service_packets", "Packets translated for a service port "
                                    "(both directions, all its frontends).", labels=["service_port"])
        svc_b = CounterMetricFamily("ebpfsvc_service_bytes", "Bytes translated for a service port.",
                                    labels=["service_port"])
        fe_p = CounterMetricFamily("ebpfsvc_frontend_packets", "Packets translated for a frontend.",
                                   labels=["service_port", "frontend", "scope", "kind"])
        fe_b = CounterMetricFamily("ebpfsvc_frontend_bytes", "Bytes translated for a frontend.",
                                   labels=["service_port", "frontend", "scope", "kind"])
        # The socket path's flows (--socket-lb) never meet a TC program: counted per socket instead.
        sock = node.socket_connects_all(max((f.frontend_id for f in fes), default=0))
        svc_s = CounterMetricFamily("ebpfsvc_service_socket_connects", "Sockets translated at connect() (and "
                                    "unconnected UDP datagrams at sendmsg()) by the socket path for a service "
                                    "port; their packets are not in ebpfsvc_service_packets.",
                                    labels=["service_port"])
        fe_s = CounterMetricFamily("ebpfsvc_frontend_socket_connects", "Sockets translated by the socket path "
                                   "for a frontend.", labels=["service_port", "frontend", "scope", "kind"])
        per_service: dict[str, list[int]] = {}
        for fe in fes:
            if fe.is_marker:
                continue
            pk, by = fe_traffic.get(fe.frontend_id, (0, 0))
            connects = sock.get(fe.frontend_id, 0)
            labels = [fe.service, fe.name, fe.scope, fe.kind]
            fe_p.add_metric(labels, pk)
            fe_b.add_metric(labels, by)
            fe_s.add_metric(labels, connects)
            acc = per_service.setdefault(fe.service, [0, 0, 0])
            acc[0] += pk
            acc[1] += by
            acc[2] += connects
        for svc, (pk, by, connects) in sorted(per_service.items()):
            svc_p.add_metric([svc], pk)
            svc_b.add_metric([svc], by)
            svc_s.add_metric([svc], connects)
        yield from (svc_p, svc_b, fe_p, fe_b, svc_s, fe_s)

        be_p = CounterMetricFamily("ebpfsvc_backend_packets", "Packets translated to or from a backend.",
                                   labels=["backend"])
        be_b = CounterMetricFamily("ebpfsvc_backend_bytes", "Bytes translated to or from a backend.",
                                   labels=["backend"])
        for ident, b in backends.items():
            pk, by = be_traffic.get(ident, (0, 0))
            be_p.add_metric([b.name], pk)
            be_b.add_metric([b.name], by)
        yield from (be_p, be_b)

        drops = CounterMetricFamily("ebpfsvc_drops", "Packets dropped, rejected or reset by the datapath, "
                                    "by reason.", labels=["reason"])
        for reason, n in node.drops().items():
            drops.add_metric([reason], n)
        yield drops

        used = GaugeMetricFamily("ebpfsvc_map_entries", "Entries in a BPF map now (the kernel's count; "
                                 "lb_maglev: slots owned by frontends).", labels=["map"])
        limit = GaugeMetricFamily("ebpfsvc_map_max_entries", "max_entries of a BPF map.", labels=["map"])
        for name, (n, cap) in sorted(node.fill(fes).items()):
            used.add_metric([name], n)
            limit.add_metric([name], cap)
        yield from (used, limit)

        if self.applied is not None:
            state = self.applied()
            if state is not None:
                now = time.monotonic()
                cached = self._drift
                if cached is None or cached[1] is not state or now - cached[0] >= self.drift_interval:
                    cached = self._drift = (now, state, len(drift(state, node, fes, backends)))
                g = GaugeMetricFamily("ebpfsvc_drift_frontends", "Frontends whose map entries differ from "
                                      "the state the agent last applied (0 = none).")
                g.add_metric([], cached[2])
                yield g


class AgentCollector(Collector):
    """The agent's source statistics, object validation and sync failures, read at scrape time
    from what the agent handed over (AgentReadings)."""

    def __init__(self, readings: "AgentReadings"):
        self.readings = readings

    def describe(self):
        return []

    def collect(self):
        readings = self.readings
        stats = readings.source_stats()
        if isinstance(stats, dict):
            for counter, help_text in (("lists", "Successful lists"), ("relists", "Lists after the first (410 "
                                       "Gone, broken watches)"), ("restarts", "Watches resumed without a "
                                       "re-list"), ("errors", "Failed list or watch attempts"),
                                       ("events", "Watch events received")):
                m = CounterMetricFamily(f"ebpfsvc_watch_{counter}", f"{help_text}, per kind.", labels=["kind"])
                for kind, values in sorted(stats.items()):
                    m.add_metric([kind], values.get(counter, 0))
                yield m
        total = CounterMetricFamily("ebpfsvc_invalid_objects", "Objects rejected by validation (the last good "
                                    "version stays in force).")
        total.add_metric([], readings.invalid_objects())
        yield total
        if readings.pending_changes is not None:
            g = GaugeMetricFamily("ebpfsvc_invalid_objects_current", "Objects whose current version is invalid.")
            g.add_metric([], len(readings.problems()))
            yield g
            services, endpoints = readings.pending_changes()
            for what, n in (("service", services), ("endpoint", endpoints)):
                g = GaugeMetricFamily(f"kubeproxy_sync_proxy_rules_{what}_changes_pending",
                                      f"Pending proxy rules {what.capitalize()} changes: objects changed since "
                                      "the last sync began, changes that net to nothing left out.")
                g.add_metric([], n)
                yield g
        if readings.sync_failures is not None:
            f = CounterMetricFamily("ebpfsvc_sync_proxy_rules_failures", "Syncs that raised (retried).")
            f.add_metric([], readings.sync_failures())
            yield f
