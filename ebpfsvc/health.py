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
  - when this node is not eligible, as kube-proxy 1.28+ decides: its Node
    object is being deleted or is tainted ToBeDeletedByClusterAutoscaler
    (ProxierHealth.node_changed, fed with our own Node's events);
  - when the configuration leaves the node serving nothing it should: Services
    rejected and nothing served, or NodePort Services and no NodePort address
    (serving_problems). A load balancer should skip such a node, and its
    operator sees why in the body instead of a 200 over an empty data plane.
  - while a fault is set (set_fault): a configuration the node cannot serve, e.g. an --uplink
    that does not exist, which would otherwise only show as NodePorts that silently fail.

Losing the API server is NOT unhealthy by itself: the periodic resync keeps
completing with the last known state, exactly like kube-proxy, and failing
every node at once during an API outage would turn it into a data-plane
outage. The body says what the source is doing, for operators.

The body is kube-proxy's JSON: {"lastUpdated": ..., "currentTime": ...,
"nodeEligible": ...} (plus our "state", "reason", the API source's state and the
addresses not bound), content type application/json.

/livez: 200 while the agent's loops run (the sync runner thread is alive and
not stopping) and its updates are not stale, whatever the Node says: kube-proxy
(v1.37.2, proxy_health.go livezHandler) answers 503 on /livez exactly when its
proxier is unhealthy, i.e. an update waited longer than the timeout, so that
the kubelet restarts a proxy whose sync loop is stuck. Stale here is the same
"no sync within the timeout" as /healthz (above); while starting (no sync yet)
/livez stays 200, as kube-proxy's does before its first sync, so a slow first
sync (bcc compiling, 10,000 Services) is not killed by the startup probe. Losing
the API server does not make /livez fail (the resync keeps completing). Its body
has no nodeEligible, as kube-proxy's.

ServiceHealthServers: for every externalTrafficPolicy=Local Service with a
healthCheckNodePort, an HTTP server on that port answering 200 with the number
of local endpoints when there are any, else 503, so the cloud load balancer
only sends external traffic to nodes that have a local backend (kube-proxy's
service health server, same JSON body and X-Load-Balancing-Endpoint-Weight).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from ebpfsvc.k8s.node import Node
from ebpfsvc.lbmodel import LOCAL, backend_rows

log = logging.getLogger(__name__)

STARTING = "starting"
SYNCED = "synced"
STALE = "stale"
STOPPING = "stopping"
INELIGIBLE = "node-ineligible"      # kube-proxy's nodeEligible false
NOT_SERVING = "not-serving"         # the configuration leaves the node serving nothing it should
FAULT = "fault"


