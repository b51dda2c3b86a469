"""The bpf(2) system call, the one place the project calls it directly (bcc covers the rest):
pinned maps opened by path and read (PinnedMap), program names by id (prog_name), programs
run on a test packet (prog_test_run, used through ebpfsvc/datapath/testrun.py), their run-time
statistics (run_time_stats, prog_run_stats: the benchmark's cost per connection), cgroup
programs listed and detached (prog_query, prog_detach: datapath/socklb.py), TCX programs on a
device's TC hooks (tcx_attach, tcx_detach: datapath/tc.py), and compiled programs
loaded from the program cache (prog_load, map_create, map_update_batch: datapath/progcache.py),
pinned and taken back by a restarted agent (obj_pin, obj_get, prog_map_ids, map_id).

Pinned BPF maps are opened by path and read with bpf(2): no compiler, no bcc.

Why not ebpfsvc.datapath.loader.load(pin_dir) for inspection: load() compiles
the datapath (about a second, and it needs kernel headers), and it CREATES and
pins empty maps when the pin directory is wrong or the agent has not run yet,
so a typo in --pin-dir would quietly print an empty node and leave new pins
behind. Opening the pins with BPF_OBJ_GET (read-only) fails loudly instead,
needs only CAP_BPF, costs microseconds, and is what the metrics collector uses
at every scrape too. Entries are decoded with the cffi layouts of
ebpfsvc/abi.py, which tests/bpf/test_abi.py checks against the compiled object;
map key and value sizes are checked against them when a map is opened.

    m = PinnedMap.open("/sys/fs/bpf/ebpfsvc/lb4_frontends")
    for key, value in m.items(): ...          # raw bytes, by BPF_MAP_LOOKUP_BATCH
    m.count()                                 # the kernel's entry count (fill level)
"""

from __future__ import annotations

import ctypes
import errno
from array import array
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from ebpfsvc.abi import slots_per_element

# bpf(2) commands (include/uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_PROG_LOAD = 5
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0      # enum bpf_stats_type

BPF_F_RDONLY = 1 << 3
# TCX (bpf_mprog on a device's TC hooks, Linux >= 6.6): enum bpf_attach_type and the attach flag
# that swaps one attached program for another in place (uapi bpf.h; Debian's 6.1 headers predate them).
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_REPLACE = 1 << 2

# Map types we read (enum bpf_map_type)
MAP_TYPES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash", 10: "lru_percpu_hash"}
PERCPU_TYPES = {"percpu_hash", "percpu_array", "lru_percpu_hash"}
ARRAY_TYPES = {"array", "percpu_array"}

# bpf(2) syscall numbers; the architectures Debian builds bcc for.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
_libc = ctypes.CDLL(None, use_errno=True)


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32),
                ("path_fd", ctypes.c_int32), ("_pad", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _IdAttr(ctypes.Structure):
    """The *_GET_FD_BY_ID member of union bpf_attr."""
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _TestAttr(ctypes.Structure):
    """The `test` member of union bpf_attr (BPF_PROG_TEST_RUN)."""
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info, up to its name."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info: all we need."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


class _ProgLoadAttr(ctypes.Structure):
    """The BPF_PROG_LOAD member of union bpf_attr, up to expected_attach_type."""
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32)]


class _MapCreateAttr(ctypes.Structure):
    """The BPF_MAP_CREATE member of union bpf_attr, up to map_name."""
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown for {platform.machine()}")
    # Pass a zero-padded copy as big as the kernel's union, so unknown trailing fields read 0.
    buf = ctypes.create_string_buffer(max(ctypes.sizeof(attr), 128))
    ctypes.memmove(buf, ctypes.addressof(attr), ctypes.sizeof(attr))
    ret = _libc.syscall(nr, cmd, buf, ctypes.sizeof(buf))
    err = ctypes.get_errno()
    ctypes.memmove(ctypes.addressof(attr), buf, ctypes.sizeof(attr))
    if ret < 0:
        raise OSError(err, os.strerror(err))
    return ret


