"""An LBState as kube-proxy's iptables mode writes it: one iptables-restore payload.

The layout follows pkg/proxy/iptables (kube-proxy 1.28+), because the point of
the baseline is to cost exactly what a cluster pays:

    nat PREROUTING/OUTPUT -> KUBE-SERVICES: one rule per ClusterIP / externalIP /
        LB IP (a linear walk: the cost that grows with the number of services),
        last a jump to KUBE-NODEPORTS for local destinations
    KUBE-SVC-<hash> / KUBE-SVL-<hash>: masquerade off-cluster sources, then one
        rule per endpoint with `statistic --mode random --probability 1/n,
        1/(n-1), ... 1` (each rule takes its share of what the previous ones left)
    KUBE-SEP-<hash>: mark hairpin traffic (endpoint talking to itself through
        the service) for masquerade, DNAT to the endpoint
    KUBE-EXT-<hash>: NodePort / external entry: masquerade (Cluster policy) or
        the short-circuit rules of a Local policy, then the policy chain
    KUBE-POSTROUTING: masquerade what carries mark 0x4000
    filter KUBE-SERVICES / KUBE-EXTERNAL-SERVICES: REJECT new connections to
        service ports without endpoints (DROP when only local ones are missing)

The payload also holds the jumps from the built-in chains (kube-proxy inserts
those with `iptables -I` at start-up), so it is meant for a full
`iptables-restore` (flush and replace) into a namespace that has no other rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ebpfsvc.lbmodel import Backend, LBState
from ebpfsvc.bench.baselines import names
from ebpfsvc.bench.baselines.serviceports import ServicePortView, service_ports

MASQ_MARK = "0x4000"

# (table, chain it jumps to, built-in chain, comment, extra match) as kube-proxy's iptablesJumpChains.
_JUMPS = [
    ("filter", "KUBE-EXTERNAL-SERVICES", "INPUT", "kubernetes externally-visible service portals",
     "-m conntrack --ctstate NEW"),
    ("filter", "KUBE-EXTERNAL-SERVICES", "FORWARD", "kubernetes externally-visible service portals",
     "-m conntrack --ctstate NEW"),
    ("filter", "KUBE-NODEPORTS", "INPUT", "kubernetes health check service ports", ""),
    ("filter", "KUBE-SERVICES", "FORWARD", "kubernetes service portals", "-m conntrack --ctstate NEW"),
    ("filter", "KUBE-SERVICES", "OUTPUT", "kubernetes service portals", "-m conntrack --ctstate NEW"),
    ("filter", "KUBE-FORWARD", "FORWARD", "kubernetes forwarding rules", ""),
    ("filter", "KUBE-PROXY-FIREWALL", "INPUT", "kubernetes load balancer firewall", "-m conntrack --ctstate NEW"),
    ("filter", "KUBE-PROXY-FIREWALL", "OUTPUT", "kubernetes load balancer firewall", "-m conntrack --ctstate NEW"),
    ("filter", "KUBE-PROXY-FIREWALL", "FORWARD", "kubernetes load balancer firewall", "-m conntrack --ctstate NEW"),
    ("nat", "KUBE-SERVICES", "OUTPUT", "kubernetes service portals", ""),
    ("nat", "KUBE-SERVICES", "PREROUTING", "kubernetes service portals", ""),
    ("nat", "KUBE-POSTROUTING", "POSTROUTING", "kubernetes postrouting rules", ""),
]
_BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}
_FIXED_CHAINS = {
    "filter": ["KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL",
               "KUBE-SERVICES"],
    "nat": ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"],
}


_FILTER_TARGET = {"reject": "REJECT", "drop": "DROP"}


def probability(n: int) -> str:
    """The statistic match for "this endpoint, out of the n still left": kube-proxy's %0.10f of 1/n."""
    return f"{1.0 / n:0.10f}"


def _comment(text: str) -> str:
    return f'"{text}"' if " " in text else text


def _match(view: ServicePortView, address: str | None, port: int) -> str:
    dst = f" -d {address}" if address else ""
    return f"-m {view.protocol} -p {view.protocol}{dst} --dport {port}"


class _Tables:
    """Chains declared and rules appended, per table, in the order iptables-restore wants."""

    def __init__(self) -> None:
        self.chains: dict[str, list[str]] = {"filter": list(_FIXED_CHAINS["filter"]),
                                             "nat": list(_FIXED_CHAINS["nat"])}
        self.rules: dict[str, list[str]] = {"filter": [], "nat": []}

    def chain(self, table: str, name: str) -> None:
        self.chains[table].append(name)

    def add(self, table: str, chain: str, rule: str) -> None:
        self.rules[table].append(f"-A {chain} {rule}")