def parse_bind_address(value: str, default_port: int) -> tuple[str, int]:
    """"HOST:PORT", ":PORT" or "HOST" (kube-proxy's bind address forms) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        return value or "0.0.0.0", default_port
    return host or "0.0.0.0", int(port)


# ---- binding the agent's servers -------------------------------------------------------------------

#: kube-proxy's retry period for its healthz and metrics servers (server.go: wait.Until(..., 5*time.Second)).
BIND_RETRY_INTERVAL = 5.0


class BindError(RuntimeError):
    """A server's address cannot be bound and --bind-address-hard-fail says that is fatal.
    str() is the one line for the operator."""


def bind_problem(what: str, err: OSError) -> str:
    """`WHAT: address already in use (is kube-proxy still running?)`; WHAT names the flag and
    address (`--healthz-bind-address 0.0.0.0:10256`) or the Service and port."""
    reason = os.strerror(err.errno).lower() if err.errno else str(err)
    hint = {errno.EADDRINUSE: " (is kube-proxy still running?)",
            errno.EADDRNOTAVAIL: " (not an address of this node)"}.get(err.errno, "")
    return f"{what}: {reason}{hint}"


class Listener:
    """One of the agent's servers on its configured address (--healthz-bind-address,
    --metrics-bind-address): bound at start or, when the address is taken, retried in the
    background every BIND_RETRY_INTERVAL seconds.

    That is kube-proxy's own behaviour (it logs and retries both servers every 5 s unless
    --bind-address-hard-fail makes a failed bind fatal), and the one a migration needs: the
    DaemonSet keeps kube-proxy's ports 10256 and 10249, so that load balancers' health checks
    (which probe :10256/healthz) keep working once ebpfsvc has taken over. While kube-proxy still
    runs it holds those ports; an agent that died over them would crash-loop until kube-proxy is
    removed, and would not be programming Services meanwhile. Retrying, it programs the datapath
    at once and answers on the ports the moment kube-proxy lets go. The problem is logged once
    (one line), shown in the /healthz body while it lasts, and logged again when it is over.

    `serve(host, port)` starts the server and returns it (anything with .port and .close())."""

    def __init__(self, flag: str, address: str, default_port: int, serve: Callable[[str, int], Any], *,
                 hard_fail: bool = False, retry_interval: float | None = None):
        self.flag = flag
        self.address = address
        self.host, self._port = parse_bind_address(address, default_port)
        self._serve = serve
        self.retry_interval = BIND_RETRY_INTERVAL if retry_interval is None else retry_interval
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.server: Any = None
        self.error: str | None = None
        try:
            self.server = serve(self.host, self._port)
        except OSError as e:
            self.error = bind_problem(f"{flag} {address}", e)
            if hard_fail:
                raise BindError(f"{self.error}; stop what holds it, choose another address, or run without "
                                "--bind-address-hard-fail to retry in the background as kube-proxy does") from None
            log.warning("%s; retrying every %gs in the background, as kube-proxy does", self.error,
                        self.retry_interval)
            threading.Thread(target=self._retry, name=f"bind{flag}", daemon=True).start()

    @property
    def port(self) -> int | None:
        """The bound port (the real one when 0 was asked for); None while not bound."""
        server = self.server
        return server.port if server is not None else None

    def _retry(self) -> None:
        while not self._closed.wait(self.retry_interval):
            try:
                server = self._serve(self.host, self._port)
            except OSError as e:
                self.error = bind_problem(f"{self.flag} {self.address}", e)
                continue
            with self._lock:
                if self._closed.is_set():
                    server.close()
                    return
                self.server, self.error = server, None
            log.info("%s %s: bound now", self.flag, self.address)
            return

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            server, self.server = self.server, None
        if server is not None:
            server.close()


def _iso(ts: float | None) -> str:
    if ts is None:
        return "0001-01-01T00:00:00Z"     # Go's zero time.Time, as kube-proxy prints it
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class ProxierHealth:
    """The state behind /healthz: sync freshness, this node's eligibility, and what the
    configuration leaves served. Times are wall-clock seconds from `clock`.

    `serving`, when set, returns the reasons the node serves nothing it should (empty: none);
    it is asked only when everything else is healthy."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.time,
                 serving: Callable[[], list[str]] | None = None):
        self.timeout = timeout
        self.clock = clock
        self.serving = serving
        self._lock = threading.Lock()
        self.last_updated: float | None = None
        self.oldest_queued: float | None = None
        self.stopping = False
        # kube-proxy: eligible while starting and until a Node event says otherwise.
        self.ineligible = ""
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

    def node_changed(self, node: Node | None) -> None:
        """This node's own Node was added or changed (None: deleted); kube-proxy's SyncNode.
        Called by whatever watches the Node (the agent's ClusterState does, through on_node)."""
        reason = node_ineligible(node)
        with self._lock:
            changed, self.ineligible = reason != self.ineligible, reason
        if changed:
            log.log(logging.WARNING if reason else logging.INFO, "/healthz: node %s",
                    f"not eligible for load-balancer traffic: {reason}" if reason else "eligible again")

    def proxier_healthy(self) -> bool:
        """kube-proxy's IsHealthy: the data plane is kept in sync (and we are not stopping), whatever
        the Node says. What healthCheckNodePort servers report as serviceProxyHealthy."""
        with self._lock:
            now = self.clock()
            return self._sync_state(now, self.last_updated, self.oldest_queued, self.stopping)[0]

    def stale(self) -> str:
        """Why updates are stale ("" = they are not): what fails /livez, as kube-proxy's
        livezHandler fails on its proxier's health. Not while starting nor stopping (those have
        their own answers)."""
        with self._lock:
            now = self.clock()
            _, state, reason = self._sync_state(now, self.last_updated, self.oldest_queued, self.stopping)
        return reason if state == STALE else ""

    def _sync_state(self, now: float, last: float | None, queued: float | None, stopping: bool
                    ) -> tuple[bool, str, str]:
        if stopping:
            return False, STOPPING, "the agent is shutting down"
        if last is None:
            return False, STARTING, "no sync has completed yet"
        if now - last >= self.timeout:
            return False, STALE, f"no sync for {now - last:.1f}s" + (
                f", an update queued {now - queued:.1f}s ago is not programmed" if queued is not None else "")
        return True, SYNCED, ""

    def status(self) -> tuple[bool, str, str, dict]:
        """(healthy, state, reason, body)."""
        with self._lock:
            now = self.clock()
            last, queued, stopping, ineligible = self.last_updated, self.oldest_queued, self.stopping, self.ineligible
            faults = [self.faults[k] for k in sorted(self.faults)]
        healthy, state, reason = self._sync_state(now, last, queued, stopping)
        proxier_healthy = healthy
        # Stopping says it all; then what keeps the node from serving, most basic first.
        problems = [] if state == STOPPING or faults or ineligible or not healthy or self.serving is None \
            else self.serving()
        if state == STOPPING:
            healthy, state, reason = False, STOPPING, reason
        elif faults:
            healthy, state, reason = False, FAULT, "; ".join(faults)
        elif ineligible:
            healthy, state, reason = False, INELIGIBLE, ineligible
        elif problems:
            healthy, state, reason = False, NOT_SERVING, "; ".join(problems)
        # "healthy" as kube-proxy v1.37.2's body: the proxier's sync health alone (not the Node's).
        body = {"lastUpdated": _iso(last), "currentTime": _iso(now), "nodeEligible": not ineligible,
                "healthy": proxier_healthy, "state": state}
        if reason:
            body["reason"] = reason
        return healthy, state, reason, body