class _AttachAttr(ctypes.Structure):       # BPF_PROG_ATTACH, BPF_PROG_DETACH
    # target_fd is target_ifindex for TCX; replace_bpf_fd is read with BPF_F_REPLACE only.
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


class _QueryAttr(ctypes.Structure):        # BPF_PROG_QUERY
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32)]


def _bpf_found(cmd: int, attr) -> bool:
    """bpf(2) `cmd`; False when it answers ENOENT (no such element, no next one, nothing attached)."""
    try:
        _bpf(cmd, attr)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        return False
    return True


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Attach program `prog_fd` on `attach_type` of `target_fd` (a cgroup directory's fd), without
    BPF_F_ALLOW_MULTI: it replaces the program attached there in place, if any."""
    _bpf(BPF_PROG_ATTACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type))


def prog_detach(target_fd: int, attach_type: int) -> bool:
    """Detach the program (attached without BPF_F_ALLOW_MULTI) on `attach_type` of `target_fd`, a
    cgroup directory's fd; False when none was attached there."""
    return _bpf_found(BPF_PROG_DETACH, _AttachAttr(target_fd=target_fd, attach_type=attach_type))


def prog_query(target_fd: int, attach_type: int, most: int = 64) -> list[int]:
    """Ids of the programs attached on `attach_type` of `target_fd` itself (a cgroup directory's fd),
    or of a device (`target_fd` its ifindex, the hook a BPF_TCX_* one), in their order of running."""
    ids = (ctypes.c_uint32 * most)()
    attr = _QueryAttr(target_fd=target_fd, attach_type=attach_type, prog_ids=ctypes.addressof(ids), prog_cnt=most)
    _bpf(BPF_PROG_QUERY, attr)
    return list(ids[:attr.prog_cnt])


def tcx_attach(ifindex: int, prog_fd: int, attach_type: int, replace_fd: int | None = None) -> None:
    """Attach program `prog_fd` at TCX hook `attach_type` (BPF_TCX_INGRESS/EGRESS) of device `ifindex`
    of the caller's network namespace: after the programs already there, or in the place of the
    program `replace_fd` in one step (no moment without either). It stays attached without an fd
    held (not a link), until detached or the device goes, as a tc filter does."""
    attr = _AttachAttr(target_fd=ifindex, attach_bpf_fd=prog_fd, attach_type=attach_type)
    if replace_fd is not None:
        attr.attach_flags, attr.replace_bpf_fd = BPF_F_REPLACE, replace_fd
    _bpf(BPF_PROG_ATTACH, attr)


def tcx_detach(ifindex: int, prog_fd: int, attach_type: int) -> bool:
    """Detach program `prog_fd` from TCX hook `attach_type` of device `ifindex`; False if it was not there."""
    return _bpf_found(BPF_PROG_DETACH, _AttachAttr(target_fd=ifindex, attach_bpf_fd=prog_fd, attach_type=attach_type))


def prog_get_fd(prog_id: int) -> int:
    """A new fd of the loaded program with id `prog_id` (OSError ENOENT when there is none)."""
    return _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))


def prog_fd_id_name(fd: int) -> tuple[int, str]:
    """(id, name) of program `fd`."""
    info = _ProgInfo()
    _obj_info(fd, info)
    return info.id, info.name.decode(errors="replace")


def _obj_info(fd: int, info: ctypes.Structure) -> None:
    """BPF_OBJ_GET_INFO_BY_FD into `info` (the head of a struct bpf_*_info: the kernel fills what fits)."""
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))


class _ProgRunInfo(ctypes.Structure):
    """struct bpf_prog_info up to its run-time statistics (run_time_ns, run_cnt: kernel >= 5.1)."""
    _fields_ = _ProgInfo._fields_ + [
        ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64)]


