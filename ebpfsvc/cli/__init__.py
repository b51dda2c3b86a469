"""The `ebpfsvc` command (also `python -m ebpfsvc`, `python -m ebpfsvc.cli`): one click group,
each command group in a module of this package."""

from __future__ import annotations

import logging

import click

from ebpfsvc import __version__


# Every command lives in this package, one module per command group (agent, lab, bench, demo,
# inspect: service/bpf/maglev/why/drift/cleanup); the code it drives lives in its own package.
# None imports bcc at import time, so `ebpfsvc --help` works anywhere. A command's module is imported
# when that command runs (or help lists it): the agent's start would otherwise wait for the lab's
# imports (the Kubernetes client, 0.6 s on a quiet machine, seconds on a busy one: issue 12).
COMMANDS = {"agent": "agent:agent", "lab": "lab:lab", "demo": "demo:demo", "service": "inspect:service",
            "bpf": "inspect:bpf", "maglev": "inspect:maglev", "why": "inspect:why", "drift": "inspect:drift",
            "cleanup": "inspect:cleanup", "bench": "bench:bench"}


class LazyGroup(click.Group):
    """A click group whose commands (COMMANDS: name -> "module:attribute" of ebpfsvc.cli) are
    imported when asked for."""

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx, name):
        if name in self.commands or name not in COMMANDS:
            return super().get_command(ctx, name)
        import importlib

        module, attribute = COMMANDS[name].split(":")
        command = getattr(importlib.import_module(f"ebpfsvc.cli.{module}"), attribute)
        self.add_command(command, name)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ebpfsvc")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """eBPF Kubernetes Service data plane: a kube-proxy replacement."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