#: The taint the cluster autoscaler puts on a node it is about to delete (kube-proxy's ToBeDeletedTaint).
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def node_ineligible(node: Node | None) -> str:
    """Why this node should get no load-balancer traffic, from its v1 Node ("" = it should): it is
    being deleted or is tainted ToBeDeletedByClusterAutoscaler, as kube-proxy's SyncNode decides.
    A deleted Node (None) counts as being deleted: kube-proxy looks at the last state it had, which
    for a Node deleted without a grace period carries no deletionTimestamp, but a node whose object
    is gone is on its way out either way."""
    if node is None:
        return "its Node object is deleted"
    if node.deleting:
        return "its Node object is being deleted"
    if TO_BE_DELETED_TAINT in node.taints:
        return f"tainted {TO_BE_DELETED_TAINT} (the cluster autoscaler is removing it)"
    return ""


# ---- a configuration that leaves the node serving nothing it should ---------------------------------

def nodeport_services(services, node) -> int:
    """How many Services this node answers for (not skipped: ExternalName, headless, another
    proxy's) have a NodePort: each needs NodePort addresses on the node."""
    return sum(1 for svc in services if not svc.skip_reason(node) and any(p.node_port for p in svc.ports))


def serving_problems(*, frontends: int, rejected: list, nodeport_services: int, node_addresses) -> list[str]:
    """Why a synced node serves nothing it should: reasons that make /healthz fail, because a load
    balancer should not send traffic to such a node, and its operator should see it there.

    - Services were rejected and nothing at all is served: the node's configuration disagrees with
      the cluster (a wrong service CIDR or NodePort range rejects every Service), not one bad object;
    - Services have NodePorts but the node has no NodePort address: --nodeport-addresses (or
      --node-address) selects none of its addresses, and no NodePort, and no load balancer that
      sends to NodePorts, works here.

    `rejected`: the Services' validation problems (ebpfsvc.k8s.fields.Problem), first one named."""
    out = []
    if rejected and not frontends:
        out.append(f"nothing is served: {len(rejected)} Service(s) rejected, e.g. {rejected[0]}")
    if nodeport_services and not node_addresses:
        out.append(f"{nodeport_services} Service(s) have a NodePort but this node has no NodePort address "
                   "(--nodeport-addresses / --node-address select none of its addresses)")
    return out


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
            body.pop("nodeEligible", None)       # kube-proxy's /livez body has no nodeEligible
            stale = self.health.stale()
            code = 200 if self.alive() and not stale else 503
            if stale:    # say so even when /healthz has a more basic reason (a fault, the Node)
                body.update(state=STALE, reason=stale)
        else:
            code, body = 404, {"error": f"{path} not found; try /healthz or /livez"}
        # Counted before answering: whoever got the answer can already see it counted.
        if self.on_request is not None:
            self.on_request(path, code)
        reply(req, code, body)

    def close(self) -> None:
        self._server.close()


