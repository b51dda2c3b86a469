"""Benchmark results JSON -> markdown report with ratio tables and PNG plots.

Input: a JSON list of records, or {"meta": {...}, "results": [...]}.  A record is

    {"datapath": "ebpfsvc", "metric": "tcp_crr_cps", "services": 10000,
     "values": [5210.0, 5188.3, 5240.9]}          # one value per repeat

or the same with a single "value" (records with the same datapath, metric and
services are then pooled as repeats); "repeats" may hold the list instead of
"values".  Optional: "unit", "higher_is_better" for metrics not listed in
METRICS.  "direct" is the no-translation limit; iptables / iptables-legacy /
nftables are the kube-proxy baselines.

Every figure is the median of the repeats, with its spread (min-max) beside it.
Ratios are ratios of medians: datapath / direct at the same number of services
(or direct's only measurement, since direct has no tables), and each ebpfsvc
variant / each kube-proxy mode.  A ratio above 1 is better for a
higher-is-better metric and worse for a lower-is-better one; the tables say
which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

DIRECT = "direct"
KUBE_PROXY_MODES = ("iptables", "iptables-legacy", "nftables", "kube-proxy-iptables", "kube-proxy-nftables")
_ORDER = ("direct", "ebpfsvc", "ebpfsvc-tc", "ebpfsvc-xdp", "iptables", "iptables-legacy", "nftables",
          "kube-proxy-iptables", "kube-proxy-nftables")


@dataclass(frozen=True)
class Metric:
    title: str
    unit: str
    higher_is_better: bool | None
    plot: bool = True


METRICS: dict[str, Metric] = {
    "tcp_throughput_gbps": Metric("TCP throughput, one stream", "Gbit/s", True),
    "tcp_throughput_cross_node_gbps": Metric("TCP throughput, one stream, cross node", "Gbit/s", True),
    "tcp_rr_p50_us": Metric("Request/response latency p50", "µs", False),
    "tcp_rr_p99_us": Metric("Request/response latency p99", "µs", False),
    "tcp_rr_tps": Metric("Request/response transactions", "1/s", True),
    "tcp_crr_cps": Metric("New connections (connect, request, close)", "1/s", True),
    "udp_pps": Metric("UDP packets arrived, one flow", "packets/s", True),
    "cpu_s_per_gb": Metric("CPU time per GB transferred", "s/GB", False),
    "program_seconds": Metric("Time to program N services from nothing", "s", False),
    "endpoint_change_ms": Metric("Endpoint change effective on the wire", "ms", False),
    "endpoint_change_after_ack_ms": Metric("Endpoint change: the API's acknowledgement to the first packet on "
                                           "the new backend", "ms", False),
    "endpoint_change_api_ms": Metric("Endpoint change: the API write itself (until acknowledged)", "ms", None),
    "bpf_bytes_per_service": Metric("BPF map entries written per service port", "bytes", False),
    "bpf_memlock_mib": Metric("Kernel memory locked by the BPF maps", "MiB", False),
    "cpu_us_per_conn": Metric("CPU time per new connection (machine-wide)", "µs", False),
    "bpf_ns_per_conn": Metric("ebpfsvc: its BPF programs' own run time per new connection", "ns", False),
    "bpf_runs_per_conn": Metric("ebpfsvc: BPF program runs per new connection", "", None, plot=False),
    "bpf_ns_per_run": Metric("ebpfsvc: BPF run time per program run", "ns", False, plot=False),
    "proxy_cpu_pct": Metric("The proxy process's own CPU during the traffic", "% of a core", False),
    "proxy_peak_rss_mib": Metric("The proxy process's peak resident memory", "MiB", False),
    "first_sync_seconds": Metric("kube-proxy's first sync (its own log)", "s", False),
    "bpf_load_seconds": Metric("ebpfsvc agent: compiling and loading its BPF object at start", "s", False),
    "map_write_seconds": Metric("ebpfsvc agent's first full sync (its own log)", "s", False),
    "kube_services_position": Metric("Measured service's position in KUBE-SERVICES", "", None, plot=False),
    "kube_services_rules": Metric("Rules in KUBE-SERVICES", "", None, plot=False),
    "wrk_errors": Metric("wrk socket errors and non-2xx answers", "", False, plot=False),
    "syn_retransmits": Metric("wrk's SYNs retransmitted (1 s each: a dropped SYN)", "", False, plot=False),
}


@dataclass(frozen=True)
class Summary:
    median: float
    low: float        # min
    high: float       # max
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Summary":
        v = sorted(values)
        if len(v) >= 2:
            q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
        else:
            q1 = q3 = v[0]
        return cls(statistics.median(v), v[0], v[-1], q1, q3, len(v))


Key = tuple[str, str, int]     # (metric, datapath, services)


def records(datapath: str, services: int, metrics: dict[str, float], **extra: Any) -> list[dict]:
    """Result records for one measurement of several metrics (e.g. traffic.measure_suite's dict)."""
    return [{"datapath": datapath, "metric": m, "services": services, "value": v, **extra}
            for m, v in metrics.items()]


def load_results(path: str | Path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        return data.get("meta", {}), list(data.get("results", []))
    return {}, list(data)


def _values(record: dict) -> list[float]:
    for field in ("values", "repeats"):
        if isinstance(record.get(field), list):
            return [float(v) for v in record[field]]
    if "value" in record:
        return [float(record["value"])]
    raise ValueError(f"record without value(s): {record}")


def summarize(records: Iterable[dict]) -> dict[Key, Summary]:
    pooled: dict[Key, list[float]] = defaultdict(list)
    for r in records:
        pooled[(r["metric"], r["datapath"], int(r.get("services", 0)))].extend(_values(r))
    return {k: Summary.of(v) for k, v in pooled.items() if v}


def metric_info(metric: str, records: Iterable[dict] = ()) -> Metric:
    if metric in METRICS:
        return METRICS[metric]
    for r in records:
        if r.get("metric") == metric:
            return Metric(metric, r.get("unit", ""), r.get("higher_is_better"))
    return Metric(metric, "", None)


def datapaths_in(summaries: dict[Key, Summary], metric: str) -> list[str]:
    found = {d for m, d, _ in summaries if m == metric}
    return [d for d in _ORDER if d in found] + sorted(found - set(_ORDER))


def services_in(summaries: dict[Key, Summary], metric: str) -> list[int]:
    return sorted({n for m, _, n in summaries if m == metric})


def reference(summaries: dict[Key, Summary], metric: str, datapath: str, services: int) -> Summary | None:
    """`datapath` at `services`; for direct, which has no tables, its only measurement will do."""
    exact = summaries.get((metric, datapath, services))
    if exact is not None or datapath != DIRECT:
        return exact
    only = [s for (m, d, _), s in summaries.items() if m == metric and d == DIRECT]
    return only[0] if len(only) == 1 else None


def ratio(summaries: dict[Key, Summary], metric: str, num: str, den: str, services: int) -> float | None:
    a = summaries.get((metric, num, services))
    b = reference(summaries, metric, den, services)
    if a is None or b is None or b.median == 0:
        return None
    return a.median / b.median


def ratio_columns(datapaths: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) pairs: each datapath / direct, then each ebpfsvc variant / each kube-proxy mode."""
    cols = [(d, DIRECT) for d in datapaths if d != DIRECT] if DIRECT in datapaths else []
    for e in (d for d in datapaths if d.startswith("ebpfsvc")):
        cols += [(e, k) for k in KUBE_PROXY_MODES if k in datapaths]
    return cols


# --- formatting ----------------------------------------------------------------------

def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.01:
        return f"{x:.3g}" if a < 1 else f"{x:.2f}"
    return f"{x:.2e}"


def fmt_summary(s: Summary | None) -> str:
    if s is None:
        return "–"
    if s.n == 1:
        return fmt(s.median)
    return f"{fmt(s.median)} ({fmt(s.low)}–{fmt(s.high)})"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _table(header: list[str], rows: list[list[str]], align: str = "---:") -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _direction(info: Metric) -> str:
    return {True: "higher is better", False: "lower is better", None: ""}[info.higher_is_better]


# --- plots ---------------------------------------------------------------------------

def plot_metric(summaries: dict[Key, Summary], metric: str, info: Metric, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs_all = services_in(summaries, metric)
    for datapath in datapaths_in(summaries, metric):
        points = sorted((n, s) for (m, d, n), s in summaries.items() if m == metric and d == datapath)
        if datapath == DIRECT and len(points) == 1:
            s = points[0][1]
            ax.axhline(s.median, color="black", linestyle="--", linewidth=1, label="direct (no NAT)")
            ax.axhspan(s.low, s.high, color="black", alpha=0.07)
            continue
        xs = [max(n, 1) for n, _ in points]
        ys = [s.median for _, s in points]
        err = [[s.median - s.low for _, s in points], [s.high - s.median for _, s in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=datapath)
    if len(xs_all) > 1 and max(xs_all) / max(min(xs_all), 1) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("services in the tables")
    # Wrapped: a long title (the endpoint change's) ran past both edges of the figure, and its
    # y label past the top and bottom. The title names the metric; the y label needs only the unit.
    ax.set_ylabel(info.unit or textwrap.fill(info.title, 40))
    ax.set_title(textwrap.fill(f"{info.title}: median, bars min–max", 70), fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- targets (issue 6) ---------------------------------------------------------------

def check_targets(summaries: dict[Key, Summary], ebpfsvc: str = "ebpfsvc") -> list[tuple[str, str, str]]:
    """(target, verdict, evidence) for the targets the data allows judging; others are left out."""
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    for metric in ("tcp_throughput_gbps", "tcp_throughput_cross_node_gbps"):
        ratios = {n: ratio(summaries, metric, ebpfsvc, DIRECT, n) for n in services_in(summaries, metric)}
        ratios = {n: r for n, r in ratios.items() if r is not None}
        if ratios:
            worst = min(ratios, key=ratios.get)
            out.append((f"{metric}: {ebpfsvc} ≥ 0.95 × direct", verdict(ratios[worst] >= 0.95),
                        f"lowest ratio {ratios[worst]:.3f} at {worst} services"))
    for metric in ("tcp_rr_p50_us", "tcp_rr_p99_us", "tcp_rr_tps", "tcp_crr_cps"):
        ns = sorted(n for (m, d, n) in summaries if m == metric and d == ebpfsvc)
        if len(ns) >= 2:
            first, last = summaries[(metric, ebpfsvc, ns[0])], summaries[(metric, ebpfsvc, ns[-1])]
            change = last.median / first.median - 1 if first.median else float("inf")
            out.append((f"{metric}: {ebpfsvc} within 5% between {ns[0]} and {ns[-1]} services",
                        verdict(abs(change) <= 0.05), f"{change:+.1%}"))
    for metric in ("tcp_throughput_gbps", "tcp_rr_tps", "tcp_crr_cps", "udp_pps", "tcp_rr_p50_us", "tcp_rr_p99_us"):
        info = METRICS[metric]
        pairs = [(n, ratio(summaries, metric, ebpfsvc, "iptables", n)) for n in services_in(summaries, metric)]
        pairs = [(n, r) for n, r in pairs if r is not None]
        if pairs:
            bad = [(n, r) for n, r in pairs if (r < 1 if info.higher_is_better else r > 1)]
            out.append((f"{metric}: {ebpfsvc} at least as good as iptables at every size", verdict(not bad),
                        ", ".join(f"{n}: {r:.3f}" for n, r in pairs)))
    r = ratio(summaries, "tcp_crr_cps", ebpfsvc, "iptables", 10_000)
    if r is not None:
        out.append(("tcp_crr_cps: ≥ 2 × iptables at 10,000 services", verdict(r >= 2), f"{r:.2f} ×"))
    s = summaries.get(("endpoint_change_ms", ebpfsvc, 10_000))
    if s is not None:
        out.append(("endpoint change effective within 50 ms at 10,000 services", verdict(s.median <= 50),
                    f"median {fmt(s.median)} ms, max {fmt(s.high)} ms"))
    return out


# --- the report ----------------------------------------------------------------------

def render_markdown(meta: dict, records: list[dict], summaries: dict[Key, Summary],
                    plots: dict[str, str]) -> str:
    lines = ["# ebpfsvc benchmark report", ""]
    for key in ("command", "machine", "kernel", "date", "notes"):
        if key in meta:
            lines.append(f"- **{key}**: {meta[key]}")
    if meta:
        lines.append("")
    lines += ["Figures are medians over repeats with min–max in parentheses. Ratios are ratios of medians; "
              "direct is the no-translation limit (pod IP, no service tables).", ""]

    # Issue 6's targets judge the generated rule sets; the run against the real kube-proxy
    # (bench/real.py) writes issue 13's own.
    targets = [] if meta.get("baseline") else check_targets(summaries)
    if targets:
        lines += ["## Targets", ""]
        lines += _table(["target", "verdict", "evidence"], [list(t) for t in targets], align=":---")
        lines.append("")

    metrics = [m for m in METRICS if any(k[0] == m for k in summaries)]
    metrics += sorted({k[0] for k in summaries} - set(metrics))
    for metric in metrics:
        info = metric_info(metric, records)
        datapaths = datapaths_in(summaries, metric)
        services = services_in(summaries, metric)
        unit = f" ({info.unit})" if info.unit else ""
        lines += [f"## {info.title}{unit}", "", f"`{metric}`, {_direction(info) or 'no direction given'}.", ""]
        rows = [[f"{n:,}"] + [fmt_summary(summaries.get((metric, d, n))) for d in datapaths] for n in services]
        lines += _table(["services"] + datapaths, rows)
        lines.append("")
        cols = ratio_columns(datapaths)
        if cols:
            rows = [[f"{n:,}"] + [fmt_ratio(ratio(summaries, metric, a, b, n)) for a, b in cols] for n in services]
            rows = [row for row in rows if any(cell != "–" for cell in row[1:])]
            lines += [f"Ratios ({_direction(info) or 'see metric'} for the numerator):", ""]
            lines += _table(["services"] + [f"{a} / {b}" for a, b in cols], rows)
            lines.append("")
        if metric in plots:
            lines += [f"![{info.title}]({plots[metric]})", ""]
    return "\n".join(lines)


def write_report(results: str | Path | list[dict] | dict, out_dir: str | Path, *, plots: bool = True) -> Path:
    """Write report.md (and one PNG per metric) into `out_dir`; return the report's path."""
    if isinstance(results, (str, Path)):
        meta, records = load_results(results)
    elif isinstance(results, dict):
        meta, records = results.get("meta", {}), list(results.get("results", []))
    else:
        meta, records = {}, list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(records)
    images: dict[str, str] = {}
    if plots:
        for metric in sorted({k[0] for k in summaries}):
            info = metric_info(metric, records)
            if info.plot:
                images[metric] = plot_metric(summaries, metric, info, out / f"{metric}.png").name
    report = out / "report.md"
    report.write_text(render_markdown(meta, records, summaries, images) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ebpfsvc.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results JSON")
    parser.add_argument("out_dir", help="folder for report.md and the PNG plots")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    print(write_report(args.results, args.out_dir, plots=not args.no_plots))


if __name__ == "__main__":
    main()
