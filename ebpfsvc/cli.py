"""The `ebpfsvc` command: one click group; each concern adds its own subcommands."""

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


# Each concern owns its commands; they are registered here. None imports bcc at
# import time, so `ebpfsvc --help` works anywhere.
from ebpfsvc.agent_cli import agent  # noqa: E402
from ebpfsvc.demo import demo  # noqa: E402
from ebpfsvc.lab.cli import lab  # noqa: E402 - the local lab's commands (ebpfsvc/lab/)

main.add_command(agent)
main.add_command(lab)
main.add_command(demo)
from ebpfsvc import inspect_cli  # noqa: E402 - inspection: service/bpf/maglev/why/drift/cleanup
main.add_command(inspect_cli.service)
main.add_command(inspect_cli.bpf)
main.add_command(inspect_cli.maglev)
main.add_command(inspect_cli.why)
main.add_command(inspect_cli.drift)
main.add_command(inspect_cli.cleanup)
from ebpfsvc.bench.cli import bench  # noqa: E402 - make bench / bench-quick (ebpfsvc/bench/run.py)
main.add_command(bench)

if __name__ == "__main__":
    main()
