"""`ebpfsvc agent`: the node agent's command line, with kube-proxy's flag names where the meaning is the same."""

from __future__ import annotations

import logging
import os
import socket

import click
import yaml

from ebpfsvc import abi
from ebpfsvc.config import (AUTO_IP_FAMILIES, DEFAULT_IP_FAMILIES, DEFAULT_NODEPORT_RANGE, DEFAULT_PIN_DIR, AgentConfig, NodeConfig,
                            format_port_range)
from ebpfsvc.flags import (CONFIG_META, AgentError, BindAddress, Duration, IPFamilies, IPv4Address, IPv4Network,
                           IPv6Address, NodePortAddress, OneLineErrors, PortRange, format_duration)
from ebpfsvc.health import BindError
from ebpfsvc.nodeinfo import parse_nodeport_addresses

log = logging.getLogger(__name__)


def _load_config_file(ctx: click.Context, _param, path: str | None):
    """--config FILE: a YAML mapping of long flag names (`service-cidr`, `uplink`, ...) to values,
    lists for repeatable flags; flags given on the command line win, as with kube-proxy's --config.
    An unknown key is an error, so a typo cannot silently leave a setting at its default."""
    if not path:
        return None
    ctx.meta[CONFIG_META] = path
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise AgentError(f"--config {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise AgentError(f"--config {path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise AgentError(f"--config {path}: expected a mapping of option names to values, "
                         f"got {type(data).__name__}")
    # Flag name -> click parameter name (e.g. `uplink` -> `uplinks`, `node-address` -> `node_addresses`).
    by_flag = {opt.lstrip("-"): p.name for p in ctx.command.params for opt in p.opts if opt.startswith("--")}
    by_flag.pop("config", None)
    unknown = sorted(str(k) for k in data if str(k).replace("_", "-") not in by_flag)
    if unknown:
        raise AgentError(f"--config {path}: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(by_flag))}")
    ctx.default_map = {by_flag[str(k).replace("_", "-")]: v for k, v in data.items()}
    return path


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and where (line, column)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(what).split())


def _nodeport_addresses(_ctx, _param, values):
    try:
        return parse_nodeport_addresses(values or ())
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--nodeport-addresses") from None


def _socket_lb_cgroup(_ctx, _param, value):
    """--socket-lb-cgroup: an existing cgroup v2 directory below a cgroup2 mount (read from mountinfo), or
    `auto`: the kubelet's, found when the agent starts (where there is none, the TC path serves)."""
    from ebpfsvc.datapath import socklb

    if not value or value == socklb.AUTO:
        return value or ""
    try:
        path = socklb.resolve_cgroup(value)
    except socklb.CgroupError as e:
        raise click.BadParameter(str(e), param_hint="--socket-lb-cgroup") from None
    return str(path)


def _lifetime_option(flag: str, macro: str, what: str):
    """A --conntrack-*-timeout flag (kube-proxy's): whole seconds as a duration; default abi.h's `macro`."""
    return click.option(flag, default=format_duration(getattr(abi, macro)), show_default=True,
                        type=Duration(whole=True), help=f"Idle lifetime of {what} (0: the datapath's default).")


#: --max-* flags: the datapath's map sizes (datapath/loader.Limits field, what it counts). Their
#: defaults are bpf/include/abi.h's; docs/operations.md ("Capacity") gives the formula to size them.
MAP_LIMIT_FLAGS = (
    ("--max-frontends", "frontends", "frontends (address:port/protocol and scope; a ClusterIP port is one, a "
                                     "NodePort two per node address)"),
    ("--max-service-ports", "services", "service ports (namespace/name:port/protocol)"),
    ("--max-backends", "backends", "distinct backends (endpoint address:port/protocol)"),
    ("--max-maglev-slots", "maglev_slots", "Maglev slots of all frontends together (a frontend with n usable "
                                           "backends takes maglev.table_size(n): 251, 503, 1009, 2011... >= 100 x n)"),
    ("--max-affinity-entries", "affinity_entries", "(client, service port) session-affinity entries (LRU)"),
    ("--max-affinity-backends", "affinity_matches", "(backend, frontend) pairs of ClientIP-affinity Services"),
    ("--max-snat-entries", "snat_entries", "NodePort SNAT entries, two per SNATed flow (LRU)"),
    ("--max-source-ranges", "source_ranges", "(frontend, prefix) loadBalancerSourceRanges entries"),
    ("--max-fragment-entries", "frag_entries", "datagrams whose first fragment was seen (LRU)"),
)


def _map_limit_options(fn):
    from ebpfsvc.datapath.loader import Limits

    defaults = Limits()
    for flag, name, what in reversed(MAP_LIMIT_FLAGS):
        # No click default: an unset size is left out of AgentConfig.limits (abi.h's then applies).
        fn = click.option(flag, name, default=None, show_default=str(getattr(defaults, name)),
                          type=click.IntRange(min=1), help=f"Map size: {what}.")(fn)
    return fn


def start_agent(cfg: AgentConfig):
    """The agent of `cfg`, its pinned maps already opening: ebpfsvc.agent and what it imports (pyroute2,
    the admission and Maglev modules: most of a second, seconds on a busy node), then the API source
    (the Kubernetes client), load while the maps open on another thread (bcc compiles the maps-only
    unit on a new node; a restart makes the tables from the kept layout), instead of before it
    (issue 12: a restart's first change)."""
    from dataclasses import replace

    cfg = replace(cfg, pin_dir=os.path.abspath(cfg.pin_dir), **{     # bcc changes the cwd while compiling
        name: os.path.abspath(getattr(cfg, name)) for name in ("manifests", "kubeconfig") if getattr(cfg, name)})
    opening = None
    if not cfg.bind_address_hard_fail:      # that mode exits on a taken port before touching any map
        from ebpfsvc.datapath import loader      # numpy and bcc, needed for the compile anyway

        opening = loader.open_maps_early(cfg.pin_dir, loader.Limits(**cfg.limits), cfg.program_cache,
                                         compile_apart=cfg.program_cache)
    from ebpfsvc.agent import Agent
    return Agent(cfg, opening=opening)


@click.command("agent", cls=OneLineErrors)
@click.option("--config", callback=_load_config_file, is_eager=True, expose_value=False,
              type=click.Path(exists=True, dir_okay=False), help="YAML file with any of these options.")
@click.option("--node-name", envvar="NODE_NAME", default=socket.gethostname, show_default="hostname",
              help="This node's name (endpoints with this nodeName are local).")
@click.option("--manifests", type=click.Path(file_okay=False),
              help="Read Services/EndpointSlices from this directory instead of the API server.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig; default: in-cluster.")
@click.option("--pin-dir", default=DEFAULT_PIN_DIR, show_default=True, help="bpffs directory for pinned maps.")
@click.option("--node-address", "node_addresses", multiple=True, type=IPv4Address(),
              help="A NodePort address (repeatable); alone, it replaces the node's own (an override).")
@click.option("--nodeport-addresses", multiple=True, type=NodePortAddress(), callback=_nodeport_addresses,
              help="kube-proxy's: CIDRs (NodePorts on this node's addresses inside them), `primary` (its Node's "
                   "first InternalIP); default: every node address (its Node's status.addresses on this node).")
@click.option("--zone", default="", help="topology.kubernetes.io/zone; default: from the Node object.")
@click.option("--service-cidr", default=None, type=IPv4Network(),
              help="Optional: refuse clusterIPs outside it, and route it for node clients when the API has "
                   "no ServiceCIDR objects. Default: every valid clusterIP is served.")
@click.option("--ip-families", default=AUTO_IP_FAMILIES, show_default=True, type=IPFamilies(auto=True),
              help="The IP families this node serves: auto (the families of the cluster's ServiceCIDRs, followed "
                   "as they change; IPv4 when the API serves none), or IPv4, IPv6, IPv4,IPv6 (an override: then a "
                   "Service with a clusterIP of another family is refused).")
@click.option("--cluster-cidr", default=None, type=IPv4Network(),
              help="The cluster's pod CIDR, as kube-proxy's (its default --detect-local-mode ClusterCIDR): pods of "
                   "other nodes reaching a NodePort, externalIP or LoadBalancer IP of this node with "
                   "externalTrafficPolicy Local get the cluster-wide endpoints (docs/semantics.md).")
@click.option("--service-node-port-range", default=format_port_range(DEFAULT_NODEPORT_RANGE), show_default=True,
              type=PortRange())
@click.option("--proxy-name", default="", help="Answer Services labelled service.kubernetes.io/service-proxy-name=NAME.")
@click.option("--legacy-source-ranges-annotation/--no-legacy-source-ranges-annotation",
              default=NodeConfig.legacy_source_ranges, show_default=True,
              help="Enforce service.beta.kubernetes.io/load-balancer-source-ranges on LoadBalancer IPs when "
                   "spec.loadBalancerSourceRanges is empty; off: ignored, as kube-proxy does (docs/semantics.md).")
@click.option("--lb-algorithm", type=click.Choice(["maglev", "random"]), default="maglev", show_default=True)
@click.option("--pod-interfaces", multiple=True, default=("lxc*",), show_default=True,
              help="Name patterns of the host side of pod veths (followed as they come and go).")
@click.option("--uplink", "uplinks", multiple=True,
              help="Node uplink interface for NodePort/external traffic (repeatable); default: the interfaces "
                   "that carry the node addresses. One that does not exist makes /healthz fail.")
@click.option("--uplink-mode", type=click.Choice(["tc", "xdp"]), default="tc", show_default=True,
              help="Uplink programs: TC only, or XDP (native) in front of TC (docs/northsouth.md).")
@click.option("--hairpin-address", default=None, type=IPv4Address(),
              help="Node-owned address pods see when they reach themselves via a Service; default: the node's "
                   "primary address.")
@click.option("--hairpin-address6", default=None, type=IPv6Address(),
              help="The IPv6 twin of --hairpin-address (IPv6 Services); default: the node's IPv6 primary address.")
@click.option("--host-clients/--no-host-clients", default=True, show_default=True,
              help="Serve Services to clients in the node's own namespace (hostNetwork pods): ClusterIPs "
                   "through a device the service addresses are routed to, ebpfsvc0; the node's own NodePorts "
                   "through lo; externalIPs and LoadBalancer IPs on the uplink (needs an uplink).")
@click.option("--nodeport-snat-keep-client-port/--no-nodeport-snat-keep-client-port", default=True, show_default=True,
              help="SNATed NodePort TCP flows keep the client's source port when free (as Linux NAT does; "
                   "docs/northsouth.md); off: always a port of 61000-65535.")
@click.option("--reset-removed-endpoint-tcp/--no-reset-removed-endpoint-tcp",
              default=AgentConfig.reset_removed_endpoint_tcp, show_default=True,
              help="Reset an established TCP connection whose endpoint left its EndpointSlice at its next "
                   "segment; off: it goes on to the endpoint's address until it closes or expires, as with "
                   "kube-proxy (docs/semantics.md).")
@click.option("--masquerade-external-to-local-backends/--no-masquerade-external-to-local-backends",
              default=AgentConfig.masquerade_external_to_local_backends, show_default=True,
              help="SNAT external traffic under externalTrafficPolicy Cluster to the node address also when the "
                   "backend is on this node, as kube-proxy does; off: that backend sees the client's address "
                   "(docs/semantics.md).")
@click.option("--socket-lb/--no-socket-lb", default=False, show_default=True,
              help="Translate ClusterIP connections at the socket (connect/sendmsg hooks on --socket-lb-cgroup) "
                   "instead of every packet at TC (docs/socklb.md). Off by default for now.")
@click.option("--socket-lb-cgroup", default="", callback=_socket_lb_cgroup,
              help="cgroup v2 directory whose processes get the socket path (the kubelet's pods' parent), "
                   "absolute or relative to the cgroup2 mount; never the hierarchy's root. `auto`: the "
                   "kubelet's kubepods.slice or kubepods below any cgroup2 mount, the last mounted first.")
@click.option("--program-cache/--no-program-cache", default=True, show_default=True,
              help="Load the datapath programs compiled by an earlier start when source, flags, kernel and bcc "
                   "are unchanged ($EBPFSVC_PROGRAM_CACHE; docs/operations.md), instead of compiling them again.")
@click.option("--min-sync-period", default=format_duration(0.05), show_default=True, type=Duration(),
              help="Time between syncs, at least (a Go duration like 50ms, or seconds).")
@click.option("--sync-period", default=format_duration(30.0), show_default=True, type=Duration(positive=True),
              help="A full resync at least this often (a Go duration like 30s, or seconds).")
@click.option("--healthz-bind-address", default="0.0.0.0:10256", show_default=True, type=BindAddress(10256),
              help="/healthz and /livez (kube-proxy's meaning); empty to disable.")
@click.option("--metrics-bind-address", default="127.0.0.1:10249", show_default=True, type=BindAddress(10249),
              help="Prometheus /metrics; empty to disable.")
@click.option("--bind-address-hard-fail", is_flag=True,
              help="Exit when a healthz or metrics address is taken, instead of retrying it in the background "
                   "every 5s (kube-proxy's flag and default; docs/deploy.md, migrating from kube-proxy).")
@click.option("--conntrack-max-per-core", default=32768, show_default=True, type=click.IntRange(min=0),
              help="Flows tracked per CPU (0: leave the datapath's table size and ignore --conntrack-min).")
@click.option("--conntrack-min", default=131072, show_default=True, type=click.IntRange(min=0),
              help="Flows tracked at least, whatever the CPU count.")
@_lifetime_option("--conntrack-tcp-timeout-established", "CT_TIMEOUT_TCP_ESTABLISHED_S", "an established TCP flow")
@_lifetime_option("--conntrack-tcp-timeout-close-wait", "CT_TIMEOUT_TCP_CLOSE_WAIT_S",
                  "a TCP flow closed in one direction")
@_lifetime_option("--conntrack-udp-timeout", "CT_TIMEOUT_UDP_S", "a UDP flow with no reply yet")
@_lifetime_option("--conntrack-udp-timeout-stream", "CT_TIMEOUT_UDP_STREAM_S", "a UDP flow that had a reply")
@_map_limit_options
def agent(node_name, manifests, kubeconfig, pin_dir, node_addresses, nodeport_addresses, zone, service_cidr,
          ip_families, cluster_cidr, service_node_port_range, proxy_name, legacy_source_ranges_annotation, lb_algorithm,
          pod_interfaces, uplinks,
          uplink_mode, hairpin_address, hairpin_address6, host_clients, nodeport_snat_keep_client_port,
          reset_removed_endpoint_tcp, masquerade_external_to_local_backends,
          socket_lb, socket_lb_cgroup,
          program_cache, min_sync_period, sync_period,
          healthz_bind_address, metrics_bind_address, bind_address_hard_fail, conntrack_max_per_core, conntrack_min,
          conntrack_tcp_timeout_established, conntrack_tcp_timeout_close_wait, conntrack_udp_timeout,
          conntrack_udp_timeout_stream, **map_limits):
    """Run the node agent: program this node's Service data plane and keep it in sync."""
    from ebpfsvc.datapath.loader import conntrack_limits

    if socket_lb and not socket_lb_cgroup:
        raise AgentError("--socket-lb: needs --socket-lb-cgroup (the cgroup v2 directory of the node's pods)")
    addrs = tuple(node_addresses)
    auto = ip_families == AUTO_IP_FAMILIES      # the ServiceCIDRs' families, from DEFAULT_IP_FAMILIES on
    node = NodeConfig(node_name=node_name, node_addresses=tuple(dict.fromkeys(addrs)), zone=zone,
                      service_cidr=service_cidr, nodeport_range=service_node_port_range, proxy_name=proxy_name,
                      default_algorithm=lb_algorithm, legacy_source_ranges=legacy_source_ranges_annotation,
                      ip_families=DEFAULT_IP_FAMILIES if auto else ip_families)
    if not auto and "IPv4" not in ip_families:
        for flag, value in (("--service-cidr", service_cidr), ("--node-address", addrs[:1] and addrs[0])):
            if value:
                raise AgentError(f"{flag} {value}: an IPv4 setting, but --ip-families {','.join(ip_families)} "
                                 f"serves no IPv4")
    cfg = AgentConfig(node=node, ip_families_auto=auto, pin_dir=pin_dir, manifests=manifests, kubeconfig=kubeconfig,
                      in_cluster=not manifests and not kubeconfig, pod_interfaces=tuple(pod_interfaces),
                      uplinks=tuple(uplinks) or None, uplink_mode=uplink_mode, nodeport_addresses=nodeport_addresses,
                      hairpin_address=hairpin_address, hairpin_address6=hairpin_address6,
                      snat_keep_client_port=nodeport_snat_keep_client_port, host_clients=host_clients,
                      reset_removed_endpoint_tcp=reset_removed_endpoint_tcp,
                      masquerade_external_to_local_backends=masquerade_external_to_local_backends,
                      cluster_cidr=cluster_cidr, socket_lb=socket_lb, socket_lb_cgroup=socket_lb_cgroup or None,
                      program_cache=program_cache, min_sync_interval=min_sync_period, sync_period=sync_period,
                      healthz_bind_address=healthz_bind_address, metrics_bind_address=metrics_bind_address,
                      bind_address_hard_fail=bind_address_hard_fail,
                      limits={**conntrack_limits(max_per_core=conntrack_max_per_core, minimum=conntrack_min,
                                                 tcp_established=conntrack_tcp_timeout_established,
                                                 tcp_close_wait=conntrack_tcp_timeout_close_wait,
                                                 udp=conntrack_udp_timeout,
                                                 udp_stream=conntrack_udp_timeout_stream),
                              **{k: v for k, v in map_limits.items() if v is not None}})
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    log.info("ebpfsvc agent on node %s (pid %d)", node_name, os.getpid())
    try:
        start_agent(cfg).run_forever()
    except BindError as e:
        raise AgentError(str(e)) from None
