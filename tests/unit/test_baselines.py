"""kube-proxy baselines: names, rule text and scale of the iptables and nftables renderings (no root)."""

from __future__ import annotations

import ipaddress
import re
import time
from fractions import Fraction

import pytest

from ebpfsvc.bench.baselines import iptables_restore_payload, names, nft_script, synthetic_state
from ebpfsvc.bench.baselines.iptables import probability
from ebpfsvc.bench.baselines.nftables import chains_of
from ebpfsvc.lbmodel import (Backend, Frontend, FrontendKey, FrontendKind, LBState, Protocol, Scope,
                             ServicePortName)

SVC1 = ServicePortName("ns1", "svc1", "p80")
SVC2 = ServicePortName("ns2", "svc2", "p80")
SVC3 = ServicePortName("ns3", "svc3", "")


def addr(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def be(text: str, port: int = 8080, **kw) -> Backend:
    return Backend(addr(text), port, **kw)


EPS = (be("198.18.2.11"), be("198.18.2.12"), be("198.18.2.13"))


def cluster_ip(spn, ip, backends=(), port=80, **kw) -> Frontend:
    return Frontend(FrontendKey(addr(ip), port, spn.protocol), spn, backends=backends, **kw)


def node_port(spn, ip, port, backends=(), scope=Scope.EXTERNAL, **kw) -> Frontend:
    return Frontend(FrontendKey(addr(ip), port, spn.protocol, scope), spn, kind=FrontendKind.NODE_PORT,
                    backends=backends, **kw)


def rules(payload: str, chain: str) -> list[str]:
    """The -A lines of one chain, without the "-A CHAIN " prefix, in order."""
    prefix = f"-A {chain} "
    return [line[len(prefix):] for line in payload.splitlines() if line.startswith(prefix)]


def table(payload: str, name: str) -> str:
    start = payload.index(f"*{name}\n")
    return payload[start: payload.index("COMMIT", start)]


def nft_rules(script: str, chain: str) -> list[str]:
    prefix = f"add rule ip kube-proxy {chain} "
    return [line[len(prefix):] for line in script.splitlines() if line.startswith(prefix)]


def nft_elements(script: str, map_name: str) -> list[str]:
    prefix = f"add element ip kube-proxy {map_name} "
    return [line[len(prefix):] for line in script.splitlines() if line.startswith(prefix)]


# --- names ----------------------------------------------------------------------

def test_chain_names_match_kube_proxys_own_test_vectors():
    # These strings appear in kube-proxy's proxier tests (pkg/proxy/iptables,
    # pkg/proxy/nftables) for the same inputs: same hash, same encoding, same cut.
    ep = be("10.180.0.1", 80)
    assert names.svc_chain(SVC1) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert names.svc_chain(SVC2) == "KUBE-SVC-GNZBNJ2PO5MGZ6GT"
    assert names.sep_chain(SVC1, ep) == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert names.nft_service_base(SVC1) == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert names.nft_endpoint_base(SVC1, ep) == "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


def test_chain_names_share_one_hash_and_depend_on_protocol():
    chains = names.service_chains(SVC1)
    assert [c.split("-")[-1] for c in chains] == [names.port_proto_hash(SVC1)] * 4
    assert chains.svc == names.svc_chain(SVC1) and chains.ext == names.ext_chain(SVC1)
    udp = ServicePortName("ns1", "svc1", "p80", Protocol.UDP)
    assert names.svc_chain(udp) != names.svc_chain(SVC1)
    assert all(len(c) <= 28 for c in chains)    # iptables' chain name limit


def test_names_do_not_depend_on_other_services_or_order():
    one = LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS)])
    many = LBState.of([cluster_ip(SVC2, "198.19.0.2", EPS[:1]), cluster_ip(SVC1, "198.19.0.1", EPS)])
    assert rules(iptables_restore_payload(one), "KUBE-SVC-XPGD46QRK7WJZT7O") == \
        rules(iptables_restore_payload(many), "KUBE-SVC-XPGD46QRK7WJZT7O")
    assert iptables_restore_payload(many) == iptables_restore_payload(many)
    assert nft_script(many) == nft_script(many)


