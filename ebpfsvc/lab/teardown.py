"""`lab down`: remove everything a lab made, also when its controller or a test crashed.

Order matters.  Processes go first (a namespace with a process inside outlives
its /run/netns file, with its veths), then namespaces (pods before nodes before
the fabric), then BPF pins, and the state dir last: it is the registry of what
to remove, so a `lab down` interrupted half-way can simply be run again.

Only processes the lab started are signalled: those with a matching pid record
(pid + start time) and those living inside the lab's own namespaces.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import names, network, processes, rpc
from ebpfsvc.lab.pods import process as pod_process
from ebpfsvc.lab.store import State

log = logging.getLogger(__name__)

def down(prefix: str, root: Path | None = None) -> bool:
    """Tear down lab `prefix`; False if there was nothing to tear down."""
    state = State(prefix, root)
    pins = names.pin_root(prefix)
    if not state.path.exists() and not pins.exists():
        return False
    _stop_processes(state)
    namespaces = state.namespaces()
    processes.kill_in_netns(nsenter.netns_path(n) for n in namespaces)
    for name in reversed(namespaces):     # recorded in creation order: fabric first, pods last
        try:
            network.remove_namespace(name)
        except OSError as exc:
            log.warning("cannot remove namespace %s: %s", name, exc)
    if pins.exists():
        shutil.rmtree(pins)
    state.remove()
    return True


def down_all(root: Path | None = None) -> list[str]:
    """Tear down every lab registered under the state root; the prefixes removed."""
    root = root or names.STATE_ROOT
    removed = []
    for path in sorted(root.iterdir()) if root.exists() else []:
        if path.is_dir() and down(path.name, root):
            removed.append(path.name)
    return removed


def _stop_processes(state: State) -> None:
    controller = state.read_pid(names.CONTROLLER)
    if processes.alive(controller):
        try:
            # The controller stops its pods and agents itself, and reaps them.
            rpc.call(state.path, {"op": "shutdown"}, timeout=30)
        except (rpc.ControllerError, OSError) as exc:
            log.warning("controller of %s did not shut down cleanly: %s", state.prefix, exc)
    # Whatever is still running (controller hung or dead): by record.
    records = state.pid_records()
    if state.objects.exists():
        records += [r for p in state.list("Pod") if (r := pod_process(p))]
    processes.stop(records, grace=2.0)
