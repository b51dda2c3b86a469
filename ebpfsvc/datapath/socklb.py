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

The programs go through the program cache like the TC ones (loader.load with attach_types:
each is verified for its hook); attaching, listing and detaching are bpf(2) commands
(datapath/bpfsys.py: prog_attach, prog_query, prog_detach), so that a cached program attaches as a
compiled one does and `ebpfsvc cleanup` needs no program fd.

    socklb.reset_removed(cgroup, dp.maps, keeps)  # sockets to removed backends destroyed

A socket the programs translated carries no conntrack entry that could go stale, so the agent
itself ends the ones whose backend left: netlink SOCK_DESTROY (inet_diag,
CONFIG_INET_DIAG_DESTROY) in each network namespace of the cgroup's processes.

IPv6 sockets have the same four hooks (connect6, ...) over the lb6_* maps; a dual-stack socket
naming an IPv4 Service by its IPv4-mapped address (::ffff:a.b.c.d) takes the IPv4 logic and maps.

The server side has one hook, sock_ops: an accepted TCP connection that no conntrack entry of ours
describes (its client came by the socket path, or from another node) is marked like a translated
client socket, so the server veth's from_pod lets its replies pass unparsed (bpf/lib/sock.h,
lb_sock_ops).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ebpfsvc import abi
from ebpfsvc.datapath import bpfsys, loader, nsenter

SOURCE = loader.BPF_DIR / "lb_sock.c"

#: program -> the cgroup hook (enum bpf_attach_type, uapi/linux/bpf.h) it is loaded and attached for.
HOOKS = {
    "connect4": 10,        # BPF_CGROUP_INET4_CONNECT
    "sendmsg4": 14,        # BPF_CGROUP_UDP4_SENDMSG
    "recvmsg4": 19,        # BPF_CGROUP_UDP4_RECVMSG
    "getpeername4": 29,    # BPF_CGROUP_INET4_GETPEERNAME
    "connect6": 11,        # BPF_CGROUP_INET6_CONNECT
    "sendmsg6": 15,        # BPF_CGROUP_UDP6_SENDMSG
    "recvmsg6": 20,        # BPF_CGROUP_UDP6_RECVMSG
    "getpeername6": 30,    # BPF_CGROUP_INET6_GETPEERNAME
    "sock_ops": loader.CGROUP_SOCK_OPS,     # a server's accepted connections (marked: from_pod's fast exit)
}
PROGRAMS = tuple(HOOKS)


class CgroupError(RuntimeError):
    pass


def load(pin_dir, *, limits: loader.Limits | None = None, cache: bool = True, program_cache: bool = False,
         maps_unit=None, compile_apart: bool = False) -> loader.Datapath:
    """Compile (or take from the program cache) lb_sock.c on the maps pinned in `pin_dir` and load
    its programs, each for its cgroup hook (the kernel's expected_attach_type: HOOKS). The other
    arguments are loader.load's. The programs are not pinned: a loaded socket program is how
    `ebpfsvc why` and `service list` tell that the socket path serves (inspect/node.py
    socket_programs), so they live only while an agent or a cgroup holds them."""
    return loader.load(pin_dir, limits=limits, cache=cache, source=SOURCE, programs=PROGRAMS, attach_types=HOOKS,
                       program_cache=program_cache, maps_unit=maps_unit, compile_apart=compile_apart,
                       pin_programs=False)


#: --socket-lb-cgroup's value that finds the kubelet's cgroup (find_kubelet_cgroup) instead of naming it.
AUTO = "auto"
#: The kubelet's parent cgroup of all pods, by cgroup driver: systemd, then cgroupfs.
KUBELET_CGROUPS = ("kubepods.slice", "kubepods")


def cgroup2_mounts(mountinfo: str | Path = "/proc/self/mountinfo") -> list[Path]:
    """Every place a cgroup v2 hierarchy is mounted, in mount order: /sys/fs/cgroup, or .../unified on
    a hybrid v1/v2 machine; in a container also the host's, mounted from a hostPath (deploy/). Read,
    not assumed."""
    found = []
    for line in Path(mountinfo).read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            found.append(Path(left.split()[4]))
    return found