class ServiceHealthServers:
    """One HTTP server per healthCheckNodePort, answering by local endpoint count.

    A port that cannot be bound (another process holds it) costs that Service's health check
    only: one line naming the Service and the port, retried at every sync (a sync comes at least
    every --sync-period), logged again only if the problem changes and once when it is over."""

    def __init__(self, host: str = "0.0.0.0", proxy_healthy: Callable[[], bool] = lambda: True):
        self.host = host
        self.proxy_healthy = proxy_healthy
        self._lock = threading.Lock()
        self._servers: dict[tuple[str, str], tuple[int, _Server]] = {}
        self._endpoints: dict[tuple[str, str], int] = {}
        self._failed: dict[tuple[str, str], tuple[int, str]] = {}     # Service -> (port, problem)

    def sync(self, ports: dict[tuple[str, str], int], local_endpoints: dict[tuple[str, str], int]) -> None:
        """ports: (namespace, name) -> healthCheckNodePort; local_endpoints: (namespace, name) -> count."""
        with self._lock:
            self._endpoints = dict(local_endpoints)
            for svc, (port, server) in list(self._servers.items()):
                if ports.get(svc) != port:
                    server.close()
                    del self._servers[svc]
            for svc in [s for s, (port, _) in self._failed.items() if ports.get(s) != port]:
                del self._failed[svc]
            for svc, port in sorted(ports.items()):
                if svc in self._servers:
                    continue
                try:
                    server = _Server(self.host, port, lambda req, svc=svc: self._handle(req, svc),
                                     f"healthcheck:{svc[0]}/{svc[1]}:{port}")
                except OSError as e:
                    problem = bind_problem(f"healthCheckNodePort {port} of Service {svc[0]}/{svc[1]}", e)
                    if self._failed.get(svc) != (port, problem):
                        log.warning("%s; its load balancer health check fails on this node, retried at every "
                                    "sync", problem)
                    self._failed[svc] = (port, problem)
                    continue
                if self._failed.pop(svc, None) is not None:
                    log.info("healthCheckNodePort %d of Service %s/%s: serving now", port, *svc)
                self._servers[svc] = (port, server)

    @property
    def problems(self) -> dict[str, str]:
        """"namespace/name" -> why its healthCheckNodePort is not served."""
        with self._lock:
            return {f"{ns}/{name}": problem for (ns, name), (_, problem) in sorted(self._failed.items())}

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


def served_health_check_ports(ports: dict[tuple[str, str], int], services, node) -> dict[tuple[str, str], int]:
    """The healthCheckNodePorts this node opens: those of Services it serves (kube-proxy v1.37.2 never
    sees another proxy's service-proxy-name, a headless or an ExternalName Service, so it opens no
    port for them: a port opened here would answer a load balancer for a Service this node does not
    balance). `services`: (namespace, name) -> Service, the snapshot the last sync used; a Service
    not in it (rejected, or not arrived yet) gets no port until it is."""
    return {key: port for key, port in ports.items()
            if (svc := services.get(key)) is not None and not svc.skip_reason(node)}


