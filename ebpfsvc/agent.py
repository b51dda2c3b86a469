"""The node agent: Kubernetes objects in, BPF maps out.

    source (API server | manifest dir) -> ClusterState (trackers) -> desired_state() (pure)
        -> MapWriter.apply() (diff, batched writes) -> pinned BPF maps <- TC programs on pod veths

One sync costs what changed: the snapshot names the Services that changed, the
DesiredStateBuilder recomputes only those and names the frontends that changed, and the
writer writes only their entries.  The first sync, and then one every sync_period, is a
full apply instead: the writer re-derives every entry from the state rather than trusting
its incremental bookkeeping, and removes whatever nothing wants (a previous run's leftovers).
The BoundedFrequencyRunner coalesces bursts of events into one sync.  Nothing is written
before Services and EndpointSlices have both synced once, because a partial view would
delete live frontends.

Restart safety: maps are pinned, programs are replaced in place (never detached
first), and stopping the agent leaves everything attached, so established and
new connections keep being served while the agent is down or upgrading.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from ebpfsvc.config import NodeConfig
from ebpfsvc.desired import DesiredStateBuilder
from ebpfsvc.interfaces import InterfaceWatcher
from ebpfsvc.lbmodel import LBState
from ebpfsvc.runner import BoundedFrequencyRunner
from ebpfsvc.tracker import ClusterState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    node: NodeConfig
    pin_dir: str = "/sys/fs/bpf/ebpfsvc"
    manifests: str | None = None             # a manifest directory instead of the API server
    kubeconfig: str | None = None
    in_cluster: bool = False
    pod_interfaces: tuple[str, ...] = ("lxc*",)
    uplinks: tuple[str, ...] = ()
    uplink_mode: str = "tc"                   # "tc" | "xdp": programs on the uplinks (datapath/uplink.py)
    hairpin_address: IPv4Address | None = None
    snat_keep_client_port: bool = True       # NodePort SNAT: a TCP client's port first (nodeport.h)
    host_clients: bool = True                # node-namespace clients to ClusterIPs (datapath/hostpath.py)
    min_sync_interval: float = 0.05          # kube-proxy --iptables-min-sync-period, scaled to maps
    sync_period: float = 30.0                # periodic full resync (repairs any drift)
    limits: dict[str, int] = field(default_factory=dict)   # map sizes: abi.h names -> value
    healthz_bind_address: str = "0.0.0.0:10256"   # /healthz, /livez ("" = off); kube-proxy's default
    metrics_bind_address: str = "127.0.0.1:10249"  # /metrics ("" = off); kube-proxy's default


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.state = ClusterState(config.node, on_invalid=self._invalid)
        self.datapath = None
        self.uplink_datapath = None     # bpf/lb_node.c, when there are uplinks
        self.writer = None
        self.source = None
        self.watcher: InterfaceWatcher | None = None
        self.runner = BoundedFrequencyRunner("sync", self.sync, min_interval=config.min_sync_interval,
                                             max_interval=config.sync_period)
        self.last_applied: LBState | None = None
        self.desired = DesiredStateBuilder(config.node)   # keeps the last result; sync() feeds it snapshots
        self._next_full_apply = 0.0                       # monotonic time of the next full (verifying) apply
        self.synced_once = threading.Event()
        self._stopped = threading.Event()
        self.syncs = 0
        self.invalid_objects = 0
        from ebpfsvc.metrics import Telemetry
        self.telemetry = Telemetry(self)     # metrics, /healthz, /livez, healthCheckNodePorts

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        from ebpfsvc.datapath import loader
        from ebpfsvc.datapath.writer import MapWriter

        cfg = self.config
        self.telemetry.start()      # /healthz answers 503 "starting" until the first sync
        t0 = time.monotonic()
        # With node clients served, local backends' replies to them are translated on the pod
        # veths too (bpf/lib/flow.h), which need the node address.
        self.node_address = self._node_address() if cfg.uplinks else None
        self.datapath = loader.load(cfg.pin_dir, limits=loader.Limits(**cfg.limits),
                                    hairpin_addr=cfg.hairpin_address,
                                    snat_addr=self.node_address if cfg.host_clients else None)
        self.writer = MapWriter(self.datapath.maps)
        log.info("datapath loaded in %.2fs (pins in %s)", time.monotonic() - t0, cfg.pin_dir)
        if cfg.uplinks:
            self._attach_uplinks()

        # Attach to pod interfaces as they come; attaching replaces in place.
        self.watcher = InterfaceWatcher(cfg.pod_interfaces, self._attach_pod, self._detach_pod)
        self.watcher.start()

        self.source = self._make_source()
        self.runner.start()
        threading.Thread(target=self._forward_changes, name="changes", daemon=True).start()
        self.source.start()

    def _forward_changes(self) -> None:
        # The tracker drops changes that net to nothing; whatever is left wakes the runner.
        while not self._stopped.is_set():
            if self.state.wait_changed(timeout=0.5):
                self.telemetry.queued()
                self.runner.run()
                self._stopped.wait(max(self.config.min_sync_interval, 0.01))

    def _make_source(self):
        cfg = self.config
        if cfg.manifests:
            from ebpfsvc.sources.manifests import ManifestSource
            return ManifestSource(cfg.manifests, self.telemetry.sink(self.state))
        from ebpfsvc.sources.kube import KubeSource
        # Services, EndpointSlices, this node's Node and ServiceCIDRs: what kube-proxy watches.
        return KubeSource(self.telemetry.sink(self.state), kubeconfig=cfg.kubeconfig, in_cluster=cfg.in_cluster or None,
                          node_name=cfg.node.node_name)

    def stop(self) -> None:
        """Stop watching and syncing. The datapath stays attached and keeps forwarding."""
        self._stopped.set()
        self.telemetry.stop()       # /healthz 503 at once: load balancers drain the node
        if self.source:
            self.source.stop()
        self.runner.stop()
        if self.watcher:
            self.watcher.stop()
        self.telemetry.close()

    def run_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopped.set())
        self.start()
        self._stopped.wait()
        log.info("stopping; the datapath stays attached")
        self.stop()

    # -- interfaces ------------------------------------------------------------
    def _attach_pod(self, ifindex: int, ifname: str) -> None:
        from ebpfsvc.datapath import tc

        # Leaving the pod = ingress of the host side; into the pod = its egress.
        progs = self.datapath.programs
        tc.attach(ifindex, progs["from_pod"].fd, "from_pod", tc.INGRESS)
        tc.attach(ifindex, progs["to_pod"].fd, "to_pod", tc.EGRESS)
        if self.config.hairpin_address is not None:
            _accept_local(ifname)
        log.info("attached to pod interface %s (ifindex %d)", ifname, ifindex)

    def _node_address(self):
        """The node's address: the first uplink's, else the first NodePort address. SNATed flows
        leave with it, and node clients to ClusterIPs use it as their source."""
        from ebpfsvc.datapath import uplink

        address = uplink.interface_address(self.config.uplinks[0])
        if address is None and self.config.node.node_addresses:
            address = self.config.node.node_addresses[0]
        return address

    def _attach_uplinks(self) -> None:
        """North-south programs on every uplink, and the node clients' path (hostpath.py)."""
        from ebpfsvc.datapath import loader, uplink

        cfg = self.config
        snat = self.node_address
        self.uplink_datapath = uplink.load(cfg.pin_dir, snat_addr=snat, limits=loader.Limits(**cfg.limits),
                                           hairpin_addr=cfg.hairpin_address,
                                           snat_keep_client_port=cfg.snat_keep_client_port)
        for name in cfg.uplinks:
            ifindex = uplink.ifindex_of(name)
            if ifindex is None:
                log.warning("uplink %s not found: NodePort/external traffic on it is not served", name)
                continue
            uplink.attach(self.uplink_datapath, ifindex, cfg.uplink_mode)
            log.info("attached to uplink %s (ifindex %d, mode %s, SNAT address %s)", name, ifindex,
                     cfg.uplink_mode, snat)
        if cfg.host_clients and snat is not None and cfg.node.service_cidr is not None:
            from ebpfsvc.datapath import hostpath
            hostpath.setup(self.uplink_datapath, cfg.node.service_cidr, snat)

    def _detach_pod(self, ifindex: int, ifname: str) -> None:
        log.info("pod interface %s (ifindex %d) is gone", ifname, ifindex)

    def _invalid(self, problem) -> None:
        # The tracker has logged it; keep a count for the metrics endpoint.
        self.invalid_objects += 1

    # -- sync ------------------------------------------------------------------
    def sync(self) -> None:
        if not self.state.synced:
            log.debug("not synced yet: Services and EndpointSlices must both have listed once")
            return
        t0 = time.monotonic()
        self.telemetry.sync_started()
        result = self.desired.build(self.state.snapshot())
        desired = result.state
        # On the first apply and then every sync_period the writer recomputes everything instead
        # of trusting its incremental bookkeeping (and deletes whatever nothing wants).
        full = t0 >= self._next_full_apply
        if desired is self.last_applied and not full:
            self.telemetry.sync_done(time.monotonic() - t0)
            return
        stats = self.writer.apply(desired, full=full, delta=result.delta)
        if full:
            self._next_full_apply = t0 + self.config.sync_period
            if self.last_applied is None:
                # The first full state is a large, long-lived heap (10k Services: millions of
                # objects). Freezing it keeps Python's full garbage collections, which would walk it
                # every time, from adding hundreds of milliseconds to an endpoint change.
                gc.freeze()
        self.last_applied = desired
        self.syncs += 1
        self.synced_once.set()
        self.telemetry.sync_done(time.monotonic() - t0, stats)
        log.info("synced %d frontends in %.1f ms%s: %s", len(desired.frontends),
                 (time.monotonic() - t0) * 1000, " (full)" if full else "", stats)


def _accept_local(ifname: str) -> None:
    """Let a pod interface accept packets whose source is a node-local address.

    Hairpin flows (a pod reaching itself through a Service) leave from_pod with their source
    rewritten to the hairpin address, a node-owned address; the kernel's source validation
    drops such "martian" packets arriving on an interface unless accept_local is set on it.
    """
    path = f"/proc/sys/net/ipv4/conf/{ifname}/accept_local"
    try:
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as exc:     # the interface went away meanwhile: nothing to serve
        log.warning("cannot set %s: %s (hairpin traffic from this pod will be dropped)", path, exc)
