"""Resizing without loss (issue 11 #7): a limit change recreates the pinned maps, and the agent's
load (migrate=True) carries their entries over: established TCP and UDP flows keep their backend,
ClientIP affinity holds, ids and Maglev tables are not renumbered or rewritten.  Packets through
BPF_PROG_TEST_RUN before and after, exact bytes. The agent before the change runs the run's compiled
programs (conftest.py load_elsewhere); the load under test, after it, compiles."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from ebpfsvc.datapath import batch, bpfsys, loader, nodeaddrs
from ebpfsvc.datapath.writer import ApplyStats, MapWriter
from ebpfsvc.lbmodel import Protocol

from .conftest import HAIRPIN, TEST_LIMITS
from .packets import (BACKEND1, BACKEND2, BACKEND3, CLIENT, OK, VIP, VIP2, Case, be, check, expected_backend,
                      from_pod, frontend, state, tcp, udp)

pytestmark = pytest.mark.root

BPF_MAP_TYPE_ARRAY = 2
BPF_F_MMAPABLE = 1 << 10       # include/uapi/linux/bpf.h

WEB = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3)], affinity_timeout=600)
DNS = frontend(VIP2, 53, [be(a, 5353, Protocol.UDP) for a in (BACKEND1, BACKEND2, BACKEND3)],
               proto=Protocol.UDP, name="dns")


def tcp_case(sport, flags, backend):
    return Case(f"{flags} {sport} -> {backend}", "from_pod", from_pod(tcp(CLIENT, VIP, sport, 80, flags)), OK,
                from_pod(tcp(CLIENT, backend, sport, 8080, flags)))


def udp_case(sport, backend):
    return Case(f"UDP {sport} -> {backend}", "from_pod", from_pod(udp(CLIENT, VIP2, sport, 53)), OK,
                from_pod(udp(CLIENT, backend, sport, 5353)))


def test_a_limit_change_carries_flows_affinity_ids_and_tables_over(pin_dir, compiled_datapaths):
    a = compiled_datapaths.load_elsewhere(pin_dir)
    node = nodeaddrs.NodeAddrs(hairpin4=HAIRPIN, snat4=HAIRPIN, hairpin6="2001:2::1", snat6="2001:2::1")
    try:
        nodeaddrs.write(a.maps, node)
        writer = MapWriter(a.maps)
        writer.apply(state(WEB, DNS))
        ids = (writer.service_id(WEB.service), writer.frontend_id(WEB), writer.backend_id(be(BACKEND2)))
        web_be = expected_backend(WEB, CLIENT, 40000)
        dns_be = expected_backend(DNS, CLIENT, 5000)
        check(a, tcp_case(40000, "S", web_be))
        check(a, udp_case(5000, dns_be))
        flows = len(list(a.maps["ct4"].items()))
    finally:
        a.close()

    # The agent restarts with larger maps: every pin is recreated.
    bigger = dataclasses.replace(TEST_LIMITS, maglev_slots=TEST_LIMITS.maglev_slots * 2,
                                 ct_entries=TEST_LIMITS.ct_entries * 2, backends=TEST_LIMITS.backends * 2)
    b = loader.load(pin_dir, limits=bigger, cache=False, migrate=True)
    try:
        assert loader.stale_pins(b.bpf, pin_dir) == []
        assert nodeaddrs.read(b.maps) == node          # the node's addresses came along too
        assert batch.slot_capacity(b.maps["lb_maglev"]) == bigger.maglev_slots
        assert len(list(b.maps["ct4"].items())) == flows
        # The established TCP flow goes on to its backend, whatever the hash of a new flow says...
        other = next(p for p in range(40001, 45000) if expected_backend(WEB, CLIENT, p) != web_be)
        check(b, tcp_case(40000, "A", web_be))
        # ...a new flow of the client follows its affinity, and the UDP flow stays too.
        check(b, tcp_case(other, "S", web_be))
        check(b, udp_case(5000, dns_be))
        # Ids and tables came along: the same state writes nothing.
        again = MapWriter(b.maps)
        assert (again.service_id(WEB.service), again.frontend_id(WEB), again.backend_id(be(BACKEND2))) == ids
        assert again.apply(state(WEB, DNS)) == ApplyStats()
    finally:
        b.close()


def test_an_upgrade_carries_the_tables_of_the_one_slot_maglev_layout_over(pin_dir, compiled_datapaths):
    """Before struct lb_maglev_pair, lb_maglev held one slot to an element (a 4-byte value, 8 bytes in
    the kernel). An agent upgraded over such pins recreates the map in the new layout and carries
    every table over (datapath/migrate.py reads the old layout): flows keep their backends, a new
    flow finds the same table, and the writer has nothing to rewrite."""
    a = compiled_datapaths.load_elsewhere(pin_dir)
    try:
        nodeaddrs.write(a.maps, nodeaddrs.NodeAddrs(hairpin4=HAIRPIN))
        writer = MapWriter(a.maps)
        writer.apply(state(WEB, DNS))
        high = max(e.maglev_offset + e.maglev_size for e in a.maps["lb4_frontends"].values())
        slots = batch.read_slots(a.maps["lb_maglev"], high)
        web_be = expected_backend(WEB, CLIENT, 40000)
        check(a, tcp_case(40000, "S", web_be))
    finally:
        a.close()

    # The old build's lb_maglev, holding the same tables: u32 -> u32, mapped, one slot an element.
    old = bpfsys.map_create(BPF_MAP_TYPE_ARRAY, 4, 4, TEST_LIMITS.maglev_slots, flags=BPF_F_MMAPABLE,
                            name="lb_maglev")
    try:
        bpfsys.map_update_batch(old, np.arange(high, dtype=np.uint32).tobytes(), slots.tobytes(), high)
        (pin_dir / "lb_maglev").unlink()
        bpfsys.obj_pin(old, pin_dir / "lb_maglev")
    finally:
        os.close(old)

    b = loader.load(pin_dir, limits=TEST_LIMITS, cache=False, migrate=True)
    try:
        assert loader.stale_pins(b.bpf, pin_dir) == []
        assert batch.slot_capacity(b.maps["lb_maglev"]) == TEST_LIMITS.maglev_slots
        assert batch.read_slots(b.maps["lb_maglev"], high).tolist() == slots.tolist()
        check(b, tcp_case(40000, "A", web_be))
        other = next(p for p in range(40001, 45000) if expected_backend(WEB, CLIENT, p) != web_be)
        check(b, tcp_case(other, "S", web_be))          # affinity, carried too
        fresh = next(p for p in range(41000, 45000) if expected_backend(DNS, CLIENT, p) != expected_backend(
            DNS, CLIENT, 5000))
        check(b, udp_case(fresh, expected_backend(DNS, CLIENT, fresh)))     # a new flow: the carried table
        assert MapWriter(b.maps).apply(state(WEB, DNS)) == ApplyStats()
    finally:
        b.close()
