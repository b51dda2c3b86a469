"""TC attachment with pyroute2, inside a network namespace made for the test
(never the root namespace): clsact, direct-action attach at ingress/egress,
atomic replace, detach, list."""

from __future__ import annotations

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as netns_mod

from ebpfsvc.datapath import tc

pytestmark = pytest.mark.root


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


def test_attach_replace_detach(datapath, veth):
    ns, idx = veth
    from_pod, to_pod = datapath.programs["from_pod"], datapath.programs["to_pod"]
    tc.attach(idx, from_pod.fd, "from_pod", tc.INGRESS, netns=ns)
    tc.attach(idx, to_pod.fd, "to_pod", tc.EGRESS, netns=ns)
    first = tc.list_filters(idx, netns=ns)
    got = {(f.direction, f.name, f.prio, f.handle) for f in first}
    assert len({f.prog_id for f in first}) == 2, "two programs, two ids"
    assert got == {(tc.INGRESS, "from_pod", tc.PRIO, tc.HANDLE), (tc.EGRESS, "to_pod", tc.PRIO, tc.HANDLE)}

    # Re-attach replaces in place: still exactly one filter per hook.
    tc.attach(idx, to_pod.fd, "to_pod_v2", tc.INGRESS, netns=ns)
    filters = tc.list_filters(idx, netns=ns)
    assert sorted((f.direction, f.name) for f in filters) == [(tc.EGRESS, "to_pod"), (tc.INGRESS, "to_pod_v2")]
    # Both hooks now run the same program: the kernel reports one program id.
    assert len({f.prog_id for f in filters}) == 1 and filters[0].prog_id > 0

    assert tc.detach(idx, tc.INGRESS, netns=ns) is True
    assert tc.detach(idx, tc.INGRESS, netns=ns) is False
    assert [(f.direction, f.name) for f in tc.list_filters(idx, netns=ns)] == [(tc.EGRESS, "to_pod")]


def test_ensure_clsact_is_idempotent(veth):
    ns, idx = veth
    tc.ensure_clsact(idx, netns=ns)
    tc.ensure_clsact(idx, netns=ns)
    with IPRoute(netns=ns) as ipr:
        kinds = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=idx)]
    assert kinds.count("clsact") == 1
    assert tc.list_filters(idx, netns=ns) == []
