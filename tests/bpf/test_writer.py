"""MapWriter against real (pinned) maps: minimal diffs, stable ids across
restarts, stale entries removed, Maglev tables switched through new ranges."""

from __future__ import annotations

import pytest

from ebpfsvc import abi, maglev
from ebpfsvc.datapath import batch, loader, stats
from ebpfsvc.datapath import writer as writer_mod
from ebpfsvc.datapath.writer import ApplyStats, MapWriter, service_name
from ebpfsvc.lbmodel import Algorithm, FrontendKind, Protocol

from .conftest import TEST_LIMITS
from .packets import CLIENT, VIP, be, from_pod, frontend, run, state, tcp

pytestmark = pytest.mark.root


def web(i, backends):
    return frontend(f"198.19.0.{i}", 80, [be(f"198.18.2.{b}") for b in backends], name=f"web{i}")


def fe_entry(dp, fe):
    t = dp.maps["lb4_frontends"]
    k = t.Key(loader.be32(fe.key.address), int.from_bytes(fe.key.port.to_bytes(2, "big"), "little"),
              fe.key.protocol.number, int(fe.key.scope))
    return t[k]


def table_of(dp, fe):
    v = fe_entry(dp, fe)
    return v, batch.read_slots(dp.maps["lb_maglev"], v.maglev_offset + v.maglev_size)[v.maglev_offset:].tolist()


def dump(dp):
    """Everything the writer owns, as plain values, to compare across runs."""
    out = {}
    for name in ("lb4_frontends", "lb4_backends", "lb_service_names"):
        out[name] = sorted((bytes(k), bytes(v)) for k, v in dp.maps[name].items())
    return out


def test_first_apply_and_table_contents(datapath, writer):
    fe = web(1, [1, 2, 3])
    st = writer.apply(state(fe))
    size = maglev.table_size(3)
    assert st == ApplyStats(backends_written=3, services_written=1, tables_written=1, slots_written=size,
                            frontends_written=2, stats_zeroed=4)   # entry + address marker; 3 backends + 1 frontend
    v, slots = table_of(datapath, fe)
    names = sorted(b.name for b in fe.backends)
    ids = [writer.backend_id(b) for b in sorted(fe.backends, key=lambda b: b.name)]
    assert slots == [ids[i] for i in maglev.build_table(names, size)]
    assert (v.maglev_size, v.backend_count, v.service_id) == (size, 3, writer.service_id(fe.service))
    names_map = datapath.maps["lb_service_names"]
    assert names_map[names_map.Key(v.service_id)].name.decode() == service_name(fe.service)


def test_unchanged_apply_writes_nothing(datapath, writer):
    s = state(web(1, [1, 2]), web(2, [2, 3]))
    assert writer.apply(s)
    assert writer.apply(s) == ApplyStats()
    assert not writer.apply(s)


def test_one_endpoint_change_rewrites_only_that_frontend(datapath, writer):
    fes = [web(i, [1, 2, 3]) for i in range(1, 6)]
    writer.apply(state(*fes))
    before = {i: fe_entry(datapath, fe).maglev_offset for i, fe in enumerate(fes)}
    free_before = writer.free_slots()
    changed = web(3, [1, 2, 3, 4])
    st = writer.apply(state(*fes[:2], changed, *fes[3:]))
    assert st == ApplyStats(backends_written=1, tables_written=1, slots_written=maglev.table_size(4),
                            frontends_written=1, stats_zeroed=1)
    # The changed frontend points to a new range; the others were not touched.
    assert fe_entry(datapath, changed).maglev_offset != before[2]
    for i, fe in enumerate(fes):
        if i != 2:
            assert fe_entry(datapath, fe).maglev_offset == before[i]
    # The old range went back to the free list (net: the size difference).
    assert writer.free_slots() == free_before - (maglev.table_size(4) - maglev.table_size(3))

    # Removing the endpoint again: table + frontend entry, and the unused backend deleted.
    st = writer.apply(state(*fes))
    assert st == ApplyStats(tables_written=1, slots_written=maglev.table_size(3), frontends_written=1,
                            backends_deleted=1)


