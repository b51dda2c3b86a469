"""The compiled-program cache (ebpfsvc/datapath/progcache.py): programs loaded from it translate
byte for byte as the ones bcc compiled (fixtures of test_clusterip.py, test_nodeport.py and
test_nodeport_xdp.py run here against them), a changed #define or flag is a miss, a corrupt
entry falls back to bcc, a restarted agent on a warm cache serves from its first sync and takes
its previous run's programs (pinned) without loading them, and the sizes of the maps are no part
of the key (a node with more CPUs has a bigger conntrack table and the same programs). Each
test has a cache directory of its own ($EBPFSVC_PROGRAM_CACHE), so nothing here reads or writes
the machine's cache. The entries tests start from are the ones the run's compiles stored (its own
cache, conftest.py), not compiled again here: a test compiles only where a compile is what it checks.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil

import pytest
from bcc import BPF

from ebpfsvc.agent import Agent
from ebpfsvc.datapath import loader, progcache

from .conftest import TEST_LIMITS
from .packets import HAIRPIN
from . import northsouth, test_clusterip as clusterip, test_nodeport as nodeport, test_nodeport_xdp as nodeport_xdp

pytestmark = pytest.mark.root

# The ClusterIP fixtures, collected here again: their `datapath` is the cache-loaded one below.
test_tcp_flow_dnat_and_reply_rev_nat = clusterip.test_tcp_flow_dnat_and_reply_rev_nat
test_udp_dnat_and_reply = clusterip.test_udp_dnat_and_reply
test_ip_options_shift_l4_header = clusterip.test_ip_options_shift_l4_header
test_untouched = clusterip.test_untouched
test_sctp_translation_keeps_crc32c_valid = clusterip.test_sctp_translation_keeps_crc32c_valid     # lb_sctp_crc_shift
# And north-south ones, on lb_node.c's programs (TC and XDP) from the cache.
test_nodeport_remote_backend_is_snated_and_the_reply_reversed = nodeport.test_nodeport_remote_backend_is_snated_and_the_reply_reversed
test_nodeport_local_backend_keeps_the_client_address = nodeport.test_nodeport_local_backend_keeps_the_client_address
test_external_ip = nodeport.test_external_ip
test_xdp_snat_flow_both_ways = nodeport_xdp.test_snat_flow_both_ways
test_xdp_local_backend_dnat_then_kernel = nodeport_xdp.test_local_backend_dnat_then_kernel


def run_entry(compiled_datapaths, limits, kind="", **kw):
    """The run's cache entry of the programs of `kw`'s object (loader.load's source and programs) at
    `limits`, or with kind "maps" of the maps unit's layout at `limits`. The run's first compile of
    them stored it: the run's cache is a directory of its own, which only its compiles write
    (conftest.py), so an entry there is a compile's."""
    compiled_datapaths.load(limits, **kw)
    if kind == "maps":
        flags = loader.cflags_for(compiled_datapaths.pin_dir(limits), limits)
        key = progcache.cache_key(loader.expand_source(loader.MAPS_SOURCE), flags, {}, with_sizes=True)
    else:
        key = loader.program_key(limits, **{k: kw[k] for k in ("source", "programs") if k in kw})
    entry = progcache._entry_path(compiled_datapaths.program_cache, key, kind)
    assert entry.is_file(), f"the run's compile stored no entry {entry.name}"
    return entry


def _cache_loaded(compiled_datapaths, limits, **kw):
    """The programs of `kw`'s object loaded from the cache entry the run's compile of them stored,
    on the maps of the run's shared pin directory for `limits` (the one the other tests' fixtures use)."""
    run_entry(compiled_datapaths, limits, **kw)       # compiled (a miss), and stored; the pins, as the other tests have them
    pin_dir = compiled_datapaths.pin_dir(limits)
    for pin in progcache.program_pins(pin_dir):     # else the load takes the run's programs back, pinned
        pin.unlink()
    dp = compiled_datapaths.load_elsewhere(pin_dir, limits, **kw)
    assert isinstance(dp.bpf, progcache.CachedObject)
    return dp


@pytest.fixture(scope="module")
def cache_loaded(compiled_datapaths):
    dp = _cache_loaded(compiled_datapaths, TEST_LIMITS)
    yield dp
    dp.close()


@pytest.fixture
def datapath(compiled, cache_loaded):
    compiled.load(TEST_LIMITS, hairpin_addr=HAIRPIN)    # this test's maps, emptied
    return cache_loaded


UPLINK = dict(source=loader.NODE_SOURCE, programs=loader.NODE_PROGRAMS)
UPLINK_NODE = dict(hairpin_addr=HAIRPIN, snat_addr=northsouth.NODE)     # lb_node_addrs, written per test


@pytest.fixture(scope="module")
def cache_loaded_uplink(compiled_datapaths):
    dp = _cache_loaded(compiled_datapaths, northsouth.LIMITS, **UPLINK)
    yield dp
    dp.close()


@pytest.fixture
def uplink(compiled, cache_loaded_uplink, unique_prefix):
    """northsouth.uplink_fixture with lb_node.c's programs (XDP too) from the cache."""
    compiled.load(northsouth.LIMITS, **UPLINK, **UPLINK_NODE)     # this test's maps, emptied
    name = f"{unique_prefix}-np"
    northsouth.build_netns(name)
    try:
        yield northsouth.Uplink(cache_loaded_uplink, name)
    finally:
        northsouth.netns.remove(name)


def program_entries(directory) -> list:
    """The programs' entries of a cache directory (not the maps layouts, <key>.maps.json)."""
    return sorted(p for p in directory.glob("*.json") if not p.name.endswith(".maps.json"))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "programs"
    monkeypatch.setenv("EBPFSVC_PROGRAM_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def one_entry(compiled_datapaths, tmp_path_factory):
    """A cache directory as one compile of lb_pod.c at TEST_LIMITS fills it (its programs' entry and
    the maps' layout): the run's compile's, copied once for the module. Tests about what a load does
    with an entry start from a copy instead of a compile of their own."""
    path = tmp_path_factory.mktemp("one-entry") / "programs"
    path.mkdir(mode=0o700)
    for kind in ("", "maps"):
        shutil.copy(run_entry(compiled_datapaths, TEST_LIMITS, kind=kind), path)
    assert len(program_entries(path)) == 1
    return path


@pytest.fixture
def warm_cache_dir(cache_dir, one_entry):
    """cache_dir holding one_entry's entry, as a node that compiled lb_pod.c once leaves it."""
    shutil.copytree(one_entry, cache_dir)
    return cache_dir


def test_cached_programs_carry_the_compiled_names(datapath):
    from ebpfsvc.datapath import bpfsys
    for name, prog in datapath.programs.items():
        info = bpfsys._ProgInfo()
        bpfsys._obj_info(prog.fd, info)
        assert info.name.decode() == name       # what `bpftool prog`, drift and uplink.py's XDP check read


def test_key_covers_source_and_flags_but_not_the_pin_directory():
    text = loader.expand_source()
    types = {"from_pod": BPF.SCHED_CLS, "to_pod": BPF.SCHED_CLS}
    flags = loader.cflags_for("/sys/fs/bpf/a", TEST_LIMITS)
    key = progcache.cache_key(text, flags, types)
    assert progcache.cache_key(text, loader.cflags_for("/sys/fs/bpf/b", TEST_LIMITS), types) == key
    other_limits = loader.Limits(**{**TEST_LIMITS.__dict__, "ct_udp_s": TEST_LIMITS.ct_udp_s + 1})
    assert progcache.cache_key(text, loader.cflags_for("/sys/fs/bpf/a", other_limits), types) != key
    assert progcache.cache_key(text.replace("#define", "#define LB_X 1\n#define", 1), flags, types) != key
    assert progcache.cache_key(text, flags, {"from_pod": BPF.SCHED_CLS}) != key


def test_nothing_of_the_node_is_compiled_in():
    """Issue 12: a new node must find its programs in the cache, so no compiler input names the
    node (its addresses are lb_node_addrs, datapath/nodeaddrs.py): the flags of two nodes of
    different addresses are the same but for the pin directory, which the key leaves out."""
    for source in (loader.SOURCE, loader.NODE_SOURCE):
        text = loader.expand_source(source)
        assert "HAIRPIN_ADDR" not in text and "NODE_SNAT_ADDR" not in text
    flags = loader.cflags_for("/sys/fs/bpf/node-1", TEST_LIMITS)
    assert all("198.18." not in f and "2001:2:" not in f for f in flags)


def test_one_cache_entry_serves_nodes_of_different_addresses(compiled, cache_loaded):
    """The cached programs (compiled with the fixtures' node in the map) SNAT a hairpin flow to
    whatever hairpin address the map holds now: another node's, with no compile."""
    from .packets import CLIENT, OK, VIP, Case, be, check, from_pod, frontend, state, tcp
    from ebpfsvc.datapath.writer import MapWriter
    other = "198.18.0.77"
    compiled.load(TEST_LIMITS, hairpin_addr=other)      # this test's maps, emptied; another node's address
    MapWriter(cache_loaded.maps).apply(state(frontend(VIP, 80, [be(CLIENT, 8080)])))
    check(cache_loaded, Case("hairpin SYN: source becomes the map's hairpin address", "from_pod",
                             from_pod(tcp(CLIENT, VIP, 40000, 80, "S")), OK,
                             from_pod(tcp(other, CLIENT, 40000, 8080, "S"))))
    check(cache_loaded, Case("the pod's reply to that address is turned into VIP -> pod", "from_pod",
                             from_pod(tcp(CLIENT, other, 8080, 40000, "SA", seq=7000, ack=1001)), OK,
                             from_pod(tcp(VIP, CLIENT, 80, 40000, "SA", seq=7000, ack=1001))))


def test_one_cache_entry_serves_nodes_of_different_options(uplink):
    """Nor are the agent's datapath options compiler inputs (a word in lb_agent_config,
    loader.publish_options): the cached uplink programs give a SNATed flow the client's own port by
    default, and a port of the range on a node that publishes --no-nodeport-snat-keep-client-port."""
    from .northsouth import CLIENT, NODE, REDIRECT, REMOTE_BE, from_client, snat_port, tcp, to_node2
    assert set(inspect.signature(loader.cflags_for).parameters) == {"pin_dir", "limits"}
    uplink.writer.apply(nodeport.state(nodeport.REMOTE))
    uplink.check("SYN: the client's port kept (the default)", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40000, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, 40000, 8080, "S")))
    loader.publish_options(uplink.dp.maps, snat_keep_client_port=False)
    port = snat_port(CLIENT, NODE, 40001, 30080, probe=0)
    uplink.check("SYN: a range port, the option published", "from_uplink",
                 from_client(tcp(CLIENT, NODE, 40001, 30080, "S")), REDIRECT,
                 to_node2(tcp(NODE, REMOTE_BE, port, 8080, "S")))