def prog_fd_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of program `fd` since it was loaded, counted while run-time statistics
    are on (run_time_stats())."""
    info = _ProgRunInfo()
    _obj_info(fd, info)
    return info.run_time_ns, info.run_cnt


def prog_name(prog_id: int) -> str:
    """The name of the loaded program with id `prog_id` ("" when there is none)."""
    try:
        fd = prog_get_fd(prog_id)
    except OSError:
        return ""
    try:
        return prog_fd_id_name(fd)[1]
    except OSError:
        return ""
    finally:
        os.close(fd)


def prog_run_stats(prog_id: int) -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of program `prog_id`: counted only while run-time statistics are
    on (run_time_stats()); None when there is no such program."""
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))
    except OSError:
        return None
    try:
        return prog_fd_run_stats(fd)
    finally:
        os.close(fd)


class _StatsAttr(ctypes.Structure):         # BPF_ENABLE_STATS
    _fields_ = [("type", ctypes.c_uint32)]


def run_time_stats() -> int:
    """Turn on every program's run-time statistics (run_time_ns, run_cnt) until the returned fd is
    closed: kernel.bpf_stats_enabled without writing the sysctl, so a crash cannot leave it on
    (statistics cost every program run a clock read, on every program on the machine)."""
    return _bpf(BPF_ENABLE_STATS, _StatsAttr(type=BPF_STATS_RUN_TIME))


def programs_using_map(map_id: int, prog_type: int | None = None) -> list[tuple[int, str]]:
    """(id, name) of every loaded program (of `prog_type`, a BPF_PROG_TYPE_*) that uses map `map_id`:
    whether some program serves a pinned map, without knowing where it is attached."""
    out = []
    attr = _IdAttr(id=0)
    while True:
        if not _bpf_found(BPF_PROG_GET_NEXT_ID, attr):
            return out
        attr.id = attr.next_id
        try:
            fd = _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=attr.id))
        except OSError:
            continue            # unloaded meanwhile
        try:
            info = _ProgInfo()
            _obj_info(fd, info)
            if prog_type is not None and info.type != prog_type or not info.nr_map_ids:
                continue
            ids = (ctypes.c_uint32 * info.nr_map_ids)()
            count = info.nr_map_ids
            info = _ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
            _obj_info(fd, info)
            if map_id in ids[:min(count, info.nr_map_ids)]:
                out.append((attr.id, info.name.decode(errors="replace")))
        except OSError:
            continue
        finally:
            os.close(fd)


def prog_test_run(prog_fd: int, data_in, data_size_in: int, data_out, data_size_out: int, *, repeat: int = 1,
                  ctx_in=None, ctx_size_in: int = 0) -> tuple[int, int, int]:
    """BPF_PROG_TEST_RUN on ctypes buffers: (the program's return value, bytes written to
    data_out, mean ns per run). ebpfsvc/datapath/testrun.py wraps it for packets."""
    attr = _TestAttr(prog_fd=prog_fd, data_size_in=data_size_in, data_size_out=data_size_out,
                     data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out), repeat=repeat,
                     ctx_in=ctypes.addressof(ctx_in) if ctx_in is not None else 0, ctx_size_in=ctx_size_in)
    try:
        _bpf(BPF_PROG_TEST_RUN, attr)
    except OSError as e:
        raise OSError(e.errno, f"BPF_PROG_TEST_RUN: {e.strerror}") from None
    return attr.retval, attr.data_size_out, attr.duration