def test_endpoint_turning_terminating(datapath, writer):
    fe = web(1, [1, 2, 3])
    writer.apply(state(fe))
    draining = frontend("198.19.0.1", 80, [be("198.18.2.1", terminating=True), be("198.18.2.2"),
                                            be("198.18.2.3")], name="web1")
    st = writer.apply(state(draining))
    assert st.backends_written == 1 and st.tables_written == 1 and st.frontends_written == 1
    b = datapath.maps["lb4_backends"]
    tid = writer.backend_id(be("198.18.2.1"))
    assert b[b.Key(tid)].flags & abi.LB_BE_F_TERMINATING
    v, slots = table_of(datapath, draining)
    assert tid not in slots and v.backend_count == 2


def test_endpoint_not_ready_in_every_service_using_it(datapath, writer):
    """A backend is flagged not ready only when every frontend listing it says so: a Service with
    publishNotReadyAddresses keeps using the same address:port as a ready backend."""
    b = datapath.maps["lb4_backends"]
    blip = be("198.18.2.1", not_ready=True)
    writer.apply(state(frontend("198.19.0.1", 80, [blip, be("198.18.2.2")], name="web1"),
                       frontend("198.19.0.2", 80, [be("198.18.2.1")], name="peers")))
    tid = writer.backend_id(be("198.18.2.1"))
    assert not b[b.Key(tid)].flags & abi.LB_BE_F_NOT_READY
    v, slots = table_of(datapath, frontend("198.19.0.1", 80, [blip, be("198.18.2.2")], name="web1"))
    assert tid not in slots and v.backend_count == 1          # web1 never balances to it

    st = writer.apply(state(frontend("198.19.0.1", 80, [blip, be("198.18.2.2")], name="web1")))
    assert st.backends_written == 1 and st.backends_deleted == 0
    assert st.backends_changed == 1, "an existing backend's entry rewritten: the socket path's reset pass runs"
    assert b[b.Key(tid)].flags & abi.LB_BE_F_NOT_READY


def test_new_backends_are_written_but_not_changed(datapath, writer):
    """backends_changed counts rewrites of a backend already there, never new ones: a sync that only
    adds endpoints gives the socket path's reset pass nothing to do (agent.py)."""
    st = writer.apply(state(frontend("198.19.0.1", 80, [be("198.18.2.1")])))
    assert (st.backends_written, st.backends_changed) == (1, 0)
    st = writer.apply(state(frontend("198.19.0.1", 80, [be("198.18.2.1"), be("198.18.2.2")])))
    assert (st.backends_written, st.backends_changed, st.backends_deleted) == (1, 0, 0)
    st = writer.apply(state(frontend("198.19.0.1", 80, [be("198.18.2.1", terminating=True), be("198.18.2.2")])))
    assert (st.backends_written, st.backends_changed) == (1, 1)


def test_restart_renumbers_nothing_and_writes_nothing(datapath, writer, pin_dir, compiled_datapaths):
    s = state(web(1, [1, 2]), web(2, [2, 3]), frontend(VIP, 53, [be("198.18.2.9", 53, Protocol.UDP)],
                                                       proto=Protocol.UDP, name="dns"))
    writer.apply(s)
    ids = {fe.key: (writer.frontend_id(fe), writer.service_id(fe.service),
                    [writer.backend_id(b) for b in fe.backends]) for fe in s.frontends.values()}
    snapshot = dump(datapath)

    # A new agent process: load again on the same pins (as an agent does, from the program cache), new writer.
    again = compiled_datapaths.load_elsewhere(pin_dir)
    try:
        w2 = MapWriter(again.maps)
        assert w2.apply(s) == ApplyStats()
        assert {fe.key: (w2.frontend_id(fe), w2.service_id(fe.service),
                         [w2.backend_id(b) for b in fe.backends]) for fe in s.frontends.values()} == ids
        assert dump(again) == snapshot
        # Its next change still diffs minimally and allocates past the old ids.
        st = w2.apply(state(*s.frontends.values(), web(3, [4])))
        assert st.frontends_written == 2 and st.backends_written == 1 and st.tables_written == 1
        assert w2.frontend_id(web(3, [4])) not in {v[0] for v in ids.values()}
    finally:
        again.close()


