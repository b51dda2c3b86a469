"""Prometheus metrics of the node agent: the ones it observes as it works (Metrics), and the names
of every metric it exports (collectors.py reads the rest at scrape time; telemetry.py serves them).

Everything is in one CollectorRegistry of our own (no process-global state, so
tests and several agents in one process do not mix). Two kinds of metrics:

- read at scrape time from the live pinned maps (DatapathCollector): traffic per
  service port, frontend and backend, drops by reason, map fill levels (the
  kernel's entry count against max_entries), and drift between the last state
  the agent applied and what the maps hold. Counters are the datapath's per-CPU
  counters summed, so they are exactly the packets and bytes translated;
- observed by the agent as it works (Metrics): kube-proxy's metrics, with its
  names, buckets and meaning, so kube-proxy's dashboards and alerts keep
  working; our own (ebpfsvc_*) where kube-proxy has nothing of the kind: map
  writes, failed syncs, the API source's watch statistics (read at scrape time
  from KubeSource.stats), invalid objects; and the process (prometheus_client's
  process, platform and GC collectors, as kube-proxy exports Go's).

Metric names:

  kubeproxy_sync_proxy_rules_duration_seconds            histogram: one sync
  kubeproxy_network_programming_duration_seconds         histogram: change -> maps serving it
  kubeproxy_sync_proxy_rules_last_timestamp_seconds      gauge: last completed sync
  kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge: last change asking for a sync
  kubeproxy_sync_proxy_rules_{service,endpoint}_changes_total   counter: objects received
  kubeproxy_sync_proxy_rules_{service,endpoint}_changes_pending gauge: net changes not yet synced
  kubeproxy_proxy_healthz_total / kubeproxy_proxy_livez_total {code}
  process_* , python_gc_*, python_info
  ebpfsvc_sync_proxy_rules_map_writes_total             counter
  ebpfsvc_sync_proxy_rules_failures_total               counter
  ebpfsvc_service_packets_total / _bytes_total          {service_port}
  ebpfsvc_frontend_packets_total / _bytes_total         {service_port, frontend, scope, kind}
  ebpfsvc_backend_packets_total / _bytes_total          {backend}
  ebpfsvc_service_socket_connects_total                 {service_port}: the socket path's translations
  ebpfsvc_frontend_socket_connects_total                {service_port, frontend, scope, kind}
  ebpfsvc_drops_total                                   {reason}
  ebpfsvc_socket_resets_total                           {protocol}: socket-path sockets to removed backends
  ebpfsvc_map_entries / ebpfsvc_map_max_entries         {map}
  ebpfsvc_drift_frontends                               gauge (0 = maps equal the applied state)
  ebpfsvc_watch_{lists,relists,restarts,errors,events}_total {kind}
  ebpfsvc_invalid_objects_total / ebpfsvc_invalid_objects
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector
from prometheus_client import ProcessCollector

# kube-proxy's buckets: sync durations exponential from 1 ms; programming latency 0.25 s .. 5 min.
SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
PROGRAMMING_BUCKETS = (0.25, 0.5) + tuple(range(1, 60)) + tuple(range(60, 120, 5)) + tuple(range(120, 330, 30))


class Metrics:
    """What the agent observes as it works (kube-proxy's pkg/proxy/metrics where the meaning is the same)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                                       "SyncProxyRules latency in seconds: desired state computed and the map "
                                       "difference written.", buckets=SYNC_BUCKETS, registry=r)
        self.programming_latency = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds: from a Service/EndpointSlice change (its "
            "last-change-trigger-time annotation, else when the agent received it) to the maps serving it.",
            buckets=PROGRAMMING_BUCKETS, registry=r)
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced.", registry=r)
        self.last_queued = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued.", registry=r)
        self.service_changes = Counter("kubeproxy_sync_proxy_rules_service_changes",
                                       "Cumulative proxy rules Service changes (Services received).", registry=r)
        self.endpoint_changes = Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                        "Cumulative proxy rules Endpoint changes (EndpointSlices and Endpoints "
                                        "received).", registry=r)
        self.map_writes = Counter("ebpfsvc_sync_proxy_rules_map_writes",
                                  "Map entries written or deleted by syncs.", registry=r)
        self.socket_resets_total = Counter(
            "ebpfsvc_socket_resets", "Sockets the socket path (--socket-lb) had sent to a backend that left its "
            "Service, destroyed by the agent (SOCK_DESTROY), as the TC path resets such flows.", ["protocol"],
            registry=r)
        self.healthz = Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status.", ["code"],
                               registry=r)
        self.livez = Counter("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status.", ["code"], registry=r)
        # The process, as kube-proxy exports its Go runtime's: CPU, memory, fds, start time; GC; version.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def changed(self, kind: str, count: int = 1) -> None:
        """`count` Service, EndpointSlice or Endpoints objects were received (kube-proxy counts every
        update its change trackers see, a re-list's included: ClusterState tells a re-list's at once)."""
        if kind == "Service":
            self.service_changes.inc(count)
        elif kind in ("EndpointSlice", "Endpoints"):
            self.endpoint_changes.inc(count)

    def socket_resets(self, destroyed: dict[str, int]) -> None:
        """Sockets reset per protocol ("TCP", "UDP") by one pass of socklb.reset_removed."""
        for protocol, n in destroyed.items():
            if n:
                self.socket_resets_total.labels(protocol).inc(n)

    def on_probe(self, path: str, code: int) -> None:
        if path == "/healthz":
            self.healthz.labels(str(code)).inc()
        elif path == "/livez":
            self.livez.labels(str(code)).inc()
