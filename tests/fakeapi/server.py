"""A fake Kubernetes API server: the list/watch HTTP protocol, plus failures on demand.

It speaks enough of the real protocol for the real `kubernetes` Python client to
talk to it unmodified, so the source under test runs its production HTTP path:

- GET <collection>: a JSON list whose metadata.resourceVersion is the snapshot it
  was served from; items carry no kind/apiVersion (the real server omits them).
  limit/continue paginate over ONE consistent snapshot, like etcd-backed lists.
- GET <collection>?watch=true&resourceVersion=N: a chunked stream, one JSON event
  per line, starting with every change after N.  allowWatchBookmarks and
  timeoutSeconds are honoured.
- fieldSelector=metadata.name=NAME on both (the only field selector a node agent sends).
- a resource the server does not serve (`without=("ServiceCIDR",)`, an API server older than
  the kind) answers 404, as the real one does for an unknown path.

The test drives it: create/update/delete objects (each bumps one global
resourceVersion, as etcd does), compact history (older watches get 410 Gone, as
an ERROR event or as an HTTP 410, the two ways the real server answers), send
bookmarks or ERROR events, end watches normally, make them hang silently, refuse
connections, and read a log of every request it served.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

# URL path of each collection -> (kind, apiVersion).
RESOURCES = {
    "/api/v1/services": ("Service", "v1"),
    "/api/v1/endpoints": ("Endpoints", "v1"),
    "/api/v1/nodes": ("Node", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
    "/apis/networking.k8s.io/v1/servicecidrs": ("ServiceCIDR", "networking.k8s.io/v1"),
}
API_VERSION = {kind: api_version for kind, api_version in RESOURCES.values()}

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Request:
    """One request the server answered (refused connections never get here)."""
    kind: str
    verb: str                 # "list" or "watch"
    params: dict[str, str]    # query parameters, last value wins
    status: int               # HTTP status sent (a 410 ERROR *event* still has status 200)


@dataclass(eq=False)   # identity, so watchers can live in a set
class _Watcher:
    kind: str
    bookmarks: bool
    name: str | None = None    # fieldSelector metadata.name=NAME: only that object's events
    # ("event", dict) | ("raw", bytes) | ("close",) | ("hang",) | ("kill",)
    inbox: queue.Queue = field(default_factory=queue.Queue)
    killed: threading.Event = field(default_factory=threading.Event)

    def selects(self, event: dict[str, Any]) -> bool:
        return self.name is None or _key(event["object"])[1] == self.name


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A metav1.Status, the body of every API error."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _name_selector(selector: str) -> str | None:
    """NAME of a `metadata.name=NAME` (or ==) field selector; None for any other selector."""
    field, _, value = selector.replace("==", "=").partition("=")
    return value if field == "metadata.name" and value else None


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta["name"])


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True   # come_up() rebinds the same port at once

    def __init__(self, address, api: "FakeApiServer"):
        self.api = api
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        # Clients hanging up and go_down() cutting connections are expected; bugs are not.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request(self, request, client_address):
        # Remember every connection so go_down() can cut them, like a dying server.
        self.api._track(request)
        super().process_request(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # chunked transfer encoding needs 1.1
    server: _HTTPServer

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        resource = RESOURCES.get(url.path)
        api = self.server.api
        if resource is None or resource[0] in api.without:
            if resource is not None:
                api._log(resource[0], "watch" if params.get("watch") in ("true", "1") else "list", params, 404)
            self.send_json(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return
        selector = params.get("fieldSelector", "")
        if selector and not _name_selector(selector):
            api._log(resource[0], "list", params, 400)
            self.send_json(400, _status(400, "BadRequest", f"field selector {selector!r} is not supported"))
            return
        if params.get("watch") in ("true", "1"):
            api._serve_watch(self, resource[0], params)
        else:
            api._serve_list(self, resource[0], params)

    def send_json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class FakeApiServer:
    """Start with `with FakeApiServer() as api:`; point a client at `api.url`."""

    def __init__(self, without: tuple[str, ...] = ()) -> None:
        self.without = frozenset(without)      # kinds answered with 404
        self._lock = threading.RLock()
        self._requests_changed = threading.Condition(self._lock)
        self._rv = 1
        self._compacted = 0
        self._gone_as = "event"
        self._objects: dict[str, dict[Key, dict[str, Any]]] = {k: {} for k in API_VERSION}
        # Every change ever made, per kind: (rv, key, object or None once deleted).
        self._history: dict[str, list[tuple[int, Key, dict[str, Any] | None]]] = {k: [] for k in API_VERSION}
        self._events: dict[str, list[tuple[int, dict[str, Any]]]] = {k: [] for k in API_VERSION}
        self._watchers: set[_Watcher] = set()
        self._connections: set[socket.socket] = set()
        self._requests: list[Request] = []
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self.port = 0
        # Called (with kind and the page number, from 1) after a list page is computed and
        # before it is sent: lets a test change the world in the middle of a paginated list.
        self.on_list_page: Callable[[str, int], None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path) -> str:
        """A kubeconfig at `path` pointing at this server (a token it never checks), for code under
        test that loads one the way a user's tools do; returns the path as a string."""
        with open(path, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{self.url}"}}}}]
users: [{{name: me, user: {{token: not-a-secret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: me}}}}]
current-context: fake
""")
        return str(path)

    def start(self) -> "FakeApiServer":
        self._httpd = _HTTPServer(("127.0.0.1", self.port), self)
        self.port = self._httpd.server_address[1]
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fakeapi:{self.port}", daemon=True)
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        self.go_down()

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def go_down(self) -> None:
        """Stop listening (new connections are refused) and cut every open connection."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        with self._lock:
            for w in self._watchers:
                w.killed.set()
                w.inbox.put(("kill",))
            conns, self._connections = self._connections, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def come_up(self) -> None:
        """Listen again on the same port; all state (objects, history, compaction) kept."""
        if self._httpd is None:
            self.start()

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    # ---- objects ----------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def create(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if _key(obj) in self._objects[kind]:
                raise KeyError(f"{kind} {_key(obj)} already exists")
            obj = copy.deepcopy(obj)
            obj["metadata"].setdefault("uid", str(uuid.uuid4()))
            return self._change(kind, "ADDED", obj)

    def update(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            old = self._objects[kind][_key(obj)]   # KeyError: update of a missing object
            obj = copy.deepcopy(obj)
            obj["metadata"]["uid"] = old["metadata"]["uid"]
            return self._change(kind, "MODIFIED", obj)

    def delete(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            last = copy.deepcopy(self._objects[kind][_key(obj)])
            return self._change(kind, "DELETED", last)

    def _change(self, kind: str, type_: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._rv += 1
        obj["kind"], obj["apiVersion"] = kind, API_VERSION[kind]
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = _key(obj)
        if type_ == "DELETED":
            del self._objects[kind][key]
        else:
            self._objects[kind][key] = obj
        self._history[kind].append((self._rv, key, None if type_ == "DELETED" else obj))
        event = {"type": type_, "object": obj}
        self._events[kind].append((self._rv, event))
        with self._lock:
            for w in self._watchers:
                if w.kind == kind and w.selects(event):
                    w.inbox.put(("event", event))
        return copy.deepcopy(obj)

    def _snapshot(self, kind: str, rv: int) -> dict[Key, dict[str, Any]]:
        state: dict[Key, dict[str, Any]] = {}
        for change_rv, key, obj in self._history[kind]:
            if change_rv > rv:
                break
            if obj is None:
                state.pop(key, None)
            else:
                state[key] = obj
        return state

    # ---- failures and protocol events on demand ---------------------------------------------

    def compact(self, rv: int | None = None, *, gone_as: str = "event") -> None:
        """Forget history before `rv` (default: now). A later watch from an older
        resourceVersion, or a continue token from an older list, gets 410 Gone:
        `gone_as="event"` answers watches with HTTP 200 and an ERROR event (the
        watch cache's way), `gone_as="http"` with an HTTP 410 status (etcd's way)."""
        assert gone_as in ("event", "http")
        with self._lock:
            self._compacted = self._rv if rv is None else rv
            self._gone_as = gone_as

    def send_bookmark(self, kind: str | None = None) -> int:
        """A BOOKMARK at the current resourceVersion to watches that asked for them."""
        with self._lock:
            for w in self._watchers:
                if (kind is None or w.kind == kind) and w.bookmarks:
                    w.inbox.put(("event", {"type": "BOOKMARK", "object": {
                        "kind": w.kind, "apiVersion": API_VERSION[w.kind],
                        "metadata": {"resourceVersion": str(self._rv)}}}))
            return self._rv

    def send_error(self, kind: str, code: int = 500, reason: str = "InternalError",
                   message: str = "etcd leader changed") -> None:
        """An ERROR event carrying a Status, then the end of the stream (as the real server)."""
        self._push(kind, ("event", {"type": "ERROR", "object": _status(code, reason, message)}))
        self._push(kind, ("close",))

    def send_raw(self, kind: str, line: bytes) -> None:
        """Any bytes as one line of the stream: for clients facing a broken server or proxy."""
        self._push(kind, ("raw", line))

    def close_watches(self, kind: str | None = None) -> None:
        """End open watch streams normally (terminating chunk), as on timeoutSeconds."""
        self._push(kind, ("close",))

    def hang_watches(self, kind: str | None = None) -> None:
        """Open watch streams go silent but stay open (a stuck proxy or half-dead peer).
        Watches opened afterwards are served normally."""
        self._push(kind, ("hang",))

    def _push(self, kind: str | None, message: tuple) -> None:
        with self._lock:
            for w in self._watchers:
                if kind is None or w.kind == kind:
                    w.inbox.put(message)

    # ---- request log -------------------------------------------------------------------------

    def requests(self, kind: str | None = None, verb: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._requests
                    if (kind is None or r.kind == kind) and (verb is None or r.verb == verb)]

    def count(self, kind: str, verb: str) -> int:
        return len(self.requests(kind, verb))

    def wait_for_request(self, kind: str, verb: str, n: int, timeout: float = 10.0) -> Request:
        """Block until the n-th (1-based) `verb` request for `kind` arrived; return it."""
        with self._requests_changed:
            ok = self._requests_changed.wait_for(lambda: self.count(kind, verb) >= n, timeout)
            if not ok:
                raise TimeoutError(f"{kind} got {self.count(kind, verb)} {verb} requests, wanted {n}")
            return self.requests(kind, verb)[n - 1]

    def _log(self, kind: str, verb: str, params: dict[str, str], status: int) -> None:
        with self._requests_changed:
            self._requests.append(Request(kind, verb, params, status))
            self._requests_changed.notify_all()

    # ---- serving -----------------------------------------------------------------------------

    def _serve_list(self, h: _Handler, kind: str, params: dict[str, str]) -> None:
        limit = int(params.get("limit") or 0)
        token = params.get("continue")
        with self._lock:
            if token:
                cont = json.loads(base64.urlsafe_b64decode(token))
                snapshot_rv, after, page = cont["rv"], tuple(cont["after"]), cont["page"] + 1
                if snapshot_rv < self._compacted:
                    self._log(kind, "list", params, 410)
                    h.send_json(410, _status(410, "Expired", "The provided continue parameter is too "
                                             "old to display a consistent list result."))
                    return
                state = self._snapshot(kind, snapshot_rv)
            else:
                snapshot_rv, after, page = self._rv, None, 1
                state = self._objects[kind]
            name = _name_selector(params.get("fieldSelector", ""))
            keys = sorted(k for k in state if (after is None or k > after) and (name is None or k[1] == name))
            shown = keys[:limit] if limit else keys
            items = []
            for k in shown:
                item = copy.deepcopy(state[k])
                item.pop("kind", None)         # the real server omits these on list items
                item.pop("apiVersion", None)
                items.append(item)
            meta: dict[str, Any] = {"resourceVersion": str(snapshot_rv)}
            if len(shown) < len(keys):
                meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                    {"rv": snapshot_rv, "after": list(shown[-1]), "page": page}).encode()).decode()
        if self.on_list_page is not None:
            self.on_list_page(kind, page)
        self._log(kind, "list", params, 200)
        h.send_json(200, {"kind": f"{kind}List", "apiVersion": API_VERSION[kind],
                          "metadata": meta, "items": items})

    def _serve_watch(self, h: _Handler, kind: str, params: dict[str, str]) -> None:
        rv_param = params.get("resourceVersion", "")
        timeout = int(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        watcher = _Watcher(kind, params.get("allowWatchBookmarks") in ("true", "1"),
                           _name_selector(params.get("fieldSelector", "")))
        with self._lock:
            since = int(rv_param) if rv_param not in ("", "0") else None
            if since is not None and since < self._compacted:
                gone = _status(410, "Expired", f"too old resource version: {since} ({self._compacted})")
                if self._gone_as == "http":
                    self._log(kind, "watch", params, 410)
                    h.send_json(410, gone)
                    return
                watcher.inbox.put(("event", {"type": "ERROR", "object": gone}))
                watcher.inbox.put(("close",))
            elif since is None:
                # No resourceVersion: the current state as synthetic ADDED events first.
                for key, obj in sorted(self._objects[kind].items()):
                    if watcher.name is None or key[1] == watcher.name:
                        watcher.inbox.put(("event", {"type": "ADDED", "object": obj}))
            else:
                for event_rv, event in self._events[kind]:
                    if event_rv > since and watcher.selects(event):
                        watcher.inbox.put(("event", event))
            self._watchers.add(watcher)
        self._log(kind, "watch", params, 200)
        try:
            self._stream(h, watcher, timeout)
        finally:
            with self._lock:
                self._watchers.discard(watcher)

    def _stream(self, h: _Handler, w: _Watcher, timeout: int | None) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    break                                  # timeoutSeconds: a normal end
                try:
                    message = w.inbox.get(timeout=wait)
                except queue.Empty:
                    continue
                if message[0] == "event":
                    h.write_chunk(json.dumps(message[1]).encode() + b"\n")
                elif message[0] == "raw":
                    h.write_chunk(message[1] + b"\n")
                elif message[0] == "close":
                    break
                elif message[0] == "hang":
                    self._hang(h, w)
                    h.close_connection = True
                    return
                else:                                      # "kill": the server went away
                    h.close_connection = True
                    return
            h.wfile.write(b"0\r\n\r\n")                    # the terminating chunk
            h.wfile.flush()
        except OSError:
            h.close_connection = True                      # the client hung up

    @staticmethod
    def _hang(h: _Handler, w: _Watcher) -> None:
        # Say nothing, keep the socket open, until the client gives up (EOF) or the server dies.
        conn = h.connection
        while not w.killed.is_set():
            readable, _, _ = select.select([conn], [], [], 0.1)
            if readable:
                try:
                    if not conn.recv(1, socket.MSG_PEEK):
                        return
                except OSError:
                    return
