"""A map write the kernel refuses costs only the Service(s) whose entries failed (issue 11, isolation).

MapWriter.apply(isolate=True) (the agent's) writes in batches; when a batch fails it re-reads the
maps, writes the last good state again and then the changes Service by Service: every Service that
can be written is, a failing one keeps its last good entries (or stays out, if new) and comes back
in ApplyStats.failed naming the map.  Real pinned maps; a genuinely full map (lb4_source_ranges,
256 entries here), or an update that raises for one backend's key; packets through
BPF_PROG_TEST_RUN show what is programmed.
"""

from __future__ import annotations

import errno
import ipaddress
import threading

import numpy as np
import pytest

from ebpfsvc import abi, maglev
from ebpfsvc.datapath import batch
from ebpfsvc.datapath import writer as writer_mod
from ebpfsvc.datapath.writer import ApplyStats, MapWriteError, MapWriter
from ebpfsvc.lbmodel import FrontendKind

from .packets import CLIENT, be, from_pod, frontend, run, state, tcp

pytestmark = pytest.mark.root

BAD_BACKEND = "198.18.2.99"


def web(i, backends, name=None, **kw):
    return frontend(f"198.19.0.{i}", 80, [be(f"198.18.2.{b}") for b in backends], name=name or f"web{i}", **kw)


def ranged(i, n):
    """A LoadBalancer frontend with n loadBalancerSourceRanges (/32s of 198.18.64.0/18)."""
    nets = tuple(ipaddress.IPv4Network(f"198.18.{64 + j // 256}.{j % 256}/32") for j in range(n))
    return frontend(f"198.19.0.{i}", 80, [be("198.18.2.1")], name=f"lb{i}", kind=FrontendKind.LOAD_BALANCER,
                    source_ranges=nets)


def served_by(dp, fe, sport=40000):
    """The backend address a new TCP flow to `fe` is DNATed to (None: not translated)."""
    res = run(dp, "from_pod", from_pod(tcp(CLIENT, str(fe.key.address), sport, fe.key.port, "S")))
    if res.verdict != "TC_ACT_OK":
        return None
    dst = str(ipaddress.IPv4Address(res.data[14 + 16:14 + 20]))
    return None if dst == str(fe.key.address) else dst


def exactly(dp, st):
    """The maps hold exactly `st`: a fresh writer (reading the maps back) has nothing to write."""
    return MapWriter(dp.maps).apply(st) == ApplyStats()


def test_a_full_map_costs_only_the_service_that_does_not_fit(datapath, writer):
    a, b = web(1, [1, 2]), web(2, [3])
    writer.apply(state(a, b))
    a2, big, d = web(1, [1, 2, 4]), ranged(3, 300), web(4, [5])      # 300 ranges: lb4_source_ranges has 256
    st = writer.apply(state(a2, b, big, d), isolate=True)
    ((svc, (map_name, detail)),) = st.failed.items()
    assert svc == ("default", "lb3") and map_name == "lb4_source_ranges", st.failed
    assert detail.endswith("not programmed") and "lb4_source_ranges" in detail, detail
    # Every other Service is programmed; the new one that does not fit is out whole.
    assert exactly(datapath, state(a2, b, d))
    assert served_by(datapath, d) == "198.18.2.5"
    assert served_by(datapath, a2) in {"198.18.2.1", "198.18.2.2", "198.18.2.4"}
    assert len(list(datapath.maps["lb4_source_ranges"].keys())) == 0        # its partial writes undone
    # The writer's own view is true: the same state again retries only the failing Service.
    st = writer.apply(state(a2, b, big, d), isolate=True)
    assert set(st.failed) == {("default", "lb3")}
    assert exactly(datapath, state(a2, b, d))


def test_an_existing_service_whose_update_fails_keeps_its_last_good_version(datapath, writer):
    a, small = web(1, [1]), ranged(3, 2)
    writer.apply(state(a, small))
    a2, big = web(1, [2]), ranged(3, 300)
    st = writer.apply(state(a2, big), isolate=True)
    assert st.failed[("default", "lb3")][1].endswith("its last good version stays"), st.failed
    assert exactly(datapath, state(a2, small))
    assert served_by(datapath, a2) == "198.18.2.2"
    fe = datapath.maps["lb4_frontends"]
    entry = fe[fe.Key(abi.be32(small.key.address), abi.be16(80), 6, int(small.key.scope))]
    assert entry.flags & abi.LB_SVC_F_SOURCE_RANGES and len(list(datapath.maps["lb4_source_ranges"].keys())) == 2


@pytest.fixture
def refuse_backend(monkeypatch, datapath):
    """lb4_backends refuses any batch holding BAD_BACKEND (ENOSPC), as a map full at that key would."""
    real = writer_mod._update_records
    bad = abi.be32(ipaddress.IPv4Address(BAD_BACKEND))
    state = {"on": True}

    def update_records(table, keys, values):
        if state["on"] and table is datapath.maps["lb4_backends"] and any(v[0] == bad for v in values):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, keys, values)

    monkeypatch.setattr(writer_mod, "_update_records", update_records)
    return state