def cgroup2_mount(mountinfo: str | Path = "/proc/self/mountinfo") -> Path:
    """The first cgroup v2 mount (cgroup2_mounts): where a relative --socket-lb-cgroup is."""
    mounts = cgroup2_mounts(mountinfo)
    if not mounts:
        raise CgroupError("no cgroup2 file system mounted (/proc/self/mountinfo): socket-level load balancing "
                          "needs one")
    return mounts[0]


def find_kubelet_cgroup(mountinfo: str | Path = "/proc/self/mountinfo") -> Path:
    """The kubelet's pods cgroup (KUBELET_CGROUPS) right below a cgroup2 mount, the last mount first: in
    the DaemonSet the host's hierarchy is mounted after the container's own (deploy/daemonset.yaml)."""
    mounts = cgroup2_mounts(mountinfo)
    for mount in reversed(mounts):
        for name in KUBELET_CGROUPS:
            if (mount / name / "cgroup.procs").is_file():
                return mount / name
    raise CgroupError(f"--socket-lb-cgroup {AUTO}: no {' or '.join(KUBELET_CGROUPS)} below the cgroup2 mounts "
                      f"({', '.join(map(str, mounts)) or 'none'})")


def resolve_cgroup(path, mountinfo: str | Path = "/proc/self/mountinfo") -> Path:
    """A cgroup given as absolute path, relative to the first cgroup2 mount, or AUTO (the kubelet's),
    checked as a target."""
    if str(path) == AUTO:
        path = find_kubelet_cgroup(mountinfo)
    path = Path(path)
    if not path.is_absolute():
        path = cgroup2_mount(mountinfo) / path
    _check_target(path, mountinfo)
    return path


def _check_target(cgroup: Path, mountinfo: str | Path = "/proc/self/mountinfo") -> None:
    # Programs at a hierarchy's root would serve every process of the machine:
    # only a cgroup below it (the kubelet's, the lab's) is a target.
    mounts = [m.resolve() for m in cgroup2_mounts(mountinfo)]
    target = cgroup.resolve()
    if target in mounts:
        raise CgroupError(f"cgroup {cgroup}: the cgroup2 root; attach to a node's own cgroup below it")
    if not any(m in target.parents for m in mounts) or not (cgroup / "cgroup.procs").is_file():
        raise CgroupError(f"cgroup {cgroup}: not a cgroup v2 directory (the cgroup2 mounts are "
                          f"{', '.join(map(str, mounts)) or 'none'})")


def _open(cgroup: Path) -> int:
    return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)


def attach(dp: loader.Datapath, cgroup, programs: tuple[str, ...] = PROGRAMS) -> None:
    """Attach the `programs` of `dp` (socklb.load; all of them unless named) to `cgroup`, each on
    its hook, replacing ours in place."""
    cgroup = Path(cgroup)
    _check_target(cgroup)
    fd = _open(cgroup)
    try:
        for name in programs:
            bpfsys.prog_attach(dp.programs[name].fd, fd, HOOKS[name])
    finally:
        os.close(fd)


def detach(cgroup, programs: tuple[str, ...] = PROGRAMS) -> list[str]:
    """Detach whatever program sits on the hooks of our `programs` (all unless named) of `cgroup`;
    the programs whose hook had one."""
    cgroup = Path(cgroup)
    if not cgroup.is_dir():
        return []
    done = []
    fd = _open(cgroup)
    try:
        for name in programs:
            if bpfsys.prog_detach(fd, HOOKS[name]):
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


# ---- sockets to removed backends --------------------------------------------------------------

#: (protocol number, backend address of either family, backend port) -> whether a flow of that
#: protocol may stay on that backend: the TC path's lb4_flow_keeps_backend / lb6_flow_keeps_backend
#: (bpf/lib/lb.h), asked of the same maps.
KeepsBackend = Callable[[int, str, int], bool]

# TCP states that still carry a connection (inet_diag's SS_* bits): not LISTEN, CLOSE, TIME_WAIT
# or SYN_RECV (a server's half-open socket: never one the programs translated).
_TCP_CONNECTED = sum(1 << s for s in (1, 2, 4, 5, 8, 9, 11))
_ALL_STATES = 0xFFFFFFFF
_PROTOCOLS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_NLMSG_ERROR = 2


