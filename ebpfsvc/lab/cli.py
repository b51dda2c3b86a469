"""`ebpfsvc lab ...`: the local lab from the command line (a thin shell over lab.Lab).

Every command finds its lab by prefix: --prefix, else $EBPFSVC_LAB_PREFIX, else
the only lab that exists, else the default lab file's name ("demo").
"""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.table import Table

from ebpfsvc.lab import controlplane, labfile, names, pods as podlib, processes, teardown
from ebpfsvc.lab.lab import Lab, LabError, load_documents
from ebpfsvc.lab.rpc import ControllerError
from ebpfsvc.lab.store import LabNotFound

ERRORS = (LabError, LabNotFound, ControllerError, labfile.LabFileError, KeyError, FileExistsError)


def _default_prefix() -> str:
    if os.environ.get("EBPFSVC_LAB_PREFIX"):
        return os.environ["EBPFSVC_LAB_PREFIX"]
    labs = [p.name for p in names.STATE_ROOT.iterdir()] if names.STATE_ROOT.exists() else []
    return labs[0] if len(labs) == 1 else labfile.load().name


def prefix_option(fn):
    return click.option("--prefix", "-p", default=None,
                        help="Lab prefix (default: $EBPFSVC_LAB_PREFIX, the only lab, or 'demo').")(fn)


def _open(prefix: str | None) -> Lab:
    return Lab.open(prefix or _default_prefix())


class _Errors(click.Group):
    """Known lab errors become one clear line and exit code 1, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ERRORS as exc:
            raise click.ClickException(str(exc.args[0] if isinstance(exc, KeyError) else exc)) from None


@click.group(cls=_Errors)
def lab() -> None:
    """A Kubernetes cluster's data plane on this machine, in network namespaces (docs/lab.md)."""


@lab.command()
@click.option("-f", "--file", "labfile_path", type=click.Path(exists=True, dir_okay=False),
              help="Lab file (default: the shipped 2-node lab).")
@prefix_option
@click.option("--no-agents", is_flag=True, help="Do not start node agents.")
def up(labfile_path: str | None, prefix: str | None, no_agents: bool) -> None:
    """Create the fabric, nodes, external clients and the control plane; start the kubelet and agents."""
    lab_ = Lab.up(labfile_path, prefix or os.environ.get("EBPFSVC_LAB_PREFIX"), agents=not no_agents)
    click.echo(f"lab {lab_.prefix} is up: state in {lab_.state.path}\n"
               f"kubectl: export KUBECONFIG={lab_.kubeconfig}")


@lab.command()
@click.option("-f", "--file", "path", required=True, help="YAML file (multi-document; '-' for stdin).")
@prefix_option
def apply(path: str, prefix: str | None) -> None:
    """Create or update Pods, Services, Endpoints and EndpointSlices."""
    for obj in _open(prefix).apply(load_documents(path)):
        meta = obj["metadata"]
        click.echo(f"{obj['kind'].lower()}/{meta['name']} applied")


@lab.command()
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option("-f", "--file", "path", help="Delete the objects in this YAML file.")
@click.option("--grace-period", type=float, default=None, help="Override the pods' grace period (seconds).")
@prefix_option
def delete(kind: str | None, name: str | None, path: str | None, grace_period: float | None,
           prefix: str | None) -> None:
    """Delete objects: `-f FILE` or `KIND NAME` (NAME may be namespace/name)."""
    lab_ = _open(prefix)
    if path:
        lab_.delete(load_documents(path), grace_period)
    elif kind and name:
        lab_.delete_object(kind, name, grace_period)
    else:
        raise click.UsageError("give -f FILE or KIND NAME")
    click.echo("deleted (pods terminate for their grace period)")


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("pod")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@prefix_option
def exec_(pod: str, argv: tuple[str, ...], prefix: str | None) -> None:
    """Run a command in a pod's namespace: `lab exec POD -- CMD...`; exits with its code."""
    result = _open(prefix).exec(pod, list(argv), timeout=None, capture_output=False, text=False)
    sys.exit(result.returncode)