def _endpoint_selection(t: _Tables, view: ServicePortView, chain: str, endpoints: Sequence[Backend],
                        seps: dict[tuple, str]) -> None:
    if view.affinity_timeout:
        # sessionAffinity ClientIP: a client seen recently goes back to its endpoint.
        for b in endpoints:
            sep = seps[b.address, b.port]
            t.add("nat", chain, f"-m comment --comment \"{view.label} -> {names.endpoint_string(b)}\" "
                  f"-m recent --name {sep} --mask 255.255.255.255 --rsource --rcheck "
                  f"--seconds {view.affinity_timeout} --reap -j {sep}")
    n = len(endpoints)
    for i, b in enumerate(endpoints):
        sep = seps[b.address, b.port]
        stat = "" if i == n - 1 else f"-m statistic --mode random --probability {probability(n - i)} "
        t.add("nat", chain, f"-m comment --comment \"{view.label} -> {names.endpoint_string(b)}\" {stat}-j {sep}")


def _endpoint_chain(t: _Tables, view: ServicePortView, b: Backend, sep: str) -> None:
    label = _comment(view.label)
    t.add("nat", sep, f"-m comment --comment {label} -s {b.address} -j KUBE-MARK-MASQ")
    recent = (f"-m recent --name {sep} --mask 255.255.255.255 --rsource --set "
              if view.affinity_timeout else "")
    t.add("nat", sep, f"-m comment --comment {label} {recent}-m {view.protocol} -p {view.protocol} "
          f"-j DNAT --to-destination {names.endpoint_string(b)}")


def _external_chain(t: _Tables, view: ServicePortView, chains: names.ServiceChains,
                    cluster_cidr: str | None) -> None:
    ext, svc = chains.ext, chains.svc
    if not view.external_local:
        t.add("nat", ext, f"-m comment --comment \"masquerade traffic for {view.label} external destinations\" "
              "-j KUBE-MARK-MASQ")
    else:
        # Local policy keeps the client address, except for traffic that starts on
        # this node (pods, the host): it behaves as if it left and came back in.
        if cluster_cidr:
            t.add("nat", ext, f"-m comment --comment \"pod traffic for {view.label} external destinations\" "
                  f"-s {cluster_cidr} -j {svc}")
        t.add("nat", ext, f"-m comment --comment \"masquerade LOCAL traffic for {view.label} external "
              "destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ")
        t.add("nat", ext, f"-m comment --comment \"route LOCAL traffic for {view.label} external destinations\" "
              f"-m addrtype --src-type LOCAL -j {svc}")
    if view.has_external_endpoints:
        policy = chains.svl if view.external_local else svc
        t.add("nat", ext, f"-j {policy}")


def _service_port(t: _Tables, view: ServicePortView, cluster_cidr: str | None, masquerade_all: bool,
                  node_port_match: str) -> None:
    spn, label = view.name, view.label
    chains = names.service_chains(spn)
    svc, svl, ext, fw = chains
    internal_chain = svl if view.internal_local else svc
    uses_ext, uses_fw = view.uses_external_chain, view.uses_firewall
    selections = view.endpoint_selections(svc, svl)
    # Declarations first (iptables-restore needs a chain before a rule jumps to it).
    for chain, _ in selections:
        t.chain("nat", chain)
    if uses_ext:
        t.chain("nat", ext)
    if uses_fw and view.has_endpoints:
        t.chain("nat", fw)
    endpoints = view.endpoints_in_use()
    # Keyed by (address, port): the cluster and local sets may hold the same endpoint with other flags.
    seps = {(b.address, b.port): names.sep_chain(spn, b) for b in endpoints}
    for sep in seps.values():
        t.chain("nat", sep)

    internal_filter = _FILTER_TARGET.get(view.internal_no_endpoints)
    external_filter = _FILTER_TARGET.get(view.external_no_endpoints)
    no_eps = "has no endpoints" if not view.has_endpoints else "has no local endpoints"

    def no_endpoints(chain: str, address: str, port: int, target: str) -> None:
        # kube-proxy's filter-table answer to a Service address with no (local) endpoints.
        t.add("filter", chain, f"-m comment --comment \"{label} {no_eps}\" {_match(view, address, port)} -j {target}")

    for address, port in view.cluster_ips:
        if internal_filter:
            no_endpoints("KUBE-SERVICES", address, port, internal_filter)
            continue
        t.add("nat", "KUBE-SERVICES", f"-m comment --comment \"{label} cluster IP\" "
              f"{_match(view, address, port)} -j {internal_chain}")
        # Off-cluster clients of a ClusterIP (a route to the service CIDR via a
        # node) may be answered from another node: masquerade them.
        if masquerade_all:
            t.add("nat", internal_chain, f"-m comment --comment \"{label} cluster IP\" "
                  f"{_match(view, address, port)} -j KUBE-MARK-MASQ")
        elif cluster_cidr:
            t.add("nat", internal_chain, f"-m comment --comment \"{label} cluster IP\" "
                  f"{_match(view, address, port)} ! -s {cluster_cidr} -j KUBE-MARK-MASQ")

    for address, port in view.external_ips:
        if uses_ext:
            t.add("nat", "KUBE-SERVICES", f"-m comment --comment \"{label} external IP\" "
                  f"{_match(view, address, port)} -j {ext}")
        if external_filter:
            no_endpoints("KUBE-EXTERNAL-SERVICES", address, port, external_filter)

    for address, port in view.load_balancer_ips:
        if uses_ext:
            target = fw if uses_fw else ext
            t.add("nat", "KUBE-SERVICES", f"-m comment --comment \"{label} loadbalancer IP\" "
                  f"{_match(view, address, port)} -j {target}")
        if uses_fw:
            t.add("filter", "KUBE-PROXY-FIREWALL", f"-m comment --comment \"{label} traffic not accepted by "
                  f"{fw}\" {_match(view, address, port)} -j DROP")
        if external_filter:
            no_endpoints("KUBE-EXTERNAL-SERVICES", address, port, external_filter)
    if uses_fw and view.has_endpoints:
        for cidr in view.source_ranges:
            t.add("nat", fw, f"-m comment --comment \"{label} loadbalancer IP\" -s {cidr} -j {ext}")
        t.add("nat", fw, f"-m comment --comment \"other traffic to {label} will be dropped by "
              "KUBE-PROXY-FIREWALL\"")

    for node_port in view.node_ports:
        if uses_ext:
            t.add("nat", "KUBE-NODEPORTS", f"-m comment --comment {_comment(label)} "
                  f"-m {view.protocol} -p {view.protocol} --dport {node_port} -j {ext}")
        if external_filter:
            t.add("filter", "KUBE-EXTERNAL-SERVICES", f"-m comment --comment \"{label} {no_eps}\" "
                  f"{node_port_match}-m {view.protocol} -p {view.protocol} --dport {node_port} "
                  f"-j {external_filter}")

    if uses_ext:
        _external_chain(t, view, chains, cluster_cidr)
    for chain, selected in selections:
        _endpoint_selection(t, view, chain, selected, seps)
    for b in endpoints:
        _endpoint_chain(t, view, b, seps[b.address, b.port])


