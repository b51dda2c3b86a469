"""cgroup v2 directories of a lab: one per node, its pods below it, as the kubelet does.

    <cgroup2 mount>/ebpfsvc-<prefix>/                 the lab's (or a test's) own root
    <cgroup2 mount>/ebpfsvc-<prefix>/<node>/          the node: its agent attaches the socket programs here
    <cgroup2 mount>/ebpfsvc-<prefix>/<node>/pods/<ns>_<pod>   a pod's processes

The mount is read from /proc/self/mountinfo (socklb.cgroup2_mount), never
assumed. Nothing is created, joined or removed outside the lab's own root, so
programs attached to a node's cgroup see only the lab's processes.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

from ebpfsvc.datapath import nsenter
from ebpfsvc.datapath.socklb import cgroup2_mount

log = logging.getLogger(__name__)


def lab_root(prefix: str) -> Path:
    return cgroup2_mount() / f"ebpfsvc-{prefix}"


def node_cgroup(prefix: str, node: str) -> Path:
    return lab_root(prefix) / node


def pod_cgroup(prefix: str, node: str, namespace: str, name: str) -> Path:
    # '_' is legal in neither namespace nor pod names: no two pods share a directory.
    return node_cgroup(prefix, node) / "pods" / f"{namespace}_{name}"


def create(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def join(path: Path, pid: int = 0) -> None:
    """Move process `pid` (0: the caller) into cgroup `path` (created if needed)."""
    create(path)
    (path / "cgroup.procs").write_text(f"{pid or os.getpid()}\n")


def remove(prefix: str, timeout: float = 5.0) -> bool:
    """Remove the lab's cgroup tree, deepest first; False if there was none.

    The lab's processes are stopped before (teardown order). Programs attached
    to a removed cgroup are released by the kernel with it."""
    root = lab_root(prefix)
    if not root.is_dir():
        return False
    dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for path in [*dirs, root]:
        remove_dir(path, timeout)
    return True


def remove_dir(path: Path, timeout: float = 5.0) -> None:
    """rmdir one cgroup whose processes were stopped: one still exiting makes it EBUSY for a
    moment, so that is retried until `timeout`; then it is left, with a warning."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cannot remove cgroup %s: %s", path, exc)
                return
            time.sleep(0.05)


def host_cgroup(prefix: str, node: str) -> Path:
    """The node's own processes (hostNetwork clients run with `lab node-exec`), under the node."""
    return node_cgroup(prefix, node) / "host"


__all__ = ["lab_root", "node_cgroup", "pod_cgroup", "host_cgroup", "create", "join", "remove", "remove_dir"]


def preexec(netns: str, cgroup: Path | None):
    """A subprocess preexec_fn: join `cgroup` (created if needed) when given, then enter `netns`
    (cgroup first: the child's sockets belong to the cgroup it is in when it makes them)."""
    enter_netns = nsenter.preexec(netns)

    def enter() -> None:
        if cgroup is not None:
            join(cgroup)
        enter_netns()

    return enter
