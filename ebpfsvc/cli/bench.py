"""`ebpfsvc bench`: the benchmark run of issue 6 (`make bench`, `make bench-quick`).

Needs root (network namespaces, BPF).  Everything happens in a lab of its own
(unique prefix, 198.18.0.0/15), taken down at the end, also on failure or
Ctrl-C.  See docs/bench.md for what is measured and how to read the report.
"""

from __future__ import annotations

import json
import os
import time

import click


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: comma-separated whole numbers, e.g. 1,1000,10000") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: at least one number, each at least 1")
    return values


@click.command("bench")
@click.option("--quick", is_flag=True, help="Fewer points and shorter measurements (under two minutes).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Results folder [default: results/<UTC timestamp>].")
@click.option("--services", default=None, help="Comma-separated numbers of services [full: 1,1000,10000,50000; "
                                               "quick: 1,1000].")
@click.option("--repeats", type=click.IntRange(1, 50), default=None, help="Repeats per point [full: 3, quick: 1].")
@click.option("--datapaths", default=None, help="Comma-separated subset of ebpfsvc,iptables,nftables,direct "
                                                "(also iptables-legacy: measure it last).")
@click.option("--max-program-seconds", type=float, default=None,
              help="Skip a (datapath, N) point whose programming is predicted or measured to take longer "
                   "[150].")
@click.option("--no-nodeport", is_flag=True, help="Leave out NodePort TC vs XDP (a second lab, with agents).")
@click.option("--no-packet-cost", is_flag=True, help="Leave out ns/packet through BPF_PROG_TEST_RUN.")
@click.option("--note", default="", help="Free text for the report's notes, e.g. what else ran on the machine.")
@click.option("--report-only", "results_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Measure nothing: write report.md and the plots again from this results.json (into its folder).")
def bench(quick: bool, out_dir: str | None, services: str | None, repeats: int | None, datapaths: str | None,
          max_program_seconds: float | None, no_nodeport: bool, no_packet_cost: bool, note: str,
          results_file: str | None) -> None:
    """Benchmark ebpfsvc against kube-proxy's iptables and nftables modes and direct pod IPs."""
    from pathlib import Path

    from ebpfsvc.bench import run
    from ebpfsvc.bench.datapaths import NAMES

    if results_file:
        data = json.loads(Path(results_file).read_text())
        click.echo(run.key_ratios(data))
        click.echo(f"report: {run.write(data, Path(results_file).parent)}")
        return
    if os.geteuid() != 0:
        raise click.ClickException("the benchmark needs root (network namespaces, BPF): sudo make bench")
    overrides: dict = {"command": run.command_line(), "note": note}
    if services:
        overrides["services"] = _ints(services)
    if repeats:
        overrides["repeats"] = repeats
    if datapaths:
        names = tuple(d.strip() for d in datapaths.split(",") if d.strip())
        unknown = [d for d in names if d not in (*NAMES, "iptables-legacy")]
        if unknown:
            raise click.BadParameter(f"unknown datapath(s) {', '.join(unknown)}", param_hint="--datapaths")
        overrides["datapaths"] = names
    if max_program_seconds is not None:
        overrides["max_program_seconds"] = max_program_seconds
    if no_nodeport:
        overrides["nodeport"] = False
    if no_packet_cost:
        overrides["packet_cost"] = False
    config = run.Config.quick_run(**overrides) if quick else run.Config.full(**overrides)
    start = time.monotonic()
    path = run.execute(config, out_dir, log=lambda line: click.echo(line))
    data = json.loads((path.parent / "results.json").read_text())
    click.echo("")
    click.echo(run.key_ratios(data))
    click.echo("")
    click.echo(f"report: {path}  ({time.monotonic() - start:.0f} s)")