def test_stale_entries_of_a_previous_run_are_removed(datapath, writer):
    old = state(web(1, [1, 2]), web(2, [3]), web(3, []))
    writer.apply(old)
    free_empty = MapWriter(datapath.maps)
    new = state(web(1, [1, 2]))
    st = free_empty.apply(new)
    assert st.frontends_deleted == 4          # web2, web3 and their address markers
    assert st.backends_deleted == 1 and st.services_deleted == 2
    assert st.frontends_written == 0 and st.tables_written == 0
    assert len(list(datapath.maps["lb4_frontends"].items())) == 2
    assert len(list(datapath.maps["lb4_backends"].items())) == 2
    assert len(list(datapath.maps["lb_service_names"].items())) == 1
    assert free_empty.free_slots() == TEST_LIMITS.maglev_slots - maglev.table_size(2)


def test_shared_backend_survives_removal_of_one_frontend(datapath, writer):
    a, b = web(1, [1, 2]), web(2, [2])
    writer.apply(state(a, b))
    shared = writer.backend_id(be("198.18.2.2"))
    st = writer.apply(state(b))
    assert st.backends_deleted == 1
    assert writer.backend_id(be("198.18.2.2")) == shared


def test_service_flags(datapath, writer):
    fes = [
        frontend("198.19.0.1", 80, [be("198.18.2.1")], name="a", affinity_timeout=600),
        frontend("198.19.0.2", 80, [be("198.18.2.1")], name="b", algorithm=Algorithm.RANDOM),
        frontend("198.19.0.3", 80, [], name="c", local_only=True),
        frontend("198.19.0.4", 30080, [be("198.18.2.1")], name="d", kind=FrontendKind.NODE_PORT),
    ]
    writer.apply(state(*fes))
    flags = [fe_entry(datapath, fe).flags for fe in fes]
    assert flags == [abi.LB_SVC_F_AFFINITY, abi.LB_SVC_F_RANDOM, abi.LB_SVC_F_LOCAL_ONLY, abi.LB_SVC_F_NODEPORT]
    assert fe_entry(datapath, fes[0]).affinity_timeout == 600
    empty = fe_entry(datapath, fes[2])
    assert (empty.maglev_size, empty.backend_count) == (0, 0)


def test_local_backend_flag(datapath, writer):
    writer.apply(state(frontend(VIP, 80, [be("198.18.2.1", local=True), be("198.18.2.2")])))
    t = datapath.maps["lb4_backends"]
    flags = {t[t.Key(writer.backend_id(be(a)))].flags for a in ("198.18.2.1", "198.18.2.2")}
    assert flags == {abi.LB_BE_F_LOCAL, 0}


def test_reused_id_gets_zeroed_stats(compiled):
    # Two frontend ids in all (ids 1..2): the third frontend must reuse a released one.
    tiny = loader.Limits(frontends=3, services=16, backends=16, maglev_slots=4096, ct_entries=256,
                         affinity_entries=16, frag_entries=16)
    dp = compiled.load(tiny)
    w = MapWriter(dp.maps)
    a, b = web(1, [1]), frontend("198.19.0.1", 81, [be("198.18.2.1")], name="web1b")
    w.apply(state(a))
    assert run(dp, "from_pod", from_pod(tcp(CLIENT, "198.19.0.1", 40000, 80))).verdict == "TC_ACT_OK"
    fid = w.frontend_id(a)
    assert stats.traffic(dp.maps, "frontend", fid)[0] == 1
    w.apply(state(b))                 # a's id released; b takes the other fresh id
    assert w.frontend_id(b) != fid
    w.apply(state(b, frontend("198.19.0.5", 80, [be("198.18.2.1")], name="web5")))
    assert w.frontend_id(frontend("198.19.0.5", 80, [], name="web5")) == fid
    assert stats.traffic(dp.maps, "frontend", fid) == (0, 0)


def test_out_of_maglev_space_fails_loudly_and_keeps_a_true_view(compiled):
    # Room for two 3-backend tables, not for four.
    small = loader.Limits(frontends=64, services=64, backends=64, maglev_slots=2 * maglev.table_size(3) + 10,
                          ct_entries=256,
                          affinity_entries=16, frag_entries=16)
    dp = compiled.load(small)
    w = MapWriter(dp.maps)
    from ebpfsvc.datapath.ids import IdExhausted
    with pytest.raises(IdExhausted):
        w.apply(state(*(web(i, [1, 2, 3]) for i in range(1, 5))))
    # Nothing points at a table that was not written; a smaller state fits and
    # then re-applies as a no-op, as from a fresh writer.
    assert all(v.maglev_size == 0 or v.flags & abi.LB_SVC_F_ADDRESS
               for _, v in dp.maps["lb4_frontends"].items())
    fits = state(*(web(i, [1, 2, 3]) for i in range(1, 3)))
    w.apply(fits)
    assert w.apply(fits) == ApplyStats() and MapWriter(dp.maps).apply(fits) == ApplyStats()