def test_a_changed_define_is_a_miss(warm_cache_dir, pin_dir, tmp_path, caplog):
    cache_dir = warm_cache_dir
    changed = tmp_path / "lb_pod.c"
    text = loader.SOURCE.read_text()
    assert "#define LB_SCTP_PORT_CRC 1" in text
    changed.write_text(text.replace("#define LB_SCTP_PORT_CRC 1", "#define LB_SCTP_PORT_CRC 1\n#define LB_X 1"))
    caplog.set_level(logging.INFO, logger="ebpfsvc.datapath.progcache")
    dp = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True,
                     source=changed)
    try:
        assert isinstance(dp.bpf, BPF)
        assert any("miss" in r.getMessage() for r in caplog.records)
    finally:
        dp.close()
    assert len(program_entries(cache_dir)) == 2       # both kept: each its own key


def _damage(text: str, damage: str) -> str:
    return {"truncated": text[:len(text) // 2],
            "an instruction changed": text.replace('"insns": "', '"insns": "AAAA', 1),
            "not JSON": "\0\1garbage"}[damage]


# Finding an entry unusable is progcache's to check, with no compile; that loader.load then compiles
# and stores the entry again is one path whatever the damage, checked once (a compile, seconds).
@pytest.mark.parametrize("damage", ["truncated", "an instruction changed", "not JSON"])
def test_a_corrupt_entry_is_unusable(warm_cache_dir, damage, caplog):
    (entry,) = program_entries(warm_cache_dir)
    entry.write_text(_damage(entry.read_text(), damage))
    caplog.set_level(logging.INFO, logger="ebpfsvc.datapath.progcache")
    assert progcache.load(warm_cache_dir, entry.name.removesuffix(".json"), {}) is None
    assert [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]


def test_an_unusable_entry_falls_back_to_bcc_and_is_written_again(warm_cache_dir, pin_dir, caplog):
    cache_dir = warm_cache_dir
    (entry,) = program_entries(cache_dir)
    good = entry.read_text()
    entry.write_text(_damage(good, "an instruction changed"))
    caplog.set_level(logging.INFO, logger="ebpfsvc.datapath.progcache")
    dp = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True)
    try:
        assert isinstance(dp.bpf, BPF)
        assert [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    finally:
        dp.close()
    assert entry.read_text() == good            # the compile stored it again
    dp = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True)
    try:
        assert isinstance(dp.bpf, progcache.CachedObject)
    finally:
        dp.close()


