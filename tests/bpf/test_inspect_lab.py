"""The inspection CLI and the metrics against a lab node after real traffic.

A lab (network namespaces, two nodes, their agents) serves a UDP Service with an
echo pod on each node. A client pod on node-1 sends datagrams through the
ClusterIP from chosen source ports; before each one `ebpfsvc why` names the
backend, and the echo's answer says which pod really answered. Afterwards
`ebpfsvc service list` / `bpf ct list` and the metrics collector, reading
node-1's pins, must show exactly the packets and bytes that crossed its
programs: each exchange is one request (from_pod, DNAT) and one answer (to_pod,
reverse NAT), each counted with its Ethernet header as the TC hook sees it.
"""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ebpfsvc.cli import main
from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, apps, names
from ebpfsvc.collectors import DatapathCollector

from e2e.helpers import (add_clients, cluster_ip, service,  # noqa: I001
                         wait_programmed, wait_ready, wait_udp_bound)

pytestmark = pytest.mark.root

CLIENT = "insp-client"
ETH_IP_UDP = 14 + 20 + 8


@pytest.fixture(scope="module")
def lab():
    instance = Lab.up(prefix="es" + uuid.uuid4().hex[:6], agents=True)
    try:
        yield add_clients(instance, {CLIENT: "node-1"})
    finally:
        instance.down()


def cli_json(pin_dir, *args):
    res = CliRunner().invoke(main, [*args, "--pin-dir", str(pin_dir), "-o", "json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(res.output)


def test_cli_and_metrics_match_real_udp_traffic(lab):
    pods = [apps.pod(f"insp-{i}", "udp-echo", 5353, node=node, labels={"app": "insp"})
            for i, node in enumerate(["node-1", "node-2"], 1)]
    lab.apply(pods + [service("insp", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                              selector={"app": "insp"})])
    wait_ready(lab, ["insp-1", "insp-2"])
    wait_udp_bound(lab, CLIENT, ["insp-1", "insp-2"], 5353)
    wait_programmed(lab, "insp", 53, backends=2, proto="UDP")
    vip = cluster_ip(lab, "insp")
    client_ip = lab.pod_ip(CLIENT)
    pin = names.pin_dir(lab.prefix, "node-1")
    ip_of = {lab.pod_ip(p): p for p in ("insp-1", "insp-2")}

    packets = byte_count = 0
    per_backend: dict[str, list[int]] = {ip: [0, 0] for ip in ip_of}
    sports = range(42100, 42116)
    for i, sport in enumerate(sports):
        w = cli_json(pin, "why", client_ip, f"{vip}:53/UDP", "--sport", str(sport))
        assert (w["verdict"], w["reason"]) == ("dnat", "maglev")
        sock = nsenter.socket_in(lab.pod_netns(CLIENT), socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.settimeout(10)
            sock.bind(("0.0.0.0", sport))
            payload = b"q" * (i + 1)
            sock.sendto(payload, (vip, 53))
            data, source = sock.recvfrom(65535)
        finally:
            sock.close()
        assert source == (vip, 53)                     # reverse-NATed
        answer = json.loads(data)
        who = lab.pod_ip(answer["pod"])
        assert w["backend"] == f"{who}:5353/UDP", f"sport {sport}: why said {w['backend']}, {answer['pod']} answered"
        n = (ETH_IP_UDP + len(payload)) + (ETH_IP_UDP + len(data))
        packets += 2
        byte_count += n
        per_backend[who][0] += 2
        per_backend[who][1] += n
        again = cli_json(pin, "why", client_ip, f"{vip}:53/UDP", "--sport", str(sport))
        assert (again["reason"], again["backend"]) == ("conntrack", w["backend"])
    assert all(v[0] for v in per_backend.values()), "16 flows should reach both backends"

    rows = {s["service"]: s for s in cli_json(pin, "service", "list")}
    svc = rows["default/insp/UDP"]
    assert (svc["packets"], svc["bytes"]) == (packets, byte_count)
    (fe,) = svc["frontends"]
    assert fe["frontend"] == f"{vip}:53/UDP" and fe["scope"] == "internal"
    for b in fe["backends"]:
        ip = b["backend"].split(":")[0]
        assert [b["packets"], b["bytes"]] == per_backend[ip]
        assert b["flows"] == per_backend[ip][0] // 2
        assert b["local"] == (ip_of[ip] == "insp-1")          # insp-1 runs on node-1

    ct = [e for e in cli_json(pin, "bpf", "ct", "list") if e["frontend"] == f"{vip}:53"]
    fwd = {int(e["src"].split(":")[1]): e for e in ct if e["direction"] == "forward"}
    assert set(fwd) == set(sports)
    assert all(e["flags"] == ["established"] for e in fwd.values())   # UDP: a reply was seen

    reg = CollectorRegistry()
    collector = DatapathCollector(pin)
    reg.register(collector)
    try:
        got = {}
        for fam in text_string_to_metric_families(generate_latest(reg).decode()):
            for s in fam.samples:
                got[(s.name, tuple(sorted(s.labels.items())))] = s.value
    finally:
        collector.close()
    assert got[("ebpfsvc_service_packets_total", (("service_port", "default/insp/UDP"),))] == packets
    assert got[("ebpfsvc_service_bytes_total", (("service_port", "default/insp/UDP"),))] == byte_count
    for ip, (pk, by) in per_backend.items():
        assert got[("ebpfsvc_backend_packets_total", (("backend", f"{ip}:5353/UDP"),))] == pk
        assert got[("ebpfsvc_backend_bytes_total", (("backend", f"{ip}:5353/UDP"),))] == by
