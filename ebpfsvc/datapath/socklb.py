"""Socket-level load balancing: compile bpf/lb_sock.c and attach it to a cgroup v2.

    dp = socklb.load(pin_dir)                  # same pinned maps as the TC programs
    socklb.attach(dp, "/sys/fs/cgroup/unified/ebpfsvc-x/node-1")
    socklb.attached(cgroup)                    # {hook: [program ids]}
    socklb.detach(cgroup)                      # every hook, also after a crash

Every program runs for the sockets of every process in the cgroup's subtree
(the node's pods, and its own processes when they are under it), so one attach
per node covers all of them. Attach and detach replace in place (no
BPF_F_ALLOW_MULTI): a restarted agent's programs take over from the old ones
with no window, as at TC, and detaching needs no program fd, so `ebpfsvc
cleanup` can remove what a crashed agent left.

bcc attaches (BPF.attach_func) but cannot list or detach without the program;
those two are bpf(2) commands (datapath/bpfsys.py: prog_query, prog_detach).
"""

from __future__ import annotations

import os
from pathlib import Path

from ebpfsvc.datapath import bpfsys, loader

SOURCE = loader.BPF_DIR / "lb_sock.c"

#: program -> the cgroup hook (enum bpf_attach_type, uapi/linux/bpf.h) it is loaded and attached for.
HOOKS = {
    "connect4": 10,        # BPF_CGROUP_INET4_CONNECT
    "sendmsg4": 14,        # BPF_CGROUP_UDP4_SENDMSG
    "recvmsg4": 19,        # BPF_CGROUP_UDP4_RECVMSG
    "getpeername4": 29,    # BPF_CGROUP_INET4_GETPEERNAME
}
PROGRAMS = tuple(HOOKS)


class CgroupError(RuntimeError):
    pass


def load(pin_dir, *, limits: loader.Limits | None = None, cache: bool = True) -> loader.Datapath:
    """Compile lb_sock.c on the maps pinned in `pin_dir` and load its programs.

    cgroup sock_addr programs must name their hook at load time (the kernel's
    expected_attach_type), so they are loaded here rather than by loader.load."""
    from bcc import BPF

    dp = loader.load(pin_dir, limits=limits, cache=cache, source=SOURCE, programs=())
    for name, hook in HOOKS.items():
        if name not in dp.programs:
            dp.programs[name] = dp.bpf.load_func(name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=hook)
    return dp


def cgroup2_mount(mountinfo: str | Path = "/proc/self/mountinfo") -> Path:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified
    on a hybrid v1/v2 machine): read, not assumed."""
    for line in Path(mountinfo).read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4])
    raise CgroupError("no cgroup2 file system mounted (/proc/self/mountinfo): socket-level load balancing needs one")


def resolve_cgroup(path) -> Path:
    """A cgroup given as absolute path or relative to the cgroup2 mount, checked as a target."""
    path = Path(path)
    if not path.is_absolute():
        path = cgroup2_mount() / path
    _check_target(path)
    return path


def _check_target(cgroup: Path) -> None:
    # Programs at the hierarchy's root would serve every process of the machine:
    # only a cgroup the project created below it is a target.
    if cgroup.resolve() == cgroup2_mount().resolve():
        raise CgroupError(f"cgroup {cgroup}: the cgroup2 root; attach to a node's own cgroup below it")
    mount = cgroup2_mount().resolve()
    if mount not in cgroup.resolve().parents or not (cgroup / "cgroup.procs").is_file():
        raise CgroupError(f"cgroup {cgroup}: not a cgroup v2 directory (the cgroup2 mount is {mount})")


def _open(cgroup: Path) -> int:
    return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)


def attach(dp: loader.Datapath, cgroup) -> None:
    """Attach every program of `dp` (socklb.load) to `cgroup`, replacing ours in place."""
    from bcc import BPF

    cgroup = Path(cgroup)
    _check_target(cgroup)
    fd = _open(cgroup)
    try:
        for name, hook in HOOKS.items():
            BPF.attach_func(dp.programs[name], fd, hook)
    finally:
        os.close(fd)


def detach(cgroup) -> list[str]:
    """Detach whatever program sits on our hooks of `cgroup`; the hooks that had one."""
    cgroup = Path(cgroup)
    if not cgroup.is_dir():
        return []
    done = []
    fd = _open(cgroup)
    try:
        for name, hook in HOOKS.items():
            if bpfsys.prog_detach(fd, hook):
                done.append(name)
    finally:
        os.close(fd)
    return done


def attached(cgroup) -> dict[str, list[int]]:
    """Program ids attached to `cgroup` itself, per hook of ours (empty lists when none)."""
    cgroup = Path(cgroup)
    out: dict[str, list[int]] = {}
    fd = _open(cgroup)
    try:
        for name, hook in HOOKS.items():
            out[name] = bpfsys.prog_query(fd, hook)
    finally:
        os.close(fd)
    return out


__all__ = ["HOOKS", "PROGRAMS", "SOURCE", "CgroupError", "load", "attach", "detach", "attached", "cgroup2_mount",
           "resolve_cgroup"]