def test_a_directory_others_may_write_is_not_used(warm_cache_dir, caplog):
    """Nothing is read from it (what a load does on a miss, compile, is the test above's)."""
    cache_dir = warm_cache_dir
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    (entry,) = program_entries(cache_dir)
    cache_dir.chmod(0o777)
    caplog.set_level(logging.INFO, logger="ebpfsvc.datapath.progcache")
    assert progcache.load(cache_dir, entry.name.removesuffix(".json"), {}) is None
    assert any("writable by others" in r.getMessage() for r in caplog.records)


def test_a_restarted_agent_on_a_warm_cache_loads_without_compiling(cache_dir, tmp_path, pin_dir, unique_prefix,
                                                                    monkeypatch):
    from .test_agent_start import NEW_EP, NEW_SERVICE, config, syn_to_new_service
    from .test_inspect_agent import free_port, manifests, wait_for
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "web.yaml").write_text(manifests(free_port()))
    agents = []
    compiles = []
    import bcc      # loader imports BPF from it at each load: counted there
    monkeypatch.setattr(bcc, "BPF", _counting(bcc.BPF, compiles))
    try:
        first = Agent(config(pin_dir, mdir, unique_prefix))
        agents.append(first)
        first.start()
        # An empty cache: compiled and stored by a child process (compiler.py), never in the agent's
        # own, which took the result from the cache and the pins.
        assert isinstance(first.datapath.bpf, progcache.CachedObject)
        assert compiles == [] and len(program_entries(cache_dir)) == 1
        first.stop()
        first.datapath.close()
        loader.drop_cache()

        (mdir / "api.yaml").write_text(NEW_SERVICE)
        second = Agent(config(pin_dir, mdir, unique_prefix))
        agents.append(second)
        second.start()
        wait_for(second.synced_once.is_set, "the restarted agent's first sync")
        assert isinstance(second.datapath.bpf, progcache.CachedObject)
        # Nothing compiled: the programs from the cache, the maps' tables from the kept layout.
        assert compiles == []
        out = Ether(syn_to_new_service(second.datapath.programs["from_pod"].fd))
        assert (out[IP].dst, out[TCP].dport) == (NEW_EP, 8080)
    finally:
        for a in agents:
            a.stop()
            if a.datapath is not None:
                a.datapath.close()
        loader.drop_cache()