# --- iptables mode ---------------------------------------------------------------

def test_clusterip_with_three_endpoints_exact_rules():
    payload = iptables_restore_payload(LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS)]))
    svc = "KUBE-SVC-XPGD46QRK7WJZT7O"
    seps = [names.sep_chain(SVC1, b) for b in EPS]
    assert rules(payload, "KUBE-SERVICES")[0] == (
        f'-m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 198.19.0.1 --dport 80 -j {svc}')
    assert rules(payload, svc) == [
        '-m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 198.19.0.1 --dport 80 '
        '! -s 198.18.0.0/16 -j KUBE-MARK-MASQ',
        '-m comment --comment "ns1/svc1:p80 -> 198.18.2.11:8080" '
        f'-m statistic --mode random --probability 0.3333333333 -j {seps[0]}',
        '-m comment --comment "ns1/svc1:p80 -> 198.18.2.12:8080" '
        f'-m statistic --mode random --probability 0.5000000000 -j {seps[1]}',
        f'-m comment --comment "ns1/svc1:p80 -> 198.18.2.13:8080" -j {seps[2]}',
    ]
    assert rules(payload, seps[1]) == [
        "-m comment --comment ns1/svc1:p80 -s 198.18.2.12 -j KUBE-MARK-MASQ",
        "-m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 198.18.2.12:8080",
    ]
    # Every chain a rule jumps to is declared in the same table.
    nat = table(payload, "nat")
    for target in set(re.findall(r"-j (KUBE-[A-Z0-9-]+)", nat)):
        assert f"\n:{target} - [0:0]" in nat, target


def test_draining_endpoints_get_rules_only_when_nothing_else_is_left():
    draining = be("198.18.2.19", terminating=True)
    mixed = iptables_restore_payload(LBState.of([cluster_ip(SVC1, "198.19.0.1", (*EPS, draining))]))
    assert mixed == iptables_restore_payload(LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS)]))
    only = iptables_restore_payload(LBState.of([cluster_ip(SVC1, "198.19.0.1", (draining,))]))
    assert "--to-destination 198.18.2.19:8080" in only


def test_masquerade_plumbing_and_base_chain_jumps():
    payload = iptables_restore_payload(LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS)]))
    assert rules(payload, "PREROUTING") == ['-m comment --comment "kubernetes service portals" -j KUBE-SERVICES']
    assert rules(payload, "POSTROUTING") == ['-m comment --comment "kubernetes postrouting rules" '
                                             '-j KUBE-POSTROUTING']
    assert rules(payload, "KUBE-MARK-MASQ") == ["-j MARK --or-mark 0x4000"]
    assert rules(payload, "KUBE-POSTROUTING") == [
        "-m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-j MARK --xor-mark 0x4000",
        '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
    ]
    # NodePorts are checked after every service address.
    assert rules(payload, "KUBE-SERVICES")[-1].endswith("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")


@pytest.mark.parametrize("n", range(1, 12))
def test_statistic_probabilities_give_every_endpoint_one_nth(n):
    # Rule i takes 1/(n-i) of what the rules before it left: each ends with 1/n.
    state = LBState.of([cluster_ip(SVC1, "198.19.0.1", tuple(be(f"198.18.2.{i + 1}") for i in range(n)))])
    selection = rules(iptables_restore_payload(state), names.svc_chain(SVC1))[1:]
    assert len(selection) == n
    left, shares = Fraction(1), []
    for rule in selection:
        m = re.search(r"--probability (\S+)", rule)
        p = Fraction(m.group(1)) if m else Fraction(1)
        shares.append(left * p)
        left -= left * p
    assert left == 0 and "--probability" not in selection[-1]
    assert all(abs(float(s) - 1 / n) < 1e-9 for s in shares)
    assert probability(3) == "0.3333333333"


