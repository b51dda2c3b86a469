"""Follow network interfaces by name pattern, as pods come and go, and the node's addresses.

The agent attaches its pod-side programs to the host end of every pod veth
(e.g. `lxc*`).  Pods are created after the agent starts, so a one-off scan is
not enough: we subscribe to netlink link events first and only then list the
existing links, so that no interface can appear unseen between the two.

With `on_address`, IPv4 address events too: kube-proxy reads the node's addresses again at
every sync (its --nodeport-addresses), so an address added at runtime serves NodePorts without
a restart; the agent re-reads them when the kernel says they changed instead of on every sync.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from typing import Callable, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK

from ebpfsvc.datapath import nsenter

log = logging.getLogger(__name__)

Callback = Callable[[int, str], None]


class InterfaceWatcher:
    def __init__(self, patterns: Iterable[str], on_add: Callback, on_remove: Callback | None = None,
                 netns: str | None = None, on_address: Callable[[], None] | None = None):
        self.patterns = tuple(patterns)
        # None: the agent's own namespace (the normal case). Else the watcher's thread enters it, so
        # the callbacks run there too: the ifindexes they get belong to that namespace.
        self.netns = netns
        self._on_add = on_add
        self._on_remove = on_remove
        self._on_address = on_address           # an IPv4 address was added or removed, any interface
        self._known: dict[int, str] = {}
        self._ipr: IPRoute | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def matches(self, ifname: str) -> bool:
        return any(fnmatch.fnmatchcase(ifname, p) for p in self.patterns)

    @property
    def interfaces(self) -> dict[int, str]:
        return dict(self._known)

    def start(self) -> None:
        # pyroute2 0.9 sockets belong to the thread (event loop) that made them,
        # so the monitoring socket is created, bound and read in the watcher thread.
        ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name="interfaces", daemon=True)
        self._thread.start()
        ready.wait(10)

    def _socket(self):
        if self.netns:
            nsenter.setns(self.netns)       # this thread only: it exists for the watch
        return IPRoute()

    def stop(self) -> None:
        self._stop.set()
        if self._ipr:
            self._ipr.close()
        if self._thread:
            self._thread.join(5)

    def _loop(self, ready: threading.Event) -> None:
        try:
            self._ipr = self._socket()
            # Subscribe before listing: no gap.
            self._ipr.bind(groups=RTMGRP_LINK | (RTMGRP_IPV4_IFADDR if self._on_address else 0))
            for link in self._ipr.get_links():
                self._seen(link)
        finally:
            ready.set()
        # Blocking reads: pyroute2 buffers several messages per recv, so select()
        # on its fd would miss the buffered ones. stop() closes the socket, which
        # ends the read.
        while not self._stop.is_set():
            try:
                msgs = self._ipr.get()
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("netlink read failed")
                self._stop.wait(0.5)
                continue
            for msg in msgs:
                if msg.get("event") == "RTM_NEWLINK":
                    self._seen(msg)
                elif msg.get("event") == "RTM_DELLINK":
                    self._gone(msg)
                elif msg.get("event") in ("RTM_NEWADDR", "RTM_DELADDR") and self._on_address:
                    try:
                        self._on_address()
                    except Exception:
                        log.exception("handling an address change failed")

    def _seen(self, link) -> None:
        ifname = link.get_attr("IFLA_IFNAME") or ""
        index = link["index"]
        if not self.matches(ifname) or self._known.get(index) == ifname:
            return
        self._known[index] = ifname
        try:
            self._on_add(index, ifname)
        except Exception:
            # One bad interface (e.g. gone again already) must not stop the others.
            log.exception("attaching to %s (ifindex %d) failed", ifname, index)
            self._known.pop(index, None)

    def _gone(self, link) -> None:
        index = link["index"]
        ifname = self._known.pop(index, None)
        if ifname and self._on_remove:
            self._on_remove(index, ifname)
