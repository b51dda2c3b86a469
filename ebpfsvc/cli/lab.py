"""`ebpfsvc lab ...`: the local lab from the command line (a thin shell over lab.Lab).

Every command finds its lab by prefix: --prefix, else $EBPFSVC_LAB_PREFIX, else
the only lab that exists, else the default lab file's name ("demo").
"""

from __future__ import annotations

import json
import os
import sys

import click
import yaml
from rich.console import Console
from rich.table import Table

from ebpfsvc.lab import controlplane, kubeproxy, labfile, names, pods as podlib, processes, teardown
from ebpfsvc.lab.lab import Lab, LabError, load_documents
from ebpfsvc.lab.rpc import ControllerError
from ebpfsvc.lab.store import LabNotFound

ERRORS = (LabError, LabNotFound, ControllerError, labfile.LabFileError, KeyError, FileExistsError,
          controlplane.ControlPlaneError, kubeproxy.KubeProxyError)
WAIT_TIMEOUT = 120.0


def _default_prefix() -> str:
    """$EBPFSVC_LAB_PREFIX, else the only lab, else the default name; with several labs, never a guess
    (it could be another engineer's)."""
    if os.environ.get("EBPFSVC_LAB_PREFIX"):
        return os.environ["EBPFSVC_LAB_PREFIX"]
    labs = sorted(p.name for p in names.STATE_ROOT.iterdir()) if names.STATE_ROOT.exists() else []
    if len(labs) > 1:
        raise LabError(f"{len(labs)} labs run here ({', '.join(labs)}): say which with --prefix "
                       f"or $EBPFSVC_LAB_PREFIX")
    return labs[0] if labs else labfile.load().name


def prefix_option(fn):
    return click.option("--prefix", "-p", default=None,
                        help="Lab prefix (default: $EBPFSVC_LAB_PREFIX, the only lab, or 'demo').")(fn)


def _open(prefix: str | None) -> Lab:
    return Lab.open(prefix or _default_prefix())


def wait_option(fn):
    fn = click.option("--timeout", type=float, default=WAIT_TIMEOUT, show_default=True,
                      help="Seconds to wait for the agents.")(fn)
    return click.option("--wait/--no-wait", default=True, show_default=True,
                        help="Return once every agent serves what the API says (ebpfsvc drift on each node).")(fn)


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
@wait_option
def up(labfile_path: str | None, prefix: str | None, no_agents: bool, wait: bool, timeout: float) -> None:
    """Create the fabric, nodes, external clients and the control plane; start the kubelet and agents
    (and wait until they have programmed their nodes)."""
    lab_ = Lab.up(labfile_path, prefix or os.environ.get("EBPFSVC_LAB_PREFIX"), agents=not no_agents)
    if wait and not no_agents:
        lab_.wait_synced(timeout)
    click.echo(f"lab {lab_.prefix} is up{' and its agents in sync' if wait and not no_agents else ''}: "
               f"state in {lab_.state.path}\nkubectl: export KUBECONFIG={lab_.kubeconfig}")


@lab.command()
@click.option("-f", "--file", "paths", required=True, multiple=True,
              help="YAML file (multi-document; '-' for stdin) or directory of them; repeatable.")
@prefix_option
@wait_option
def apply(paths: tuple[str, ...], prefix: str | None, wait: bool, timeout: float) -> None:
    """Create or update Namespaces, Pods, Services, Endpoints and EndpointSlices (server-side apply),
    then wait until every agent serves them."""
    lab_ = _open(prefix)
    for obj in lab_.apply(load_documents(*paths)):
        meta = obj["metadata"]
        click.echo(f"{obj['kind'].lower()}/{meta['name']} applied")
    if wait:
        lab_.wait_synced(timeout)
        click.echo("agents in sync")


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
    click.echo("deleted" if grace_period == 0 else "deleted (pods terminate for their grace period)")


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("pod")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@prefix_option
def exec_(pod: str, argv: tuple[str, ...], prefix: str | None) -> None:
    """Run a command in a pod's namespace: `lab exec POD -- CMD...`; exits with its code.
    `python`/`python3` is the lab's own interpreter, as in a pod's command."""
    lab_ = _open(prefix)
    sys.exit(_run_or_127(lambda: lab_.exec(pod, list(argv), timeout=None, capture_output=False, text=False),
                         argv[0], f"pod {pod}"))


