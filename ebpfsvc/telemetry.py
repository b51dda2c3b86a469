"""The agent's telemetry: its metrics, /metrics, /healthz, /livez and healthCheckNodePort servers.

The agent creates one Telemetry, hands it what it reads at scrape and probe time
(collectors.AgentReadings), and calls it as it works: queued() when a change asks for a sync,
sync_started(trigger times of the snapshot) and sync_done(...) with what the sync applied.
Node events reach health through ClusterState's on_node, object counts through on_received.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from ebpfsvc.collectors import AgentCollector, AgentReadings, DatapathCollector
from ebpfsvc.metrics import Metrics

log = logging.getLogger(__name__)


class MetricsServer:
    """/metrics of `registry` on host:port, in a daemon thread (port 0: a free one, see .port)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        from prometheus_client import start_http_server
        self.httpd, self.thread = start_http_server(port, addr=host, registry=registry)
        self.port = self.httpd.server_address[1]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Telemetry:
    """Metrics, /metrics, /healthz, /livez and healthCheckNodePort servers of one agent.

    `config`: the agent's (sync_period, pin_dir, the bind addresses); `readings`: what it reads
    from the agent at scrape and probe time. The agent calls start() / stop() / close(),
    queued() when a change asks for a sync, sync_started(trigger_times) and sync_done(...)."""

    def __init__(self, config, readings: AgentReadings, *, clock: Callable[[], float] = time.time):
        from ebpfsvc.health import LocalEndpointCounts, ProxierHealth

        self.config = config
        self.readings = readings
        self.clock = clock
        self.metrics = Metrics()
        self.health = ProxierHealth(timeout=2 * config.sync_period, clock=clock, serving=self.serving_problems)
        self.datapath_collector = DatapathCollector(config.pin_dir, applied=lambda: self._applied)
        self.metrics.registry.register(self.datapath_collector)
        self.metrics.registry.register(AgentCollector(readings))
        self.healthz_server = None
        self.metrics_server = None
        self.service_health = None
        self._triggers: list[float] = []
        self._applied = None                  # the LBState the last sync applied
        self._local_endpoints = LocalEndpointCounts()   # its local endpoints, for healthCheckNodePorts
        self._served: tuple[Any, Any] | None = None   # (snapshot, node config) of the last sync
        self._serving_lock = threading.Lock()
        self._nodeports: tuple[Any, Any, int] | None = None   # (services view, node config, NodePort Services)
        self._serving_logged: list[str] = []

    # -- lifecycle
    def start(self) -> None:
        """Bind /healthz and /metrics. A taken address is retried in the background (health.Listener
        says why), or raises health.BindError with --bind-address-hard-fail."""
        from ebpfsvc.health import HealthServer, Listener, ServiceHealthServers

        cfg = self.config
        hard_fail = cfg.bind_address_hard_fail
        if cfg.healthz_bind_address:
            self.healthz_server = Listener(
                "--healthz-bind-address", cfg.healthz_bind_address, 10256, hard_fail=hard_fail,
                serve=lambda host, port: HealthServer(self.health, self.alive, host, port, details=self.details,
                                                      on_request=self.metrics.on_probe))
            self.service_health = ServiceHealthServers(self.healthz_server.host,
                                                       proxy_healthy=self.health.proxier_healthy)
            log.info("healthz on %s (port %s)", cfg.healthz_bind_address, self.healthz_server.port)
        if cfg.metrics_bind_address:
            try:
                self.metrics_server = Listener(
                    "--metrics-bind-address", cfg.metrics_bind_address, 10249, hard_fail=hard_fail,
                    serve=lambda host, port: MetricsServer(self.metrics.registry, host, port))
            except Exception:
                self.close()
                raise
            log.info("metrics on %s (port %s)", cfg.metrics_bind_address, self.metrics_server.port)

    def stop(self) -> None:
        """Fail /healthz at once (load balancers drain the node); close the servers."""
        self.health.set_stopping()

    def close(self) -> None:
        """Close every server (idempotent: the agent may be stopped twice)."""
        for server in (self.healthz_server, self.service_health, self.metrics_server):
            if server is not None:
                server.close()
        self.healthz_server = self.service_health = self.metrics_server = None
        self.datapath_collector.close()

    def alive(self) -> bool:
        return not self.health.stopping and self.readings.loops_alive()

    def details(self) -> dict:
        """Operator information in the /healthz body: the API source's state, and addresses the agent
        could not bind (its own servers', healthCheckNodePorts)."""
        out: dict = {}
        stats = self.readings.source_stats()
        if isinstance(stats, dict):
            out["source"] = {kind: {"synced": v.get("synced"), "errors": v.get("errors"),
                                    "lastError": v.get("last_error")} for kind, v in sorted(stats.items())}
        unbound = [listener.error for listener in (self.healthz_server, self.metrics_server)
                   if listener is not None and listener.error]
        if unbound:
            out["bindErrors"] = unbound
        if self.service_health is not None and self.service_health.problems:
            out["healthCheckNodePortErrors"] = self.service_health.problems
        out.update(self.readings.admission())
        return out

    def serving_problems(self) -> list[str]:
        """health.serving_problems for the state the last sync computed and applied; asked at each
        /healthz, so the count of NodePort Services is kept while the Services view and the node
        configuration are the same objects (an endpoint change costs nothing here)."""
        from ebpfsvc.health import nodeport_services, serving_problems

        served, applied = self._served, self._applied
        if served is None or applied is None:
            return []
        snapshot, node = served
        rejected = [p for p in self.readings.problems() if p.kind == "Service"]
        with self._serving_lock:
            cached = self._nodeports
            if cached is None or cached[0] is not snapshot.services or cached[1] is not node:
                cached = self._nodeports = (snapshot.services, node,
                                            nodeport_services(snapshot.services.values(), node))
            problems = serving_problems(frontends=len(applied.frontends), rejected=rejected,
                                        nodeport_services=cached[2], node_addresses=node.node_addresses)
            changed, self._serving_logged = problems != self._serving_logged, problems
        if changed:
            if problems:
                log.warning("/healthz fails: %s", "; ".join(problems))
            else:
                log.info("/healthz: the node serves what it should again")
        return problems

    # -- hooks
    def queued(self) -> None:
        self.health.queued()
        self.metrics.last_queued.set(self.clock())

    def sync_started(self, trigger_times=()) -> None:
        """A sync begins with a snapshot: `trigger_times` are when the changes it is the first to
        show were triggered (ClusterSnapshot.trigger_times), timed when the sync completes."""
        self._triggers.extend(trigger_times)

    def sync_done(self, duration: float, stats=None, *, snapshot=None, node=None, applied=None, delta=None) -> None:
        """A sync completed (stats: the writer's ApplyStats, None when nothing had to change), from
        `snapshot` with the node configuration `node`, leaving `applied` (an LBState) in the maps;
        `delta`: how `applied` differs from an earlier state (desired.LBDelta), if known."""
        now = self.clock()
        self.metrics.sync_duration.observe(duration)
        self.metrics.last_sync.set(now)
        if stats is not None:
            self.metrics.map_writes.inc(stats.writes)
        for t in self._triggers:
            self.metrics.programming_latency.observe(max(0.0, now - t))
        self._triggers = []
        if applied is not None:
            self._applied = applied
        if snapshot is not None and node is not None:
            self._served = (snapshot, node)
        self.health.updated()
        if self.service_health is not None and snapshot is not None:
            self.service_health.sync(*self._local_endpoints.health_checks(snapshot, node, self._applied, delta))
