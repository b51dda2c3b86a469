"""One socket operation from a lab process, its outcome as one JSON line: for checks of the
socket path (docs/socklb.md), which applies to processes in a node's cgroup only, so the
client must be a process of its own there (`lab exec`, `lab node-exec`), not a socket the
test process opens in a namespace.

    python -m ebpfsvc.lab.sockprobe tcp ADDRESS PORT            {"peer": [a, p], "data": "..."}
    python -m ebpfsvc.lab.sockprobe udp ADDRESS PORT            {"src": [a, p], "data": "..."}
    python -m ebpfsvc.lab.sockprobe udp-connected ADDRESS PORT  {"peer": .., "src": .., "data": ..}

`peer` is what getpeername() says, `src` what recvfrom() says, `data` the server's first
answer (up to 4 KiB; TCP: a line or an HTTP request's answer, the server sends first or
answers a GET). A failure is {"errno": "ECONNREFUSED"} (or "TimeoutError"). ADDRESS is of
either family (an IPv6 peer or source is [address, port, flowinfo, scope_id]).

    python -m ebpfsvc.lab.sockprobe hold tcp|udp ADDRESS PORT N

holds N connected sockets (for a backend's removal while they are open): prints
{"cookies": [...]} (SO_COOKIE, the socket path's key), then answers each line of stdin:
`check` -> {"sockets": [{"error": the first SO_ERROR seen or null, "peer": [a, p] or "ENOTCONN"}, ...]};
`ask` -> {"sockets": [the tcp-echo/udp-echo answer's pod, or {"errno": ...}, ...]}.

    python -m ebpfsvc.lab.sockprobe serve ADDRESS PORT N

a TCP server (for the socket path's server side, sock_ops, which sees a server's sockets only when
the server is a process in the cgroup): prints {"listening": [a, p]}, then answers N connections
with "served\n" after their first bytes, and prints {"accepted": [{"cookie": .., "peer": [a, p]}, ...]}.
"""

from __future__ import annotations

import errno
import json
import socket
import sys

TIMEOUT = 3.0
SO_COOKIE = 57          # asm-generic/socket.h; Python names it from 3.12 on only


def probe(op: str, address: str, port: int) -> dict:
    out: dict = {}
    try:
        if op == "tcp":
            with socket.create_connection((address, port), timeout=TIMEOUT) as s:
                out["peer"] = list(s.getpeername())
                host = f"[{address}]" if ":" in address else address
                s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                out["data"] = _read(s).decode(errors="replace")
        elif op in ("udp", "udp-connected"):
            with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(TIMEOUT)
                if op == "udp":
                    s.sendto(b"ping", (address, port))
                else:
                    s.connect((address, port))
                    out["peer"] = list(s.getpeername())
                    s.send(b"ping")
                data, src = s.recvfrom(4096)
                out["data"], out["src"] = data.decode(errors="replace"), list(src)
        else:
            raise SystemExit(f"sockprobe: unknown operation {op!r} (tcp, udp, udp-connected)")
    except OSError as e:
        out["errno"] = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    return out


def _errno(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__


def hold(kind: str, address: str, port: int, count: int) -> None:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                          socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(TIMEOUT)
        s.connect((address, port))
        socks.append(s)
    print(json.dumps({"cookies": [_cookie(s) for s in socks]}), flush=True)
    # Reading SO_ERROR clears it: a socket's first error is kept, so that a `check` made while the
    # agent is still destroying the others does not lose the ones it already saw.
    errors: list[str | None] = [None] * len(socks)
    for line in sys.stdin:
        command = line.strip()
        if command == "check":
            out = [_check(s, errors, i) for i, s in enumerate(socks)]
        else:
            out = [_ask(kind, s) for s in socks]
        print(json.dumps({"sockets": out}), flush=True)


def serve(address: str, port: int, count: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((address, port))
        lsock.listen(count)
        lsock.settimeout(4 * TIMEOUT)
        print(json.dumps({"listening": list(lsock.getsockname())}), flush=True)
        accepted = []
        for _ in range(count):
            conn, peer = lsock.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                accepted.append({"cookie": _cookie(conn), "peer": list(peer)})
                conn.recv(4096)
                conn.sendall(b"served\n")
        print(json.dumps({"accepted": accepted}), flush=True)


def _cookie(s: socket.socket) -> int:
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)


def _check(s: socket.socket, errors: list[str | None], i: int) -> dict:
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err and errors[i] is None:
        errors[i] = errno.errorcode.get(err, str(err))
    out: dict = {"error": errors[i]}
    try:
        out["peer"] = list(s.getpeername())
    except OSError as e:
        out["peer"] = _errno(e)
    return out


def _ask(kind: str, s: socket.socket):
    try:
        if kind == "tcp":
            s.sendall(b"who\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    return {"errno": "EOF"}
                data += chunk
            return data.decode().split(":", 1)[0]
        s.send(b"ping")
        data = s.recv(4096).decode(errors="replace")
        return json.loads(data)["pod"] if data.startswith("{") else data     # udp-echo's JSON, or a name
    except OSError as e:
        return {"errno": _errno(e)}


def _read(s: socket.socket) -> bytes:
    data = b""
    while len(data) < 4096:
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    return data


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["hold"]:
        if len(args) != 5 or args[1] not in ("tcp", "udp") or not args[3].isdigit() or not args[4].isdigit():
            raise SystemExit("usage: python -m ebpfsvc.lab.sockprobe hold tcp|udp ADDRESS PORT N")
        hold(args[1], args[2], int(args[3]), int(args[4]))
        return
    if args[:1] == ["serve"]:
        if len(args) != 4 or not args[2].isdigit() or not args[3].isdigit():
            raise SystemExit("usage: python -m ebpfsvc.lab.sockprobe serve ADDRESS PORT N")
        serve(args[1], int(args[2]), int(args[3]))
        return
    if len(args) != 3 or not args[2].isdigit():
        raise SystemExit("usage: python -m ebpfsvc.lab.sockprobe tcp|udp|udp-connected ADDRESS PORT")
    print(json.dumps(probe(args[0], args[1], int(args[2]))), flush=True)


if __name__ == "__main__":
    main()