@lab.command(name="node-exec", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@prefix_option
def node_exec(node: str, argv: tuple[str, ...], prefix: str | None) -> None:
    """Run a command in a node's (or external client's) namespace."""
    lab_ = _open(prefix)
    run = lab_.node_exec if node in {n.name for n in lab_.spec.nodes} else lab_.external_exec
    sys.exit(run(node, list(argv), timeout=None, capture_output=False, text=False).returncode)


@lab.command()
@prefix_option
def status(prefix: str | None) -> None:
    """Nodes, pods and services of the lab."""
    lab_ = _open(prefix)
    console = Console()
    nodes = Table(title=f"lab {lab_.prefix}: nodes")
    for col in ("node", "address", "pod CIDR", "zone", "agent"):
        nodes.add_column(col)
    for n in lab_.spec.nodes:
        rec = lab_.agent_record(n.name)
        agent = f"running (pid {rec.pid})" if processes.alive(rec) else ("stopped" if rec is None else "exited")
        nodes.add_row(n.name, str(n.address), str(n.pod_cidr), n.zone, agent)
    for e in lab_.spec.external:
        nodes.add_row(f"{e.name} (external)", str(e.address), "", "", "")
    console.print(nodes)

    pods = Table(title="pods")
    for col in ("pod", "IP", "node", "phase", "ready"):
        pods.add_column(col)
    for pod in lab_.pods():
        status_ = pod.get("status") or {}
        ready = "yes" if podlib.is_ready(pod) else "no"
        if podlib.is_terminating(pod):
            ready += " (terminating)"
        pods.add_row(podlib.label(pod), status_.get("podIP", ""), pod["spec"].get("nodeName", ""),
                     status_.get("phase", ""), ready)
    console.print(pods)

    svcs = Table(title="services")
    for col in ("service", "type", "cluster IP", "ports", "endpoints (ready/all)"):
        svcs.add_column(col)
    for svc in lab_.api.list("Service"):
        spec = svc.get("spec") or {}
        ports = ", ".join(f"{p.get('name') or '-'} {p.get('port')}/{p.get('protocol', 'TCP')}"
                          + (f" node {p['nodePort']}" if p.get("nodePort") else "")
                          for p in spec.get("ports") or [])
        ref = podlib.label(svc)
        endpoints = [e for s in lab_.endpoint_slices(ref) for e in s.get("endpoints") or []]
        ready = sum(1 for e in endpoints if (e.get("conditions") or {}).get("ready"))
        svcs.add_row(ref, spec.get("type", ""), spec.get("clusterIP", ""), ports, f"{ready}/{len(endpoints)}")
    console.print(svcs)


@lab.command()
@click.argument("action", type=click.Choice(["start", "stop", "restart"]))
@click.argument("node")
@prefix_option
def agent(action: str, node: str, prefix: str | None) -> None:
    """Start, stop or restart the agent of NODE."""
    _open(prefix).agent(action, node)
    click.echo(f"agent {node}: {action} done")


@lab.command("control-plane")
@click.argument("action", type=click.Choice(["start", "stop", "restart"]))
@click.argument("component", type=click.Choice([controlplane.ETCD, controlplane.APISERVER,
                                                controlplane.CONTROLLER_MANAGER]))
@prefix_option
def control_plane(action: str, component: str, prefix: str | None) -> None:
    """Start, stop or restart one control-plane component (API-fault tests); waits for /readyz
    after starting etcd or the API server."""
    lab_ = _open(prefix)
    lab_.control_plane(action, component)
    if action != "stop" and component != controlplane.CONTROLLER_MANAGER:
        lab_.wait_api_ready()
    click.echo(f"{component}: {action} done")


@lab.command()
@prefix_option
@click.option("--all", "all_", is_flag=True, help="Tear down every lab on this machine.")
def down(prefix: str | None, all_: bool) -> None:
    """Stop everything of a lab and remove its namespaces, pins and state (also after a crash)."""
    if all_:
        removed = teardown.down_all()
        click.echo(f"removed labs: {', '.join(removed) or 'none'}")
        return
    prefix = prefix or _default_prefix()
    if teardown.down(prefix):
        click.echo(f"lab {prefix} removed")
    else:
        click.echo(f"no lab {prefix} (nothing in {names.state_dir(prefix)})")


@lab.command()
@click.argument("name")
@prefix_option
def logs(name: str, prefix: str | None) -> None:
    """Print a log: a pod's (NAME or namespace/NAME), `agent/NODE`, `controller`, or a control-plane
    component's (etcd, kube-apiserver, kube-controller-manager, apiproxy)."""
    lab_ = _open(prefix)
    if name == "controller":
        path = lab_.state.log_path(names.CONTROLLER)
    elif name in controlplane.COMPONENTS:
        path = lab_.state.log_path(name)
    elif name.startswith("agent/"):
        path = lab_.state.log_path(names.agent_record(name.split("/", 1)[1]))
    else:
        namespace, pod = podlib.key(lab_.pod(name))
        path = lab_.state.log_path(names.pod_record(namespace, pod))
    if not path.exists():
        raise click.ClickException(f"no log {path}")
    click.echo(path.read_text(errors="replace"), nl=False)


@lab.command()
@prefix_option
def kubeconfig(prefix: str | None) -> None:
    """Print the path of the lab's admin kubeconfig (for kubectl, from the host)."""
    click.echo(str(_open(prefix).kubeconfig))