def prog_load(prog_type: int, insns: bytes, *, license: str, name: str, kern_version: int = 0,
              expected_attach_type: int = 0) -> int:
    """BPF_PROG_LOAD: the fd of the verified program. Its map references (BPF_PSEUDO_MAP_FD) must
    already hold this process's map fds; a cgroup sock_addr program names its hook
    (`expected_attach_type`). A refusal raises OSError with the verifier log's last line."""
    code = ctypes.create_string_buffer(bytes(insns), len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
                         license=ctypes.addressof(lic), kern_version=kern_version,
                         prog_name=name.encode()[:15],     # BPF_OBJ_NAME_LEN, as bcc truncates
                         expected_attach_type=expected_attach_type)
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as first:
        # Again with the verifier's log, only to say why: a log costs time and memory on success.
        log_buf = ctypes.create_string_buffer(1 << 20)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log_buf), ctypes.addressof(log_buf)
        try:
            fd = _bpf(BPF_PROG_LOAD, attr)
        except OSError:
            lines = log_buf.value.decode(errors="replace").strip().splitlines()
            raise OSError(first.errno, f"BPF_PROG_LOAD {name}: {first.strerror}"
                          + (f" ({lines[-1]})" if lines else "")) from None
        return fd       # refused once, accepted with a log: keep it


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, *, flags: int = 0,
               name: str = "") -> int:
    """BPF_MAP_CREATE of an unpinned map: its fd."""
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                          map_flags=flags, map_name=name.encode()[:15])
    try:
        return _bpf(BPF_MAP_CREATE, attr)
    except OSError as e:
        raise OSError(e.errno, f"BPF_MAP_CREATE {name}: {e.strerror}") from None


def obj_pin(fd: int, path: str | os.PathLike) -> None:
    """BPF_OBJ_PIN: pin object `fd` (a program) at `path` on a bpffs."""
    p = os.fsencode(str(path)) + b"\0"
    buf = ctypes.create_string_buffer(p, len(p))
    try:
        _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(buf), bpf_fd=fd))
    except OSError as e:
        raise OSError(e.errno, f"cannot pin at {path}: {e.strerror}") from None


def obj_get(path: str | os.PathLike) -> int:
    """BPF_OBJ_GET, read-write: an fd of the object pinned at `path` (a program, to attach)."""
    p = os.fsencode(str(path)) + b"\0"
    buf = ctypes.create_string_buffer(p, len(p))
    try:
        return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(buf)))
    except OSError as e:
        raise OSError(e.errno, f"cannot open pinned object {path}: {e.strerror}") from None


def prog_map_ids(fd: int) -> list[int]:
    """Ids of the maps program `fd` references."""
    info = _ProgInfo()
    _obj_info(fd, info)
    count = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info = _ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    _obj_info(fd, info)
    return list(ids[:min(count, info.nr_map_ids)])


def map_id(fd: int) -> int:
    """The kernel's id of map `fd` (the same for every fd of one map)."""
    info = _MapInfo()
    _obj_info(fd, info)
    return info.id


def map_shape(fd: int) -> tuple[int, int, int, int, int]:
    """(type, key size, value size, max entries, flags) of map `fd`: what map_create needs to make
    another like it."""
    info = _MapInfo()
    _obj_info(fd, info)
    return info.type, info.key_size, info.value_size, info.max_entries, info.map_flags


def map_update_batch(map_fd: int, keys: bytes, values: bytes, count: int) -> None:
    """BPF_MAP_UPDATE_BATCH: `count` packed keys and values written in one call."""
    kbuf = ctypes.create_string_buffer(bytes(keys), len(keys))
    vbuf = ctypes.create_string_buffer(bytes(values), len(values))
    attr = _BatchAttr(keys=ctypes.addressof(kbuf), values=ctypes.addressof(vbuf), count=count, map_fd=map_fd)
    _bpf(BPF_MAP_UPDATE_BATCH, attr)
    if attr.count != count:
        raise OSError(errno.EIO, f"BPF_MAP_UPDATE_BATCH wrote {attr.count} of {count} entries")


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """How many values a per-CPU map holds per key: the kernel's possible CPUs, not the online ones."""
    with open("/sys/devices/system/cpu/possible") as f:
        return count_cpu_list(f.read())