def test_service_without_endpoints_is_rejected_in_the_filter_table():
    payload = iptables_restore_payload(LBState.of([cluster_ip(SVC2, "198.19.0.2")]))
    assert rules(payload, "KUBE-SERVICES")[0] == (
        '-m comment --comment "ns2/svc2:p80 has no endpoints" -m tcp -p tcp -d 198.19.0.2 --dport 80 -j REJECT')
    assert "KUBE-SVC-GNZBNJ2PO5MGZ6GT" not in payload
    assert "198.19.0.2" not in table(payload, "nat")


def test_nodeport_goes_through_kube_nodeports_and_kube_ext():
    state = LBState.of([
        cluster_ip(SVC3, "198.19.0.3", EPS[:2]),
        node_port(SVC3, "198.18.0.2", 30080, EPS[:2]),
        node_port(SVC3, "198.18.0.3", 30080, EPS[:2]),    # a second node address: one rule
    ])
    payload = iptables_restore_payload(state)
    chains = names.service_chains(SVC3)
    assert rules(payload, "KUBE-NODEPORTS") == [f"-m comment --comment ns3/svc3 -m tcp -p tcp --dport 30080 "
                                                f"-j {chains.ext}"]
    assert rules(payload, chains.ext) == [
        '-m comment --comment "masquerade traffic for ns3/svc3 external destinations" -j KUBE-MARK-MASQ',
        f"-j {chains.svc}",
    ]
    limited = iptables_restore_payload(state, node_addresses=["198.18.0.2"])
    assert rules(limited, "KUBE-SERVICES")[-1].endswith("-d 198.18.0.2 -j KUBE-NODEPORTS")


def local_nodeport_state(local_endpoints) -> LBState:
    """SVC3: ClusterIP over EPS, NodePort with externalTrafficPolicy Local over `local_endpoints`."""
    return LBState.of([
        cluster_ip(SVC3, "198.19.0.3", EPS),
        node_port(SVC3, "198.18.0.2", 30080, local_endpoints, local_only=True),
    ])


def test_external_local_policy_uses_local_endpoints_and_short_circuits():
    local = (be("198.18.2.11", local=True),)
    state = local_nodeport_state(local)
    payload = iptables_restore_payload(state)
    chains = names.service_chains(SVC3)
    assert rules(payload, chains.ext) == [
        f'-m comment --comment "pod traffic for ns3/svc3 external destinations" -s 198.18.0.0/16 -j {chains.svc}',
        '-m comment --comment "masquerade LOCAL traffic for ns3/svc3 external destinations" '
        "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
        '-m comment --comment "route LOCAL traffic for ns3/svc3 external destinations" '
        f"-m addrtype --src-type LOCAL -j {chains.svc}",
        f"-j {chains.svl}",
    ]
    assert rules(payload, chains.svl) == [
        f'-m comment --comment "ns3/svc3 -> 198.18.2.11:8080" -j {names.sep_chain(SVC3, local[0])}']
    assert len(rules(payload, chains.svc)) == 1 + 3      # masquerade + three endpoints


def test_external_local_policy_without_local_endpoints_drops():
    state = local_nodeport_state(())
    payload = iptables_restore_payload(state)
    assert rules(payload, "KUBE-EXTERNAL-SERVICES") == [
        '-m comment --comment "ns3/svc3 has no local endpoints" -m addrtype --dst-type LOCAL '
        "-m tcp -p tcp --dport 30080 -j DROP"]
    assert f"-j {names.svl_chain(SVC3)}" not in payload


def test_session_affinity_uses_recent_match():
    state = LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS[:2], affinity_timeout=10800)])
    payload = iptables_restore_payload(state)
    sep = names.sep_chain(SVC1, EPS[0])
    assert rules(payload, names.svc_chain(SVC1))[1] == (
        f'-m comment --comment "ns1/svc1:p80 -> 198.18.2.11:8080" -m recent --name {sep} '
        f"--mask 255.255.255.255 --rsource --rcheck --seconds 10800 --reap -j {sep}")
    assert rules(payload, sep)[1] == (
        f"-m comment --comment ns1/svc1:p80 -m recent --name {sep} --mask 255.255.255.255 --rsource --set "
        "-m tcp -p tcp -j DNAT --to-destination 198.18.2.11:8080")


