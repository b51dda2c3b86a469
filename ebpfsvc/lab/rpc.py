"""Talking to a lab's controller: one JSON request line, one JSON reply line, over a Unix socket.

The controller owns every long-lived lab process (it is their parent, so it can
reap them) and the pods' networking; CLI commands and the Python API write objects
to the API server and then ask the controller to act on them, synchronously, so
that `lab apply` returns only once new pods run.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

SOCKET_NAME = "controller.sock"


class ControllerError(RuntimeError):
    pass


def socket_path(state_path: Path) -> Path:
    return state_path / SOCKET_NAME


def call(state_path: Path, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(socket_path(state_path)))
        except OSError as exc:
            raise ControllerError(
                f"the lab controller ({state_path}) does not answer: {exc}; see "
                f"{state_path}/controller.log, then `ebpfsvc lab down` and `lab up` again") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = read_line(sock)
    finally:
        sock.close()
    if not reply:
        raise ControllerError(f"the lab controller closed the connection on {request.get('op')!r}")
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise ControllerError(answer.get("error") or "the lab controller failed")
    return answer


def read_line(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.strip()


def reply(sock: socket.socket, answer: dict[str, Any]) -> None:
    sock.sendall(json.dumps(answer).encode() + b"\n")