def _counting(real, calls: list):
    class Counting(real):
        def __init__(self, *args, text=b"", **kw):
            calls.append(text.split(b"\n", 1)[0])       # `#line 1 "<source>"`: which unit
            super().__init__(*args, text=text, **kw)
    return Counting


def _prog_id(fd: int) -> int:
    from ebpfsvc.datapath import bpfsys
    info = bpfsys._ProgInfo()
    bpfsys._obj_info(fd, info)
    return info.id


def test_a_restart_takes_the_pinned_programs_without_loading_them(warm_cache_dir, pin_dir, monkeypatch, caplog):
    """Issue 12: the verifier costs seconds per object at every BPF_PROG_LOAD; a restart with the same
    programs on the same maps takes the previous run's from their pins, and loads nothing."""
    from ebpfsvc.datapath import bpfsys
    first = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True)      # pins its programs
    ids = {name: _prog_id(p.fd) for name, p in first.programs.items()}
    first.close()
    assert sorted(p.name.rsplit("_", 1)[0] for p in progcache.program_pins(pin_dir)) == sorted(loader.PROGRAMS)

    def no_load(*a, **kw):
        raise AssertionError("BPF_PROG_LOAD on a restart with the same programs")
    with monkeypatch.context() as mp:
        mp.setattr(bpfsys, "prog_load", no_load)
        again = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True)
    try:
        assert isinstance(again.bpf, progcache.CachedObject)
        assert {name: _prog_id(p.fd) for name, p in again.programs.items()} == ids
    finally:
        again.close()

    # A map pinned anew (here removed behind the agent's back; in life, recreated at another size) is
    # another map: the pinned programs still use the old one, so they are loaded again, on the new one.
    (pin_dir / "lb4_frontends").unlink()
    caplog.set_level(logging.INFO, logger="ebpfsvc.datapath.progcache")
    third = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True)
    try:
        assert isinstance(third.bpf, progcache.CachedObject)
        assert any("references other maps" in r.getMessage() for r in caplog.records)
        assert all(_prog_id(p.fd) != ids[name] for name, p in third.programs.items())
        frontends = bpfsys.map_id(third.maps["lb4_frontends"].map_fd)
        assert frontends in bpfsys.prog_map_ids(third.programs["from_pod"].fd)     # the new map
    finally:
        third.close()
    # and pinned in place of the old ones: one pin per program
    assert len(progcache.program_pins(pin_dir)) == len(loader.PROGRAMS)


