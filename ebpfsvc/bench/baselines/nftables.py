"""An LBState as kube-proxy's nftables mode writes it: one `nft -f` transaction.

The layout follows pkg/proxy/nftables: everything lives in `table ip
kube-proxy`, and service dispatch is a verdict-map lookup instead of a rule walk:

    nat-prerouting / nat-output -> services:
        ip daddr . meta l4proto . th dport vmap @service-ips     (ClusterIP, externalIP, LB IP)
        <local destination> meta l4proto . th dport vmap @service-nodeports
    service-<base> / local-<base>: masquerade off-cluster sources, then
        `numgen random mod N vmap { 0 : goto endpoint-..., ... }`
    endpoint-<base>__<ip>/<port>: mark hairpin traffic, `dnat to ip:port`
    external-<base>: NodePort / external entry (masquerade, or Local short-circuits)
    filter-* base chains (priority dstnat-10, so before DNAT) -> endpoints-check:
        @no-endpoint-services / @no-endpoint-nodeports -> reject-chain or drop
    nat-postrouting -> masquerading: masquerade what carries mark 0x4000

The script is written in the command form knftables sends to `nft -f -` (add
table, add chain, add rule, add element ...), so loading it costs what a
kube-proxy sync costs.  With `replace=True` it starts by deleting the table, in
the same transaction, so a reload is atomic and leaves nothing stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ebpfsvc.lbmodel import Backend, LBState
from ebpfsvc.bench.baselines import names
from ebpfsvc.bench.baselines.serviceports import ServicePortView, service_ports

TABLE = "ip kube-proxy"
MASQ_MARK = "0x004000"   # kube-proxy prints its mark with %#08x

_BASE_CHAINS = [
    # Filter chains see the pre-DNAT destination (service address), so they run
    # before DNAT: dstnat - 10.  Numbers, because nft 1.0 accepts the names
    # dstnat/srcnat only on some hooks (dstnat = -100, srcnat = 100).
    ("filter-prerouting", "filter", "prerouting", "-110"),
    ("filter-input", "filter", "input", "-110"),
    ("filter-forward", "filter", "forward", "-110"),
    ("filter-output", "filter", "output", "-110"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
]
_JUMPS = [
    # reject is only valid from input/forward/output, hence no endpoints-check in prerouting.
    ("endpoints-check", "filter-input", "ct state new"),
    ("endpoints-check", "filter-forward", "ct state new"),
    ("endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting", "ct state new"),
    ("firewall-check", "filter-output", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
]
_ADDR_PROTO_PORT = "ipv4_addr . inet_proto . inet_service : verdict"
_MAPS = [
    ("no-endpoint-services", _ADDR_PROTO_PORT, "vmap to drop or reject packets to services with no endpoints"),
    ("no-endpoint-nodeports", "inet_proto . inet_service : verdict",
     "vmap to drop or reject packets to service nodeports with no endpoints"),
    ("firewall-ips", _ADDR_PROTO_PORT, "destinations that are subject to LoadBalancerSourceRanges"),
    ("service-ips", _ADDR_PROTO_PORT, "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    ("service-nodeports", "inet_proto . inet_service : verdict", "NodePort traffic"),
]


_VERDICT = {"reject": "goto reject-chain", "drop": "drop"}


class _Script:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._chains: set[str] = set()

    def chain(self, name: str) -> None:
        if name not in self._chains:
            self._chains.add(name)
            self.lines.append(f"add chain {TABLE} {name}")

    def rule(self, chain: str, rule: str) -> None:
        self.lines.append(f"add rule {TABLE} {chain} {rule}")

    def element(self, map_name: str, key: str, value: str, comment: str | None = None) -> None:
        note = f' comment "{comment}"' if comment else ""
        self.lines.append(f"add element {TABLE} {map_name} {{ {key}{note} : {value} }}")


def _setup(s: _Script, node_addresses: Sequence[str] | None) -> None:
    s.lines.append(f'add table {TABLE} {{ comment "rules for kube-proxy" ; }}')
    for name, kind, hook, priority in _BASE_CHAINS:
        s.lines.append(f"add chain {TABLE} {name} {{ type {kind} hook {hook} priority {priority} ; }}")
        s._chains.add(name)
    for target, source, extra in _JUMPS:
        s.chain(target)
        s.rule(source, f"{extra + ' ' if extra else ''}jump {target}")
    for chain in ("services", "masquerading", "mark-for-masquerade"):
        s.chain(chain)
    s.rule("mark-for-masquerade", f"mark set mark or {MASQ_MARK}")
    s.rule("masquerading", f"mark and {MASQ_MARK} == 0 return")
    s.rule("masquerading", f"mark set mark xor {MASQ_MARK}")
    s.rule("masquerading", "masquerade fully-random")

    if node_addresses is None:
        # Every local address except loopback accepts NodePorts.
        local_dst = "fib daddr type local ip daddr != 127.0.0.0/8"
    else:
        s.lines.append(f'add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }}')
        for address in node_addresses:
            s.lines.append(f"add element {TABLE} nodeport-ips {{ {address} }}")
        local_dst = "ip daddr @nodeport-ips"
    for name, kind, comment in _MAPS:
        s.lines.append(f'add map {TABLE} {name} {{ type {kind} ; comment "{comment}" ; }}')
    s.lines.append(f'add chain {TABLE} reject-chain {{ comment "helper for @no-endpoint-services / '
                   '@no-endpoint-nodeports" ; }')
    s._chains.add("reject-chain")
    s.rule("reject-chain", "reject")
    s.rule("endpoints-check", "ip daddr . meta l4proto . th dport vmap @no-endpoint-services")
    s.rule("endpoints-check", f"{local_dst} meta l4proto . th dport vmap @no-endpoint-nodeports")
    s.rule("firewall-check", "ip daddr . meta l4proto . th dport vmap @firewall-ips")
    s.rule("services", "ip daddr . meta l4proto . th dport vmap @service-ips")
    s.rule("services", f"{local_dst} meta l4proto . th dport vmap @service-nodeports")


def _endpoint_selection(s: _Script, view: ServicePortView, chain: str, endpoints: Sequence[Backend],
                        bases: dict[tuple, str]) -> None:
    if view.affinity_timeout:
        for b in endpoints:
            base = bases[b.address, b.port]
            s.rule(chain, f"ip saddr @affinity-{base} goto endpoint-{base}")
    targets = " , ".join(f"{i} : goto endpoint-{bases[b.address, b.port]}" for i, b in enumerate(endpoints))
    s.rule(chain, f"numgen random mod {len(endpoints)} vmap {{ {targets} }}")


def _endpoint_chain(s: _Script, view: ServicePortView, b: Backend, base: str) -> None:
    chain = f"endpoint-{base}"
    s.rule(chain, f"ip saddr {b.address} jump mark-for-masquerade")
    if view.affinity_timeout:
        s.rule(chain, f"update @affinity-{base} {{ ip saddr }}")
    s.rule(chain, f"meta l4proto {view.protocol} dnat to {names.endpoint_string(b)}")


def _service_port(s: _Script, view: ServicePortView, cluster_cidr: str | None, masquerade_all: bool) -> None:
    base = names.nft_service_base(view.name)
    proto, label = view.protocol, view.label
    cluster_chain, local_chain = f"service-{base}", f"local-{base}"
    ext_chain, fw_chain = f"external-{base}", f"firewall-{base}"
    internal_chain = local_chain if view.internal_local else cluster_chain
    external_policy_chain = local_chain if view.external_local else cluster_chain
    uses_ext, uses_fw = view.uses_external_chain, view.uses_firewall
    # Keyed by (address, port): the cluster and local sets may hold the same endpoint with other flags.
    endpoints = view.endpoints_in_use()
    bases = {(b.address, b.port): names.nft_endpoint_base(view.name, b) for b in endpoints}
    for ep_base in bases.values():
        s.chain(f"endpoint-{ep_base}")
    selections = view.endpoint_selections(cluster_chain, local_chain)
    for chain, _ in selections:
        s.chain(chain)
    if uses_ext:
        s.chain(ext_chain)

    internal_verdict = _VERDICT.get(view.internal_no_endpoints)
    external_verdict = _VERDICT.get(view.external_no_endpoints)

    for address, port in view.cluster_ips:
        key = f"{address} . {proto} . {port}"
        if internal_verdict:
            s.element("no-endpoint-services", key, internal_verdict, label)
            continue
        s.element("service-ips", key, f"goto {internal_chain}")
        if masquerade_all:
            s.rule(internal_chain, f"ip daddr {address} {proto} dport {port} jump mark-for-masquerade")
        elif cluster_cidr:
            s.rule(internal_chain, f"ip daddr {address} {proto} dport {port} ip saddr != {cluster_cidr} "
                   "jump mark-for-masquerade")

    def external_entry(service_set: str, no_endpoint_set: str, key: str, firewall: bool = False) -> None:
        # An address or NodePort reached from outside: to the external chain (an LB IP with
        # loadBalancerSourceRanges through the firewall chain first), or the no-endpoints verdict.
        if uses_ext:
            s.element(service_set, key, f"goto {ext_chain}")
        if firewall:
            s.element("firewall-ips", key, f"goto {fw_chain}", label)
        if external_verdict:
            s.element(no_endpoint_set, key, external_verdict, label)

    for address, port in view.external_ips:
        external_entry("service-ips", "no-endpoint-services", f"{address} . {proto} . {port}")

    if uses_fw:
        s.chain(fw_chain)
        s.rule(fw_chain, f"ip saddr != {{ {', '.join(view.source_ranges)} }} drop")
    for address, port in view.load_balancer_ips:
        external_entry("service-ips", "no-endpoint-services", f"{address} . {proto} . {port}", firewall=uses_fw)

    for node_port in view.node_ports:
        external_entry("service-nodeports", "no-endpoint-nodeports", f"{proto} . {node_port}")

    if uses_ext:
        if not view.external_local:
            s.rule(ext_chain, "jump mark-for-masquerade")
        else:
            # Local policy keeps the client address, except for traffic that starts on
            # this node (pods, the host): it behaves as if it left and came back in.
            if cluster_cidr:
                s.rule(ext_chain, f'ip saddr {cluster_cidr} goto {cluster_chain} comment "short-circuit pod traffic"')
            s.rule(ext_chain, 'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"')
            s.rule(ext_chain, f'fib saddr type local goto {cluster_chain} comment "short-circuit local traffic"')
        if view.has_external_endpoints:
            s.rule(ext_chain, f"goto {external_policy_chain}")

    if view.affinity_timeout:
        for ep_base in bases.values():
            s.lines.append(f"add set {TABLE} affinity-{ep_base} "
                           f"{{ type ipv4_addr ; flags dynamic,timeout ; timeout {view.affinity_timeout}s ; }}")
    for chain, selected in selections:
        _endpoint_selection(s, view, chain, selected, bases)
    for b in endpoints:
        _endpoint_chain(s, view, b, bases[b.address, b.port])


def nft_script(state: LBState, *, cluster_cidr: str | None = "198.18.0.0/16",
               node_addresses: Sequence[str] | None = None, masquerade_all: bool = False,
               replace: bool = False) -> str:
    """The `nft -f` input kube-proxy's nftables mode would send for `state`.

    Arguments as for iptables_restore_payload; `replace` first deletes any
    existing kube-proxy table in the same transaction.
    """
    s = _Script()
    if replace:
        # "add" first so that "delete" cannot fail on a namespace without the table.
        s.lines += [f"add table {TABLE}", f"delete table {TABLE}"]
    _setup(s, node_addresses)
    for view in service_ports(state):
        _service_port(s, view, cluster_cidr, masquerade_all)
    return "\n".join(s.lines) + "\n"


def chains_of(script: str) -> Iterable[str]:
    """Names of the chains a script adds (for tests and for counting objects)."""
    prefix = f"add chain {TABLE} "
    for line in script.splitlines():
        if line.startswith(prefix):
            yield line[len(prefix):].split(" ", 1)[0]
