"""The benchmark orchestrator (ebpfsvc/bench/run.py): the wiring, not the numbers.

The root test runs the whole thing once, as small as it goes (N = the probes
alone, one repeat, fractions of a second per measurement): every datapath is
activated, measured, changed and deactivated, and results.json and report.md
come out.  No timing is asserted: the machine may be busy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ebpfsvc.bench import run
from ebpfsvc.bench.datapaths import NAMES
from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import names

TINY_BOUNDS = {"throughput": 1.0, "rr": (0.3, 2_000), "crr": (0.3, 500), "udp": (0.3, 20_000)}
SUITE = ("tcp_throughput_gbps", "tcp_throughput_cross_node_gbps", "tcp_rr_p50_us", "tcp_rr_p99_us",
         "tcp_rr_tps", "tcp_crr_cps", "udp_pps", "cpu_s_per_gb")
IPS = {"cli": "198.18.1.2", "srv-a": "198.18.1.3", "srv-b": "198.18.2.2", "srv-c": "198.18.2.3"}


# --- no root ---------------------------------------------------------------------------------

def test_states_hold_n_service_ports_and_the_watch_probe_moves():
    before, after, keys = run.states(1000, IPS, 2)
    assert len(before.frontends) == len(after.frontends) == 1000
    changed = [k for k in before.frontends if before.frontends[k] is not after.frontends[k]]
    assert changed == list(keys) and [str(k.address) for k in changed] == [run.VIP["watch"]]
    (key,) = changed
    assert [str(b.address) for b in after.frontends[key].backends] == [IPS["srv-b"]]
    # The smallest point holds the probes alone.
    small, _, _ = run.states(1, IPS, 2)
    assert len(small.frontends) == run.service_count(1) == len(run.probes(IPS))


def test_every_probe_has_one_endpoint_but_spread():
    for fe in run.probes(IPS):
        assert len(fe.backends) == (3 if fe.service.name == "spread" else 1), fe.service


def test_program_time_is_predicted_from_smaller_points(tmp_path):
    r = run.Run(run.Config.quick_run(), tmp_path, log=lambda _: None)
    assert r.predicted_program_seconds("nftables", 10_000) is None
    r.data["programming"] = [{"datapath": "nftables", "services": 1_000, "program_seconds": 0.5},
                             {"datapath": "nftables", "services": 10_000, "program_seconds": 20.0}]
    # 40x for 10x: exponent log10(40) = 1.6, so 50,000 is 20 * 5**1.6, about 263 s.
    assert r.predicted_program_seconds("nftables", 50_000) == pytest.approx(20 * 5 ** math.log10(40))
    assert r.predicted_program_seconds("nftables", 10_000) == 20.0     # measured: that figure
    assert r.predicted_program_seconds("iptables", 50_000) is None


def test_a_point_predicted_too_slow_is_skipped_with_its_reason(tmp_path):
    r = run.Run(run.Config.quick_run(max_program_seconds=100), tmp_path, log=lambda _: None)
    r.data["programming"] = [{"datapath": "nftables", "services": 1_000, "program_seconds": 0.5},
                             {"datapath": "nftables", "services": 10_000, "program_seconds": 20.0}]

    class Never:
        name, translates = "nftables", True

        def activate(self, state):
            raise AssertionError("a skipped point must not be programmed")

    r.cell(Never(), 50_000, 0)
    (skip,) = r.data["skipped"]
    assert skip["datapath"] == "nftables" and skip["services"] == 50_000
    assert "predicted" in skip["reason"] and "max_program_seconds" in skip["reason"]


def test_report_from_results_has_the_extra_sections(tmp_path):
    data = {"meta": {"config": {"repeats": 1, "datapaths": list(NAMES)}, "lab": {}},
            "results": [{"datapath": d, "metric": "tcp_crr_cps", "services": 6, "value": v}
                        for d, v in (("ebpfsvc", 10.0), ("iptables", 5.0), ("nftables", 6.0), ("direct", 11.0))],
            "skipped": [{"datapath": "nftables", "services": 50_000, "repeat": 0, "reason": "predicted 300 s"}],
            "programming": [], "endpoint_change": [], "spread": [], "errors": [],
            "maglev": [], "packet_cost": {"skipped": "not requested"}, "nodeport": {"skipped": "quick"},
            # The IPv6 maps' share of memlock; a results file from before it was recorded shows "-".
            "memory": [{"services": 6, "entry_bytes": 8400, "entry_bytes_per_service": 1400,
                        "memlock_bytes": 115 * 2**20, "memlock_ipv6_bytes": 40 * 2**20,
                        "maps": {"lb_maglev": {"max_entries": 4096}}},
                       {"services": 1000, "entry_bytes": 2**20, "entry_bytes_per_service": 1049,
                        "memlock_bytes": 115 * 2**20, "maps": {}}]}
    text = run.write(data, tmp_path).read_text()
    for heading in ("## Targets", "## Summary", "## Setup", "## NodePort", "## ns/packet", "## ebpfsvc: memory"):
        assert heading in text
    assert "predicted 300 s" in text
    assert "| 6 | 1,400 | 0.0 | 115 | 40 | 4,096 |" in text
    assert "| 1,000 | 1,049 | 1.0 | 115 | - | 0 |" in text
    ratios = run.key_ratios(data)
    assert "| tcp_crr_cps | 6 | 0.909 | 2.000 | 1.667 |" in ratios


# --- root: the whole run, tiny ----------------------------------------------------------------

@pytest.mark.root
@pytest.mark.timeout(600)
def test_a_tiny_run_measures_all_four_datapaths_and_writes_the_report(tmp_path):
    config = run.Config.quick_run(services=(1,), repeats=1, bounds=TINY_BOUNDS, spread_connections=30,
                                  packet_cost=False, nodeport=False, maglev_backends=(3,),
                                  command="pytest tests/bench/test_run.py")
    lines: list[str] = []
    report = run.execute(config, tmp_path / "out", log=lines.append)

    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["errors"] == [] and data["skipped"] == [], (data["errors"], data["skipped"])
    services = run.service_count(1)
    for datapath in NAMES:
        got = {r["metric"] for r in data["results"] if r["datapath"] == datapath and r["services"] == services}
        assert set(SUITE) <= got, (datapath, got)
        if datapath != "direct":
            assert {"program_seconds", "endpoint_change_ms"} <= got, (datapath, got)
    spread = {s["datapath"]: s["backends"] for s in data["spread"]}
    assert set(spread) == {"ebpfsvc", "iptables", "nftables"}
    assert all(sum(b.values()) == 30 for b in spread.values()), spread
    (memory,) = data["memory"]
    assert memory["entry_bytes_per_service"] > 0 and memory["memlock_bytes"] > memory["memlock_ipv6_bytes"] > 0
    assert data["meta"]["machine_info"]["cores"] >= 1 and data["meta"]["kernel"]
    assert data["maglev"] and data["nodeport"]["skipped"]

    text = report.read_text()
    assert report == tmp_path / "out" / "report.md"
    assert "## Targets" in text and "## Setup" in text
    assert "ebpfsvc / direct" in text       # a ratio column
    assert (tmp_path / "out" / "tcp_crr_cps.png").stat().st_size > 0

    # The lab is gone: namespaces and pins.
    prefix = data["meta"]["lab"]["prefix"]
    assert not any(p.name.startswith(prefix) for p in nsenter.NETNS_RUN_DIR.iterdir())
    assert not names.pin_root(prefix).exists()
    assert not Path(names.state_dir(prefix)).exists()


def test_the_order_rotates_and_keeps_iptables_legacy_last():
    names = ("ebpfsvc", "iptables", "nftables", "direct", "iptables-legacy")
    assert run.order(names, 0) == list(names)
    assert run.order(names, 1) == ["iptables", "nftables", "direct", "ebpfsvc", "iptables-legacy"]
    assert run.order(names, 4) == list(names)