def test_load_balancer_source_ranges_go_through_kube_fw():
    lb = Frontend(FrontendKey(addr("198.18.200.1"), 80), SVC1, kind=FrontendKind.LOAD_BALANCER, backends=EPS,
                  source_ranges=(ipaddress.IPv4Network("198.18.100.0/24"),))
    state = LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS), lb])
    payload = iptables_restore_payload(state)
    chains = names.service_chains(SVC1)
    assert f'--comment "ns1/svc1:p80 loadbalancer IP" -m tcp -p tcp -d 198.18.200.1 --dport 80 -j {chains.fw}' \
        in payload
    assert rules(payload, chains.fw)[0].endswith(f"-s 198.18.100.0/24 -j {chains.ext}")
    assert rules(payload, "KUBE-PROXY-FIREWALL")[0].endswith("-d 198.18.200.1 --dport 80 -j DROP")


def test_udp_service_matches_udp():
    udp = ServicePortName("kube-system", "dns", "dns", Protocol.UDP)
    payload = iptables_restore_payload(LBState.of([cluster_ip(udp, "198.19.0.10", EPS[:1], port=53)]))
    assert "-m udp -p udp -d 198.19.0.10 --dport 53" in payload
    assert "-m udp -p udp -j DNAT --to-destination 198.18.2.11:8080" in payload


def test_frontends_that_disagree_on_endpoints_are_refused():
    state = LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS), node_port(SVC1, "198.18.0.2", 30080, EPS[:1])])
    with pytest.raises(ValueError, match="disagree"):
        iptables_restore_payload(state)


# --- nftables mode ---------------------------------------------------------------

def test_nft_clusterip_with_three_endpoints_exact_rules():
    script = nft_script(LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS)]))
    bases = [names.nft_endpoint_base(SVC1, b) for b in EPS]
    assert nft_elements(script, "service-ips") == [
        "{ 198.19.0.1 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }"]
    assert nft_rules(script, "service-ULMVA6XW-ns1/svc1/tcp/p80") == [
        "ip daddr 198.19.0.1 tcp dport 80 ip saddr != 198.18.0.0/16 jump mark-for-masquerade",
        f"numgen random mod 3 vmap {{ 0 : goto endpoint-{bases[0]} , 1 : goto endpoint-{bases[1]} , "
        f"2 : goto endpoint-{bases[2]} }}",
    ]
    assert nft_rules(script, f"endpoint-{bases[0]}") == [
        "ip saddr 198.18.2.11 jump mark-for-masquerade",
        "meta l4proto tcp dnat to 198.18.2.11:8080",
    ]
    assert nft_rules(script, "services") == [
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
    ]
    assert nft_rules(script, "masquerading") == [
        "mark and 0x004000 == 0 return", "mark set mark xor 0x004000", "masquerade fully-random"]
    # Every chain a rule or element jumps to is added.
    added = set(chains_of(script))
    for target in re.findall(r"(?:goto|jump) ([A-Za-z0-9_./-]+)", script):
        assert target in added, target


def test_nft_no_endpoints_nodeport_and_replace():
    state = LBState.of([
        cluster_ip(SVC2, "198.19.0.2"),
        cluster_ip(SVC3, "198.19.0.3", EPS[:1]),
        node_port(SVC3, "198.18.0.2", 30080, EPS[:1]),
    ])
    script = nft_script(state, node_addresses=["198.18.0.2"], replace=True)
    assert script.splitlines()[:2] == ["add table ip kube-proxy", "delete table ip kube-proxy"]
    assert nft_elements(script, "no-endpoint-services") == [
        '{ 198.19.0.2 . tcp . 80 comment "ns2/svc2:p80" : goto reject-chain }']
    ext = f"external-{names.nft_service_base(SVC3)}"
    assert nft_elements(script, "service-nodeports") == [f"{{ tcp . 30080 : goto {ext} }}"]
    assert nft_rules(script, ext) == ["jump mark-for-masquerade", f"goto service-{names.nft_service_base(SVC3)}"]
    assert nft_elements(script, "nodeport-ips") == ["{ 198.18.0.2 }"]
    assert nft_rules(script, "services")[1] == "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    assert nft_rules(script, "reject-chain") == ["reject"]