def expected_slots(writer, fe):
    ordered = sorted(fe.backends, key=lambda b: b.name)
    ids = [writer.backend_id(b) for b in ordered]
    return [ids[i] for i in maglev.build_table([b.name for b in ordered], maglev.table_size(len(ordered)))]


def test_maglev_slots_are_stored_in_place_through_the_mapped_array(datapath, writer):
    # lb_maglev is BPF_F_MMAPABLE: the writer stores slots into the map's memory, and the kernel's
    # own lookups (what a packet reads) see them.
    assert writer._slots_view is not None
    fe = web(1, [1, 2, 3])
    writer.apply(state(fe))
    assert table_of(datapath, fe)[1] == expected_slots(writer, fe)
    fe2 = web(1, [1, 2, 4])
    st = writer.apply(state(fe2))
    assert st.tables_written == 1 and table_of(datapath, fe2)[1] == expected_slots(writer, fe2)


def test_new_tables_go_into_one_range_and_each_retires_on_its_own(datapath, writer, monkeypatch):
    # Frontends that have no table yet (a first sync's) get one range for all their tables, one copy.
    fes = [web(i, [i, i + 1, i + 2]) for i in range(1, 5)]
    sizes = []
    real = writer._ranges.allocate
    monkeypatch.setattr(writer._ranges, "allocate", lambda size: sizes.append(size) or real(size))
    free = writer._ranges.free_slots
    st = writer.apply(state(*fes))
    size = maglev.table_size(3)
    assert sizes == [4 * size] and st.tables_written == 4 and st.slots_written == 4 * size
    offsets = [fe_entry(datapath, fe).maglev_offset for fe in fes]
    assert offsets == [offsets[0] + i * size for i in range(4)]
    assert all(table_of(datapath, fe)[1] == expected_slots(writer, fe) for fe in fes)
    # The second one's table changes: its old part of the range is free again, the others stay.
    fes[1] = web(2, [2, 3, 9])
    writer.apply(state(*fes))
    assert writer._ranges.free_slots == free - 4 * size
    assert [fe_entry(datapath, fe).maglev_offset for fe in fes[::2]] == offsets[::2]
    assert MapWriter(datapath.maps).apply(state(*fes)) == ApplyStats()
    # When no free run holds them all, table by table.
    def fragmented(size):
        if size > maglev.table_size(3):
            raise writer_mod.IdExhausted(f"no free run of {size}")
        return real(size)
    monkeypatch.setattr(writer._ranges, "allocate", fragmented)
    more = [web(i, [i, i + 1, i + 2]) for i in range(5, 8)]
    st = writer.apply(state(*fes, *more))
    assert st.tables_written == 3 and all(table_of(datapath, fe)[1] == expected_slots(writer, fe) for fe in more)
    assert MapWriter(datapath.maps).apply(state(*fes, *more)) == ApplyStats()


def test_without_a_mapped_array_slots_go_by_batch_syscalls(datapath, monkeypatch):
    # A lb_maglev pinned by a build without BPF_F_MMAPABLE cannot be mapped: same tables, by syscalls.
    monkeypatch.setattr(writer_mod, "_map_slots", lambda table: None)
    w = MapWriter(datapath.maps)
    assert w._slots_view is None
    fe = web(1, [1, 2, 3])
    st = w.apply(state(fe, web(2, [4])))
    assert st.tables_written == 2 and table_of(datapath, fe)[1] == expected_slots(w, fe)
    fe2 = web(1, [1, 3])
    st = w.apply(state(fe2, web(2, [4])))
    assert st.tables_written == 1 and table_of(datapath, fe2)[1] == expected_slots(w, fe2)
    # A restarted writer (mapped, as normal) reads the same state back and has nothing to write.
    monkeypatch.undo()
    again = MapWriter(datapath.maps)
    assert again._slots_view is not None and not again.apply(state(fe2, web(2, [4])))