def test_a_refused_write_while_the_tables_build_on_threads_is_told_and_isolated(datapath, writer, refuse_backend,
                                                                                 monkeypatch):
    # A full sync's tables are built on threads while the backends are written (maglev.start_tables):
    # here every build is, so the refused batch meets a build under way.
    monkeypatch.setattr(maglev, "PARALLEL_SLOTS", 1)
    waits = []
    real = maglev.start_tables
    monkeypatch.setattr(maglev, "start_tables", lambda tables: waits.append(real(tables)) or waits[-1])
    fes = [web(i, [1, 2]) for i in range(1, 6)]
    writer.apply(state(*fes))
    assert exactly(datapath, state(*fes)) and waits
    new = [web(1, [1, 3]), web(2, [2, 3]), web(3, [3, 99]), web(4, [4]), web(5, [1, 2]), web(6, [6])]
    with pytest.raises(MapWriteError, match="lb4_backends"):
        MapWriter(datapath.maps).apply(state(*new))
    st = writer.apply(state(*new), isolate=True)
    assert set(st.failed) == {("default", "web3")} and exactly(datapath, state(*new[:2], fes[2], *new[3:]))
    assert all(type(wait()) is np.ndarray for wait in waits)       # every build ended with its apply


def test_a_refused_key_costs_only_its_services_and_is_retried(datapath, writer, refuse_backend):
    fes = [web(i, [1, 2]) for i in range(1, 6)]
    writer.apply(state(*fes))
    # One endpoint change touches every Service; web3's new backend is refused, web5 is new.
    new = [web(1, [1, 3]), web(2, [2, 3]), web(3, [3, 99]), web(4, [4]), web(5, [1, 2]), web(6, [6])]
    want = state(*new)
    # Without isolation (the default) the batch's failure propagates, naming the map.
    with pytest.raises(MapWriteError, match="lb4_backends"):
        MapWriter(datapath.maps).apply(want)
    st = writer.apply(want, isolate=True)
    assert st.failed == {("default", "web3"): ("lb4_backends", "lb4_backends: No space left on device; "
                                               "its last good version stays")}
    assert exactly(datapath, state(*new[:2], fes[2], *new[3:]))
    assert served_by(datapath, new[5]) == "198.18.2.6" and served_by(datapath, new[3]) == "198.18.2.4"
    assert served_by(datapath, fes[2]) in {"198.18.2.1", "198.18.2.2"}     # its last good table forwards
    # Retried while the map still refuses: the same answer, nothing else moves.
    st = writer.apply(want, isolate=True)
    assert set(st.failed) == {("default", "web3")}
    # The map takes it now: the retry programs it, and only it.
    refuse_backend["on"] = False
    st = writer.apply(want, isolate=True)
    assert not st.failed and st.backends_written == 1 and exactly(datapath, want)
    assert served_by(datapath, new[2], sport=40001) in {"198.18.2.3", "198.18.2.99"}


def test_a_failure_that_is_not_one_services_propagates(datapath, writer, monkeypatch):
    """Every frontend write refused: the last good state itself cannot be written again, so the
    apply fails as a whole (the agent's runner backs off) instead of trying Service after Service."""
    fes = [web(i, [1]) for i in range(1, 4)]
    writer.apply(state(*fes))
    frontends = sorted((bytes(k), bytes(v)) for k, v in datapath.maps["lb4_frontends"].items())
    real = writer_mod._update_records
    calls = []

    def refuse_frontends(table, keys, values):
        if table is datapath.maps["lb4_frontends"]:
            calls.append(len(keys))
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(table, keys, values)

    monkeypatch.setattr(writer_mod, "_update_records", refuse_frontends)
    with pytest.raises(MapWriteError, match="lb4_frontends: Cannot allocate memory"):
        writer.apply(state(*(web(i, [2]) for i in range(1, 4))), isolate=True)
    assert len(calls) <= 2
    monkeypatch.setattr(writer_mod, "_update_records", real)
    # The last good data plane forwards: not one frontend switched (new backends and tables written
    # before the switch are left for the next apply to use or remove).
    assert sorted((bytes(k), bytes(v)) for k, v in datapath.maps["lb4_frontends"].items()) == frontends
    assert served_by(datapath, fes[0]) == "198.18.2.1"
    writer.apply(state(*fes), isolate=True)
    assert exactly(datapath, state(*fes))


