"""A bounded traffic client that runs inside a lab pod or external client namespace.

    python -m ebpfsvc.demo.client http http://198.19.0.20:3000/ --count 20
    python -m ebpfsvc.demo.client udp 198.19.0.70 5353 --count 5

Each request opens a NEW connection (so every request is a new flow the
datapath balances) and the answers of the lab's echo apps (which pod
answered, which client address it saw) are printed as one JSON document on
stdout. Bounded in count and in time: it never loops longer than --deadline.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.request


def http(url: str, count: int, timeout: float, deadline: float) -> dict:
    answers, errors = [], []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never a proxy
    for _ in range(count):
        if time.monotonic() > deadline:
            errors.append("deadline")
            break
        try:
            with opener.open(url, timeout=timeout) as resp:
                answers.append(json.loads(resp.read()))
        except Exception as e:  # report, don't stop: the demo shows refusals too
            errors.append(type(e).__name__ + ": " + str(e))
    return {"answers": answers, "errors": errors}


def udp(host: str, port: int, count: int, timeout: float, deadline: float) -> dict:
    answers, errors = [], []
    for _ in range(count):
        if time.monotonic() > deadline:
            errors.append("deadline")
            break
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:   # new socket = new source port = new flow
            s.settimeout(timeout)
            try:
                s.sendto(b"who?", (host, port))
                answers.append(json.loads(s.recvfrom(4096)[0]))
            except Exception as e:
                errors.append(type(e).__name__ + ": " + str(e))
    return {"answers": answers, "errors": errors}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ebpfsvc.demo.client")
    sub = p.add_subparsers(dest="proto", required=True)
    h = sub.add_parser("http")
    h.add_argument("url")
    u = sub.add_parser("udp")
    u.add_argument("host")
    u.add_argument("port", type=int)
    for s in (h, u):
        s.add_argument("--count", type=int, default=10)
        s.add_argument("--timeout", type=float, default=2.0)
        s.add_argument("--deadline", type=float, default=60.0, help="seconds for all requests together")
    a = p.parse_args(argv)
    deadline = time.monotonic() + a.deadline
    if a.proto == "http":
        out = http(a.url, a.count, a.timeout, deadline)
    else:
        out = udp(a.host, a.port, a.count, a.timeout, deadline)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