@dataclass
class ResetReport:
    """What reset_removed did: sockets destroyed per protocol, namespaces searched, failures."""

    destroyed: dict[str, int] = field(default_factory=lambda: {"TCP": 0, "UDP": 0})
    namespaces: int = 0
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(self.destroyed.values())


def keeps_in_maps(writer) -> KeepsBackend:
    """`keeps` for reset_removed from what `writer` (the MapWriter) wrote: the TC path's rule over the
    same lb4_backends / lb6_backends (bpf/lib/lb.h, lb4_flow_keeps_backend): a backend still in the
    map keeps its TCP connections; its UDP flows only while it is ready."""
    from ebpfsvc.lbmodel import Backend, Protocol

    def keeps(proto: int, address: str, port: int) -> bool:
        protocol = Protocol.TCP if proto == socket.IPPROTO_TCP else Protocol.UDP
        addr = ipaddress.ip_address(address)
        be_id = writer.backend_id(Backend(addr, port, protocol))
        if be_id is None:
            return False
        if protocol is Protocol.UDP:
            table = writer.backends6_map if addr.version == 6 else writer.backends_map
            try:
                return not table[table.Key(be_id)].flags & abi.LB_BE_F_NOT_READY
            except KeyError:
                return False
        return True

    return keeps


def cgroup_netns(cgroup) -> dict[int, str]:
    """The network namespaces of the processes in `cgroup`'s subtree: inode -> a /proc path to it.

    The sockets the programs translated were made by those processes, in their namespaces (a pod's,
    or the node's for its own processes). A process gone meanwhile is skipped."""
    found: dict[int, str] = {}
    for procs in Path(cgroup).rglob("cgroup.procs"):
        try:
            pids = procs.read_text().split()
        except OSError:
            continue            # the cgroup went with its pod
        for pid in pids:
            path = f"/proc/{pid}/ns/net"
            try:
                found.setdefault(os.stat(path).st_ino, path)
            except OSError:
                continue
    return found


def reset_removed(cgroup, maps, keeps: KeepsBackend) -> ResetReport:
    """Destroy the sockets of `cgroup`'s processes that the programs sent to a backend which may no
    longer keep them (`keeps`), as the TC path resets a flow whose conntrack entry names one.

    A socket counts as translated when the reverse map of `maps` (the socket datapath's:
    lb4_sock_revnat, lb6_sock_revnat) holds (its cookie, its peer): a pod's own connections
    straight to a pod address are left alone. IPv6 sockets are searched too; one whose peer is
    IPv4-mapped (a dual-stack socket sent to an IPv4 backend) is found in lb4_sock_revnat.

    TCP: the kernel sends the backend a RST and the application's next call fails with
    ECONNABORTED. Connected UDP: the
    socket is disconnected (ECONNABORTED pending, then EDESTADDRREQ on send) so the application
    connects again, to a live backend; an unconnected one needs nothing, each datagram is
    balanced anew."""
    report = ResetReport()
    for path in cgroup_netns(cgroup).values():
        try:
            counts, refused = nsenter.run_in(path, _reset_in_netns, _Translated(maps), keeps)
        except OSError as exc:     # the namespace went with its pod, or netlink refused the dump
            report.errors.append(f"{path}: {exc}")
            continue
        report.namespaces += 1
        report.errors.extend(f"{path}: {error}" for error in refused)
        for proto, n in counts.items():
            report.destroyed[proto] += n
    return report


class _Translated:
    """Whether the socket path translated a socket: its (cookie, peer) in lb4_sock_revnat, or in
    lb6_sock_revnat for an IPv6 peer that is not IPv4-mapped (bpf/lib/sock.h lb6_sock_hook)."""

    def __init__(self, maps):
        self.revnat4, self.revnat6 = maps["lb4_sock_revnat"], maps.get("lb6_sock_revnat")

    def __call__(self, cookie: int, peer: str, port: int) -> bool:
        addr = ipaddress.ip_address(peer)
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if addr.version == 4:
            key = self.revnat4.Key(cookie=cookie, address=abi.be32(addr), port=abi.be16(port))
            table = self.revnat4
        elif self.revnat6 is None:
            return False
        else:
            key = self.revnat6.Key(cookie=cookie, port=abi.be16(port))
            key.address[:] = abi.be128(addr)
            table = self.revnat6
        try:
            table[key]
        except KeyError:
            return False
        return True


