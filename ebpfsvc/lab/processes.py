"""Long-lived lab processes (pods, agents, the controller): records, liveness, killing.

A bare pid is not an identity: after a crash and a reboot of the lab, the pid
of a dead pod may belong to someone else's process.  A record therefore keeps
the process start time too, and nothing is signalled unless both match, so
`lab down` only ever ends processes the lab itself started.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ebpfsvc.datapath import nsenter

# The package root, so pods and agents can import ebpfsvc whatever their working directory.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class ProcRecord:
    pid: int
    start_time: int     # /proc/PID/stat field 22, clock ticks since boot

    @classmethod
    def of(cls, pid: int) -> "ProcRecord | None":
        stat = _stat(pid)
        return cls(pid, stat[1]) if stat else None

    def to_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "startTime": self.start_time}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ProcRecord | None":
        if not d or "pid" not in d:
            return None
        return cls(int(d["pid"]), int(d.get("startTime", 0)))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: parse after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def alive(rec: ProcRecord | None) -> bool:
    """The recorded process still runs (a zombie has finished: it only waits to be reaped)."""
    if rec is None:
        return False
    stat = _stat(rec.pid)
    return stat is not None and stat[1] == rec.start_time and stat[0] not in ("Z", "X")


def signal_group(rec: ProcRecord, sig: int) -> None:
    """Signal the process group the record leads (lab processes start their own session)."""
    if not alive(rec):
        return
    try:
        os.killpg(rec.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(rec.pid, sig)


def stop(records: Iterable[ProcRecord], grace: float = 3.0) -> None:
    """SIGTERM each record's group, wait up to `grace` seconds, then SIGKILL what is left."""
    records = [r for r in records if alive(r)]
    for rec in records:
        signal_group(rec, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(r) for r in records):
        reap_own(r.pid for r in records)
        time.sleep(0.05)
    for rec in records:
        signal_group(rec, signal.SIGKILL)
    reap_own(r.pid for r in records)


def reap_own(pids: Iterable[int]) -> None:
    """Reap those of `pids` that are finished children of this process.

    Never waitpid(-1) outside the controller: in a test process that would steal
    the exit status of the test's own subprocesses.
    """
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def reap() -> list[tuple[int, int]]:
    """Collect every finished child of this process: [(pid, wait status)]. Controller only."""
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        done.append((pid, status))
    return done


def pids_in_netns(paths: Iterable[Path]) -> list[int]:
    """Pids of processes whose network namespace is one of the namespace files `paths`."""
    inodes = set()
    for path in paths:
        try:
            inodes.add(os.stat(path).st_ino)
        except FileNotFoundError:
            pass
    if not inodes:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino in inodes:
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def kill_in_netns(paths: Iterable[Path]) -> int:
    """SIGKILL every live process inside the given namespaces; how many there were.

    Used by `lab down` for what no record names: `lab exec` leftovers, or pods
    whose records were lost in a crash.
    """
    killed = 0
    for pid in pids_in_netns(paths):
        rec = ProcRecord.of(pid)
        if alive(rec):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


class SpawnError(RuntimeError):
    pass


def spawn(argv: list[str], netns: str, log_path: Path, env: dict[str, str]) -> ProcRecord:
    """fork + exec `argv` in its own session inside `netns`, output appended to `log_path`.

    A plain fork (not subprocess) so that this process stays the parent; safe
    because the controller is single-threaded.  Returns once the exec happened
    (a close-on-exec pipe reports a failure instead), so /proc/PID shows `argv`.
    """
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    err_r, err_w = os.pipe()     # both close-on-exec (PEP 446)
    pid = os.fork()
    if pid == 0:  # child: never return into the controller's code
        try:
            os.close(err_r)
            os.setsid()
            nsenter.setns(netns)
            os.dup2(devnull, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:  # noqa: BLE001
            os.write(err_w, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(127)
    os.close(err_w)
    os.close(log_fd)
    os.close(devnull)
    with os.fdopen(err_r, "rb") as pipe:
        failure = pipe.read()
    if failure:
        os.waitpid(pid, 0)
        raise SpawnError(f"cannot start {argv!r}: {failure.decode(errors='replace')}")
    rec = ProcRecord.of(pid)
    assert rec is not None, "a child we have not reaped always has a /proc entry"
    return rec


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TERM")}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["PYTHONPATH"] = PACKAGE_ROOT
    env["PYTHONUNBUFFERED"] = "1"
    return env
