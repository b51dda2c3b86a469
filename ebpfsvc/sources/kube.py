"""The Kubernetes API source: one reflector per kind, with client-go informer semantics.

Each reflector lists its kind (paginated), hands the whole set to the sink, then
watches from the list's resourceVersion so no change between the list and the
watch is lost.  The recovery rules (docs/sources.md has the full matrix):

- the server ends a watch normally      -> watch again from the last resourceVersion
- BOOKMARK                              -> only remember its resourceVersion
- 410 Gone (ERROR event or HTTP 410)    -> our resourceVersion is compacted: re-list
- any other ERROR / HTTP error          -> back off, re-list
- 404 on the list of an optional kind   -> the API does not serve it (ServiceCIDR before
  (OPTIONAL_KINDS)                         Kubernetes 1.33): an empty, synced set; asked again
                                           every ABSENT_RETRY_SECONDS, in case of an upgrade
- API unreachable, broken or silent     -> back off, watch again from the same
  stream (client read timeout)             resourceVersion (a 410 will say if too old)

On failure nothing is delivered: the data plane keeps what it has.  In particular
an error is never turned into an empty re-list, which would withdraw every service.

It uses the `kubernetes` client's own request path (generated list_* methods with
`_preload_content=False`) and parses the JSON itself, because the sink wants the
API's camelCase dicts, not the client's snake_case model objects.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterator

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from .backoff import Backoff
from .base import Event, EventType, Sink

log = logging.getLogger(__name__)

# kind -> (apiVersion, API class, list method covering all namespaces)
_RESOURCES: dict[str, tuple[str, type, str]] = {
    "Service": ("v1", k8s_client.CoreV1Api, "list_service_for_all_namespaces"),
    "Endpoints": ("v1", k8s_client.CoreV1Api, "list_endpoints_for_all_namespaces"),
    "Node": ("v1", k8s_client.CoreV1Api, "list_node"),
    "EndpointSlice": ("discovery.k8s.io/v1", k8s_client.DiscoveryV1Api,
                      "list_endpoint_slice_for_all_namespaces"),
    "ServiceCIDR": ("networking.k8s.io/v1", k8s_client.NetworkingV1Api, "list_service_cidr"),
}

# What a node agent watches, as kube-proxy does: Services, EndpointSlices (v1 Endpoints that an
# owner writes by hand reach it as EndpointSlices, through the EndpointSlice mirroring
# controller), its own Node (KubeSource(node_name=...)), and the cluster's ServiceCIDRs.
AGENT_KINDS = ("Service", "EndpointSlice", "Node", "ServiceCIDR")

# Kinds an API server may not serve at all (404): ServiceCIDR is GA from Kubernetes 1.33.
OPTIONAL_KINDS = frozenset({"ServiceCIDR"})
ABSENT_RETRY_SECONDS = 300.0

# A watch that ends normally this quickly without a single event is treated as a
# failure (client-go's "very short watch"), so a misbehaving server cannot put us
# in a tight reconnect loop.
_SHORT_WATCH_SECONDS = 1.0

_NETWORK_ERRORS = (urllib3.exceptions.HTTPError, OSError)


class _Failure(Exception):
    """One list or watch attempt failed; `relist` says whether our state is suspect."""

    def __init__(self, message: str, *, relist: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.relist = relist
        self.status = status        # the HTTP status, when the server answered with one


class _ContinueExpired(_Failure):
    """HTTP 410 on a list page: the snapshot behind our continue token was compacted."""


class _Stopping(Exception):
    """stop() was called: unwind without recording an error."""


def load_api_client(kubeconfig: str | None, in_cluster: bool | None) -> k8s_client.ApiClient:
    # A private Configuration, so two sources (or a test) never share global client state.
    configuration = k8s_client.Configuration()
    if in_cluster is None:
        in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
    if in_cluster:
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return k8s_client.ApiClient(configuration)


def _resource_version(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


class _Reflector:
    """List-then-watch loop for one kind, run on its own daemon thread."""

    def __init__(self, kind: str, source: "KubeSource") -> None:
        api_version, api_class, method = _RESOURCES[kind]
        self.kind, self.api_version = kind, api_version
        list_call = getattr(api_class(source._api_client), method)
        selector = source._field_selectors.get(kind)
        if selector:
            list_call = functools.partial(list_call, field_selector=selector)
        self._list_call: Callable[..., Any] = list_call
        self._source = source
        self._sink = source._sink
        self._stopping = source._stopping
        self._backoff = Backoff(source._backoff_initial, source._backoff_max)
        self._resource_version: str | None = None
        self._synced = False
        self._response_lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self.thread = threading.Thread(target=self._run, name=f"reflector:{kind}", daemon=True)

    # ---- the state machine ------------------------------------------------------------------

    def _run(self) -> None:
        need_list = True
        watched_since_list = False
        while not self._stopping.is_set():
            try:
                if need_list:
                    self._list()
                    need_list, watched_since_list = False, False
                if watched_since_list:
                    self._source._count(self.kind, "restarts")
                watched_since_list = True
                self._watch()
            except _Stopping:
                break
            except Exception as error:
                if self._stopping.is_set():
                    break
                if not isinstance(error, _Failure):
                    # A malformed response we did not foresee must not kill the thread
                    # (the kind would silently freeze); trust nothing and re-list.
                    log.exception("%s reflector: unexpected error", self.kind)
                    error = _Failure(f"unexpected {error!r}", relist=True)
                if need_list and error.status == 404 and self.kind in OPTIONAL_KINDS:
                    if not self._absent():
                        break
                    continue
                need_list = need_list or error.relist
                delay = self._backoff.next_delay()
                self._source._record_error(self.kind, str(error))
                log.warning("%s reflector: %s; %s in %.2fs", self.kind, error,
                            "re-list" if need_list else "watch again", delay)
                self._stopping.wait(delay)
        log.debug("%s reflector stopped", self.kind)

    def _absent(self) -> bool:
        """The API server does not serve this optional kind: deliver it as an empty, synced set
        (the sink then does without it) and ask again later. False when stopping."""
        if not self._source._absent(self.kind):
            log.info("%s: not served by this API server (404); asking again every %.0fs",
                     self.kind, ABSENT_RETRY_SECONDS)
        try:
            self._deliver(self._sink.on_relist, self.kind, [])
            if not self._synced:
                self._deliver(self._sink.on_synced, self.kind)
                self._synced = True
        except _Stopping:
            return False
        except _Failure:
            pass                        # the sink failed: it is told again at the next attempt
        self._stopping.wait(ABSENT_RETRY_SECONDS)
        return not self._stopping.is_set()

    # ---- list ---------------------------------------------------------------------------------

    def _list(self) -> None:
        page_size = self._source._list_page_size
        try:
            objects, resource_version = self._list_pages(page_size)
        except _ContinueExpired:
            # The snapshot behind our continue token was compacted mid-list. A consistent
            # list needs a restart; unpaginated, so it cannot expire again (client-go's pager).
            log.info("%s: continue token expired mid-list; listing again without pagination", self.kind)
            objects, resource_version = self._list_pages(None)
        self._deliver(self._sink.on_relist, self.kind, objects)
        first = not self._synced
        if first:
            self._deliver(self._sink.on_synced, self.kind)
            self._synced = True
        self._resource_version = resource_version
        self._backoff.reset()
        self._source._list_done(self.kind, resource_version, relist=not first)

    def _list_pages(self, page_size: int | None) -> tuple[list[dict[str, Any]], str]:
        objects: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            body = self._request_list(page_size, token)
            for obj in body.get("items") or []:
                # List items come without kind/apiVersion; the sink wants whole objects.
                obj.setdefault("kind", self.kind)
                obj.setdefault("apiVersion", self.api_version)
                objects.append(obj)
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                resource_version = meta.get("resourceVersion")
                if not resource_version:
                    raise _Failure("list response without metadata.resourceVersion", relist=True)
                return objects, resource_version

    def _request_list(self, page_size: int | None, token: str | None) -> dict[str, Any]:
        if self._stopping.is_set():
            raise _Stopping()
        try:
            response = self._list_call(limit=page_size, _continue=token, _preload_content=False,
                                       _request_timeout=self._source._request_timeout)
        except ApiException as e:
            failure = _ContinueExpired if token and e.status == 410 else _Failure
            raise failure(f"list: HTTP {e.status} {e.reason}", relist=True, status=e.status) from e
        except _NETWORK_ERRORS as e:
            raise _Failure(f"list: API unreachable: {e}", relist=True) from e
        with self._holding(response) as finish:
            try:
                body = json.loads(response.data)
            except _NETWORK_ERRORS as e:
                raise _Failure(f"list: connection lost while reading: {e}", relist=True) from e
            except ValueError as e:
                raise _Failure(f"list: response is not JSON: {e}", relist=True) from e
            finish()
        if not isinstance(body, dict):
            raise _Failure("list: response is not a JSON object", relist=True)
        return body

    # ---- watch --------------------------------------------------------------------------------

    def _watch(self) -> None:
        """One watch stream. Returns when the server ends it normally; raises _Failure otherwise."""
        if self._stopping.is_set():
            raise _Stopping()
        source = self._source
        source._count(self.kind, "watches")
        started, received = time.monotonic(), 0
        try:
            response = self._list_call(
                watch=True, resource_version=self._resource_version, allow_watch_bookmarks=True,
                timeout_seconds=source._watch_timeout_seconds, _preload_content=False,
                _request_timeout=source._request_timeout)
        except ApiException as e:
            if e.status == 410:
                raise _Failure(f"watch: HTTP 410 {e.reason}: resourceVersion "
                               f"{self._resource_version} is gone", relist=True) from e
            raise _Failure(f"watch: HTTP {e.status} {e.reason}", relist=True) from e
        except _NETWORK_ERRORS as e:
            raise _Failure(f"watch: API unreachable: {e}", relist=False) from e
        with self._holding(response) as finish:
            try:
                for line in iter_resp_lines(response):
                    if not line:
                        continue
                    self._handle(line)
                    received += 1
            except urllib3.exceptions.ReadTimeoutError as e:
                raise _Failure(f"watch: no data for {source._request_timeout[1]}s (silent "
                               f"connection)", relist=False) from e
            except _NETWORK_ERRORS as e:
                raise _Failure(f"watch: stream broken: {e}", relist=False) from e
            finish()
        if received == 0 and time.monotonic() - started < _SHORT_WATCH_SECONDS:
            raise _Failure("watch: ended at once without events (very short watch)", relist=False)
        # The server closed a healthy stream (timeoutSeconds): the API works.
        self._backoff.reset()

    def _handle(self, line: str) -> None:
        try:
            event = json.loads(line)
            event_type, obj = event["type"], event["object"]
        except (ValueError, KeyError, TypeError) as e:
            raise _Failure(f"watch: undecodable event {line[:200]!r}", relist=True) from e
        if not isinstance(obj, dict):
            raise _Failure(f"watch: event without an object {line[:200]!r}", relist=True)
        if event_type in ("ADDED", "MODIFIED", "DELETED"):
            obj.setdefault("kind", self.kind)
            obj.setdefault("apiVersion", self.api_version)
            self._deliver(self._sink.on_event, Event(self.kind, EventType(event_type), obj))
            self._advance(obj, "events")
        elif event_type == "BOOKMARK":
            # Nothing changed; the server only tells us a newer point to resume from.
            self._advance(obj, "bookmarks")
        elif event_type == "ERROR":
            code = obj.get("code")
            message = f"watch: ERROR event {code} {obj.get('reason')}: {obj.get('message')}"
            # 410: our resourceVersion was compacted away; anything else: state is suspect.
            raise _Failure(message, relist=True)
        else:
            raise _Failure(f"watch: unknown event type {event_type!r}", relist=True)

    def _advance(self, obj: dict[str, Any], counter: str) -> None:
        resource_version = _resource_version(obj)
        if resource_version:
            self._resource_version = resource_version
        self._backoff.reset()   # the stream delivers: the API is healthy
        self._source._count(self.kind, counter, resource_version=self._resource_version)

    # ---- plumbing -----------------------------------------------------------------------------

    def _deliver(self, method: Callable[..., None], *args: Any) -> None:
        if self._stopping.is_set():
            raise _Stopping()
        try:
            method(*args)
        except Exception as e:
            # The sink may now hold a partial view; a re-list hands it the whole truth.
            log.exception("%s: sink %s failed", self.kind, getattr(method, "__name__", method))
            raise _Failure(f"sink {getattr(method, '__name__', method)} failed: {e!r}", relist=True) from e

    @contextlib.contextmanager
    def _holding(self, response: Any) -> Iterator[Callable[[], None]]:
        """Make `response` abortable by stop(); close it on the way out.

        The caller calls the yielded `finish()` once it read the body to its end:
        only then can the connection go back to the pool for reuse."""
        done = []
        with self._response_lock:
            self._response = response
        if self._stopping.is_set():
            self.abort()
        try:
            yield lambda: done.append(True)
        finally:
            with self._response_lock:
                self._response = None
            if not done:
                response.close()       # half-read or aborted: never reuse this connection
            response.release_conn()

    def abort(self) -> None:
        """Wake a thread blocked reading the current response (called by stop())."""
        with self._response_lock:
            response = self._response
        connection = getattr(response, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                # shutdown() (unlike close()) wakes a recv() blocked in another thread.
                sock.shutdown(socket.SHUT_RDWR)


class KubeSource:
    """Delivers Services, EndpointSlices, Nodes and ServiceCIDRs (any of _RESOURCES) from the API
    server to a sink."""

    def __init__(self, sink: Sink, *, kubeconfig: str | None = None, in_cluster: bool | None = None,
                 api_client: k8s_client.ApiClient | None = None, kinds: tuple[str, ...] = AGENT_KINDS,
                 node_name: str | None = None,
                 request_timeout: tuple[float, float] | float = (5, 60), watch_timeout_seconds: int = 300,
                 backoff_initial: float = 0.2, backoff_max: float = 30.0,
                 list_page_size: int = 500) -> None:
        """request_timeout is (connect, read) seconds for every request, or one number for
        both. The read timeout is how long a watch may stay silent before we call the
        connection dead and watch again; keep it above the server's bookmark interval
        (about a minute). node_name: watch only that Node (a field selector, as kube-proxy does)
        rather than every Node of the cluster."""
        unknown = set(kinds) - set(_RESOURCES)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {sorted(_RESOURCES)}")
        Backoff(backoff_initial, backoff_max)   # validate early, not in a thread
        self._sink = sink
        self._own_client = api_client is None
        self._api_client = api_client if api_client is not None else load_api_client(kubeconfig, in_cluster)
        if isinstance(request_timeout, (int, float)):
            request_timeout = (request_timeout, request_timeout)
        self._request_timeout = tuple(request_timeout)
        self._watch_timeout_seconds = int(watch_timeout_seconds)
        self._backoff_initial, self._backoff_max = backoff_initial, backoff_max
        self._list_page_size = list_page_size
        self._field_selectors = {"Node": f"metadata.name={node_name}"} if node_name else {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._started = self._stopped = False
        self._stats = {kind: {"lists": 0, "relists": 0, "watches": 0, "restarts": 0, "events": 0,
                              "bookmarks": 0, "errors": 0, "last_error": None,
                              "resource_version": None, "synced": False, "absent": False} for kind in kinds}
        self._reflectors = [_Reflector(kind, self) for kind in kinds]

    def start(self) -> None:
        with self._lock:
            if self._started:
                raise RuntimeError("KubeSource already started")
            self._started = True
        for reflector in self._reflectors:
            reflector.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every reflector: ends open streams at once and waits (bounded) for the threads."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        for reflector in self._reflectors:
            reflector.abort()
        deadline = time.monotonic() + timeout
        for reflector in self._reflectors:
            if reflector.thread.is_alive():
                reflector.thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [r.kind for r in self._reflectors if r.thread.is_alive()]
        if stuck:
            log.warning("reflectors still running after %.1fs: %s", timeout, stuck)
        if self._own_client:
            self._api_client.close()

    @property
    def running(self) -> bool:
        return any(r.thread.is_alive() for r in self._reflectors)

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per kind: lists (all successful lists), relists (lists after the first), watches
        (watch requests), restarts (watches resumed without a re-list), events, bookmarks,
        errors, last_error, resource_version, synced. A copy, safe to export as metrics."""
        with self._lock:
            return {kind: dict(values) for kind, values in self._stats.items()}

    # Called from reflector threads.

    def _count(self, kind: str, counter: str, **values: Any) -> None:
        with self._lock:
            self._stats[kind][counter] += 1
            self._stats[kind].update(values)

    def _absent(self, kind: str) -> bool:
        """Note that the server does not serve `kind`; True if that was known already."""
        with self._lock:
            known = self._stats[kind]["absent"]
            self._stats[kind].update(absent=True, synced=True)
            return known

    def _record_error(self, kind: str, message: str) -> None:
        self._count(kind, "errors", last_error=message)

    def _list_done(self, kind: str, resource_version: str, *, relist: bool) -> None:
        with self._lock:
            stats = self._stats[kind]
            stats["lists"] += 1
            stats["relists"] += int(relist)
            stats.update(synced=True, resource_version=resource_version, absent=False)