def test_map_sizes_are_no_part_of_the_key():
    """A pinned map's size is in no instruction: nodes whose conntrack table differs (kube-proxy's
    --conntrack-max-per-core times the node's CPUs) share one entry. A size the code uses is kept."""
    text = loader.expand_source()
    types = {"from_pod": BPF.SCHED_CLS, "to_pod": BPF.SCHED_CLS}
    bigger = loader.Limits(**{**TEST_LIMITS.__dict__, "ct_entries": TEST_LIMITS.ct_entries * 4,
                              "frontends": TEST_LIMITS.frontends * 2})
    key = progcache.cache_key(text, loader.cflags_for("/a", TEST_LIMITS), types)
    assert progcache.cache_key(text, loader.cflags_for("/a", bigger), types) == key
    used = text.replace("#define LB_SCTP_PORT_CRC 1", "#define LB_SCTP_PORT_CRC 1\n#define LB_X (CT_ENTRIES_MAX / 2)")
    assert "CT_ENTRIES_MAX" not in progcache.size_only_macros(used, loader.cflags_for("/a", TEST_LIMITS))
    assert progcache.cache_key(used, loader.cflags_for("/a", bigger), types) != \
        progcache.cache_key(used, loader.cflags_for("/a", TEST_LIMITS), types)


def test_a_node_with_bigger_maps_loads_another_nodes_entry(warm_cache_dir, pin_dir, tmp_path):
    """The entry a node of TEST_LIMITS filled serves a new node whose conntrack table is four times
    as big: no compile, and the programs run on the new node's maps."""
    from ebpfsvc.datapath import bpfsys
    bigger = loader.Limits(**{**TEST_LIMITS.__dict__, "ct_entries": TEST_LIMITS.ct_entries * 4})
    other = pin_dir.with_name(pin_dir.name + "-b")
    dp = loader.load(other, limits=bigger, cache=False, program_cache=True)
    try:
        assert isinstance(dp.bpf, progcache.CachedObject)
        assert bpfsys.map_shape(dp.maps["ct4"].map_fd)[3] == bigger.ct_entries
        _serves_a_syn(dp)
    finally:
        dp.close()
        loader.unpin(other)


