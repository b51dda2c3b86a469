"""The `ebpfsvc` command (also `python -m ebpfsvc`, `python -m ebpfsvc.cli`): one click group,
each command group in a module of this package."""

from __future__ import annotations

import logging

import click

from ebpfsvc import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ebpfsvc")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """eBPF Kubernetes Service data plane: a kube-proxy replacement."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# Every command lives in this package, one module per command group (agent, lab, bench, demo,
# inspect: service/bpf/maglev/why/drift/cleanup); the code it drives lives in its own package.
# None imports bcc at import time, so `ebpfsvc --help` works anywhere.
from ebpfsvc.cli import agent, bench, demo, inspect, lab  # noqa: E402

main.add_command(agent.agent)
main.add_command(lab.lab)
main.add_command(demo.demo)
for command in (inspect.service, inspect.bpf, inspect.maglev, inspect.why, inspect.drift, inspect.cleanup):
    main.add_command(command)
main.add_command(bench.bench)
