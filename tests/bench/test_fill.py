"""The benchmark's fast filler writer (ebpfsvc/bench/fill.py) against a fake API server of its
own: real TLS (the lab's PKI), kept-alive connections, 409, 429 and a dropped connection."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ebpfsvc.bench import fill, real
from ebpfsvc.lab import controlplane
from ebpfsvc.lab.api import APIError

IPS = {"srv-a": "198.18.2.1", "srv-b": "198.18.3.1"}


class FakeAPIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, existing=(), throttle=(), drop=(), refuse=(), timeout=()):
        super().__init__(("127.0.0.1", 0), Handler)
        self.existing, self.throttle, self.drop, self.refuse = set(existing), set(throttle), set(drop), set(refuse)
        self.timeout = set(timeout)
        self.made: list[tuple[str, str, str]] = []
        self.connections: set[tuple] = set()
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # kept alive, as kube-apiserver

    def log_message(self, *args):
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        srv: FakeAPIServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = body["metadata"]["name"]
        assert self.headers["Authorization"] == "Bearer t0ken"
        assert "fieldManager=ebpfsvc-lab" in self.path and "fieldValidation=Strict" in self.path
        with srv.lock:
            srv.connections.add(self.client_address)
            if name in srv.drop:                 # the server closes a kept-alive connection once
                srv.drop.discard(name)
                self.close_connection = True
                self.connection.close()
                return
            if name in srv.throttle:
                srv.throttle.discard(name)
                return self._answer(429, {"message": "too many requests"})
            if name in srv.timeout:             # etcd did not answer in time, once; or it did, late
                srv.timeout.discard(name)
                if name.endswith("-late"):
                    srv.existing.add(name)
                    srv.made.append((self.command, body["kind"], name))
                return self._answer(500, {"message": "etcdserver: request timed out"})
            if name in srv.refuse:
                return self._answer(422, {"message": f'Service "{name}" is invalid: spec.ports[0].port: Invalid'})
            if self.command == "POST" and name in srv.existing:
                return self._answer(409, {"message": "already exists"})
            srv.made.append((self.command, body["kind"], name))
        self._answer(201 if self.command == "POST" else 200, body)

    do_POST = do_PATCH = _handle


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The lab's own PKI (its RSA key takes seconds on a busy machine: once per module)."""
    paths = controlplane.Paths(tmp_path_factory.mktemp("pki"))
    controlplane.make_pki(paths, ["198.18.0.1"], "198.19.0.1")
    return paths


@pytest.fixture
def api(pki, tmp_path):
    """A factory: start a fake API server with the given behaviour; returns (server, Writer settings)."""
    paths = pki
    servers = []

    def start(**kw):
        server = FakeAPIServer(**kw)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(paths.pki / "apiserver.crt", paths.pki / "apiserver.key")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        kubeconfig = tmp_path / f"kubeconfig-{len(servers)}"
        controlplane.write_kubeconfig(kubeconfig, f"https://127.0.0.1:{server.server_address[1]}", paths.ca,
                                      "t0ken", "admin")
        return server, fill.kubeconfig_settings(kubeconfig)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_fillers_are_posted_each_service_before_its_slice_over_kept_alive_connections(api):
    server, settings = api(existing={"svc-00004"})
    made = fill.create_all(lambda: fill.Writer(**settings), real.filler_objects(range(3, 9), IPS), threads=2)
    assert made == 12
    assert ("PATCH", "Service", "svc-00004") in server.made      # it existed: applied, as LabAPI does
    assert sorted(n for m, k, n in server.made if k == "Service") == [f"svc-{i:05d}" for i in range(3, 9)]
    for i in range(3, 9):
        kinds = [k for _, k, n in server.made if n.startswith(f"svc-{i:05d}")]
        assert kinds == ["Service", "EndpointSlice"], (i, kinds)
    assert len(server.connections) == 2             # one connection per thread, kept alive


def test_a_throttled_or_dropped_request_is_sent_again(api, monkeypatch):
    monkeypatch.setattr(fill, "RETRY_WAIT", 0.001)
    server, settings = api(throttle={"svc-00000"}, drop={"svc-00001-bench"})
    assert fill.create_all(lambda: fill.Writer(**settings), real.filler_objects(range(2), IPS), threads=1) == 4
    assert sorted(server.made) == [("POST", "EndpointSlice", "svc-00000-bench"),
                                   ("POST", "EndpointSlice", "svc-00001-bench"),
                                   ("POST", "Service", "svc-00000"), ("POST", "Service", "svc-00001")]


def test_a_storage_timeout_is_sent_again_and_a_create_that_landed_is_applied(api, monkeypatch):
    monkeypatch.setattr(fill, "RETRY_WAIT", 0.001)
    server, settings = api(timeout={"svc-00000", "svc-00001-late"})
    objects = real.filler_objects(range(2), IPS)
    objects[1][0]["metadata"]["name"] = "svc-00001-late"
    assert fill.create_all(lambda: fill.Writer(**settings), objects, threads=1) == 4
    assert ("POST", "Service", "svc-00000") in server.made
    # The late one was created by the request that timed out: the retry meets 409 and applies.
    assert [m for m in server.made if m[2] == "svc-00001-late"] == [("POST", "Service", "svc-00001-late"),
                                                                    ("PATCH", "Service", "svc-00001-late")]


def test_a_refusal_names_the_object_and_the_field(api):
    _, settings = api(refuse={"svc-00002"})
    with pytest.raises(APIError, match=r'svc-00002" is invalid: spec.ports\[0\].port') as err:
        fill.create_all(lambda: fill.Writer(**settings), real.filler_objects(range(1, 4), IPS), threads=1)
    assert err.value.status == 422


def test_the_filler_objects_are_the_bench_services_and_slices():
    (svc, eps), = real.filler_objects([7], IPS)
    assert svc == real.service("svc-00007", real.filler_ports())
    assert eps == real.endpoint_slice("svc-00007", real.filler_ports(), IPS)