def _serves_a_syn(dp) -> None:
    """`dp`'s programs, on its maps, translate a SYN to a one-backend ClusterIP (exact bytes)."""
    from ebpfsvc.datapath.writer import MapWriter
    from .packets import CLIENT, OK, VIP, Case, be, check, from_pod, frontend, state, tcp

    MapWriter(dp.maps).apply(state(frontend(VIP, 80, [be("198.18.2.50", 8080)])))
    check(dp, Case("a SYN to the VIP goes to the backend", "from_pod", from_pod(tcp(CLIENT, VIP, 40000, 80, "S")), OK,
                   from_pod(tcp(CLIENT, "198.18.2.50", 40000, 8080, "S"))))


def _layout(t) -> tuple:
    """A ctypes type's layout: size, and its fields' names and layouts (structures, unions, arrays)."""
    import ctypes
    fields = getattr(t, "_fields_", None)
    if fields is not None:
        return ctypes.sizeof(t), t.__name__, [(f[0], _layout(f[1])) + tuple(f[2:]) for f in fields]
    if hasattr(t, "_length_"):
        return ctypes.sizeof(t), t._length_, _layout(t._type_)
    return ctypes.sizeof(t), t.__name__


def test_a_kept_layout_opens_the_pinned_maps_without_compiling(cache_dir, pin_dir, monkeypatch, caplog):
    """Issue 12: bcc's compile of the maps unit (lb_maps.c, 1-2.5 s) was most of a restart's first
    change. The first open keeps the unit's layout; the next one, every map pinned in its shape,
    makes the same bcc tables on the same pinned maps without compiling. A map pinned in another
    shape, or not pinned, is a compile, as before."""
    import bcc
    from ebpfsvc.datapath import bpfsys

    bpf, compiled = loader.open_maps(pin_dir, limits=TEST_LIMITS, program_cache=True)
    try:
        assert isinstance(bpf, BPF)
        assert len(list(cache_dir.glob("*.maps.json"))) == 1
        compiles: list = []
        with monkeypatch.context() as mp:
            mp.setattr(bcc, "BPF", _counting(bcc.BPF, compiles))
            unit, tables = loader.open_maps(pin_dir, limits=TEST_LIMITS, program_cache=True)
        assert compiles == [] and isinstance(unit, progcache.PinnedTables)
        try:
            assert tables.keys() == compiled.keys() == set(loader.MAPS)
            for name, want in compiled.items():
                got = tables[name]
                assert type(got) is type(want), name
                assert (got.ttype, got.flags, got.max_entries) == (want.ttype, want.flags, want.max_entries), name
                assert _layout(got.Key) == _layout(want.Key) and _layout(got.Leaf) == _layout(want.Leaf), name
                assert bpfsys.map_id(got.map_fd) == bpfsys.map_id(want.map_fd), name      # the same pinned map
            # Written through one, read through the other: Maglev slot 7 (element 3's second), a per-CPU
            # counter array's size.
            slots = tables["lb_maglev"]
            slots[slots.Key(3)] = slots.Leaf((0, 4242))
            assert compiled["lb_maglev"][compiled["lb_maglev"].Key(3)].slot[1] == 4242
            slots[slots.Key(3)] = slots.Leaf()
            percpu = [n for n, t in compiled.items() if hasattr(t, "sLeaf")]
            assert percpu and all(tables[n].total_cpu == compiled[n].total_cpu for n in percpu)
        finally:
            unit.cleanup()
    finally:
        bpf.cleanup()

    # A pin of another shape than the layout's (an older agent's size, here a layout changed behind
    # the agent's back) is a compile, which takes it as before.
    (layout,) = cache_dir.glob("*.maps.json")
    entry = json.loads(layout.read_text())
    entry["tables"]["lb4_frontends"]["max_entries"] += 1
    key = entry.pop("key")
    entry.pop("digest")
    progcache._write(cache_dir, key, {"key": key, **entry}, kind="maps")
    caplog.set_level(logging.INFO, logger="ebpfsvc.datapath.loader")
    opened = loader.open_maps(pin_dir, limits=TEST_LIMITS, program_cache=True)
    try:
        assert isinstance(opened[0], BPF)
        assert any("lb4_frontends: pinned" in r.getMessage() for r in caplog.records)
    finally:
        opened[0].cleanup()
    # A layout without one of the maps (none should be: the key covers the source) is a compile too.
    entry = json.loads(layout.read_text())
    del entry["tables"]["lb_maglev"]
    key = entry.pop("key")
    entry.pop("digest")
    progcache._write(cache_dir, key, {"key": key, **entry}, kind="maps")
    opened = loader.open_maps(pin_dir, limits=TEST_LIMITS, program_cache=True)
    try:
        assert isinstance(opened[0], BPF) and set(opened[1]) == set(loader.MAPS)
    finally:
        opened[0].cleanup()
    # ... and kept the right layout again; a map not pinned (a new node's) is created from it and pinned.
    (pin_dir / "lb4_frontends").unlink()
    opened = loader.open_maps(pin_dir, limits=TEST_LIMITS, program_cache=True)
    try:
        assert isinstance(opened[0], progcache.PinnedTables) and (pin_dir / "lb4_frontends").exists()
    finally:
        opened[0].cleanup()
    opened = loader.open_maps(pin_dir, limits=TEST_LIMITS, program_cache=True)
    try:
        assert isinstance(opened[0], progcache.PinnedTables)
    finally:
        opened[0].cleanup()


