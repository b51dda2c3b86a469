"""Health endpoints with kube-proxy's meaning.

/healthz (--healthz-bind-address, default 0.0.0.0:10256): is this node's data
plane being kept in sync? Load balancers for externalTrafficPolicy=Cluster
Services probe it to decide whether to send traffic to the node, so it turns
503 (kube-proxy's ProxierHealthServer rules, plus two of our own):

  - before the first successful sync (nothing programmed from the API yet);
  - when no sync completed for longer than the timeout (2 x --sync-period,
    kube-proxy's factor). kube-proxy only fails when a QUEUED update waits
    that long; since our runner completes a sync at least every sync period
    even without changes, "no sync within the timeout" covers that case (a
    queued update cannot wait longer than the last sync is old) and also
    catches a silent stall with nothing queued, which kube-proxy would call
    healthy forever;
  - once the agent is stopping, so load balancers drain the node first;
  - while a fault is set (set_fault): a configuration the node cannot serve, e.g. an --uplink
    that does not exist, which would otherwise only show as NodePorts that silently fail.

Losing the API server is NOT unhealthy by itself: the periodic resync keeps
completing with the last known state, exactly like kube-proxy, and failing
every node at once during an API outage would turn it into a data-plane
outage. The body says what the source is doing, for operators.

The body is kube-proxy's JSON: {"lastUpdated": ..., "currentTime": ...} (plus
our "state" and "reason"), content type application/json.

/livez: 200 while the agent's loops run (the sync runner thread is alive and
not stopping), regardless of sync freshness: restarting a process whose
loops are fine but whose API is slow would not help.

ServiceHealthServers: for every externalTrafficPolicy=Local Service with a
healthCheckNodePort, an HTTP server on that port answering 200 with the number
of local endpoints when there are any, else 503, so the cloud load balancer
only sends external traffic to nodes that have a local backend (kube-proxy's
service health server, same JSON body and X-Load-Balancing-Endpoint-Weight).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger(__name__)

STARTING = "starting"
SYNCED = "synced"
STALE = "stale"
STOPPING = "stopping"
FAULT = "fault"


def parse_bind_address(value: str, default_port: int) -> tuple[str, int]:
    """"HOST:PORT", ":PORT" or "HOST" (kube-proxy's bind address forms) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        return value or "0.0.0.0", default_port
    return host or "0.0.0.0", int(port)


def _iso(ts: float | None) -> str:
    if ts is None:
        return "0001-01-01T00:00:00Z"     # Go's zero time.Time, as kube-proxy prints it
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class ProxierHealth:
    """The sync-freshness state behind /healthz. Times are wall-clock seconds from `clock`."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.time):
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self.last_updated: float | None = None
        self.oldest_queued: float | None = None
        self.stopping = False
        self.faults: dict[str, str] = {}      # name -> reason: what keeps the node from serving

    def set_fault(self, name: str, reason: str | None) -> None:
        """Set (reason) or clear (None) a fault; any fault makes /healthz 503 with its reason."""
        with self._lock:
            if reason:
                self.faults[name] = reason
            else:
                self.faults.pop(name, None)

    def queued(self) -> None:
        """A change was seen and a sync requested (kube-proxy's QueuedUpdate)."""
        with self._lock:
            if self.oldest_queued is None:
                self.oldest_queued = self.clock()

    def updated(self) -> None:
        """A sync completed: the maps hold everything queued before it began (kube-proxy's Updated)."""
        with self._lock:
            self.last_updated = self.clock()
            self.oldest_queued = None

    def set_stopping(self) -> None:
        with self._lock:
            self.stopping = True

    def status(self) -> tuple[bool, str, str, dict]:
        """(healthy, state, reason, body)."""
        with self._lock:
            now = self.clock()
            last, queued, stopping = self.last_updated, self.oldest_queued, self.stopping
            faults = [self.faults[k] for k in sorted(self.faults)]
        if stopping:
            healthy, state, reason = False, STOPPING, "the agent is shutting down"
        elif faults:
            healthy, state, reason = False, FAULT, "; ".join(faults)
        elif last is None:
            healthy, state, reason = False, STARTING, "no sync has completed yet"
        elif now - last >= self.timeout:
            healthy, state, reason = False, STALE, f"no sync for {now - last:.1f}s" + (
                f", an update queued {now - queued:.1f}s ago is not programmed" if queued is not None else "")
        else:
            healthy, state, reason = True, SYNCED, ""
        body = {"lastUpdated": _iso(last), "currentTime": _iso(now), "state": state}
        if reason:
            body["reason"] = reason
        return healthy, state, reason, body


class _Server:
    """A ThreadingHTTPServer on its own daemon thread; port 0 picks a free port (see .port)."""

    def __init__(self, host: str, port: int, handler: Callable[[BaseHTTPRequestHandler], None], name: str):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                try:
                    handler(self)
                except Exception:      # never kill the server thread over one request
                    log.exception("%s: request %s failed", outer.name, self.path)
                    self.send_error(500)

            def log_message(self, fmt, *args):   # quiet: probes arrive every few seconds
                log.debug("%s: " + fmt, outer.name, *args)

        self.name = name
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=name, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def reply(req: BaseHTTPRequestHandler, code: int, body, content_type: str = "application/json",
          headers: dict | None = None) -> None:
    data = body if isinstance(body, bytes) else (json.dumps(body) if not isinstance(body, str) else body).encode()
    req.send_response(code)
    req.send_header("Content-Type", content_type)
    req.send_header("X-Content-Type-Options", "nosniff")
    for k, v in (headers or {}).items():
        req.send_header(k, str(v))
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


class HealthServer:
    """/healthz and /livez on one address.

    `alive` says whether the agent's loops run; `details` adds operator information
    (source state) to the /healthz body; `on_request(path, code)` counts probes."""

    def __init__(self, health: ProxierHealth, alive: Callable[[], bool], host: str = "0.0.0.0", port: int = 10256,
                 details: Callable[[], dict] | None = None,
                 on_request: Callable[[str, int], None] | None = None):
        self.health = health
        self.alive = alive
        self.details = details
        self.on_request = on_request
        self._server = _Server(host, port, self._handle, "healthz")
        self.port = self._server.port

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/healthz":
            healthy, _, _, body = self.health.status()
            if self.details is not None:
                try:
                    body.update(self.details())
                except Exception:
                    log.exception("healthz details failed")
            code = 200 if healthy else 503
        elif path == "/livez":
            _, _, _, body = self.health.status()
            code = 200 if self.alive() else 503
        else:
            code, body = 404, {"error": f"{path} not found; try /healthz or /livez"}
        # Counted before answering: whoever got the answer can already see it counted.
        if self.on_request is not None:
            self.on_request(path, code)
        reply(req, code, body)

    def close(self) -> None:
        self._server.close()


class ServiceHealthServers:
    """One HTTP server per healthCheckNodePort, answering by local endpoint count."""

    def __init__(self, host: str = "0.0.0.0", proxy_healthy: Callable[[], bool] = lambda: True):
        self.host = host
        self.proxy_healthy = proxy_healthy
        self._lock = threading.Lock()
        self._servers: dict[tuple[str, str], tuple[int, _Server]] = {}
        self._endpoints: dict[tuple[str, str], int] = {}

    def sync(self, ports: dict[tuple[str, str], int], local_endpoints: dict[tuple[str, str], int]) -> None:
        """ports: (namespace, name) -> healthCheckNodePort; local_endpoints: (namespace, name) -> count."""
        with self._lock:
            self._endpoints = dict(local_endpoints)
            for svc, (port, server) in list(self._servers.items()):
                if ports.get(svc) != port:
                    server.close()
                    del self._servers[svc]
            for svc, port in sorted(ports.items()):
                if svc in self._servers:
                    continue
                try:
                    server = _Server(self.host, port, lambda req, svc=svc: self._handle(req, svc),
                                     f"healthcheck:{svc[0]}/{svc[1]}:{port}")
                except OSError as e:      # port taken: log and retry at the next sync
                    log.warning("cannot serve healthCheckNodePort %d of %s/%s: %s", port, *svc, e)
                    continue
                self._servers[svc] = (port, server)

    def _handle(self, req: BaseHTTPRequestHandler, svc: tuple[str, str]) -> None:
        with self._lock:
            count = self._endpoints.get(svc, 0)
        healthy = self.proxy_healthy()
        body = {"service": {"namespace": svc[0], "name": svc[1]}, "localEndpoints": count,
                "serviceProxyHealthy": healthy}
        reply(req, 200 if count > 0 and healthy else 503, body,
              headers={"X-Load-Balancing-Endpoint-Weight": count})

    @property
    def ports(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return {svc: p for svc, (p, _) in self._servers.items()}

    def close(self) -> None:
        with self._lock:
            for _, server in self._servers.values():
                server.close()
            self._servers.clear()


def local_endpoint_counts(state) -> dict[tuple[str, str], int]:
    """(namespace, name) -> distinct node-local, non-terminating backend addresses over all the
    Service's frontends in an LBState: the endpoints a healthCheckNodePort probe counts."""
    seen: dict[tuple[str, str], set] = {}
    for fe in state.frontends.values():
        key = (fe.service.namespace, fe.service.name)
        addrs = seen.setdefault(key, set())
        addrs.update(b.address for b in fe.backends if b.local and not b.terminating and not b.not_ready)
    return {k: len(v) for k, v in seen.items()}