def local_endpoint_counts(state, services=None) -> dict[tuple[str, str], int]:
    """(namespace, name) -> distinct node-local, non-terminating backend addresses over all the
    Service's frontends in an LBState: the endpoints a healthCheckNodePort probe counts.  Only of
    `services` when given (those with a healthCheckNodePort: no other count is asked for), so a
    sync of a cluster without any costs nothing here, however many backends it has."""
    if services is not None and not services:
        return {}
    seen: dict[tuple[str, str], set] = {}
    for fe in state.frontends.values():
        key = (fe.service.namespace, fe.service.name)
        if services is not None and key not in services:
            continue
        seen.setdefault(key, set()).update(_local_addresses(fe))
    return {k: len(v) for k, v in seen.items()}


def _local_addresses(fe) -> Iterator:
    rows = backend_rows(fe.backends)
    # LOCAL alone: on this node, neither terminating nor not ready.
    return (a for a, f in zip(rows.addresses, rows.flags) if f == LOCAL)


class LocalEndpointCounts:
    """local_endpoint_counts(state, services) after every sync, without walking every frontend of
    the state each time: the frontend keys of the Services asked for, kept from one applied state
    to the next by its delta (desired.LBDelta, when its base is the state counted last, as
    MapWriter.apply takes it), so a sync costs its changed frontends and the asked Services' own.
    Walking them all cost 9.6 ms a sync at 10,000 Services as soon as one had a
    healthCheckNodePort, against an endpoint change of 0.3 ms.  Any other state (the first, one
    after a sync that asked nothing) or a Service not asked before is indexed anew: one walk.
    A Service's count is kept until one of its frontends changes, and the ports served until the
    snapshot's Services (or the node) do: an endpoint change elsewhere recounts nothing."""

    def __init__(self) -> None:
        self._state = None
        self._asked: frozenset = frozenset()            # the Services _keys follows
        self._keys: dict[tuple[str, str], set] = {}     # such a Service -> its frontends' keys in _state
        self._counts: dict[tuple[str, str], int] = {}   # counted in _state, until a frontend of it changes
        self._served: tuple = (None, None, {})          # (Services view, node, the ports served) last asked

    def health_checks(self, snapshot, node, applied, delta=None) -> tuple[dict, dict]:
        """What a sync hands the healthCheckNodePort servers: the ports this node opens (of the
        Services it serves, when `node` is known) and their Services' local endpoints in `applied`,
        the LBState in the maps (None: nothing applied yet)."""
        services, known_node, ports = self._served
        if snapshot.services is not services or node is not known_node:
            # (The same Services, the same ports: a snapshot reuses its view until a Service changes.)
            ports = snapshot.health_check_node_ports()
            if node is not None:
                ports = served_health_check_ports(ports, snapshot.services, node)
            self._served = (snapshot.services, node, ports)
        return dict(ports), self.counts(applied, ports, delta) if applied is not None else {}

    def counts(self, state, services, delta=None) -> dict[tuple[str, str], int]:
        """local_endpoint_counts(state, services); `delta`: how `state` differs from an earlier one."""
        if not services:
            return {}
        if not self._asked.issuperset(services):
            self._state, self._asked = None, frozenset(services)
        if state is not self._state:
            if self._state is not None and getattr(delta, "base", None) is self._state:
                before, after = self._state.frontends, state.frontends
                for key in delta.keys:
                    self._move(key, before.get(key), after.get(key))
            else:
                self._keys, self._counts = {}, {}
                for key, fe in state.frontends.items():
                    self._move(key, None, fe)
            self._state = state
        frontends, counts = state.frontends, self._counts
        out = {}
        for svc in services:
            keys = self._keys.get(svc)
            if keys:
                count = counts.get(svc)
                if count is None:
                    count = counts[svc] = len(set().union(*(_local_addresses(frontends[k]) for k in keys)))
                out[svc] = count
        return out

    def _move(self, key, old, new) -> None:
        if old is not None:
            svc = (old.service.namespace, old.service.name)
            self._counts.pop(svc, None)
            keys = self._keys.get(svc)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._keys[svc]
        if new is not None and (svc := (new.service.namespace, new.service.name)) in self._asked:
            self._counts.pop(svc, None)
            self._keys.setdefault(svc, set()).add(key)