# ---- compiles in a child process (datapath/compiler.py) ----

def test_compile_apart_never_compiles_in_the_process(cache_dir, pin_dir, unique_prefix, monkeypatch):
    """An agent's compiles (the maps unit, lb_pod.c, lb_sock.c) run in a child: this process takes
    the maps from the kept layout and the programs from the cache and their pins, compiling nothing,
    and the programs it gets serve: a SYN is translated, the socket programs attach to a cgroup
    for their hooks (the kernel checks each against the hook it was verified for)."""
    import bcc
    from ebpfsvc.datapath import socklb
    from ebpfsvc.lab import cgroups

    compiles: list = []
    monkeypatch.setattr(bcc, "BPF", _counting(bcc.BPF, compiles))
    unit, _ = loader.open_maps(pin_dir, limits=TEST_LIMITS, program_cache=True, compile_apart=True)
    dp = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True, maps_unit=unit,
                     compile_apart=True)
    sock = socklb.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True, maps_unit=unit,
                       compile_apart=True)
    node_cg = cgroups.node_cgroup(unique_prefix, "node-1")
    try:
        assert compiles == []
        assert isinstance(unit, progcache.PinnedTables)
        assert isinstance(dp.bpf, progcache.CachedObject) and isinstance(sock.bpf, progcache.CachedObject)
        assert len(program_entries(cache_dir)) == 2
        # The socket programs are not pinned: loaded, they say the socket path serves (inspect).
        assert sorted(p.name.rsplit("_", 1)[0] for p in progcache.program_pins(pin_dir)) == sorted(loader.PROGRAMS)
        _serves_a_syn(dp)
        cgroups.create(node_cg)
        socklb.attach(sock, node_cg)
        assert socklb.attached(node_cg) == {name: [_prog_id(sock.programs[name].fd)] for name in socklb.HOOKS}
    finally:
        socklb.detach(node_cg)
        cgroups.remove(unique_prefix)
        sock.close()
        dp.close()
        unit.cleanup()


