"""The inspection CLI against real maps after real packets.

Maps are filled by MapWriter.apply, packets go through the real from_pod /
to_pod programs (BPF_PROG_TEST_RUN), and the commands read the pins by path,
as on a live node. The numbers printed must be the packets and bytes sent; the
backend `why` names must be the one the datapath then really picks.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from click.testing import CliRunner
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from ebpfsvc import abi, maglev
from ebpfsvc.cli import main
from ebpfsvc.datapath import loader
from ebpfsvc.inspect import views
from ebpfsvc.inspect.node import NodeMaps
from ebpfsvc.lbmodel import Algorithm, Protocol

from .conftest import age
from .packets import (
    BACKEND1, BACKEND2, BACKEND3, CLIENT, CLIENT2, HAIRPIN, OTHER, VIP, VIP2, be, from_pod, frontend, run, state, tcp,
    to_pod, udp,
)

pytestmark = pytest.mark.root

WEB = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3, local=True)])
DNS = frontend(VIP, 53, [be(BACKEND1, 5353, Protocol.UDP), be(BACKEND2, 5353, Protocol.UDP)],
               proto=Protocol.UDP, name="dns")


def cli(pin_dir, *args, expect_exit: int = 0):
    res = CliRunner().invoke(main, [*args, "--pin-dir", str(pin_dir)])
    assert res.exit_code == expect_exit, res.output + repr(res.exception)
    return res.output


def cli_json(pin_dir, *args):
    return json.loads(cli(pin_dir, *args, "-o", "json"))


def dnat_target(dp, packet) -> str:
    """Where the datapath really sent a new flow: the destination of the output packet."""
    res = run(dp, "from_pod", packet)
    assert res.verdict == "TC_ACT_OK"
    return Ether(res.data)[IP].dst


def test_service_list_counters_equal_the_traffic_sent(datapath, writer, pin_dir):
    writer.apply(state(WEB, DNS))
    sent_web: Counter = Counter()     # backend address -> [packets, bytes]
    web_pk = web_by = 0
    per_backend: dict[str, list[int]] = {}
    for sport in range(41000, 41012):
        syn = from_pod(tcp(CLIENT, VIP, sport, 80, "S"))
        b = dnat_target(datapath, syn)
        reply = to_pod(tcp(b, CLIENT, 8080, sport, "SA"))
        data = from_pod(tcp(CLIENT, VIP, sport, 80, "PA", payload=b"y" * (sport - 40990)))
        assert run(datapath, "to_pod", reply).verdict == "TC_ACT_OK"
        assert run(datapath, "from_pod", data).verdict == "TC_ACT_OK"
        n = len(syn) + len(reply) + len(data)
        web_pk += 3
        web_by += n
        acc = per_backend.setdefault(b, [0, 0])
        acc[0] += 3
        acc[1] += n
        sent_web[b] += 1
    dns_pkts = [from_pod(udp(CLIENT2, VIP, 5000 + i, 53, b"q" * i)) for i in range(1, 6)]
    dns_by = 0
    for p in dns_pkts:
        b = dnat_target(datapath, p)
        dns_by += len(p)
        acc = per_backend.setdefault(f"{b}/udp", [0, 0])
        acc[0] += 1
        acc[1] += len(p)
    # Traffic that is not a Service counts nowhere.
    run(datapath, "from_pod", from_pod(tcp(CLIENT, OTHER, 1234, 80)))

    rows = {s["service"]: s for s in cli_json(pin_dir, "service", "list")}
    web, dns = rows["default/web/TCP"], rows["default/dns/UDP"]
    assert (web["packets"], web["bytes"]) == (web_pk, web_by)
    assert (dns["packets"], dns["bytes"]) == (len(dns_pkts), dns_by)
    (fe,) = web["frontends"]
    assert fe["frontend"] == f"{VIP}:80/TCP" and fe["scope"] == "internal" and fe["kind"] == "ClusterIP"
    assert fe["algorithm"] == "maglev" and fe["maglev_size"] == maglev.table_size(3)
    got = {b["backend"].split(":")[0]: b for b in fe["backends"]}
    assert set(got) == {BACKEND1, BACKEND2, BACKEND3}
    assert got[BACKEND3]["local"] is True and got[BACKEND1]["local"] is False
    assert sum(b["slots"] for b in fe["backends"]) == fe["maglev_size"]
    for addr, b in got.items():
        assert b["state"] == "active"
        assert b["flows"] == sent_web.get(addr, 0)
        assert [b["packets"], b["bytes"]] == per_backend.get(addr, [0, 0])
    for b in dns["frontends"][0]["backends"]:
        assert [b["packets"], b["bytes"]] == per_backend.get(b["backend"].split(":")[0] + "/udp", [0, 0])

    table = cli(pin_dir, "service", "list")
    assert f"{VIP}:80/TCP" in table and str(web_by) in table and str(dns_by) in table


def test_lb_list_and_ct_list_show_the_maps(datapath, writer, pin_dir):
    writer.apply(state(WEB))
    b = dnat_target(datapath, from_pod(tcp(CLIENT, VIP, 42000, 80, "S")))
    rows = cli_json(pin_dir, "bpf", "lb", "list")
    by_fe = {r["frontend"]: r for r in rows}
    assert set(by_fe) == {f"{VIP}:80/TCP", f"{VIP}:0/TCP"}          # the frontend and its address marker
    assert by_fe[f"{VIP}:0/TCP"]["flags"] == ["address"] and by_fe[f"{VIP}:0/TCP"]["backends"] == []
    assert {x["backend"] for x in by_fe[f"{VIP}:80/TCP"]["backends"]} == \
        {f"{a}:8080/TCP" for a in (BACKEND1, BACKEND2, BACKEND3)}

    ct = cli_json(pin_dir, "bpf", "ct", "list")
    assert {(e["direction"], e["src"], e["dst"]) for e in ct} == {
        ("forward", f"{CLIENT}:42000", f"{VIP}:80"), ("reply", f"{b}:8080", f"{CLIENT}:42000")}
    assert all(e["backend"] == f"{b}:8080" and e["flags"] == ["SYN"] and not e["expired"] for e in ct)
    # The reply marks the flow established; an aged entry shows its age and, past its lifetime, expiry.
    run(datapath, "to_pod", to_pod(tcp(b, CLIENT, 8080, 42000, "SA")))
    age(datapath, "ct4", "last_seen_ns", 100)
    ct = cli_json(pin_dir, "bpf", "ct", "list")
    assert all(e["flags"] == ["SYN", "established"] for e in ct)
    assert all(100 <= e["age_s"] < 200 and not e["expired"] for e in ct)
    age(datapath, "ct4", "last_seen_ns", abi.CT_TIMEOUT_TCP_ESTABLISHED_S)
    assert all(e["expired"] for e in cli_json(pin_dir, "bpf", "ct", "list"))
    assert cli_json(pin_dir, "bpf", "ct", "list", "--no-expired") == []
    assert "established" in cli(pin_dir, "bpf", "ct", "list")


def test_maglev_show_is_the_table_the_writer_built(datapath, writer, pin_dir):
    writer.apply(state(WEB, DNS))
    names = sorted(b.name for b in WEB.backends)
    size = maglev.table_size(3)
    want = [names[i] for i in maglev.build_table(names, size)]
    (r,) = cli_json(pin_dir, "maglev", "show", "default/web", "--first", "20")
    assert r["table_size"] == size and r["frontend"] == f"{VIP}:80/TCP"
    by_id = {b["id"]: b["backend"] for b in r["backends"]}
    assert [by_id[i] for i in r["first_slots"]] == want[:20]
    assert {b["backend"]: b["slots"] for b in r["backends"]} == dict(Counter(want))
    # A frontend name selects too, and an unknown service is an error.
    assert cli_json(pin_dir, "maglev", "show", f"{VIP}:53/UDP")[0]["service"] == "default/dns/UDP"
    out = cli(pin_dir, "maglev", "show", "default/nope", expect_exit=1)
    assert "no frontend" in out
    assert f"table size {size}" in cli(pin_dir, "maglev", "show", "default/web")


def why(pin_dir, src, dst, sport=None, scope=None):
    args = ["why", src, dst] + (["--sport", str(sport)] if sport is not None else []) + \
        (["--scope", scope] if scope else [])
    return cli_json(pin_dir, *args)


def test_why_names_the_backend_the_datapath_then_picks(datapath, writer, pin_dir):
    writer.apply(state(WEB))
    picked = Counter()
    for sport in range(43000, 43040):
        w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", sport)
        assert w["verdict"] == "dnat" and w["reason"] == "maglev"
        actual = dnat_target(datapath, from_pod(tcp(CLIENT, VIP, sport, 80, "S")))
        assert w["backend"] == f"{actual}:8080/TCP", sport
        picked[actual] += 1
        # Now the flow is tracked: the same backend, because of conntrack.
        again = why(pin_dir, CLIENT, f"{VIP}:80/TCP", sport)
        assert (again["reason"], again["backend"]) == ("conntrack", w["backend"])
    assert len(picked) == 3             # 40 flows reached every backend: the check covered each
    # Tracked flows keep their backend when the table changes under them.
    writer.apply(state(frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3), be("198.18.2.4")])))
    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", 43000)
    assert w["reason"] == "conntrack"
    res = run(datapath, "from_pod", from_pod(tcp(CLIENT, VIP, 43000, 80, "A")))
    assert f"{Ether(res.data)[IP].dst}:8080/TCP" == w["backend"]


def test_why_follows_fresh_and_stale_affinity(datapath, writer, pin_dir):
    sticky = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2), be(BACKEND3)], affinity_timeout=60)
    writer.apply(state(sticky))
    first = dnat_target(datapath, from_pod(tcp(CLIENT, VIP, 44000, 80, "S")))
    # Pick ports whose Maglev slot names another backend: only affinity sends them to `first`.
    others = [p for p in range(44001, 44200)
              if why(pin_dir, CLIENT2, f"{VIP}:80/TCP", p)["backend"] != f"{first}:8080/TCP"][:3]
    assert others
    for p in others:
        w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", p)
        assert (w["reason"], w["backend"]) == ("affinity", f"{first}:8080/TCP")
        assert any(s["step"] == "affinity" and "fresh" in s["outcome"] for s in w["steps"])
        assert dnat_target(datapath, from_pod(tcp(CLIENT, VIP, p, 80, "S"))) == first
    # Past the timeout the entry is stale: Maglev decides, and the datapath agrees.
    age(datapath, "lb4_affinity", "last_used_ns", 61)
    p = next(q for q in range(45000, 45500)
             if why(pin_dir, CLIENT, f"{VIP}:80/TCP", q)["backend"] != f"{first}:8080/TCP")
    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", p)
    assert w["reason"] == "maglev"
    assert any(s["step"] == "affinity" and "stale" in s["outcome"] for s in w["steps"])
    assert w["backend"] == f"{dnat_target(datapath, from_pod(tcp(CLIENT, VIP, p, 80, 'S')))}:8080/TCP"


def test_why_explains_pass_reject_drop_and_reset(datapath, writer, pin_dir):
    empty = frontend(VIP2, 80, [], name="empty")
    local_empty = frontend(VIP2, 81, [], name="local", local_only=True)
    writer.apply(state(WEB, empty, local_empty))
    drops = lambda: NodeMaps.open(pin_dir).drops()  # noqa: E731

    w = why(pin_dir, CLIENT, f"{OTHER}:80/TCP", 1)
    assert (w["verdict"], w["reason"]) == ("pass", "not a service")
    pkt = from_pod(tcp(CLIENT, OTHER, 1, 80))
    assert run(datapath, "from_pod", pkt).data == bytes(pkt)
    w = why(pin_dir, CLIENT, f"{VIP}:81/TCP", 1)
    assert w["verdict"] == "pass" and "not this port" in w["steps"][-1]["outcome"]

    w = why(pin_dir, CLIENT, f"{VIP2}:80/TCP", 40000)
    assert (w["verdict"], w["reason"]) == ("reject", "no_backend")
    run(datapath, "from_pod", from_pod(tcp(CLIENT, VIP2, 40000, 80)))
    w = why(pin_dir, CLIENT, f"{VIP2}:81/TCP", 40000)
    assert (w["verdict"], w["reason"]) == ("drop", "no_local_backend")
    assert run(datapath, "from_pod", from_pod(tcp(CLIENT, VIP2, 40000, 81))).verdict == "TC_ACT_SHOT"

    # A tracked TCP flow whose backend is removed is reset.
    b = dnat_target(datapath, from_pod(tcp(CLIENT, VIP, 46000, 80, "S")))
    rest = [x for x in WEB.backends if str(x.address) != b]
    writer.apply(state(frontend(VIP, 80, rest), empty, local_empty))
    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", 46000)
    assert (w["verdict"], w["reason"]) == ("reject", "backend_gone")
    run(datapath, "from_pod", from_pod(tcp(CLIENT, VIP, 46000, 80, "A")))
    d = drops()
    assert (d["no_backend"], d["no_local_backend"], d["backend_gone"]) == (1, 1, 1)
    text = cli(pin_dir, "why", CLIENT, f"{VIP2}:81/TCP", "--sport", "1")
    assert "verdict: drop" in text and "no_local_backend" in text


def test_why_random_algorithm_and_unknown_sport(datapath, writer, pin_dir):
    rnd = frontend(VIP, 80, [be(BACKEND1), be(BACKEND2)], algorithm=Algorithm.RANDOM)
    writer.apply(state(rnd))
    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", 47000)
    assert (w["verdict"], w["reason"], w["backend"]) == ("dnat", "random", None)
    actual = dnat_target(datapath, from_pod(tcp(CLIENT, VIP, 47000, 80, "S")))
    assert actual in (BACKEND1, BACKEND2)
    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", 47000)
    assert (w["reason"], w["backend"]) == ("conntrack", f"{actual}:8080/TCP")
    w = why(pin_dir, CLIENT2, f"{VIP}:80")        # protocol defaults to TCP, no source port
    assert w["steps"][0]["outcome"].startswith("skipped")


def test_inspection_refuses_a_wrong_pin_dir_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope"
    out = cli(missing, "service", "list", expect_exit=1)
    assert "no such pin directory" in out
    assert not missing.exists()


def test_views_drift_against_the_applied_state(datapath, writer, pin_dir):
    s = state(WEB, DNS)
    writer.apply(s)
    with NodeMaps.open(pin_dir) as node:
        assert views.drift(s, node) == []
        changed = state(frontend(VIP, 80, [be(BACKEND1), be(BACKEND2)]), DNS,
                        frontend(VIP2, 80, [be(BACKEND1)], name="new"))
        diffs = {d["frontend"]: d["problem"] for d in views.drift(changed, node)}
    assert set(diffs) == {f"{VIP}:80/TCP (internal)", f"{VIP2}:80/TCP (internal)"}
    assert f"unexpected ['{BACKEND3}:8080/TCP']" in diffs[f"{VIP}:80/TCP (internal)"]
    assert diffs[f"{VIP2}:80/TCP (internal)"] == "missing from the maps"
    with NodeMaps.open(pin_dir) as node:
        extra = {d["frontend"]: d["problem"] for d in views.drift(state(WEB), node)}
    # The UDP frontend and its address marker are left over.
    assert extra == {f"{VIP}:53/UDP (internal)": "in the maps, not desired",
                     f"{VIP}:0/UDP (internal)": "in the maps, not desired"}


def test_why_with_terminating_backends(datapath, writer, pin_dir):
    # Every backend terminating: the table holds them all and the first probed slot serves (fallback).
    draining = frontend(VIP, 80, [be(BACKEND1, terminating=True), be(BACKEND2, terminating=True)])
    writer.apply(state(draining))
    for sport in (48000, 48001, 48002):
        w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", sport)
        assert w["reason"] == "maglev (terminating fallback)"
        assert w["backend"] == f"{dnat_target(datapath, from_pod(tcp(CLIENT, VIP, sport, 80, 'S')))}:8080/TCP"

    # Affinity to a backend that turns terminating is ignored; Maglev picks among the others.
    sticky = [be(BACKEND1), be(BACKEND2), be(BACKEND3)]
    writer.apply(state(frontend(VIP, 81, sticky, affinity_timeout=300, name="sticky")))
    first = dnat_target(datapath, from_pod(tcp(CLIENT2, VIP, 48100, 81, "S")))
    writer.apply(state(frontend(VIP, 81, [b if str(b.address) != first else be(first, terminating=True)
                                          for b in sticky], affinity_timeout=300, name="sticky")))
    w = why(pin_dir, CLIENT2, f"{VIP}:81/TCP", 48101)
    assert any(s["step"] == "affinity" and "terminating" in s["outcome"] for s in w["steps"])
    assert w["reason"] == "maglev" and w["backend"] != f"{first}:8080/TCP"
    assert w["backend"] == f"{dnat_target(datapath, from_pod(tcp(CLIENT2, VIP, 48101, 81, 'S')))}:8080/TCP"
    # service list shows the terminating backend as draining its one tracked flow.
    (svc,) = cli_json(pin_dir, "service", "list")
    rows = {b["backend"]: b for b in svc["frontends"][0]["backends"]}
    assert rows[f"{first}:8080/TCP"]["state"] == "terminating" and rows[f"{first}:8080/TCP"]["slots"] == 0
    assert rows[f"{first}:8080/TCP"]["flows"] == 1


def test_why_names_the_hairpin_case(datapath, writer, pin_dir):
    writer.apply(state(frontend(VIP, 80, [be(CLIENT)], name="self")))
    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", 49000)
    assert w["backend"] == f"{CLIENT}:8080/TCP"
    assert any(s["step"] == "source" and "hairpin" in s["outcome"] for s in w["steps"])
    res = run(datapath, "from_pod", from_pod(tcp(CLIENT, VIP, 49000, 80, "S")))
    out = Ether(res.data)[IP]
    assert (out.src, out.dst) == (HAIRPIN, CLIENT)


def test_service_list_shows_services_not_programmed_and_why(datapath, writer, pin_dir):
    """A NodePort claimed by two Services: the older serves it, and `service list` names the other,
    read from the pinned lb_service_status that admission writes; full maps the same way."""
    from ebpfsvc.admission import Admission, Capacity, ServiceStatusMap
    from ebpfsvc.config import NodeConfig
    from ebpfsvc.desired import DesiredStateBuilder
    from ebpfsvc.sources.base import Event, EventType
    from ebpfsvc.tracker import ClusterState

    node = NodeConfig("node-1", node_addresses=("198.18.0.11",))
    cluster = ClusterState(node)
    for name, ip, created in (("old", VIP, "2026-01-01T00:00:00Z"), ("new", VIP2, "2026-01-02T00:00:00Z")):
        cluster.on_event(Event("Service", EventType.ADDED, {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
            "spec": {"type": "NodePort", "clusterIP": ip, "ports": [{"port": 80, "nodePort": 30080}]}}))
    snap = cluster.snapshot()
    admission = Admission(Capacity(frontends=100, service_ports=100, backends=100, maglev_slots=10,
                                   source_ranges=10, affinity_backends=10),
                          status=ServiceStatusMap(datapath.maps["lb_service_status"]))
    admitted = admission.admit(DesiredStateBuilder(node).build(snap), snap.services,
                               lambda spn: writer.service_id(spn) is not None)
    writer.apply(admitted.state, delta=admitted.delta)
    rows = {r["service"]: r for r in cli_json(pin_dir, "service", "list")}
    assert rows["default/new"]["not_programmed"] == (
        "conflict: spec.ports[0].nodePort: 198.18.0.11:30080/TCP is already served by default/old; not programmed")
    # The conflict costs the newer Service the contested frontend only: its clusterIP is served.
    assert {f["kind"] for f in rows["default/old/TCP"]["frontends"]} == {"ClusterIP", "NodePort"}
    assert {f["kind"] for f in rows["default/new/TCP"]["frontends"]} == {"ClusterIP"}
    assert "NOT PROGRAMMED" in cli(pin_dir, "service", "list")
    # The conflict resolved (the newer Service deleted): the status entry goes.
    cluster.on_event(Event("Service", EventType.DELETED, {"kind": "Service", "metadata": {"name": "new",
                                                                                           "namespace": "default"}}))
    snap = cluster.snapshot()
    admission.admit(DesiredStateBuilder(node).build(snap), snap.services, lambda spn: True)
    assert "default/new" not in {r["service"] for r in cli_json(pin_dir, "service", "list")}


def test_why_follows_the_agents_setting_for_tcp_to_a_removed_backend(datapath, writer, pin_dir):
    """`why` says what happens to an established TCP flow whose backend left its slice under the
    setting the agent published (lb_agent_config, as the agent writes it: loader.publish_options),
    and the same programs, which read that word at run time, do just that (issue 17 item 2)."""
    writer.apply(state(WEB))
    b = dnat_target(datapath, from_pod(tcp(CLIENT, VIP, 46100, 80, "S")))
    writer.apply(state(frontend(VIP, 80, [x for x in WEB.backends if str(x.address) != b])))

    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", 46100)        # nothing published: the default
    assert (w["verdict"], w["reason"]) == ("reject", "backend_gone")
    assert "publishes no setting" in w["steps"][0]["outcome"]

    loader.publish_options(datapath.maps, reset_removed_endpoint_tcp=False)
    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", 46100)
    assert (w["verdict"], w["reason"], w["backend"]) == ("dnat", "conntrack", f"{b}:8080/TCP")
    assert "--no-reset-removed-endpoint-tcp" in w["steps"][0]["outcome"]
    assert dnat_target(datapath, from_pod(tcp(CLIENT, VIP, 46100, 80, "A", seq=1001))) == b

    loader.publish_options(datapath.maps, reset_removed_endpoint_tcp=True)
    w = why(pin_dir, CLIENT, f"{VIP}:80/TCP", 46100)
    assert (w["verdict"], w["reason"]) == ("reject", "backend_gone")
    assert "--reset-removed-endpoint-tcp" in w["steps"][0]["outcome"]
    res = run(datapath, "from_pod", from_pod(tcp(CLIENT, VIP, 46100, 80, "A", seq=1001)))
    assert Ether(res.data)[IP].proto == 6 and "R" in str(Ether(res.data)["TCP"].flags)


def test_bpf_options_shows_the_word_the_programs_read(datapath, pin_dir):
    """`ebpfsvc bpf options`: the defaults while no agent has written lb_agent_config, then what the
    agent wrote (loader.publish_options), each option with its agent flag."""
    got = cli_json(pin_dir, "bpf", "options")
    assert got["published"] is False
    assert {o["option"]: o["value"] for o in got["options"]} == {
        "snat_keep_client_port": True, "host_clients": True, "reset_removed_endpoint_tcp": True,
        "masquerade_external_to_local_backends": False, "cluster_cidr": None}
    loader.publish_options(datapath.maps, reset_removed_endpoint_tcp=False, host_clients=False,
                           cluster_cidr="198.18.64.0/18")
    got = cli_json(pin_dir, "bpf", "options")
    assert got["published"] is True
    assert {o["option"]: (o["flag"], o["value"]) for o in got["options"]} == {
        "snat_keep_client_port": ("--nodeport-snat-keep-client-port", True),
        "host_clients": ("--host-clients", False),
        "reset_removed_endpoint_tcp": ("--reset-removed-endpoint-tcp", False),
        "masquerade_external_to_local_backends": ("--masquerade-external-to-local-backends", False),
        "cluster_cidr": ("--cluster-cidr", "198.18.64.0/18")}
    assert "none written" not in cli(pin_dir, "bpf", "options")