def count_cpu_list(text: str) -> int:
    """CPUs in a kernel CPU list such as "0-3,8-11" or "0"."""
    n = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


@dataclass(frozen=True)
class MapInfo:
    type: str
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


class PinnedMap:
    """One pinned map, opened read-only. Keys and values are bytes; per-CPU values are lists of bytes."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path
        raw = _MapInfo()
        _obj_info(fd, raw)
        self.info = MapInfo(MAP_TYPES.get(raw.type, str(raw.type)), raw.id, raw.key_size, raw.value_size,
                            raw.max_entries, raw.name.decode(errors="replace"))
        self.percpu = self.info.type in PERCPU_TYPES
        # Per-CPU values come back as one 8-byte aligned slot per possible CPU.
        self._slot = (self.info.value_size + 7) & ~7 if self.percpu else self.info.value_size
        self._ncpu = possible_cpus() if self.percpu else 1
        self._batch_ok = True

    @classmethod
    def open(cls, path: str | os.PathLike) -> "PinnedMap":
        p = os.fsencode(str(path)) + b"\0"
        buf = ctypes.create_string_buffer(p, len(p))
        attr = _ObjAttr(pathname=ctypes.addressof(buf), file_flags=BPF_F_RDONLY)
        try:
            fd = _bpf(BPF_OBJ_GET, attr)
        except OSError as e:
            raise OSError(e.errno, f"cannot open pinned map {path}: {e.strerror}") from None
        try:
            return cls(fd, str(path))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PinnedMap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def max_entries(self) -> int:
        return self.info.max_entries

    @property
    def value_bytes(self) -> int:
        return self._slot * self._ncpu

    def _split(self, value: bytes):
        if not self.percpu:
            return value
        vs = self.info.value_size
        return [value[i * self._slot: i * self._slot + vs] for i in range(self._ncpu)]

    # ---- single lookups ----------------------------------------------------------------

    def lookup(self, key: bytes):
        """The value of `key`, or None when absent."""
        if len(key) != self.info.key_size:
            raise ValueError(f"{self.path}: key is {len(key)} bytes, the map's are {self.info.key_size}")
        kbuf = ctypes.create_string_buffer(bytes(key), len(key))
        vbuf = ctypes.create_string_buffer(self.value_bytes)
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf))
        if not _bpf_found(BPF_MAP_LOOKUP_ELEM, attr):
            return None
        return self._split(vbuf.raw)

    def keys(self) -> Iterator[bytes]:
        """Every key, by BPF_MAP_GET_NEXT_KEY (entries may change meanwhile; each key at most once)."""
        ks = self.info.key_size
        cur = None
        nxt = ctypes.create_string_buffer(ks)
        while True:
            attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(cur) if cur is not None else 0,
                             value=ctypes.addressof(nxt))
            if not _bpf_found(BPF_MAP_GET_NEXT_KEY, attr):
                return
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, ks)

    # ---- whole-map reads -----------------------------------------------------------------

    def items(self, chunk: int = 4096) -> list[tuple[bytes, object]]:
        """Every (key, value): BPF_MAP_LOOKUP_BATCH, or key by key where the kernel refuses batches."""
        if self._batch_ok:
            try:
                return list(self._batch(None, chunk))
            except OSError as e:
                if e.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        out = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def _raw_batches(self, start: bytes | None, chunk: int, limit: int | None = None):
        """BPF_MAP_LOOKUP_BATCH from the key after `start` (None: from the beginning), at most `limit`
        entries: yields (count, keys bytes, values bytes) per call."""
        ks, vb = self.info.key_size, self.value_bytes
        chunk = max(1, min(chunk, self.info.max_entries))
        keys = ctypes.create_string_buffer(ks * chunk)
        vals = ctypes.create_string_buffer(vb * chunk)
        token_in = ctypes.create_string_buffer(max(ks, 8))
        token_out = ctypes.create_string_buffer(max(ks, 8))
        if start is not None:
            ctypes.memmove(token_in, start, len(start))
        first = start is None
        left = limit
        while left is None or left > 0:
            want = chunk if left is None else min(chunk, left)
            attr = _BatchAttr(in_batch=0 if first else ctypes.addressof(token_in),
                              out_batch=ctypes.addressof(token_out), keys=ctypes.addressof(keys),
                              values=ctypes.addressof(vals), count=want, map_fd=self.fd)
            done = False
            try:
                _bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except OSError as e:
                # ENOENT: the last batch, attr.count says how many came with it. (ENOSPC, a hash
                # bucket bigger than the chunk, is left to the caller's key-by-key fallback.)
                if e.errno != errno.ENOENT:
                    raise
                done = True
            n = attr.count
            yield n, keys.raw[:n * ks], vals.raw[:n * vb]
            if done or not n:
                return
            if left is not None:
                left -= n
            ctypes.memmove(token_in, token_out, len(token_out.raw))
            first = False

    def _batch(self, start: bytes | None, chunk: int):
        ks, vb = self.info.key_size, self.value_bytes
        for n, raw_k, raw_v in self._raw_batches(start, chunk):
            for i in range(n):
                yield raw_k[i * ks:(i + 1) * ks], self._split(raw_v[i * vb:(i + 1) * vb])

    def count(self) -> int:
        """Entries present now, as the kernel sees them (an ARRAY always holds max_entries)."""
        if self.info.type in ARRAY_TYPES:
            return self.info.max_entries
        if self._batch_ok:
            try:
                return sum(n for n, _, _ in self._raw_batches(None, 4096))
            except OSError as e:
                if e.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        return sum(1 for _ in self.keys())

    def read_array(self, offset: int, size: int) -> bytes:
        """Raw values of keys [offset, offset + size) of an ARRAY map (per-CPU: every CPU's slot in
        turn), by batches of up to 64k entries; key by key where the kernel refuses batches."""
        vb = self.value_bytes
        out = bytearray(vb * max(size, 0))
        if size <= 0:
            return bytes(out)
        if self._batch_ok:
            try:
                # An ARRAY's batches come in key order, from the key after the start token.
                pos = 0
                for n, raw_k, raw_v in self._raw_batches(_u32(offset - 1) if offset else None,
                                                          min(size, 1 << 16), limit=size):
                    if n and _from_u32(raw_k[:4]) != offset + pos:
                        raise OSError(errno.EINVAL, "array batch not in key order")
                    out[pos * vb:(pos + n) * vb] = raw_v
                    pos += n
                return bytes(out)
            except OSError as e:
                if e.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        for i in range(size):
            kbuf = ctypes.create_string_buffer(_u32(offset + i), 4)
            vbuf = ctypes.create_string_buffer(vb)
            attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf))
            if _bpf_found(BPF_MAP_LOOKUP_ELEM, attr):
                out[i * vb:(i + 1) * vb] = vbuf.raw
        return bytes(out)

    def read_slots(self, offset: int, size: int) -> array:
        """Maglev slots [offset, offset + size) of lb_maglev: the elements holding them, read whole
        (abi.slots_per_element slots each)."""
        per = slots_per_element(self.info.value_size)
        first, end = offset // per, -(-(offset + size) // per)
        words = array("I", self.read_array(first, end - first))
        skip = offset - first * per
        return words[skip:skip + size]


_NO_BATCH = {errno.EINVAL, errno.ENOSPC, errno.EOPNOTSUPP, 524}     # 524: the kernel's ENOTSUPP
_BYTEORDER = "little" if bytes(ctypes.c_uint16(1))[0] == 1 else "big"


def _u32(v: int) -> bytes:
    return v.to_bytes(4, _BYTEORDER)


def _from_u32(b: bytes) -> int:
    return int.from_bytes(b, _BYTEORDER)
