"""Test apps for lab pods: `python -m ebpfsvc.lab.apps {http-echo,udp-echo,tcp-echo} --port P`.

Each app says who answered and what it saw, so a test can tell which backend a
Service picked and whether the client address survived (no NAT) or not:

- http-echo: every HTTP request -> JSON {pod, podIP, client, clientPort, localPort}
- udp-echo:  every datagram     -> the same JSON, as one datagram back
- tcp-echo:  line echo, each line prefixed with "<pod>: "; connections stay open,
             for long-lived stream tests (a flow must keep its backend)

The pod name comes from POD_NAME and the IP from POD_IP, which the lab sets.
Every app listens on both families (one `::` socket with IPV6_V6ONLY off, so IPv4 clients
arrive as ::ffff:a.b.c.d and are reported as a.b.c.d), in IPv4, dual-stack and IPv6 labs alike;
on a kernel without IPv6 it falls back to 0.0.0.0.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _family() -> tuple[int, str]:
    """(family, wildcard address) to listen on: both families if the kernel has IPv6."""
    return (socket.AF_INET6, "::") if socket.has_ipv6 and _ipv6_available() else (socket.AF_INET, "0.0.0.0")


def _ipv6_available() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        return True
    except OSError:
        return False


def _dual_stack(sock: socket.socket) -> None:
    """Accept IPv4 too on an IPv6 socket, whatever net.ipv6.bindv6only says."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def client_address(address: str) -> str:
    """An IPv4 client on a dual-stack socket (::ffff:a.b.c.d) as a.b.c.d, as an IPv4 socket shows it."""
    try:
        mapped = ipaddress.IPv6Address(address.split("%")[0]).ipv4_mapped
    except ValueError:
        return address
    return str(mapped) if mapped else address


def identity(client: tuple, local_port: int) -> dict:
    return {"pod": os.environ.get("POD_NAME", socket.gethostname()),
            "podIP": os.environ.get("POD_IP", ""),
            "client": client_address(client[0]), "clientPort": client[1], "localPort": local_port}


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(identity(self.client_address, self.server.server_address[1])).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, fmt: str, *args: object) -> None:  # one line per request on stdout
        print(f"{client_address(self.client_address[0])}:{self.client_address[1]} {fmt % args}", flush=True)


class _DualStackServer:
    """socketserver mixin: the family of _family(), IPV6_V6ONLY off before the bind."""
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self) -> None:
        _dual_stack(self.socket)
        super().server_bind()


class _HTTPServer(_DualStackServer, ThreadingHTTPServer):
    pass


class _TCPServer(_DualStackServer, socketserver.ThreadingTCPServer):
    pass


def _serve(server_cls, handler, port: int, app: str) -> None:
    """Serve `handler` on `port` of every address of the Pod's family, announced as `app`."""
    family, wildcard = _family()
    server_cls.address_family = family
    server = server_cls((wildcard, port), handler)
    print(f"{app} listening on :{port}", flush=True)
    server.serve_forever()


def http_echo(port: int) -> None:
    _serve(_HTTPServer, _EchoHandler, port, "http-echo")


def udp_echo(port: int) -> None:
    family, wildcard = _family()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    _dual_stack(sock)
    sock.bind((wildcard, port))
    print(f"udp-echo listening on :{port}", flush=True)
    while True:
        _, client = sock.recvfrom(65535)
        sock.sendto(json.dumps(identity(client, port)).encode() + b"\n", client)


class _LineEchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        name = os.environ.get("POD_NAME", socket.gethostname()).encode()
        for line in self.rfile:
            self.wfile.write(name + b": " + line)
            self.wfile.flush()


def tcp_echo(port: int) -> None:
    _serve(_TCPServer, _LineEchoHandler, port, "tcp-echo")


APPS = {"http-echo": http_echo, "udp-echo": udp_echo, "tcp-echo": tcp_echo}


def pod(name: str, app: str, port: int, node: str | None = None, labels: dict[str, str] | None = None,
        port_name: str = "serve", probe: bool = True, namespace: str = "default",
        grace_seconds: int | None = None) -> dict:
    """A v1 Pod manifest running one of these apps (for tests and demos).

    The container port is named `port_name`, so Services can use a named targetPort;
    TCP apps get a tcpSocket readiness probe on it unless `probe` is False.
    """
    protocol = "UDP" if app == "udp-echo" else "TCP"
    container = {"name": app, "command": ["python", "-m", "ebpfsvc.lab.apps", app, "--port", str(port)],
                 "ports": [{"name": port_name, "containerPort": port, "protocol": protocol}]}
    if probe and protocol == "TCP":
        container["readinessProbe"] = {"tcpSocket": {"port": port_name}, "periodSeconds": 1}
    spec: dict = {"containers": [container]}
    if node:
        spec["nodeName"] = node
    if grace_seconds is not None:
        spec["terminationGracePeriodSeconds"] = grace_seconds
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
            "spec": spec}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ebpfsvc.lab.apps", description=__doc__.splitlines()[0])
    parser.add_argument("app", choices=sorted(APPS))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        APPS[args.app](args.port)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