def test_a_child_that_fails_leaves_the_compile_to_the_process(cache_dir, pin_dir, monkeypatch, caplog):
    import sys
    caplog.set_level(logging.WARNING, logger="ebpfsvc.datapath.compiler")
    with monkeypatch.context() as mp:
        mp.setattr(sys, "executable", "/bin/false")       # the child exits 1 at once
        dp = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, program_cache=True, compile_apart=True)
    try:
        assert isinstance(dp.bpf, BPF)
        (line,) = [r.getMessage() for r in caplog.records]
        assert "lb_pod.c in a child process failed (exit 1" in line and "compiling in the agent" in line
    finally:
        dp.close()


def test_a_child_leaves_pins_of_another_shape_to_the_process(cache_dir, pin_dir, caplog):
    """A changed limit: the child does not recreate the pins (the agent migrates their entries in
    its own load); it says so by its exit code, and the load in this process recreates them."""
    from ebpfsvc.datapath import bpfsys
    loader.open_maps(pin_dir, limits=TEST_LIMITS)[0].cleanup()
    bigger = loader.Limits(**{**TEST_LIMITS.__dict__, "ct_entries": TEST_LIMITS.ct_entries * 4})
    caplog.set_level(logging.WARNING)
    dp = loader.load(pin_dir, limits=bigger, cache=False, program_cache=True, compile_apart=True)
    try:
        assert isinstance(dp.bpf, BPF)
        assert bpfsys.map_shape(dp.maps["ct4"].map_fd)[3] == bigger.ct_entries
        assert not [r for r in caplog.records if r.name == "ebpfsvc.datapath.compiler"]
        assert any("recreating all of them" in r.getMessage() for r in caplog.records)
    finally:
        dp.close()


def test_a_new_node_makes_its_maps_from_the_kept_layout(warm_cache_dir, pin_dir, monkeypatch):
    """A new node (nothing pinned) whose machine kept the maps unit's layout (warm_cache_dir: its
    layout and entry) creates and pins its maps from it, compiling nothing: the same shapes as the
    unit's compile gives (loader.stale_pins against a compile finds none), and programs from the
    cache run on them."""
    import bcc
    from ebpfsvc.datapath import bpfsys

    other = pin_dir.with_name(pin_dir.name + "-n")
    compiles: list = []
    try:
        with monkeypatch.context() as mp:
            mp.setattr(bcc, "BPF", _counting(bcc.BPF, compiles))
            unit, tables = loader.open_maps(other, limits=TEST_LIMITS, program_cache=True)
            dp = loader.load(other, limits=TEST_LIMITS, cache=False, program_cache=True, maps_unit=unit)
        try:
            assert compiles == [] and isinstance(unit, progcache.PinnedTables)
            assert sorted(p.name for p in other.iterdir() if p.name in loader.MAPS) == sorted(loader.MAPS)
            for name in loader.MAPS:
                assert bpfsys.map_shape(tables[name].map_fd) == bpfsys.map_shape(dp.maps[name].map_fd), name
            _serves_a_syn(dp)
        finally:
            dp.close()
            unit.cleanup()
        # The maps bcc makes for the unit, in a third directory: the same type, sizes and flags
        # (BPF_F_MMAPABLE, BPF_F_NO_PREALLOC), and bcc takes the created ones as its own.
        third = pin_dir.with_name(pin_dir.name + "-c")
        compiled = bcc.BPF(text=loader.expand_source(loader.MAPS_SOURCE).encode(),
                           cflags=loader.cflags_for(third, TEST_LIMITS))
        try:
            for name in loader.MAPS:
                made, by_bcc = bpfsys.obj_get(other / name), bpfsys.obj_get(third / name)
                try:
                    assert bpfsys.map_shape(made) == bpfsys.map_shape(by_bcc), name
                finally:
                    os.close(made)
                    os.close(by_bcc)
        finally:
            compiled.cleanup()
            loader.unpin(third)
        compiled = bcc.BPF(text=loader.expand_source(loader.MAPS_SOURCE).encode(),
                           cflags=loader.cflags_for(other, TEST_LIMITS))
        try:
            assert loader.stale_pins(compiled, other) == []
        finally:
            compiled.cleanup()
    finally:
        loader.unpin(other)
