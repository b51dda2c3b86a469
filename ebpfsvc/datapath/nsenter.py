"""Entering network namespaces, the one way the project does it: for a thread, a child process,
one socket, or a netlink conversation (pyroute2).

A network namespace is a property of a thread (setns(2) moves only the caller),
so everything here either runs in a short-lived thread that enters the namespace
and exits, or in a freshly forked child before exec.  The caller's own thread
never changes namespace, which keeps the root namespace safe from a lab that
misroutes: code that forgot to come back cannot exist.  The agent's datapath
code (tc, uplink, hostpath, nodeinfo, interfaces) takes an optional namespace for
the tests and the lab, and enters it here; so does the lab.

Not pyroute2's IPRoute(netns=...) or NetNS: they fork a helper and end it with
SIGTERM, and a forked copy of a caller that turns SIGTERM into an exception
(pytest's e2e conftest, the benchmark) would run the caller's cleanup in the
child; they would also create a named namespace that does not exist.

Python 3.11 has no os.setns, hence the libc call.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str | os.PathLike) -> Path:
    """A named namespace (under /run/netns), or a path to one (/proc/PID/ns/net)."""
    return Path(name) if "/" in str(name) else NETNS_RUN_DIR / str(name)


def exists(name: str) -> bool:
    return netns_path(name).exists()


def setns(name: str | os.PathLike) -> None:
    """Move the calling thread into network namespace `name` (never creates one)."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in(name: str | os.PathLike, fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args) in a throw-away thread inside namespace `name`; return or raise its result."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            setns(name)
            result.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def netlink(netns: str | os.PathLike | None, fn: Callable[[Any], T]) -> T:
    """fn(IPRoute) on a netlink socket of namespace `netns` (None: the caller's), closed after.

    pyroute2 0.9 sockets belong to the thread (event loop) that made them, so the socket is
    made, used and closed in the thread that entered the namespace."""
    from pyroute2 import IPRoute

    def work() -> T:
        ipr = IPRoute()
        try:
            return fn(ipr)
        finally:
            ipr.close()

    if not netns:
        return work()
    if not netns_path(netns).exists():
        raise FileNotFoundError(f"network namespace {netns} does not exist")
    return run_in(netns, work)


def write_sysctls(name: str, values: dict[str, str | int]) -> None:
    """Write /proc/sys entries as seen from namespace `name` (net.* sysctls are per namespace)."""
    run_in(name, write_own_sysctls, values)


def write_own_sysctls(values: dict[str, str | int]) -> None:
    """Write /proc/sys entries of the calling thread's namespace.

    /proc/sys/net resolves to the namespace of the thread that opens it, so call
    this from a thread that has entered the namespace (run_in).
    """
    for key, value in values.items():
        Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")


def socket_in(name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in namespace `name` (a socket keeps the namespace it was created in)."""
    return run_in(name, socket.socket, family, kind)


def preexec(name: str, new_session: bool = False) -> Callable[[], None]:
    """A subprocess preexec_fn: enter `name` (and optionally start a session) before exec."""
    def enter() -> None:
        if new_session:
            os.setsid()
        setns(name)

    return enter