def _reset_in_netns(translated: _Translated, keeps: KeepsBackend) -> tuple[dict[str, int], list[str]]:
    """The sockets destroyed per protocol, and the ones the kernel refused to destroy: one refusal
    does not keep the others on a backend that left."""
    from pyroute2 import DiagSocket

    counts = {"TCP": 0, "UDP": 0}
    refused: list[str] = []
    with DiagSocket() as diag:
        diag.bind()
        for family in _FAMILIES:
            for proto in _PROTOCOLS:
                states = _TCP_CONNECTED if proto == socket.IPPROTO_TCP else _ALL_STATES
                for msg in diag.get_sock_stats(family=family, protocol=proto, states=states):
                    peer, port = msg["idiag_dst"], msg["idiag_dport"]
                    if not port or ipaddress.ip_address(peer).is_unspecified:
                        continue                    # an unconnected UDP socket, a listener
                    if not translated(msg["idiag_cookie"], peer, port):
                        continue                    # not translated by the socket path
                    if keeps(proto, _unmapped(peer), port):
                        continue
                    try:
                        _destroy(diag, family, proto, msg)
                    except OSError as exc:
                        refused.append(str(exc))
                        continue
                    counts["TCP" if proto == socket.IPPROTO_TCP else "UDP"] += 1
    return counts, refused


def _unmapped(address: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it carries (the backend's, in lb4_backends)."""
    addr = ipaddress.ip_address(address)
    return str(addr.ipv4_mapped) if addr.version == 6 and addr.ipv4_mapped else address


def _diag_words(family: int, address: str) -> tuple[int, int, int, int]:
    """An inet_diag address field (four big-endian words; IPv4 in the first)."""
    if family == socket.AF_INET6:
        return struct.unpack(">4I", socket.inet_pton(socket.AF_INET6, address))
    return (struct.unpack(">I", socket.inet_aton(address))[0], 0, 0, 0)


def _destroy(diag, family: int, proto: int, msg) -> None:
    """SOCK_DESTROY the socket `msg` (an inet_diag dump entry of `family`) names, cookie included."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.diag import SOCK_DESTROY, inet_diag_req

    req = inet_diag_req()
    req["sdiag_family"], req["sdiag_protocol"] = family, proto
    req["idiag_states"] = _ALL_STATES
    req["idiag_sport"], req["idiag_dport"] = msg["idiag_sport"], msg["idiag_dport"]
    req["idiag_src"] = _diag_words(family, msg["idiag_src"])
    req["idiag_dst"] = _diag_words(family, msg["idiag_dst"])
    req["idiag_if"], req["idiag_cookie"] = msg["idiag_if"], msg["idiag_cookie"]
    for answer in diag.nlm_request(req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK):
        # DiagSocket leaves NLMSG_ERROR undecoded (its marshal keys on the family byte): the
        # errno is the s32 after the 16-byte header, 0 for the ACK.
        if answer["header"]["type"] != _NLMSG_ERROR:
            continue
        code = -struct.unpack_from("i", answer.data, answer.offset + 16)[0]
        # ENOENT: the socket closed since the dump; anything else (EOPNOTSUPP: a kernel without
        # CONFIG_INET_DIAG_DESTROY) is the caller's to report.
        if code not in (0, errno.ENOENT):
            raise OSError(code, f"SOCK_DESTROY {msg['idiag_dst']}:{msg['idiag_dport']}: {os.strerror(code)}")


__all__ = ["HOOKS", "PROGRAMS", "SOURCE", "AUTO", "KUBELET_CGROUPS", "CgroupError", "load", "attach", "detach",
           "attached", "cgroup2_mount", "cgroup2_mounts", "find_kubelet_cgroup", "resolve_cgroup", "reset_removed", "keeps_in_maps", "cgroup_netns", "ResetReport"]