def _fixed_rules(t: _Tables) -> None:
    for table, target, builtin, comment, extra in _JUMPS:
        t.add(table, builtin, f"-m comment --comment \"{comment}\" {extra + ' ' if extra else ''}-j {target}")
    t.add("filter", "KUBE-FORWARD", "-m conntrack --ctstate INVALID -j DROP")
    t.add("filter", "KUBE-FORWARD", f"-m comment --comment \"kubernetes forwarding rules\" "
          f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT")
    t.add("filter", "KUBE-FORWARD", "-m comment --comment \"kubernetes forwarding conntrack rule\" "
          "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    t.add("nat", "KUBE-POSTROUTING", f"-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN")
    # Clear the mark so a packet re-entering the stack (e.g. over a tunnel) is not masqueraded twice.
    t.add("nat", "KUBE-POSTROUTING", f"-j MARK --xor-mark {MASQ_MARK}")
    t.add("nat", "KUBE-POSTROUTING", "-m comment --comment \"kubernetes service traffic requiring SNAT\" "
          "-j MASQUERADE --random-fully")
    t.add("nat", "KUBE-MARK-MASQ", f"-j MARK --or-mark {MASQ_MARK}")


def _nodeports_jump(t: _Tables, node_addresses: Sequence[str] | None) -> None:
    # Must stay the last rule of KUBE-SERVICES: any ClusterIP match comes first.
    comment = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\""
    if node_addresses is None:
        t.add("nat", "KUBE-SERVICES", f"{comment} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    else:
        for address in node_addresses:
            t.add("nat", "KUBE-SERVICES", f"{comment} -d {address} -j KUBE-NODEPORTS")


def _render(t: _Tables) -> Iterable[str]:
    for table in ("filter", "nat"):
        yield f"*{table}"
        for builtin in _BUILTIN[table]:
            yield f":{builtin} ACCEPT [0:0]"
        for chain in t.chains[table]:
            yield f":{chain} - [0:0]"
        yield from t.rules[table]
        yield "COMMIT"


def iptables_restore_payload(state: LBState, *, cluster_cidr: str | None = "198.18.0.0/16",
                             node_addresses: Sequence[str] | None = None,
                             masquerade_all: bool = False) -> str:
    """The iptables-restore input kube-proxy's iptables mode would load for `state`.

    cluster_cidr: the pod CIDR (kube-proxy's --cluster-cidr local-traffic detector);
      None means no detector, so ClusterIP traffic is never masqueraded.
    node_addresses: kube-proxy's --nodeport-addresses; None accepts NodePorts on
      every local address (`-m addrtype --dst-type LOCAL`).
    """
    t = _Tables()
    _fixed_rules(t)
    node_port_match = "-m addrtype --dst-type LOCAL "
    for view in service_ports(state):
        _service_port(t, view, cluster_cidr, masquerade_all, node_port_match)
    _nodeports_jump(t, node_addresses)
    return "\n".join(_render(t)) + "\n"