def test_nft_affinity_sets():
    script = nft_script(LBState.of([cluster_ip(SVC1, "198.19.0.1", EPS[:2], affinity_timeout=60)]))
    base = names.nft_endpoint_base(SVC1, EPS[0])
    assert (f"add set ip kube-proxy affinity-{base} {{ type ipv4_addr ; flags dynamic,timeout ; "
            "timeout 60s ; }") in script
    assert nft_rules(script, f"service-{names.nft_service_base(SVC1)}")[1] == \
        f"ip saddr @affinity-{base} goto endpoint-{base}"
    assert f"update @affinity-{base} {{ ip saddr }}" in nft_rules(script, f"endpoint-{base}")


# --- synthetic states and scale ---------------------------------------------------

POOL = [(f"198.18.{n}.{h}", 8080) for n in (2, 3) for h in range(10, 20)]


def test_synthetic_state_makes_real_services_over_the_pool():
    probe = cluster_ip(SVC1, "198.19.0.5", EPS)
    state = synthetic_state(101, 3, POOL, probes=[probe])
    fes = list(state.frontends.values())
    assert len(fes) == 101 and fes[50] is probe                    # probe in the middle
    assert len({fe.key.address for fe in fes}) == 101             # distinct ClusterIPs, probe's skipped
    pool = {Backend(addr(a), p) for a, p in POOL}
    for fe in fes[:50] + fes[51:]:
        assert len(set(fe.backends)) == 3 and set(fe.backends) <= pool
        assert fe.key.address in ipaddress.IPv4Network("198.19.0.0/16")
    used = {b for fe in fes if fe is not probe for b in fe.backends}
    assert used == pool                                           # the load reaches every backend
    assert list(synthetic_state(3, 1, POOL, probes=[probe], probe_position="last").frontends.values())[-1] is probe


def test_synthetic_state_refuses_impossible_requests():
    with pytest.raises(ValueError):
        synthetic_state(10, 5, POOL[:4])
    with pytest.raises(ValueError):
        synthetic_state(10, 0, POOL)
    with pytest.raises(ValueError):
        synthetic_state(1, 1, POOL, probes=[cluster_ip(SVC1, "198.19.0.1", EPS), cluster_ip(SVC2, "198.19.0.2", EPS)])
    with pytest.raises(ValueError):
        synthetic_state(10, 1, POOL, probe_position="random")


@pytest.mark.timeout(180)
def test_fifty_thousand_services_render_completely():
    start = time.perf_counter()
    state = synthetic_state(50_000, 3, POOL)
    payload = iptables_restore_payload(state)
    script = nft_script(state)
    elapsed = time.perf_counter() - start
    nat = table(payload, "nat")
    assert nat.count("\n:KUBE-SVC-") == 50_000
    assert nat.count("\n:KUBE-SEP-") == 150_000
    assert nat.count("-j DNAT --to-destination") == 150_000
    assert len(nft_elements(script, "service-ips")) == 50_000
    assert sum(1 for c in chains_of(script) if c.startswith("endpoint-")) == 150_000
    print(f"50,000 services: iptables {len(payload) / 1e6:.0f} MB, nft {len(script) / 1e6:.0f} MB, "
          f"rendered in {elapsed:.1f} s")


def test_an_endpoint_in_both_the_cluster_and_the_local_set_has_one_chain():
    # Same address and port, flagged local only in the Local-policy set.
    state = local_nodeport_state((be("198.18.2.11", local=True),))
    payload = iptables_restore_payload(state)
    sep = names.sep_chain(SVC3, EPS[0])
    assert payload.count(f":{sep} - [0:0]") == 1 and len(rules(payload, sep)) == 2
    assert f"-j {sep}" in "\n".join(rules(payload, names.svl_chain(SVC3)))
    script = nft_script(state)
    chain = f"endpoint-{names.nft_endpoint_base(SVC3, EPS[0])}"
    assert list(chains_of(script)).count(chain) == 1 and len(nft_rules(script, chain)) == 2