def test_a_write_refused_behind_a_large_apply_stops_the_writes_after_it(datapath, writer, monkeypatch):
    """A large apply's writes are made on a thread of their own (writer._Behind), while it goes on:
    one refused there is told as one refused inline is, naming its map, and the writes after it
    (the frontends' switch among them) are never made, so the last good data plane forwards."""
    monkeypatch.setattr(writer_mod, "_BEHIND_MIN", 1)      # (the threshold is 1,000 frontends)
    fes = [web(i, [1, 2]) for i in range(1, 6)]
    writer.apply(state(*fes))
    frontends = sorted((bytes(k), bytes(v)) for k, v in datapath.maps["lb4_frontends"].items())
    real, bad, threads = batch.write_records, abi.be32(ipaddress.IPv4Address(BAD_BACKEND)), []

    def write_records(table, karr, varr):
        threads.append(threading.current_thread().name)
        if table is datapath.maps["lb4_backends"] and bad in varr[varr.dtype.names[0]]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, karr, varr)

    monkeypatch.setattr(batch, "write_records", write_records)
    new = [web(1, [1, 3]), web(2, [2, 3]), web(3, [3, 99]), web(4, [4]), web(5, [1, 2]), web(6, [6])]
    with pytest.raises(MapWriteError, match="lb4_backends: No space left on device"):
        MapWriter(datapath.maps).apply(state(*new))
    assert threads == ["ebpfsvc-map-writes"]            # the backends' write, and none after it
    assert sorted((bytes(k), bytes(v)) for k, v in datapath.maps["lb4_frontends"].items()) == frontends
    assert served_by(datapath, fes[2]) in {"198.18.2.1", "198.18.2.2"}
    st = writer.apply(state(*new), isolate=True)
    assert set(st.failed) == {("default", "web3")} and exactly(datapath, state(*new[:2], fes[2], *new[3:]))
    assert served_by(datapath, new[5]) == "198.18.2.6"
    monkeypatch.setattr(batch, "write_records", real)
    assert not writer.apply(state(*new), isolate=True).failed and exactly(datapath, state(*new))


def test_right_after_a_restart_the_last_good_version_is_what_the_maps_serve(datapath, refuse_backend):
    """A new writer (the agent restarted) has applied nothing yet: a failing Service keeps what the
    pinned maps serve for it (datapath/pinned.py), the others get their new version."""
    fes = [web(i, [1, 2]) for i in range(1, 4)]
    refuse_backend["on"] = False
    MapWriter(datapath.maps).apply(state(*fes))
    refuse_backend["on"] = True
    restarted = MapWriter(datapath.maps)
    new = [web(1, [3]), web(2, [99]), web(3, [1, 2]), web(4, [4])]
    st = restarted.apply(state(*new), isolate=True)
    assert set(st.failed) == {("default", "web2")}
    assert exactly(datapath, state(new[0], fes[1], *new[2:]))
    assert served_by(datapath, fes[1]) in {"198.18.2.1", "198.18.2.2"}
    assert served_by(datapath, new[3]) == "198.18.2.4"


def test_tables_begun_before_the_first_apply_are_the_ones_it_would_build(datapath, writer, monkeypatch):
    """MapWriter.prepare (a starting agent, before admission) fills every table on a thread with
    the backends' positions; the first apply takes them and puts the ids in. The maps are what an
    apply without it writes (a fresh writer reading them back has nothing to change); a frontend
    apply has that prepare did not see is built as ever; after the first apply prepare does nothing;
    a frontend prepare cannot derive is left for apply to name."""
    monkeypatch.setattr(maglev, "PARALLEL_SLOTS", 1)
    built, taken = [], []
    real_start, real_take = maglev.start_tables, maglev.take
    monkeypatch.setattr(maglev, "start_tables", lambda tables: built.append(len(tables)) or real_start(tables))
    monkeypatch.setattr(maglev, "take", lambda positions, tables, **kw: taken.append(len(tables)) or
                        real_take(positions, tables, **kw))
    # Plain rows, a terminating backend (its table without it), and a frontend without backends.
    fes = [web(1, [1, 2]), web(2, [3]), web(3, [4, 5, 6]), web(4, []),
           frontend("198.19.0.5", 80, [be("198.18.2.7"), be("198.18.2.8", terminating=True)], name="web5")]
    writer.prepare(state(*fes))
    writer.apply(state(*fes))
    assert taken == [4] and built == [] and exactly(datapath, state(*fes))
    assert served_by(datapath, fes[1]) == "198.18.2.3" and served_by(datapath, fes[4]) == "198.18.2.7"
    writer.prepare(state(*fes[:2]))
    assert writer._prepared is None             # (only before the first apply)

    # Prepared for one state, applied to another: what it has is taken, the rest built.
    other = MapWriter(datapath.maps)
    other.apply(state())
    fresh = MapWriter(datapath.maps)
    built.clear(), taken.clear()
    fresh.prepare(state(*fes))
    new = [fes[0], web(2, [3, 9]), fes[2], web(6, [1])]
    fresh.apply(state(*new))
    assert built == [4] and taken == [] and exactly(datapath, state(*new))

    # A frontend prepare cannot derive (a backend of the other family): apply names it.
    bad = frontend("198.19.0.7", 80, [be("2001:2::7")], name="bad")
    last = MapWriter(datapath.maps)
    last.apply(state())
    last = MapWriter(datapath.maps)
    last.prepare(state(bad, *fes))
    assert last._prepared is None
    with pytest.raises(ValueError, match="not of the frontend's IP family"):
        last.apply(state(bad, *fes))
