"""Fixtures for datapath tests.

Each program (lb_pod.c, lb_node.c, lb_sock.c) is compiled once per configuration (flags) for
the whole pytest run, not once per test: a compile takes seconds
and the tier has hundreds of tests. Loads go through a program cache of the run's own
(datapath/progcache.py, as an agent loads), so configurations that differ only in map sizes
or pin directory share one compile. The pin directory is compiled in (-DLB_PIN_DIR), so each
set of maps has a pin directory of the run's own, /sys/fs/bpf/<prefix>-<n>, unpinned when the
run ends (also after a failure; every pytest process, xdist workers too, has its own prefix).
Every test starts from freshly created maps all the same: the first time a test is handed a
datapath, its maps are emptied (hash and LRU maps) or zeroed (arrays, per-CPU ones on every
CPU), and pins a test removed (`ebpfsvc cleanup`, loader.unpin) are put back. The MapWriter
rebuilds its ids from the maps, so a new writer on emptied maps starts as on new ones.
The node's addresses and the agent's datapath options are no part of a configuration (the programs
read them from lb_node_addrs and lb_agent_config): `compiled.load(..., hairpin_addr=..., snat_addr=...,
reset_removed_endpoint_tcp=False, ...)` writes them into the maps (datapath/nodeaddrs.py,
loader.publish_options) each time it is called, after the reset; a test that names no option has the
defaults (lb_agent_config zeroed).

Tests about compiling itself (tests/bpf/test_loader.py: the load cache, stale pins) and the
agent's own start still compile, into a fresh per-test `pin_dir`; a load that only sets a test up
takes the run's programs on a pin directory of its own (CompiledDatapaths.load_elsewhere).
The uplink programs (lb_node.c), the run's longest compile, and the other configurations the tiers
load later are compiled by a child process while the first modules run (tests/conftest.py
AheadCompiles).
"""

from __future__ import annotations

import inspect
import os
import uuid
from pathlib import Path

import pytest

from ebpfsvc.datapath import batch, loader, nodeaddrs
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.datapath.bpfsys import PinnedMap

from .limits import TEST_LIMITS
from .packets import HAIRPIN

BPFFS = Path("/sys/fs/bpf")


class CompiledDatapaths:
    """The run's compiled datapaths: one per (program, pin directory, flags), one pin directory
    per (limits, maps) where `maps` names a set of maps (tests comparing two sets ask for two)."""

    def __init__(self, prefix: str, program_cache: Path, ahead):
        self.prefix = prefix
        self.program_cache = program_cache
        self.ahead = ahead          # tests/conftest.py AheadCompiles: compiles a child does beforehand
        self.compiles = 0
        self._dirs: dict[tuple, Path] = {}
        self._loaded: dict[tuple, loader.Datapath] = {}

    def pin_dir(self, limits: loader.Limits, maps: str = "shared") -> Path:
        key = (limits, maps)
        if key not in self._dirs:
            self._dirs[key] = BPFFS / f"{self.prefix}-{len(self._dirs)}"
        return self._dirs[key]

    def load(self, limits: loader.Limits = TEST_LIMITS, maps: str = "shared", **kw) -> loader.Datapath:
        """loader.load(...)'s Datapath for this configuration, compiled the first time it is asked for."""
        pin_dir = self.pin_dir(limits, maps)
        key = (pin_dir, tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)     # attach_types
                              for k, v in sorted(kw.items())))
        dp = self._loaded.get(key)
        if dp is None:
            self.ahead.wait(limits, **{k: kw[k] for k in ("source", "programs", "attach_types") if k in kw})
            self.restore_pins(pin_dir)     # a new program must find the maps the others use
            # Through the run's own program cache, as an agent loads (datapath/progcache.py): a
            # configuration whose programs differ from an earlier one's only in map sizes or pin
            # directory loads that one's instructions instead of compiling again.
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("EBPFSVC_PROGRAM_CACHE", str(self.program_cache))
                dp = loader.load(pin_dir, limits=limits, cache=False, program_cache=True, **kw)
            self.compiles += 1
            self._loaded[key] = dp
        return dp

    def load_elsewhere(self, pin_dir: Path, limits: loader.Limits = TEST_LIMITS, **kw) -> loader.Datapath:
        """loader.load(pin_dir, ...) of a configuration's programs on a pin directory of the caller's
        (its maps new, or the ones pinned there), as an agent loads them: from the run's program cache,
        so with no compile once the run has compiled that configuration (a miss compiles and stores it,
        as for load()). For a test whose load is setup, or whose subject is the maps rather than the
        compiler; a test about compiling still calls loader.load itself. The caller closes it."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EBPFSVC_PROGRAM_CACHE", str(self.program_cache))
            return loader.load(pin_dir, limits=limits, **{"cache": False, "program_cache": True, **kw})

    def restore_pins(self, pin_dir: Path) -> None:
        """Pin again, from a loaded program's fds, every map whose pin a test removed or replaced."""
        dp = next((d for d in self._loaded.values() if d.pin_dir == pin_dir), None)
        if dp is None:
            return
        from bcc.libbcc import lib

        pin_dir.mkdir(parents=True, exist_ok=True)
        for name in loader.MAPS:
            path = pin_dir / name
            if path.exists():
                with PinnedMap.open(path) as pinned, PinnedMap(os.dup(dp.maps[name].map_fd), "") as ours:
                    if pinned.info.id == ours.info.id:
                        continue
                path.unlink()
            if lib.bpf_obj_pin(dp.maps[name].map_fd, str(path).encode()) != 0:
                raise OSError(f"cannot pin {name} again at {path}")

    def reset(self, pin_dir: Path) -> None:
        """Every map of `pin_dir` as freshly created, with its pins in place."""
        self.restore_pins(pin_dir)
        dp = next(d for d in self._loaded.values() if d.pin_dir == pin_dir)
        for name in loader.MAPS:
            batch.clear(dp.maps[name])

    def close(self) -> None:
        for dp in self._loaded.values():
            dp.close()
        self._loaded.clear()
        for path in self._dirs.values():
            loader.unpin(path)


