"""TC attachment inside a network namespace made for the test (never the root namespace): at
TCX (this kernel has it) and on clsact (kernels before 6.6; forced here), atomic replace, detach,
list, and an agent from before TCX taken over without a moment with no program."""

from __future__ import annotations

import os

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as netns_mod

from ebpfsvc.datapath import bpfsys, tc

pytestmark = pytest.mark.root

BPF_PROG_TYPE_SCHED_CLS = 3
# r0 = -1 (TC_ACT_UNSPEC: on to the next program); exit
NEXT = bytes.fromhex("b7000000ffffffff") + bytes.fromhex("9500000000000000")


@pytest.fixture
def veth(unique_prefix):
    ns = unique_prefix + "tc"
    netns_mod.create(ns)
    try:
        with IPRoute(netns=ns) as ipr:
            ipr.link("add", ifname="vh0", kind="veth", peer={"ifname": "vp0"})
            idx = ipr.link_lookup(ifname="vh0")[0]
            ipr.link("set", index=idx, state="up")
        yield ns, idx
    finally:
        netns_mod.remove(ns)


@pytest.fixture(params=["tcx", "clsact"])
def mode(request):
    """Both ways to attach: the kernel's TCX, and clsact as on a kernel without it."""
    if request.param == "tcx":
        assert tc.tcx_supported(), "this kernel (>= 6.6) has TCX"
        yield request.param
    else:
        with tc.without_tcx():
            yield request.param


def qdiscs(ns: str, idx: int) -> list[str]:
    with IPRoute(netns=ns) as ipr:
        return [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=idx)]


def test_attach_replace_detach(datapath, veth, mode):
    ns, idx = veth
    from_pod, to_pod = datapath.programs["from_pod"], datapath.programs["to_pod"]
    tc.attach(idx, from_pod.fd, "from_pod", tc.INGRESS, netns=ns)
    tc.attach(idx, to_pod.fd, "to_pod", tc.EGRESS, netns=ns)
    first = tc.list_filters(idx, netns=ns)
    got = {(f.direction, f.name, f.tcx) for f in first}
    assert len({f.prog_id for f in first}) == 2, "two programs, two ids"
    assert got == {(tc.INGRESS, "from_pod", mode == "tcx"), (tc.EGRESS, "to_pod", mode == "tcx")}
    assert all(f.ours for f in first)
    if mode == "tcx":
        assert {(f.prio, f.handle) for f in first} == {(0, 0)} and "clsact" not in qdiscs(ns, idx)
    else:
        assert {(f.prio, f.handle) for f in first} == {(tc.PRIO, tc.HANDLE)} and "clsact" in qdiscs(ns, idx)

    # Re-attach replaces ours in place: still exactly one program per hook.
    tc.attach(idx, to_pod.fd, "to_pod", tc.INGRESS, netns=ns)
    tc.attach(idx, to_pod.fd, "to_pod", tc.INGRESS, netns=ns)      # the same again: nothing changes
    filters = tc.list_filters(idx, netns=ns)
    assert sorted((f.direction, f.name) for f in filters) == [(tc.EGRESS, "to_pod"), (tc.INGRESS, "to_pod")]
    # Both hooks now run the same program: the kernel reports one program id.
    assert len({f.prog_id for f in filters}) == 1 and filters[0].prog_id > 0

    assert tc.detach(idx, tc.INGRESS, netns=ns) is True
    assert tc.detach(idx, tc.INGRESS, netns=ns) is False
    assert [(f.direction, f.name) for f in tc.list_filters(idx, netns=ns)] == [(tc.EGRESS, "to_pod")]


def test_someone_elses_tcx_program_runs_first_and_stays(datapath, veth):
    """A TCX program not of ours (here one that hands every packet on) keeps its place before
    ours: ours is added after it, replaced after it, and detaching ours leaves it."""
    ns, idx = veth
    foreign = bpfsys.prog_load(BPF_PROG_TYPE_SCHED_CLS, NEXT, license="GPL", name="foreign")
    try:
        tc.attach(idx, foreign, "foreign", tc.INGRESS, netns=ns)
        tc.attach(idx, datapath.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns=ns)
        tc.attach(idx, datapath.programs["to_pod"].fd, "to_pod", tc.INGRESS, netns=ns)
        assert [(f.name, f.ours) for f in tc.list_filters(idx, netns=ns)] == [("foreign", False), ("to_pod", True)]
        assert tc.detach(idx, tc.INGRESS, netns=ns) is True
        assert [f.name for f in tc.list_filters(idx, netns=ns)] == ["foreign"]
    finally:
        os.close(foreign)


def test_an_agent_from_before_tcx_is_taken_over(datapath, veth):
    """Our clsact filter (an agent from before TCX) gives way to our TCX program: attached first,
    so a packet always meets one of them (TCX runs before clsact and its verdict ends the hook),
    then the filter and the clsact qdisc it needed are removed."""
    ns, idx = veth
    with tc.without_tcx():
        tc.attach(idx, datapath.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns=ns)
        assert [(f.name, f.tcx) for f in tc.list_filters(idx, netns=ns)] == [("from_pod", False)]
    tc.attach(idx, datapath.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns=ns)
    assert [(f.name, f.tcx) for f in tc.list_filters(idx, netns=ns)] == [("from_pod", True)]
    assert "clsact" not in qdiscs(ns, idx)


def test_ensure_clsact_is_idempotent(veth, mode):
    ns, idx = veth
    tc.ensure_clsact(idx, netns=ns)
    tc.ensure_clsact(idx, netns=ns)
    assert qdiscs(ns, idx).count("clsact") == 1
    assert tc.list_filters(idx, netns=ns) == []
