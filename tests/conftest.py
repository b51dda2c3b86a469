"""Shared test fixtures: privilege checks, unique names for kernel objects, the run's program cache."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    # Tests marked `root` need CAP_BPF/CAP_NET_ADMIN. CI runs as root, so there
    # they always run; elsewhere they are skipped with the reason spelled out.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (BPF programs, network namespaces); CI runs it as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def unique_prefix() -> str:
    """A short prefix for namespaces, links and pin paths, unique per test run.

    Interface names are limited to 15 bytes, so keep it short: 'es' + 6 hex.
    """
    return "es" + uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def program_cache(tmp_path_factory):
    """The run's compiled-program cache (datapath/progcache.py): a directory of its own, which only
    this run's compiles write. Every tier loads its programs through it, as an agent does, so each
    (source, flags) is compiled once per run: the BPF tier's compiles serve the differential tier."""
    return tmp_path_factory.mktemp("programs")


class AheadCompiles:
    """Compiles of configurations the run loads later, done by a child process (datapath/compiler.py,
    as an agent compiles: the same program-cache entry a compile in the test process stores) on the
    machine's other CPU while the tests before their first use run: the tiers are single-threaded.
    A configuration is known by its program-cache key (loader.program_key: map sizes and the pin
    directory are no part of it). One child at a time, in the order asked. A load first calls
    wait() for its configuration: that waits for a running child, or takes a queued one off the
    queue (the load then compiles, as without it). A child that fails leaves the compile to the
    load. Children end by their PID."""

    def __init__(self, program_cache: Path, prefix: str):
        self.program_cache = program_cache
        self.prefix = prefix
        self._queue: list[tuple[tuple, dict]] = []
        self._done: dict[tuple, threading.Event] = {}
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, source, programs, limits) -> None:
        from ebpfsvc.datapath import compiler, loader

        key = loader.program_key(limits, source, programs)
        with self._lock:
            if key in self._done or self._closed:
                return
            pin_dir = Path("/sys/fs/bpf") / f"{self.prefix}-ahead{len(self._done)}"
            self._queue.append((key, compiler.programs_request(pin_dir, limits, source, programs,
                                                               {"pin_programs": False})))
            self._done[key] = threading.Event()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ahead-compiles", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        from ebpfsvc.datapath import compiler, loader

        while True:
            with self._lock:
                if self._closed or not self._queue:
                    self._thread = None
                    return
                key, request = self._queue.pop(0)
                try:
                    self._child = subprocess.Popen(
                        compiler.command(request), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        env={**os.environ, "EBPFSVC_PROGRAM_CACHE": str(self.program_cache)})
                except OSError:             # no child: the load compiles, as without one
                    self._done[key].set()
                    continue
            try:
                self._child.wait(compiler.TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
            finally:
                loader.unpin(Path(request["pin_dir"]))
                self._done[key].set()

    def wait(self, limits, **kw) -> None:
        """Before loader.load(pin_dir, limits=limits, program_cache=True, **kw) (its source, programs,
        attach_types): the configuration's child done, or its compile left to that load."""
        from ebpfsvc.datapath import compiler, loader

        key = loader.program_key(limits, **kw)
        with self._lock:
            for i, (queued, _) in enumerate(self._queue):
                if queued == key:
                    del self._queue[i]
                    self._done[key].set()
                    break
            done = self._done.get(key)
        if done is not None:
            done.wait(compiler.TIMEOUT_SECONDS)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
            child, thread = self._child, self._thread
        if child is not None and child.poll() is None:
            child.kill()
        if thread is not None:
            thread.join()


def _ahead_configurations(items) -> list[tuple]:
    """(source, programs, limits) of the collected tiers' compiles, in the order the tests first
    load them: the BPF tier's conntrack lifetimes, then its uplink programs (lb_node.c, the longest
    compile: 10 s on a quiet 2-core machine), then the differential tier's two (other lifetimes)."""
    from ebpfsvc.datapath import loader

    paths = {Path(str(item.fspath)).parent.name for item in items}
    out = []
    if "bpf" in paths:
        from tests.bpf.limits import TEST_LIMITS, TUNED_LIMITS
        out += [(loader.SOURCE, loader.PROGRAMS, TUNED_LIMITS), (loader.NODE_SOURCE, loader.NODE_PROGRAMS, TEST_LIMITS)]
    if "diff" in paths:
        from tests.diff import runner
        out += [(loader.SOURCE, loader.PROGRAMS, runner.LIMITS),
                (loader.NODE_SOURCE, loader.NODE_PROGRAMS, runner.LIMITS)]
    return out


@pytest.fixture(scope="session")
def ahead_compiles(request, program_cache):
    """The run's AheadCompiles, started with every compile the collected BPF and differential tests
    will ask for (it is first asked for by the first of them)."""
    ahead = AheadCompiles(program_cache, "es" + uuid.uuid4().hex[:6])
    try:
        for source, programs, limits in _ahead_configurations(request.session.items):
            ahead.add(source, programs, limits)
        yield ahead
    finally:
        ahead.close()


@pytest.fixture(scope="module")
def through_program_cache(program_cache):
    """$EBPFSVC_PROGRAM_CACHE pointed at the run's cache for a module whose loads pass
    `program_cache=True` themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EBPFSVC_PROGRAM_CACHE", str(program_cache))
        yield program_cache