# The agent's datapath options (loader.agent_options): a word in the maps, not a compile flag.
OPTIONS = frozenset(inspect.signature(loader.agent_options).parameters)


class DatapathsOfATest:
    """A test's view of the run's datapaths: maps reset the first time the test asks for them."""

    def __init__(self, run: CompiledDatapaths):
        self.run = run
        self._reset: set[Path] = set()

    def load(self, limits: loader.Limits = TEST_LIMITS, maps: str = "shared", hairpin_addr=None, snat_addr=None,
             hairpin6=None, snat6=None, **kw) -> loader.Datapath:
        options = {name: kw.pop(name) for name in OPTIONS & kw.keys()}
        dp = self.run.load(limits, maps, **kw)
        if dp.pin_dir not in self._reset:
            self.run.reset(dp.pin_dir)
            self._reset.add(dp.pin_dir)
        nodeaddrs.write(dp.maps, nodeaddrs.NodeAddrs(hairpin4=hairpin_addr, snat4=snat_addr, hairpin6=hairpin6,
                                                     snat6=snat6))
        if options:
            loader.publish_options(dp.maps, **options)
        return dp


# The tier's, not the whole run's: closed (maps and pins removed) once tests/bpf's last test is done,
# so a `make test` run does not keep them through the e2e and unit tiers.
@pytest.fixture(scope="package")
def compiled_datapaths(program_cache, ahead_compiles):
    run = CompiledDatapaths("es" + uuid.uuid4().hex[:6], program_cache, ahead_compiles)
    try:
        yield run
    finally:
        run.close()


@pytest.fixture
def compiled(compiled_datapaths):
    """compiled.load(limits=..., hairpin_addr=..., source=..., ...): the datapath of that configuration,
    compiled once per run, its maps as new for this test, the node's addresses as given."""
    return DatapathsOfATest(compiled_datapaths)


@pytest.fixture
def datapath(compiled):
    return compiled.load(TEST_LIMITS, hairpin_addr=HAIRPIN)


@pytest.fixture
def writer(datapath):
    return MapWriter(datapath.maps)


@pytest.fixture
def pin_dir(request, unique_prefix):
    """The pin directory of the test's `datapath` or `uplink` when it uses one; otherwise a fresh
    one, removed afterwards (also on failure), for tests that compile and load themselves."""
    for shared in ("datapath", "uplink"):
        if shared in request.fixturenames:
            value = request.getfixturevalue(shared)
            yield value.pin_dir if shared == "datapath" else value.dp.pin_dir
            return
    path = BPFFS / unique_prefix
    yield path
    loader.unpin(path)


@pytest.fixture
def uplink(request, compiled, unique_prefix):
    """The north-south programs (bpf/lb_node.c) in a private namespace: tests/bpf/northsouth.py.
    Indirect parameters (a dict) go to uplink_fixture, e.g. {"snat_keep_client_port": False}."""
    from .northsouth import uplink_fixture
    yield from uplink_fixture(compiled, unique_prefix, **(getattr(request, "param", None) or {}))



def age(dp, map_name: str, field: str, seconds: float) -> int:
    """Make every entry of a datapath-owned LRU map (ct4, lb4_affinity) look
    `seconds` older, instead of sleeping: bpf_ktime_get_ns() is CLOCK_MONOTONIC,
    so the entries' timestamps are simply moved back. The subtraction wraps
    modulo 2**64 like the datapath's `now - last_seen` does, so an age longer
    than the machine's uptime still reads as that age. Returns entries aged."""
    table = dp.maps[map_name]
    n = 0
    for k, v in list(table.items()):
        setattr(v, field, (getattr(v, field) - int(seconds * 1e9)) % (1 << 64))
        table[k] = v
        n += 1
    return n
