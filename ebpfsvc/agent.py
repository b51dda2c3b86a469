"""The node agent: Kubernetes objects in, BPF maps out.

    source (API server | manifest dir) -> ClusterState (trackers) -> desired_state() (pure)
        -> Admission.admit() (what fits, conflicts told) -> MapWriter.apply() (diff, batched writes)
        -> pinned BPF maps <- TC programs on pod veths

One sync costs what changed: the snapshot names the Services that changed, the
DesiredStateBuilder recomputes only those and names the frontends that changed, and the
writer writes only their entries.  The first sync, and then one every FULL_APPLY_PERIOD (an
hour, kube-proxy's FullSyncPeriod), is a full apply instead: the writer re-derives every entry
from the state rather than trusting its incremental bookkeeping, and removes whatever nothing
wants (a previous run's leftovers).  The periodic resync every sync_period is cheap, as
kube-proxy's (a canary check there): the node's interfaces read again and an incremental sync,
which writes nothing when nothing changed.  A full apply at 10,000 Services costs seconds of CPU
on a small node, which every 30 s took connections from the pods it serves (docs/bench.md).
The BoundedFrequencyRunner coalesces bursts of events into one sync.  Nothing is written
before Services and EndpointSlices have both synced once, because a partial view would
delete live frontends.

Restart safety: maps are pinned, programs are replaced in place (never detached
first), and stopping the agent leaves everything attached, so established and
new connections keep being served while the agent is down or upgrading.

A fast start: compiling the programs takes seconds (lb_node.c the most), the maps alone a
fraction of one (loader.open_maps). So the agent opens the pinned maps first and syncs into them
while the programs compile: after a restart the programs still attached serve the changes made
meanwhile within moments, and a new node has its maps written by the time its programs attach.

Zero configuration: the node's addresses, NodePort addresses, uplinks and the source of its own
translated traffic come from its Node object and interfaces (ebpfsvc/nodeinfo.py).  The Node may
arrive after start, or change: every sync checks, and when the result differs the node's addresses
are written into the map the programs read them from (datapath/nodeaddrs.py: no compile, no
reload; the programs are the same on every node), uplinks are attached (or released) and the
node-client routes rewritten.

The IP families too (--ip-families auto, the default): the node serves the families of the
cluster's ServiceCIDRs (IPv4 while the API serves none), so a dual-stack cluster needs no flag.
The first sync waits for the ServiceCIDR list, so a restart never drops the IPv6 frontends the
previous run served; when the families change later, the node is resolved again (its addresses of
the new family) and the desired state recomputed.  Services are then validated as the API server
of a dual-stack cluster validates them: it allocated every clusterIP from a ServiceCIDR, and one
of a family the cluster has no ServiceCIDR of is not served.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from dataclasses import replace

from ebpfsvc import nodeinfo, takeover
from ebpfsvc.admission import Admission, Capacity, ServiceStatusMap
from ebpfsvc.config import DEFAULT_IP_FAMILIES, IP_FAMILIES, AgentConfig, family_name
from ebpfsvc.datapath.loader import Limits
from ebpfsvc.datapath.pinned import pinned_frontends
from ebpfsvc.desired import DesiredStateBuilder
from ebpfsvc.interfaces import InterfaceWatcher
from ebpfsvc.k8s.servicecidr import served_ip_families
from ebpfsvc.lbmodel import LBState
from ebpfsvc.runner import BoundedFrequencyRunner
from ebpfsvc.tracker import ClusterState

log = logging.getLogger(__name__)

# How often a full (verifying) apply re-derives every map entry: kube-proxy's FullSyncPeriod
# (pkg/proxy/util), a constant there too. Never more often than the periodic resync.
FULL_APPLY_PERIOD = 3600.0

# At start, how long to wait for the API's list of this node's Node, so the datapath is compiled
# once, with the node's addresses; if it takes longer they are configured when it comes.
NODE_WAIT_SECONDS = 5.0
#: /healthz's reason while a new node's programs compile: its maps may already hold every Service
#: (it syncs meanwhile), but nothing attached serves them yet (the lab waits for this to clear).
PROGRAMS_COMPILING = "the datapath programs are being compiled"


class Agent:
    def __init__(self, config: AgentConfig, opening=None):
        from ebpfsvc.collectors import AgentReadings
        from ebpfsvc.telemetry import Telemetry

        self.config = config
        self._opening = opening     # loader.open_maps_early()'s (restart, future), when the command started it
        # Metrics, /healthz, /livez, healthCheckNodePorts: handed what they read, as they read it.
        self.telemetry = Telemetry(config, AgentReadings(
            loops_alive=lambda: self.runner.alive, sync_failures=lambda: self.runner.failures,
            source_stats=self._source_stats, invalid_objects=lambda: self.invalid_objects,
            problems=lambda: self.state.problems, pending_changes=lambda: self.state.pending_changes(),
            admission=lambda: self.admission.details()))
        # With the families followed from the ServiceCIDRs, the API server judges a clusterIP's family
        # (it allocated it from one): validation takes either, desired state serves the cluster's.
        validation = replace(config.node, ip_families=IP_FAMILIES) if config.ip_families_auto else config.node
        self.state = ClusterState(validation, on_invalid=self._invalid, on_received=self.telemetry.metrics.changed,
                                  on_node=self.telemetry.health.node_changed)
        self.datapath = None
        self.uplink_datapath = None     # bpf/lb_node.c, when there are uplinks
        self.socket_datapath = None     # bpf/lb_sock.c, with --socket-lb
        self.socket_lb_cgroup = None    # the cgroup it is attached to (--socket-lb-cgroup, `auto` resolved)
        self.writer = None
        self.source = None
        self.watcher: InterfaceWatcher | None = None
        self.runner = BoundedFrequencyRunner("sync", self.sync, min_interval=config.min_sync_interval,
                                             max_interval=config.sync_period)
        self.last_applied: LBState | None = None
        self.desired = DesiredStateBuilder(config.node)   # keeps the last result; sync() feeds it snapshots
        self.settings = nodeinfo.NodeSettings(
            node_addresses=config.node.node_addresses, nodeport_addresses=config.nodeport_addresses,
            uplinks=config.uplinks, hairpin_address=config.hairpin_address,
            hairpin_address6=config.hairpin_address6, pod_interfaces=config.pod_interfaces,
            ip_families=config.node.ip_families)
        self.read_interfaces = nodeinfo.read_interfaces   # replaceable in tests
        self.node_info: nodeinfo.NodeInfo | None = None   # what the datapath is (being) configured with
        self._configured: nodeinfo.NodeInfo | None = None # the last node_info configured in full
        self._node_seen: tuple | None = None              # (Node object, listed) last resolved
        self._addresses_changed = threading.Event()       # a netlink address event since the last resolve
        self._datapath_lock = threading.RLock()           # pod attaches vs. a new hairpin source (accept_local)
        self._node_addrs = None                           # what lb_node_addrs holds (nodeaddrs.py)
        self._uplinks_attached: dict[str, int] = {}       # name -> ifindex
        self._host_routes = None                          # hostpath.NodeClientRoutes, fed from the first sync
        self._routed: set | None = None                   # destinations routed to the node-client device, once set up
        self._routes_lock = threading.Lock()              # start's setup vs. the first syncs
        self._takeover_pending = True                     # takeover.py, at the first sync once attached
        self._maps_bpf = None                             # the maps-only object the writer's tables belong to
        self._next_full_apply = 0.0                       # monotonic time of the next full (verifying) apply
        self._next_resync = 0.0                           # ... of the next periodic resync (interfaces re-read)
        self._told_unserved: set = set()                  # (Service, clusterIP, families) logged as unserved
        self.synced_once = threading.Event()
        self._stopped = threading.Event()
        self.syncs = 0
        self.invalid_objects = 0
        # Which Services go into the maps: capacity from the map sizes, conflicts told (admission.py).
        self.admission = Admission(Capacity.of(Limits(**config.limits)))
        self.telemetry.metrics.registry.register(self.admission.collector())

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        from ebpfsvc.datapath import loader

        started = time.monotonic()
        # bcc changes the process's working directory while it compiles, and it compiles on another
        # thread below: every path the agent opens must be absolute from here on.
        self.config = cfg = replace(self.config, pin_dir=os.path.abspath(self.config.pin_dir), **{
            name: os.path.abspath(getattr(self.config, name))
            for name in ("manifests", "kubeconfig") if getattr(self.config, name)})
        self.telemetry.start()      # /healthz answers 503 "starting" until the first sync
        # The maps before the programs, opened (on a thread: a maps-only compile, the GIL released, or on
        # a restart none, from the kept layout) while the source is made and lists: syncs write them
        # while the programs compile. Pins of another shape (new limits) are recreated by the
        # programs' load, so then nothing is written before it.
        t0 = time.monotonic()
        # restart: a previous run's programs still serve these maps.
        restart, opening = self._opening or loader.open_maps_early(
            cfg.pin_dir, loader.Limits(**cfg.limits), cfg.program_cache, compile_apart=cfg.program_cache)
        # The source: a manifest directory is read at once, and the API's Node list usually comes
        # within moments, so the programs are compiled once, with the node's addresses.
        self.source = self._make_source()
        self.source.start()
        opened = opening.result()
        log.info("maps opened in %.2fs (%.2fs since start)", time.monotonic() - t0, time.monotonic() - started)
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while not self._start_kinds() <= self.state.synced_kinds and time.monotonic() < deadline \
                and not self._stopped.is_set():
            self._stopped.wait(0.05)
        self._follow_service_cidrs()
        if opened is not None:
            self._maps_bpf, maps = opened
            self._adopt_maps(maps)
        # Without its Node the node's NodePort addresses are unknown: a sync now would take the NodePorts
        # the previous run wrote out of the maps the attached programs serve. Then sync after the compile.
        early = opened is not None and "Node" in self.state.synced_kinds
        if early:
            node = self.state.node(cfg.node.node_name)
            self._set_node_context(nodeinfo.resolve(self.settings, self.read_interfaces(), node,
                                                    "Node" in self.state.synced_kinds))
            if not restart:     # nothing serves these maps until the programs attach
                self.telemetry.health.set_fault("programs", PROGRAMS_COMPILING)
            self._start_syncing()
            log.info("syncing while the programs compile (%.2fs since start)", time.monotonic() - started)
        t1 = time.monotonic()
        self._refresh_node(force=True)
        if self.writer is None:
            self._adopt_maps(self.datapath.maps)
        self.telemetry.health.set_fault("programs", None)
        log.info("datapath loaded in %.2fs (compiling and attaching %.2fs; %.2fs since start; pins in %s)",
                 time.monotonic() - t0, time.monotonic() - t1, time.monotonic() - started, cfg.pin_dir)
        # Attach to pod interfaces as they come; attaching replaces in place.
        self.watcher = InterfaceWatcher(cfg.pod_interfaces, self._attach_pod, self._detach_pod,
                                        on_address=self._address_changed)
        self.watcher.start()
        # An address added or removed after the resolve above and before the watcher subscribed sent
        # no event to anyone: resolve once more at the next sync.
        self._addresses_changed.set()
        if early:
            self.runner.run()
        if cfg.socket_lb_cgroup and cfg.socket_lb:
            self._start_socket_lb()
        elif cfg.socket_lb_cgroup:
            self._stop_socket_lb()
        if not early:
            self._start_syncing()

    def _start_kinds(self) -> set[str]:
        """What the node's configuration is made of: its Node and, families followed, the ServiceCIDRs."""
        return {"Node", "ServiceCIDR"} if self.config.ip_families_auto else {"Node"}

    def _follow_service_cidrs(self) -> bool:
        """--ip-families auto: serve the families of the cluster's ServiceCIDRs (DEFAULT_IP_FAMILIES
        while there is none). True when they changed: the node is then resolved again and the next
        build recomputes every Service (a new node context)."""
        if not self.config.ip_families_auto:
            return False
        families = served_ip_families(self.state.service_cidrs())
        if families == self.settings.ip_families:
            return False
        log.info("IP families %s (%s)", ",".join(families), "the cluster's ServiceCIDRs"
                 if families != DEFAULT_IP_FAMILIES or self.state.service_cidrs() else "no ServiceCIDR: the default")
        self.config = replace(self.config, node=replace(self.config.node, ip_families=families))
        self.settings = replace(self.settings, ip_families=families)
        self.desired.node = replace(self.desired.node, ip_families=families)
        return True

    def _tell_unserved_families(self, snapshot, everything: bool) -> None:
        """--ip-families auto validates a clusterIP of either family (the API server allocated it),
        so one of a family the cluster has no ServiceCIDR of (from a manifest, or an API without
        ServiceCIDRs) is told here, once per Service and address: its frontends are left out."""
        families = self.desired.node.ip_families
        for key in snapshot.services if everything else snapshot.changed:
            svc = snapshot.services.get(key)
            for i, ip in enumerate(svc.cluster_ips if svc is not None else ()):
                told = (key, ip, families)
                if family_name(ip.version) not in families and told not in self._told_unserved:
                    self._told_unserved.add(told)
                    log.warning("Service %s/%s: spec.clusterIPs[%d]: %s is %s, a family the cluster has no "
                                "ServiceCIDR of (serving %s): not served", *key, i, ip,
                                family_name(ip.version), ",".join(families))

    def _adopt_maps(self, maps) -> None:
        """Write `maps` from now on: the maps-only object's tables while the programs compile, else the
        programs' own. Admission reads them first: the last good state survives restarts, what the maps
        serve now standing for Services that turn out to be invalid in the first list (admission.py)."""
        from ebpfsvc.datapath.writer import MapWriter

        self.writer = MapWriter(maps)
        self.admission.status = ServiceStatusMap(maps["lb_service_status"])
        self.admission.hold(pinned_frontends(maps))

    def _start_syncing(self) -> None:
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
            return ManifestSource(cfg.manifests, self.state)
        from ebpfsvc.sources.kube import KubeSource
        # Services, EndpointSlices, this node's Node and ServiceCIDRs: what kube-proxy watches.
        return KubeSource(self.state, kubeconfig=cfg.kubeconfig, in_cluster=cfg.in_cluster or None,
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
            cgroup = socklb.resolve_cgroup(cfg.socket_lb_cgroup)      # `auto`: found now, on this node
            self.socket_datapath = socklb.load(cfg.pin_dir, limits=loader.Limits(**cfg.limits),
                                               program_cache=cfg.program_cache, maps_unit=self._maps_bpf,
                                               compile_apart=cfg.program_cache)
            socklb.attach(self.socket_datapath, cgroup)
        except Exception as exc:    # noqa: BLE001 - no cgroup, compile, load or attach: the TC path stays
            self.socket_datapath = None
            log.error("socket-level load balancing not started on cgroup %s: %s (the TC path serves pods)",
                      cfg.socket_lb_cgroup, exc)
            return
        self.socket_lb_cgroup = cgroup
        log.info("socket-level load balancing attached to cgroup %s", cgroup)

    def _reset_socket_flows(self) -> None:
        """A backend left (or, for UDP, turned not ready): end the socket path's connections to it,
        as the TC path resets a flow whose conntrack entry names it (docs/socklb.md)."""
        from ebpfsvc.datapath import socklb

        try:
            report = socklb.reset_removed(self.socket_lb_cgroup, self.socket_datapath.maps,
                                          socklb.keeps_in_maps(self.writer))
        except Exception as exc:    # noqa: BLE001 - the maps are written: this sync succeeded whatever happens here
            log.error("socket-level load balancing: resetting sockets to removed backends failed: %s", exc)
            return
        for error in report.errors:
            log.warning("socket-level load balancing: cannot reset sockets in %s", error)
        if report:
            log.info("socket-level load balancing: reset %d TCP and %d UDP sockets to removed backends "
                     "(%d namespaces)", report.destroyed["TCP"], report.destroyed["UDP"], report.namespaces)
        self.telemetry.metrics.socket_resets(report.destroyed)

    def _stop_socket_lb(self) -> None:
        """--no-socket-lb on a cgroup a previous run attached to: off means off (the TC path
        serves new connections; established ones keep their backend, they need no translation)."""
        from ebpfsvc.datapath import socklb

        try:
            detached = socklb.detach(socklb.resolve_cgroup(self.config.socket_lb_cgroup))
        except (OSError, socklb.CgroupError) as exc:
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
            if self.node_info.hairpin is not None or self.node_info.hairpin6 is not None:
                _accept_local(ifindex, ifname)
        log.info("attached to pod interface %s (ifindex %d)", ifname, ifindex)

    # -- the node: addresses, uplinks, node clients (nodeinfo.py) ----------------
    def _address_changed(self) -> None:
        """An address came or went on some interface: resolve the node again at the next sync, as
        kube-proxy re-reads its NodePort addresses at every sync (a new one serves NodePorts)."""
        self._addresses_changed.set()
        self.runner.run()

    def _refresh_node(self, force: bool = False) -> None:
        """Resolve this node's addresses and uplinks again if its Node object changed (or
        `force`: at start and every periodic resync, for interfaces that changed), and reconfigure
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
        from ebpfsvc.datapath import loader, nodeaddrs

        cfg, old = self.config, self._configured
        log.info("node %s: %s", cfg.node.node_name, info.describe())
        if self.datapath is None:
            # migrate: a limit changed since the maps were pinned: their entries are carried over.
            self.datapath = loader.load(cfg.pin_dir, limits=loader.Limits(**cfg.limits),
                                        migrate=True, program_cache=cfg.program_cache, maps_unit=self._maps_bpf,
                                        compile_apart=cfg.program_cache)
        if old is None:
            # The datapath options are a word the programs read (not compiled in): written before
            # anything of this run attaches. Programs a previous run left attached take it at
            # their next packet, so a restart with other options needs no compile.
            loader.publish_options(self.datapath.maps, snat_keep_client_port=cfg.snat_keep_client_port,
                                   host_clients=cfg.host_clients,
                                   reset_removed_endpoint_tcp=cfg.reset_removed_endpoint_tcp,
                                   masquerade_external_to_local_backends=cfg.masquerade_external_to_local_backends,
                                   cluster_cidr=cfg.cluster_cidr)
        # The node's addresses are a map the programs read (not compiled in): written before anything
        # is attached, and again whenever they change, with no reload.
        addrs = nodeaddrs.NodeAddrs(hairpin4=info.hairpin, snat4=info.primary, hairpin6=info.hairpin6,
                                    snat6=info.primary6)
        if old is None or addrs != self._node_addrs:
            nodeaddrs.write(self.datapath.maps, addrs)
            self._node_addrs = addrs
        with self._datapath_lock:
            attach_all = self.node_info is None or (
                (self.node_info.hairpin, self.node_info.hairpin6) == (None, None) != (info.hairpin, info.hairpin6))
            self.node_info = info
            # A hairpin source that appears needs accept_local on the pods attached before.
            for ifindex, ifname in sorted(self.watcher.interfaces.items() if self.watcher and attach_all else ()):
                self._attach_pod(ifindex, ifname)
        self._configure_uplinks(info, old)
        self.telemetry.health.set_fault("uplinks", (
            f"uplink {', '.join(info.missing_uplinks)} not found: NodePorts, externalIPs, LoadBalancer IPs "
            f"and node clients are not served on it" if info.missing_uplinks else None))
        self._set_node_context(info)
        self._configured = info
        loader.release_compiler_memory()    # LLVM is needed again only for the next compile

    def _set_node_context(self, info: nodeinfo.NodeInfo) -> None:
        node = replace(self.config.node, node_addresses=info.nodeport_addresses)
        if node != self.desired.node:
            self.desired.node = node        # a new node context: the next build recomputes everything

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
        snat = info.primary         # in lb_node_addrs already (_configure)
        reload = self.uplink_datapath is None
        if reload:
            self.uplink_datapath = uplink.load(cfg.pin_dir, limits=loader.Limits(**cfg.limits),
                                               program_cache=cfg.program_cache, maps_unit=self._maps_bpf,
                                               compile_apart=cfg.program_cache)
        for name in info.uplinks:
            ifindex = uplink.ifindex_of(name)
            if ifindex is None:
                continue                  # gone since it was read: the next resolve says so
            if reload or self._uplinks_attached.get(name) != ifindex:
                uplink.attach(self.uplink_datapath, ifindex, cfg.uplink_mode)
                self._uplinks_attached[name] = ifindex
                log.info("attached to uplink %s (ifindex %d, mode %s, SNAT address %s)", name, ifindex,
                         cfg.uplink_mode, snat)
        sources = (info.primary, info.primary6)     # node clients' source per family (lb_node_addrs too)
        if cfg.host_clients and sources != (None, None) and (
                reload or old is None or (old.primary, old.primary6) != sources):
            from ebpfsvc.datapath import hostpath
            hostpath.setup(self.uplink_datapath, info.primary or info.primary6)
            with self._routes_lock:
                if self._routed is None:
                    self._routed = hostpath.routes()    # a previous run's routes: kept or removed by the diff
            self._route_node_clients(rewrite=True)

    def _route_node_clients(self, snapshot=None, result=None, rewrite: bool = False) -> None:
        """Route the service CIDRs (ServiceCIDR objects, else --service-cidr) and every ClusterIP
        outside them to the node-client device."""
        from ebpfsvc.datapath import hostpath

        if not self.config.host_clients:
            return
        with self._routes_lock:     # the first syncs may run while start() sets the device up
            if self._host_routes is None:
                self._host_routes = hostpath.NodeClientRoutes()
            routes = self._host_routes
            if snapshot is not None:
                cidrs = [c for obj in snapshot.service_cidrs.values() for c in obj.cidrs]
                if not cidrs and self.config.node.service_cidr is not None:
                    cidrs = [self.config.node.service_cidr]
                routes.set_cidrs(cidrs)
            if result is not None:
                routes.update(result.state, result.delta)     # ClusterIPs of both families: hostpath._routed
            if self._routed is None or not routes.ready:
                return      # no device yet, or nothing known yet: a previous run's routes stay until then
            if routes.dirty or rewrite:
                self._routed = hostpath.sync_routes(self._routed, routes.take_wanted(),
                                                    (self.node_info.primary, self.node_info.primary6), rewrite=rewrite)

    def _served(self, spn) -> bool:
        """Whether the maps serve that service port now (admission never evicts such a Service)."""
        return self.writer.service_id(spn) is not None

    def _detach_pod(self, ifindex: int, ifname: str) -> None:
        log.info("pod interface %s (ifindex %d) is gone", ifname, ifindex)

    def _source_stats(self) -> dict | None:
        # The API source's watch statistics; a manifest directory keeps none.
        return getattr(self.source, "stats", None)

    def _invalid(self, problem) -> None:
        # The tracker has logged it; keep a count for the metrics endpoint.
        self.invalid_objects += 1

    # -- sync ------------------------------------------------------------------
    def sync(self) -> None:
        t0 = time.monotonic()
        # On the first apply and then every FULL_APPLY_PERIOD the writer recomputes everything
        # instead of trusting its incremental bookkeeping (and deletes whatever nothing wants);
        # every sync_period the node's addresses and uplinks are read again (cheap).
        full = t0 >= self._next_full_apply
        resync = full or t0 >= self._next_resync
        families_changed = self._follow_service_cidrs()
        if self._configured is not None:        # start() configured the datapath once (it may be compiling)
            moved = self._addresses_changed.is_set()
            self._addresses_changed.clear()     # before reading: an event meanwhile brings another pass
            self._refresh_node(force=(resync and self.last_applied is not None) or moved or families_changed)
            if resync and self.last_applied is not None:
                self._next_resync = t0 + self.config.sync_period
        if not self.state.synced:
            log.debug("not synced yet: Services and EndpointSlices must both have listed once")
            return
        if not self._start_kinds() - {"Node"} <= self.state.synced_kinds:
            # Which families to serve is not known yet: a sync now could take a previous run's
            # IPv6 frontends out of the maps the attached programs serve.
            log.debug("not synced yet: the ServiceCIDRs (the cluster's IP families) have not listed")
            return
        snapshot = self.state.snapshot()
        self.telemetry.sync_started(snapshot.trigger_times)
        if self.config.ip_families_auto:
            self._tell_unserved_families(snapshot, everything=families_changed or self.last_applied is None)
        result = self.desired.build(snapshot)
        # A starting agent's first apply builds every Maglev table: they begin now, on the other
        # cores, while admission runs and the writer works out ids (a no-op after the first apply).
        self.writer.prepare(result.state)
        invalid = {(p.namespace, p.name) for p in self.state.problems if p.kind == "Service"}
        admitted = self.admission.admit(result, snapshot.services, self._served, invalid)
        desired = admitted.state
        if desired is self.last_applied and not full and not self.admission.write_failures:
            self._route_node_clients(snapshot)
            self.telemetry.sync_done(time.monotonic() - t0, snapshot=snapshot, node=self.desired.node,
                                     applied=desired)
            self._take_over(desired)
            return
        # One Service whose writes the kernel refuses costs that Service only (kept at its last good
        # entries, told by admission); it is retried with back-off, not in a loop.
        stats = self.writer.apply(desired, full=full, delta=admitted.delta, isolate=True)
        self.admission.written(stats.failed)
        if stats.failed:
            log.info("%d Services not written; retrying them in %.1fs, or at the next change",
                     len(stats.failed), self.runner.retry_later())
        # Only a backend that left or changed (UDP: turned not ready) can leave a socket on a backend
        # that no longer keeps it; a sync that only added backends has nothing to reset.
        if self.socket_datapath is not None and (stats.backends_deleted or stats.backends_changed):
            self._reset_socket_flows()
        if admitted.deferred:
            self.runner.run()       # the slots this apply released are free now: admit the waiting ones
        self._route_node_clients(snapshot, result)
        if full:
            self._next_full_apply = t0 + max(FULL_APPLY_PERIOD, self.config.sync_period)
            if self.last_applied is None:
                # The first full state is a large, long-lived heap (10k Services: millions of
                # objects). Freezing it keeps Python's full garbage collections, which would walk it
                # every time, from adding hundreds of milliseconds to an endpoint change.
                gc.freeze()
        self.last_applied = desired
        self.syncs += 1
        self.synced_once.set()
        self.telemetry.sync_done(time.monotonic() - t0, stats, snapshot=snapshot, node=self.desired.node,
                                 applied=desired, delta=admitted.delta)
        log.info("synced %d frontends in %.1f ms%s: %s", len(desired.frontends),
                 (time.monotonic() - t0) * 1000, " (full)" if full else "", stats)
        self._take_over(desired)

    def _take_over(self, desired: LBState) -> None:
        """Once, after the first sync with the programs attached: from then on new connections are
        ours, and another proxy's closed ones in the kernel's conntrack would remap their source
        ports (takeover.py). After the sync's writes, on a thread: parsing a large conntrack dump
        must hold up neither this sync nor the next."""
        if self._takeover_pending and self.watcher is not None:
            self._takeover_pending = False
            threading.Thread(target=takeover.clear_after_takeover, args=(desired,), name="takeover",
                             daemon=True).start()


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
