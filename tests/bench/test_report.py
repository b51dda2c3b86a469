"""Benchmark report: medians, spreads, ratio tables, targets and plots from a synthetic results file (no root)."""

from __future__ import annotations

import json

import pytest

from ebpfsvc.bench import report

SIZES = [1, 1000, 10000]


def synthetic_results() -> dict:
    """Throughput: direct 10 (one measurement), ebpfsvc 9.8, iptables 9.0 / 8.0 / 6.0, nftables 9.0.

    Connection rate: ebpfsvc 5000 flat, iptables 4000 / 3000 / 2000, as three
    single-value records per point (pooled as repeats), direct 6000 at each size.
    """
    results = [{"datapath": "direct", "metric": "tcp_throughput_gbps", "services": 0, "values": [9.0, 10.0, 11.0]}]
    for n, ipt in zip(SIZES, (9.0, 8.0, 6.0)):
        results += [
            {"datapath": "ebpfsvc", "metric": "tcp_throughput_gbps", "services": n, "values": [9.7, 9.8, 9.9]},
            {"datapath": "iptables", "metric": "tcp_throughput_gbps", "services": n, "values": [ipt - 1, ipt, ipt + 5]},
            {"datapath": "nftables", "metric": "tcp_throughput_gbps", "services": n, "values": [9.0]},
        ]
    for n, ipt in zip(SIZES, (4000.0, 3000.0, 2000.0)):
        for rep, wobble in enumerate((-10.0, 0.0, 10.0)):
            results += [
                {"datapath": "ebpfsvc", "metric": "tcp_crr_cps", "services": n, "value": 5000 + wobble, "repeat": rep},
                {"datapath": "iptables", "metric": "tcp_crr_cps", "services": n, "value": ipt + wobble, "repeat": rep},
                {"datapath": "direct", "metric": "tcp_crr_cps", "services": n, "value": 6000 + wobble, "repeat": rep},
            ]
    results.append({"datapath": "ebpfsvc", "metric": "custom_thing", "services": 1, "value": 3, "unit": "widgets",
                    "higher_is_better": True})
    return {"meta": {"command": "make bench", "machine": "test box"}, "results": results}


def table_after(text: str, heading: str, nth: int = 0) -> list[dict[str, str]]:
    """The nth markdown table after `heading`, as dicts keyed by column header."""
    body = text[text.index(heading):]
    tables, current = [], []
    for line in body.splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    header, _, *rows = tables[nth]
    return [dict(zip(header, row)) for row in rows]


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(synthetic_results()))
    md = report.write_report(path, tmp_path / "out")
    return md, md.read_text()


def test_ratio_table_for_throughput(written):
    _, text = written
    ratios = {row["services"]: row for row in table_after(text, "## TCP throughput, one stream", 1)}
    # Direct was measured once (services 0): every size divides by its median, 10.
    assert ratios["1"]["ebpfsvc / direct"] == "0.980"
    assert ratios["10,000"]["iptables / direct"] == "0.600"
    assert ratios["1,000"]["nftables / direct"] == "0.900"
    assert ratios["1"]["ebpfsvc / iptables"] == f"{9.8 / 9.0:.3f}"
    assert ratios["10,000"]["ebpfsvc / iptables"] == f"{9.8 / 6.0:.3f}"
    assert ratios["1,000"]["ebpfsvc / nftables"] == f"{9.8 / 9.0:.3f}"


def test_values_table_shows_median_and_spread(written):
    _, text = written
    values = {row["services"]: row for row in table_after(text, "## TCP throughput, one stream", 0)}
    assert values["10,000"]["iptables"] == "6.00 (5.00–11.0)"
    assert values["1"]["nftables"] == "9.00"          # one repeat: no spread to show
    assert values["0"]["direct"] == "10.0 (9.00–11.0)"


def test_single_value_records_pool_as_repeats(written):
    _, text = written
    values = {row["services"]: row for row in table_after(text, "## New connections", 0)}
    assert values["1,000"]["ebpfsvc"] == "5,000 (4,990–5,010)"
    ratios = {row["services"]: row for row in table_after(text, "## New connections", 1)}
    # Direct exists at every size here, so each size uses its own direct.
    assert ratios["10,000"]["ebpfsvc / direct"] == f"{5000 / 6000:.3f}"
    assert ratios["10,000"]["ebpfsvc / iptables"] == "2.500"


def test_targets_are_judged_from_the_data(written):
    _, text = written
    targets = {row["target"]: row for row in table_after(text, "## Targets")}
    assert targets["tcp_throughput_gbps: ebpfsvc ≥ 0.95 × direct"]["verdict"] == "met"
    assert targets["tcp_crr_cps: ≥ 2 × iptables at 10,000 services"]["verdict"] == "met"
    assert targets["tcp_crr_cps: ebpfsvc within 5% between 1 and 10000 services"]["verdict"] == "met"


def test_a_missed_target_is_stated():
    results = [
        {"datapath": "direct", "metric": "tcp_throughput_gbps", "services": 1, "value": 10.0},
        {"datapath": "ebpfsvc", "metric": "tcp_throughput_gbps", "services": 1, "value": 9.0},
    ]
    (_, verdict, evidence), = report.check_targets(report.summarize(results))
    assert verdict == "**missed**" and "0.900" in evidence


def test_plots_are_pngs_and_linked(written):
    md, text = written
    for metric in ("tcp_throughput_gbps", "tcp_crr_cps", "custom_thing"):
        png = md.parent / f"{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({metric}.png)" in text


def test_metadata_and_unknown_metric(written):
    _, text = written
    assert "- **command**: make bench" in text
    assert "## custom_thing (widgets)" in text


def test_summary_quartiles():
    s = report.Summary.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.median, s.low, s.high, s.q1, s.q3, s.n) == (3.0, 1.0, 100.0, 2.0, 4.0, 5)


def test_record_without_value_is_an_error():
    with pytest.raises(ValueError):
        report.summarize([{"datapath": "x", "metric": "m", "services": 1}])
