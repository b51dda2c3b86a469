"""InterfaceWatcher sees existing and new pod veths by name pattern, and address changes (root: uses a
netns)."""

import threading

import pytest
from pyroute2 import NetNS, netns

from ebpfsvc.interfaces import InterfaceWatcher

pytestmark = pytest.mark.root


def test_existing_and_new_matching_links_are_reported(unique_prefix):
    ns = f"{unique_prefix}-ifw"
    netns.create(ns)
    added, removed = [], []
    seen_new = threading.Event()

    def on_add(index, name):
        added.append(name)
        if name == "lxcnew0":
            seen_new.set()

    w = InterfaceWatcher(["lxc*"], on_add, lambda i, n: removed.append(n), netns=ns)
    try:
        with NetNS(ns) as ipr:
            ipr.link("add", ifname="lxcold0", kind="veth", peer="podold0")
            w.start()
            ipr.link("add", ifname="lxcnew0", kind="veth", peer="podnew0")
            assert seen_new.wait(5), f"new link not reported; saw {added}"
            ipr.link("del", ifname="lxcold0")
        for _ in range(100):
            if "lxcold0" in removed:
                break
            threading.Event().wait(0.05)
        assert sorted(added) == ["lxcnew0", "lxcold0"]      # peers (pod*) don't match
        assert removed == ["lxcold0"]
    finally:
        w.stop()
        netns.remove(ns)


def test_address_changes_are_reported(unique_prefix):
    ns = f"{unique_prefix}-ifa"
    netns.create(ns)
    changes = threading.Semaphore(0)
    w = InterfaceWatcher(["lxc*"], lambda i, n: None, netns=ns, on_address=changes.release)
    try:
        w.start()
        with NetNS(ns) as ipr:
            ipr.link("add", ifname="up0", kind="veth", peer="up0peer")
            index = ipr.link_lookup(ifname="up0")[0]
            ipr.addr("add", index=index, address="198.18.0.61", prefixlen=24)
            assert changes.acquire(timeout=5), "RTM_NEWADDR not reported"
            ipr.addr("del", index=index, address="198.18.0.61", prefixlen=24)
            assert changes.acquire(timeout=5), "RTM_DELADDR not reported"
    finally:
        w.stop()
        netns.remove(ns)
