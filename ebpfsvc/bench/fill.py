"""Creating the benchmark's filler objects fast: plain POSTs straight to kube-apiserver.

The lab's API relay (lab/apiproxy.py, a Python thread pair per connection between the host's
loopback and the cp namespace) and the kubernetes client's per-request machinery held the fill to
57 objects/s on a quiet machine and 4-17 under load, so 50,000 Services never finished. Here each
worker process enters the lab's control-plane namespace (nsenter.run_in: one thread enters, the
writer threads it starts inherit the namespace) and talks to the API server's own loopback address
there (the cp kubeconfig's https://127.0.0.1:6443), each thread over one kept-alive HTTPS
connection with http.client: nothing leaves the lab's namespaces, and nothing relays.

The objects are the same as through LabAPI: a POST with fieldManager and strict field validation,
and a server-side apply of the same body when the name exists already (a rerun).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import yaml

from ebpfsvc.lab.api import APPLY_PATCH, FIELD_MANAGER, APIError, path_of

# A dropped keep-alive connection, or an answer of these statuses, is retried, this many times, the
# wait doubling from RETRY_WAIT: 429 (the API server's priority and fairness, or too many requests
# in flight); 500 when its storage did not answer in time, "etcdserver: request timed out" (a
# 2026-12-05 fill of 50,000 Services died of one at 25,000, the machine at load 4); 503, 504. A
# create that did land meanwhile comes back as 409 and is applied (create_or_apply).
RETRIED = (429, 500, 503, 504)
RETRIES = 6
RETRY_WAIT = 0.05


def kubeconfig_settings(path: str | Path) -> dict[str, str]:
    """Writer's arguments from a lab kubeconfig (controlplane.write_kubeconfig: a server, a CA
    file, a token)."""
    config = yaml.safe_load(Path(path).read_text())
    cluster = config["clusters"][0]["cluster"]
    return {"server": cluster["server"], "ca": cluster["certificate-authority"],
            "token": config["users"][0]["user"]["token"]}


class Writer:
    """One kept-alive HTTPS connection to the API server, for creating objects."""

    def __init__(self, server: str, ca: str, token: str, timeout: float = 60.0):
        url = urlsplit(server)
        self.host, self.port = url.hostname, url.port or 443
        self.context = ssl.create_default_context(cafile=ca)
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.timeout = timeout
        self.conn: http.client.HTTPSConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: dict, content_type: str = "application/json") -> int:
        """Send one request; its HTTP status (2xx, or 409 for the caller); APIError otherwise."""
        data = json.dumps(body).encode()
        headers = {**self.headers, "Content-Type": content_type}
        wait = RETRY_WAIT
        for attempt in range(RETRIES + 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                            timeout=self.timeout)
                self.conn.request(method, path, data, headers)
                response = self.conn.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as exc:
                # The server closed a kept-alive connection (or it broke): a new one, same request.
                self.close()
                if attempt == RETRIES:
                    raise APIError(f"API server unreachable: {method} {path}: {exc}") from None
            else:
                if response.status in RETRIED and attempt < RETRIES:
                    wait = max(wait, float(response.getheader("Retry-After") or 0))
                elif 200 <= response.status < 300 or response.status == 409:
                    return response.status
                else:
                    raise APIError(_message(answer, response.status, method, path), response.status)
            time.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")

    def create_or_apply(self, obj: dict[str, Any]) -> None:
        """POST `obj`; if its name exists, server-side apply the same body (as LabAPI.create_or_apply)."""
        meta = obj["metadata"]
        query = f"?fieldManager={FIELD_MANAGER}&fieldValidation=Strict"
        if self.request("POST", path_of(obj["kind"], meta.get("namespace")) + query, obj) == 409:
            if self.request("PATCH", path_of(obj["kind"], meta.get("namespace"), meta["name"]) + query
                            + "&force=true", obj, content_type=APPLY_PATCH) == 409:
                raise APIError(f"{obj['kind']} {meta['name']}: apply answered 409", 409)


def _message(answer: bytes, status: int, method: str, path: str) -> str:
    try:
        return f"{method} {path}: {json.loads(answer)['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{method} {path}: HTTP {status}"


def create_all(writer: Callable[[], Writer], objects: Iterable[list[dict]], threads: int) -> int:
    """Create every group of objects (in order within a group: a Service before its slice) from
    `threads` threads, each with its own Writer (one connection); returns the objects created."""
    local = threading.local()
    made: list[Writer] = []
    lock = threading.Lock()

    def create(group: list[dict]) -> int:
        if not hasattr(local, "writer"):
            local.writer = writer()
            with lock:
                made.append(local.writer)
        for obj in group:
            local.writer.create_or_apply(obj)
        return len(group)

    try:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(create, objects))
    finally:
        for w in made:
            w.close()