@lab.command(name="node-exec", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@prefix_option
def node_exec(node: str, argv: tuple[str, ...], prefix: str | None) -> None:
    """Run a command in a node's (or external client's) namespace."""
    lab_ = _open(prefix)
    run = lab_.node_exec if node in {n.name for n in lab_.spec.nodes} else lab_.external_exec
    sys.exit(_run_or_127(lambda: run(node, list(argv), timeout=None, capture_output=False, text=False),
                         argv[0], node))


def _run_or_127(run, program: str, where: str) -> int:
    """The command's exit code; a program that is not there is one line and 127, as in a shell."""
    try:
        return run().returncode
    except FileNotFoundError:
        click.echo(f"ebpfsvc lab: {program}: command not found (in {where})", err=True)
        return 127
    except PermissionError:
        click.echo(f"ebpfsvc lab: {program}: permission denied (in {where})", err=True)
        return 126


@lab.command()
@prefix_option
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def status(prefix: str | None, output: str) -> None:
    """Nodes (and whether each agent is in sync), pods and services of the lab."""
    report = _status(_open(prefix))
    if output == "json":
        click.echo(json.dumps(report, indent=2))
        return
    if output == "yaml":
        click.echo(yaml.safe_dump(report, sort_keys=False), nl=False)
        return
    # Piped, the tables keep their rows whole instead of wrapping at 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 1000, highlight=False)
    for title, rows in ((f"lab {report['lab']}: nodes", report["nodes"]), ("pods", report["pods"]),
                        ("services", report["services"])):
        table = Table(title=title, title_justify="left")
        for col in (rows[0] if rows else {"": ""}):
            table.add_column(col)
        for row in rows:
            table.add_row(*(", ".join(map(str, v)) if isinstance(v, list) else str(v) for v in row.values()))
        console.print(table)


def _status(lab_: Lab) -> dict:
    nodes = []
    for n in lab_.spec.nodes:
        rec = lab_.agent_record(n.name)
        agent = "running" if processes.alive(rec) else ("stopped" if rec is None else "exited")
        if agent == "running":
            diffs = lab_.drift(n.name)
            sync = "in sync" if not diffs else f"{len(diffs)} frontend(s) differ"
        else:
            sync = ""
        nodes.append({"node": n.name, "address": ", ".join(map(str, n.addresses)),
                      "podCIDR": ", ".join(map(str, n.pod_cidrs)), "zone": n.zone,
                      "agent": agent, "pid": rec.pid if agent == "running" else None, "sync": sync})
    for e in lab_.spec.external:
        nodes.append({"node": e.name, "address": ", ".join(map(str, e.addresses)), "podCIDR": "", "zone": "",
                      "agent": "(external)",
                      "pid": None, "sync": ""})
    pods = []
    for pod in lab_.pods():
        status_ = pod.get("status") or {}
        pods.append({"pod": podlib.label(pod), "ip": ", ".join(podlib.pod_ips(pod)),
                     "node": pod["spec"].get("nodeName", ""), "phase": status_.get("phase", ""),
                     "ready": podlib.is_ready(pod), "terminating": podlib.is_terminating(pod)})
    endpoints: dict[tuple[str, str], list[dict]] = {}
    for eps in lab_.api.list("EndpointSlice"):
        meta = eps["metadata"]
        key = (meta["namespace"], (meta.get("labels") or {}).get("kubernetes.io/service-name", ""))
        endpoints.setdefault(key, []).extend(eps.get("endpoints") or [])
    services = []
    for svc in lab_.api.list("Service"):
        spec = svc.get("spec") or {}
        ports = [f"{p.get('name') or '-'} {p.get('port')}/{p.get('protocol', 'TCP')}"
                 + (f" node {p['nodePort']}" if p.get("nodePort") else "") for p in spec.get("ports") or []]
        eps = endpoints.get((svc["metadata"]["namespace"], svc["metadata"]["name"]), [])
        ready = sum(1 for e in eps if (e.get("conditions") or {}).get("ready"))
        services.append({"service": podlib.label(svc), "type": spec.get("type", ""),
                         "clusterIP": ", ".join(spec.get("clusterIPs") or [spec.get("clusterIP", "")]), "ports": ports,
                         "endpoints": f"{ready}/{len(eps)} ready"})
    return {"lab": lab_.prefix, "nodes": nodes, "pods": pods, "services": services}


@lab.command(context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@prefix_option
def inspect(node: str, argv: tuple[str, ...], prefix: str | None) -> None:
    """Run an inspection command against a lab node's agent: `lab inspect node-1 service list`,
    `bpf ct list`, `why ...`, `drift`: in the node's namespace, with its pin dir and kubeconfig."""
    lab_ = _open(prefix)
    lab_.spec.node(node)     # KeyError names the nodes there are
    env = {**processes.base_env(), "EBPFSVC_PIN_DIR": str(names.pin_dir(lab_.prefix, node)),
           "KUBECONFIG": str(controlplane.Paths(lab_.state.path).agent_kubeconfig(node)), "NODE_NAME": node}
    sys.exit(lab_.node_exec(node, [sys.executable, "-m", "ebpfsvc.cli", *argv], timeout=None,
                            capture_output=False, text=False, env=env).returncode)


@lab.command()
@click.argument("action", type=click.Choice(["start", "stop", "restart"]))
@click.argument("node")
@prefix_option
def agent(action: str, node: str, prefix: str | None) -> None:
    """Start, stop or restart the agent of NODE."""
    _open(prefix).agent(action, node)
    click.echo(f"agent {node}: {action} done")


@lab.command(name="kube-proxy")
@click.argument("action", type=click.Choice(["start", "stop", "cleanup"]))
@click.argument("node")
@click.option("--mode", type=click.Choice(kubeproxy.MODES), default="iptables", show_default=True,
              help="kube-proxy's --proxy-mode (start).")
@prefix_option
def kube_proxy(action: str, node: str, mode: str, prefix: str | None) -> None:
    """The real kube-proxy on NODE: start, stop (its rules stay), or `kube-proxy --cleanup` there."""
    lab_ = _open(prefix)
    lab_.spec.node(node)
    if action == "start":
        rec = kubeproxy.start(lab_, node, mode)
        click.echo(f"kube-proxy ({mode}) on {node}: running (pid {rec.pid}); log: "
                   f"ebpfsvc lab logs kube-proxy/{node}")
    elif action == "stop":
        kubeproxy.stop(lab_, node)
        click.echo(f"kube-proxy on {node}: stopped (its rules stay until `lab kube-proxy cleanup {node}`)")
    else:
        result = kubeproxy.cleanup(lab_, node)
        left = kubeproxy.leftovers(lab_, node)
        click.echo(f"kube-proxy --cleanup on {node}: exit {result.returncode}; "
                   f"left: {', '.join(sorted(left)) or 'nothing'}")
        if result.returncode != 0:
            click.echo(result.stderr[-2000:], err=True)
            sys.exit(result.returncode)


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
    """Print a log: a pod's (NAME or namespace/NAME), `agent/NODE`, `kube-proxy/NODE`, `controller`, or a control-plane
    component's (etcd, kube-apiserver, kube-controller-manager, apiproxy)."""
    lab_ = _open(prefix)
    if name == "controller":
        path = lab_.state.log_path(names.CONTROLLER)
    elif name in controlplane.COMPONENTS:
        path = lab_.state.log_path(name)
    elif name.startswith("agent/"):
        path = lab_.state.log_path(names.agent_record(name.split("/", 1)[1]))
    elif name.startswith("kube-proxy/"):
        path = lab_.state.log_path(names.kube_proxy_record(name.split("/", 1)[1]))
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

