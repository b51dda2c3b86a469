"""tcpSocket readiness probes, run for real from the pod's node, as kubelet runs them.

All probes of a round run concurrently: one non-blocking connect per pod, from a
socket created in the pod's node namespace, then one select() over all of them.
A connect that completes within the timeout means ready; refused or silent, not.
The probe dials the pod's primary IP (status.podIP), of whichever family, as kubelet does.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import time
from typing import Hashable

from ebpfsvc.datapath import nsenter

TIMEOUT = 0.4     # below the 0.5 s probe period, so rounds never overlap


def probe_all(targets: dict[Hashable, tuple[str, str, int]], timeout: float = TIMEOUT) -> dict[Hashable, bool]:
    """targets: key -> (node namespace, pod IP, port). Returns key -> reachable."""
    by_netns: dict[str, list[Hashable]] = {}
    for key, (netns, _, _) in targets.items():
        by_netns.setdefault(netns, []).append(key)

    results: dict[Hashable, bool] = {key: False for key in targets}
    pending: dict[socket.socket, Hashable] = {}
    try:
        for netns, keys in by_netns.items():
            if not nsenter.exists(netns):
                continue
            families = [socket.AF_INET6 if ipaddress.ip_address(targets[k][1]).version == 6 else socket.AF_INET
                        for k in keys]
            socks = nsenter.run_in(netns, lambda fs: [socket.socket(f) for f in fs], families)
            for sock, key in zip(socks, keys):
                sock.setblocking(False)
                _, ip, port = targets[key]
                code = sock.connect_ex((ip, port))
                if code == 0:
                    results[key] = True
                    sock.close()
                elif code in (errno.EINPROGRESS, errno.EAGAIN):
                    pending[sock] = key
                else:
                    sock.close()
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _, writable, _ = select.select([], list(pending), [], left)
            for sock in writable:
                key = pending.pop(sock)
                results[key] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                sock.close()
    finally:
        for sock in pending:
            sock.close()
    return results
