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
"""

from __future__ import annotations

import errno
import json
import socket
import sys

TIMEOUT = 3.0


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
    if len(args) != 3 or not args[2].isdigit():
        raise SystemExit("usage: python -m ebpfsvc.lab.sockprobe tcp|udp|udp-connected ADDRESS PORT")
    print(json.dumps(probe(args[0], args[1], int(args[2]))), flush=True)


if __name__ == "__main__":
    main()
