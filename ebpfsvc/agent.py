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

Zero configuration: the node's addresses, NodePort addresses, uplinks and the source of its own
translated traffic come from its Node object and interfaces (ebpfsvc/nodeinfo.py).  The Node may
arrive after start, or change: every sync checks, and when the result differs the programs that
compile those addresses in are loaded again and replace the attached ones in place, uplinks are
attached (or released) and the node-client routes rewritten.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from ebpfsvc import nodeinfo
from ebpfsvc.config import NodeConfig
from ebpfsvc.desired import DesiredStateBuilder
from ebpfsvc.interfaces import InterfaceWatcher
from ebpfsvc.lbmodel import LBState
from ebpfsvc.runner import BoundedFrequencyRunner
from ebpfsvc.tracker import ClusterState

log = logging.getLogger(__name__)

# At start, how long to wait for the API's list of this node's Node, so the datapath is compiled
# once, with the node's addresses; if it takes longer they are configured when it comes.
NODE_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class AgentConfig:
    node: NodeConfig                          # node_addresses: --node-address (always NodePort addresses)
    pin_dir: str = "/sys/fs/bpf/ebpfsvc"
    manifests: str | None = None             # a manifest directory instead of the API server
    kubeconfig: str | None = None
    in_cluster: bool = False
    pod_interfaces: tuple[str, ...] = ("lxc*",)
    uplinks: tuple[str, ...] | None = ()      # None: the interfaces of the node addresses (nodeinfo.py)
    uplink_mode: str = "tc"                   # "tc" | "xdp": programs on the uplinks (datapath/uplink.py)
    nodeport_addresses: tuple[str, ...] = ()  # kube-proxy's: () = every node address, CIDRs, ("primary",)
    hairpin_address: IPv4Address | None = None   # None: the node's primary address
    snat_keep_client_port: bool = True       # NodePort SNAT: a TCP client's port first (nodeport.h)
    host_clients: bool = True                # node-namespace clients to Services (datapath/hostpath.py)
    socket_lb: bool = False                  # socket-level LB (datapath/socklb.py) on socket_lb_cgroup
    socket_lb_cgroup: str | None = None      # where; with socket_lb off, a previous run's programs are detached
    min_sync_interval: float = 0.05          # kube-proxy --iptables-min-sync-period, scaled to maps
    sync_period: float = 30.0                # periodic full resync (repairs any drift)
    limits: dict[str, int] = field(default_factory=dict)   # map sizes: abi.h names -> value
    healthz_bind_address: str = "0.0.0.0:10256"   # /healthz, /livez ("" = off); kube-proxy's default
    metrics_bind_address: str = "127.0.0.1:10249"  # /metrics ("" = off); kube-proxy's default
    bind_address_hard_fail: bool = False      # a taken address is fatal, not retried (health.Listener)


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.state = ClusterState(config.node, on_invalid=self._invalid)
        self.datapath = None
        self.uplink_datapath = None     # bpf/lb_node.c, when there are uplinks
        self.socket_datapath = None     # bpf/lb_sock.c, with --socket-lb
        self.writer = None
        self.source = None
        self.watcher: InterfaceWatcher | None = None
        self.runner = BoundedFrequencyRunner("sync", self.sync, min_interval=config.min_sync_interval,
                                             max_interval=config.sync_period)
        self.last_applied: LBState | None = None
        self.desired = DesiredStateBuilder(config.node)   # keeps the last result; sync() feeds it snapshots
        self.settings = nodeinfo.NodeSettings(
            node_addresses=config.node.node_addresses, nodeport_addresses=config.nodeport_addresses,
            uplinks=config.uplinks, hairpin_address=config.hairpin_address, pod_interfaces=config.pod_interfaces)
        self.read_interfaces = nodeinfo.read_interfaces   # replaceable in tests
        self.node_info: nodeinfo.NodeInfo | None = None   # what the datapath is (being) configured with
        self._configured: nodeinfo.NodeInfo | None = None # the last node_info configured in full
        self._node_seen: tuple | None = None              # (Node object, listed) last resolved
        self._datapath_lock = threading.RLock()           # pod attaches vs. a reload for new addresses
        self._pod_snat = None                             # the node address the pod datapath has
        self._uplinks_attached: dict[str, int] = {}       # name -> ifindex
        self._host_routes = None                          # hostpath.NodeClientRoutes, once set up
        self._routed: set = set()                         # destinations routed to the node-client device
        self._next_full_apply = 0.0                       # monotonic time of the next full (verifying) apply
        self.synced_once = threading.Event()
        self._stopped = threading.Event()
        self.syncs = 0
        self.invalid_objects = 0
        from ebpfsvc.metrics import Telemetry
        self.telemetry = Telemetry(self)     # metrics, /healthz, /livez, healthCheckNodePorts

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        from ebpfsvc.datapath.writer import MapWriter

        cfg = self.config
        self.telemetry.start()      # /healthz answers 503 "starting" until the first sync
        # The source first: a manifest directory is read at once, and the API's Node list usually
        # comes within moments, so the datapath is compiled once, with the node's addresses.
        self.source = self._make_source()
        self.source.start()
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while "Node" not in self.state.synced_kinds and time.monotonic() < deadline and not self._stopped.is_set():
            self._stopped.wait(0.05)
        t0 = time.monotonic()
        self._refresh_node(force=True)
        self.writer = MapWriter(self.datapath.maps)
        log.info("datapath loaded in %.2fs (pins in %s)", time.monotonic() - t0, cfg.pin_dir)
        if cfg.socket_lb_cgroup and cfg.socket_lb:
            self._start_socket_lb()
        elif cfg.socket_lb_cgroup:
            self._stop_socket_lb()

        # Attach to pod interfaces as they come; attaching replaces in place.
        self.watcher = InterfaceWatcher(cfg.pod_interfaces, self._attach_pod, self._detach_pod)
        self.watcher.start()

        self.runner.start()
        threading.Thread(target=self._forward_changes, name="changes", daemon=True).start()

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

    def _start_socket_lb(self) -> None:
        """Socket-level load balancing on the node's cgroup (docs/socklb.md): the programs share
        the pinned maps, so the writer feeds them as it feeds TC. They replace a previous run's in
        place and stay attached when the agent stops, as the TC programs do. If they cannot be
        attached, the TC path serves every pod as before: logged, not fatal."""
        from ebpfsvc.datapath import loader, socklb

        cfg = self.config
        try:
            self.socket_datapath = socklb.load(cfg.pin_dir, limits=loader.Limits(**cfg.limits))
            socklb.attach(self.socket_datapath, cfg.socket_lb_cgroup)
        except Exception as exc:    # noqa: BLE001 - compile, load or attach: the TC path stays
            log.error("socket-level load balancing not started on cgroup %s: %s (the TC path serves pods)",
                      cfg.socket_lb_cgroup, exc)
            return
        log.info("socket-level load balancing attached to cgroup %s", cfg.socket_lb_cgroup)

    def _stop_socket_lb(self) -> None:
        """--no-socket-lb on a cgroup a previous run attached to: off means off (the TC path
        serves new connections; established ones keep their backend, they need no translation)."""
        from ebpfsvc.datapath import socklb

        try:
            detached = socklb.detach(self.config.socket_lb_cgroup)
        except OSError as exc:
            log.error("cannot detach socket-level load balancing from cgroup %s: %s",
                      self.config.socket_lb_cgroup, exc)
            return
        if detached:
            log.info("socket-level load balancing off: detached %s from cgroup %s", ", ".join(detached),
                     self.config.socket_lb_cgroup)

    # -- interfaces ------------------------------------------------------------
    def _attach_pod(self, ifindex: int, ifname: str) -> None:
        from ebpfsvc.datapath import tc

        # Leaving the pod = ingress of the host side; into the pod = its egress.
        with self._datapath_lock:
            progs = self.datapath.programs
            tc.attach(ifindex, progs["from_pod"].fd, "from_pod", tc.INGRESS)
            tc.attach(ifindex, progs["to_pod"].fd, "to_pod", tc.EGRESS)
            if self.node_info.hairpin is not None:
                _accept_local(ifindex, ifname)
        log.info("attached to pod interface %s (ifindex %d)", ifname, ifindex)

    # -- the node: addresses, uplinks, node clients (nodeinfo.py) ----------------
    def _refresh_node(self, force: bool = False) -> None:
        """Resolve this node's addresses and uplinks again if its Node object changed (or
        `force`: at start and every full resync, for interfaces that changed), and reconfigure
        the datapath if the result differs."""
        node = self.state.node(self.config.node.node_name)
        seen = (node, "Node" in self.state.synced_kinds)
        if seen == self._node_seen and not force:
            return
        interfaces = self.read_interfaces()
        if node is not None and seen != self._node_seen:
            problem = nodeinfo.node_problem(node, interfaces)
            if problem:
                log.warning("%s", problem)
        info = nodeinfo.resolve(self.settings, interfaces, *seen)
        if info != self._configured:
            self._configure(info)       # raises: the sync fails, and is retried (so is this)
        self._node_seen = seen

    def _configure(self, info: nodeinfo.NodeInfo) -> None:
        from ebpfsvc.datapath import loader

        cfg, old = self.config, self._configured
        log.info("node %s: %s", cfg.node.node_name, info.describe())
        # The pod datapath compiles in the hairpin source and, with node clients served, the node
        # address their replies from local backends are addressed to (bpf/lib/flow.h).
        snat = info.primary if cfg.host_clients and info.uplinks else None
        if old is None or (old.hairpin, self._pod_snat) != (info.hairpin, snat):
            datapath = loader.load(cfg.pin_dir, limits=loader.Limits(**cfg.limits), hairpin_addr=info.hairpin,
                                   snat_addr=snat)
            with self._datapath_lock:       # pods attached from now on get the new programs...
                self.datapath, self._pod_snat, self.node_info = datapath, snat, info
                # ...and the ones attached before get them too (replaced in place).
                for ifindex, ifname in sorted(self.watcher.interfaces.items() if self.watcher else ()):
                    self._attach_pod(ifindex, ifname)
        self.node_info = info
        self._configure_uplinks(info, old)
        self.telemetry.health.set_fault("uplinks", (
            f"uplink {', '.join(info.missing_uplinks)} not found: NodePorts, externalIPs, LoadBalancer IPs "
            f"and node clients are not served on it" if info.missing_uplinks else None))
        node = replace(cfg.node, node_addresses=info.nodeport_addresses)
        if node != self.desired.node:
            self.desired.node = node        # a new node context: the next build recomputes everything
        self._configured = info

    def _configure_uplinks(self, info: nodeinfo.NodeInfo, old: nodeinfo.NodeInfo | None) -> None:
        """North-south programs on every uplink, and the node clients' path (hostpath.py)."""
        from ebpfsvc.datapath import loader, uplink

        cfg = self.config
        for name in info.missing_uplinks:
            log.error("uplink %s not found: NodePort and external traffic on it is not served", name)
        for name, ifindex in list(self._uplinks_attached.items()):
            if name not in info.uplinks:
                with contextlib.suppress(Exception):      # gone with its interface
                    uplink.detach(ifindex)
                del self._uplinks_attached[name]
                log.info("released uplink %s (ifindex %d)", name, ifindex)
        if not info.uplinks:
            return
        snat = info.primary
        reload = old is None or (old.primary, old.hairpin) != (snat, info.hairpin) or self.uplink_datapath is None
        if reload:
            self.uplink_datapath = uplink.load(cfg.pin_dir, snat_addr=snat, limits=loader.Limits(**cfg.limits),
                                               hairpin_addr=info.hairpin,
                                               snat_keep_client_port=cfg.snat_keep_client_port,
                                               host_clients=cfg.host_clients)
        for name in info.uplinks:
            ifindex = uplink.ifindex_of(name)
            if ifindex is None:
                continue                  # gone since it was read: the next resolve says so
            if reload or self._uplinks_attached.get(name) != ifindex:
                uplink.attach(self.uplink_datapath, ifindex, cfg.uplink_mode)
                self._uplinks_attached[name] = ifindex
                log.info("attached to uplink %s (ifindex %d, mode %s, SNAT address %s)", name, ifindex,
                         cfg.uplink_mode, snat)
        if cfg.host_clients and snat is not None and reload:
            from ebpfsvc.datapath import hostpath
            hostpath.setup(self.uplink_datapath, snat)
            if self._host_routes is None:
                self._host_routes = hostpath.NodeClientRoutes()
                self._routed = hostpath.routes()    # a previous run's routes: kept or removed by the diff
            self._route_node_clients(rewrite=True)

    def _route_node_clients(self, snapshot=None, result=None, rewrite: bool = False) -> None:
        """Route the service CIDRs (ServiceCIDR objects, else --service-cidr) and every ClusterIP
        outside them to the node-client device."""
        from ebpfsvc.datapath import hostpath

        routes = self._host_routes
        if routes is None or (result is None and not routes.ready):
            return          # nothing known yet: a previous run's routes stay until the first sync
        if snapshot is not None:
            cidrs = [c for obj in snapshot.service_cidrs.values() for c in obj.cidrs]
            if not cidrs and self.config.node.service_cidr is not None:
                cidrs = [self.config.node.service_cidr]
            routes.set_cidrs(cidrs)
        if result is not None:
            routes.update(result.state, result.delta)
        if routes.dirty or rewrite:
            self._routed = hostpath.sync_routes(self._routed, routes.take_wanted(), self.node_info.primary,
                                                rewrite=rewrite)

    def _detach_pod(self, ifindex: int, ifname: str) -> None:
        log.info("pod interface %s (ifindex %d) is gone", ifname, ifindex)

    def _invalid(self, problem) -> None:
        # The tracker has logged it; keep a count for the metrics endpoint.
        self.invalid_objects += 1

    # -- sync ------------------------------------------------------------------
    def sync(self) -> None:
        t0 = time.monotonic()
        # On the first apply and then every sync_period the writer recomputes everything instead
        # of trusting its incremental bookkeeping (and deletes whatever nothing wants); the node's
        # addresses and uplinks are read again then too.
        full = t0 >= self._next_full_apply
        if self.node_info is not None:          # start() configured the datapath once
            self._refresh_node(force=full and self.last_applied is not None)
        if not self.state.synced:
            log.debug("not synced yet: Services and EndpointSlices must both have listed once")
            return
        self.telemetry.sync_started()
        snapshot = self.state.snapshot()
        result = self.desired.build(snapshot)
        desired = result.state
        if desired is self.last_applied and not full:
            self._route_node_clients(snapshot)
            self.telemetry.sync_done(time.monotonic() - t0)
            return
        stats = self.writer.apply(desired, full=full, delta=result.delta)
        self._route_node_clients(snapshot, result)
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


def _accept_local(ifindex: int, ifname: str) -> None:
    """Let a pod interface accept packets whose source is a node-local address.

    Hairpin flows (a pod reaching itself through a Service) leave from_pod with their source
    rewritten to the hairpin address, a node-owned address; the kernel's source validation
    drops such "martian" packets arriving on an interface unless accept_local is set on it.
    Set through netlink, as for lo: the DaemonSet's unprivileged container sees /proc/sys read-only.
    """
    from ebpfsvc.datapath import hostpath

    try:
        hostpath.set_accept_local(ifindex, 1)
    except OSError as exc:     # the interface went away meanwhile: nothing to serve
        log.warning("cannot set accept_local on %s: %s (hairpin traffic from this pod will be dropped)", ifname, exc)
