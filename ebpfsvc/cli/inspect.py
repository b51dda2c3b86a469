"""Inspection commands: what a node's live maps hold, as tables (rich) or JSON (-o json).

    ebpfsvc service list   [--pin-dir DIR] [-o json]
    ebpfsvc bpf lb list    raw frontend -> backends
    ebpfsvc bpf ct list    conntrack entries, with age and state
    ebpfsvc bpf options    the agent's datapath options, as the programs read them
    ebpfsvc maglev show SERVICE
    ebpfsvc why SRC DST:PORT/PROTO [--sport N]
    ebpfsvc drift --manifests DIR | --kubeconfig FILE    (exit 1 on drift)
    ebpfsvc cleanup --pin-dir DIR [--netns NAME]

All of them read the pinned maps directly (ebpfsvc/datapath/bpfsys.py): no
compiler, nothing created, so they are safe to run against a busy node.
"""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

from ebpfsvc.config import (AUTO_IP_FAMILIES, DEFAULT_IP_FAMILIES, DEFAULT_NODEPORT_RANGE, DEFAULT_PIN_DIR, NodeConfig,
                            format_port_range)
from ebpfsvc.flags import PortRange

pin_dir_option = click.option("--pin-dir", default=DEFAULT_PIN_DIR, show_default=True, envvar="EBPFSVC_PIN_DIR",
                              help="The node's pin directory (the agent's --pin-dir).")
output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                             show_default=True)


def _open(pin_dir):
    from ebpfsvc.inspect.node import NodeMaps
    try:
        return NodeMaps.open(pin_dir)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e))


def _console():
    from rich.console import Console
    # Tables are wide; never wrap them to an 80-column pipe.  No emoji codes: an IPv6 address holds
    # some (2001:db8::b:1 has ":b:").
    return Console(width=None if sys.stdout.isatty() else 1000, highlight=False, emoji=False)


def _esc(value) -> str:
    """A value printed inside markup: [2001:2::1]:80/TCP or [fd00::1] are text, not style tags."""
    from rich.markup import escape
    return escape(str(value))


def _json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _table(*columns: str, title: str | None = None):
    from rich.table import Table
    from rich.text import Text
    t = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    # Cells are data, never markup (a bracketed IPv6 frontend would read as a style tag).
    add_row = t.add_row
    t.add_row = lambda *cells, **kw: add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kw)
    return t


def _be_line(b: dict, *, counters: bool = True) -> str:
    bits = [b["state"]] + (["local"] if b.get("local") else [])
    text = f"{b['id']}) {b['backend'] or '?'} ({', '.join(bits)})"
    if "slots" in b:
        text += f" slots={b['slots']}"
    if b.get("flows"):
        text += f" flows={b['flows']}"
    if counters and "packets" in b:
        text += f" pkts={b['packets']} bytes={b['bytes']}"
    return text


# ---- service list ------------------------------------------------------------------------------

@click.group("service")
def service() -> None:
    """Service ports as the node serves them."""


@service.command("list")
@pin_dir_option
@output_option
def service_list(pin_dir, output) -> None:
    """Per service port: frontends (scope, kind, flags, algorithm, affinity) with packet/byte counters,
    the path east-west connections take on this node (socket: translated at connect() by --socket-lb,
    counted per socket; tc: every packet), and backends with state, locality, Maglev slots, tracked
    flows and counters."""
    from ebpfsvc.inspect import views
    with _open(pin_dir) as node:
        rows = views.service_list(node)
    if output == "json":
        return _json(rows)
    t = _table("SERVICE", "FRONTEND", "SCOPE", "KIND", "FLAGS", "ALGO", "AFFINITY", "PATH", "SOCK CONNS", "PKTS",
               "BYTES", "BACKENDS")
    for svc in rows:
        if "not_programmed" in svc:
            t.add_row(svc["service"], "NOT PROGRAMMED", "-", "-", "-", "-", "-", "-", "0", "0", "0",
                      svc["not_programmed"])
        for i, fe in enumerate(svc["frontends"]):
            t.add_row(svc["service"] if i == 0 else "", fe["frontend"], fe["scope"], fe["kind"],
                      ",".join(fe["flags"]) or "-", fe["algorithm"],
                      f"{fe['affinity_timeout']}s" if fe["affinity_timeout"] else "-",
                      fe["path"], str(fe["socket_connects"]), str(fe["packets"]), str(fe["bytes"]),
                      "\n".join(_be_line(b) for b in fe["backends"]) or "(none: rejects)")
    _console().print(t)


# ---- bpf lb list / bpf ct list ------------------------------------------------------------------

@click.group("bpf")
def bpf() -> None:
    """Raw map contents."""


@bpf.group("lb")
def bpf_lb() -> None:
    """Load-balancer maps."""


@bpf_lb.command("list")
@pin_dir_option
@output_option
def bpf_lb_list(pin_dir, output) -> None:
    """Every lb4_frontends entry -> the backends of its Maglev table."""
    from ebpfsvc.inspect import views
    with _open(pin_dir) as node:
        rows = views.lb_list(node)
    if output == "json":
        return _json(rows)
    t = _table("FRONTEND", "SCOPE", "SVC ID", "FE ID", "FLAGS", "MAGLEV", "BACKENDS")
    for r in rows:
        t.add_row(r["frontend"], r["scope"], str(r["service_id"]), str(r["id"]), ",".join(r["flags"]) or "-",
                  f"{r['maglev_offset']}+{r['maglev_size']}" if r["maglev_size"] else "-",
                  "\n".join(_be_line(b, counters=False) for b in r["backends"]) or "-")
    _console().print(t)


@bpf.command("options")
@pin_dir_option
@output_option
def bpf_options(pin_dir, output) -> None:
    """The agent's datapath options as the programs read them (lb_agent_config), each with the
    agent flag that sets it; the defaults when no agent has written them."""
    from ebpfsvc.inspect import views
    with _open(pin_dir) as node:
        got = views.datapath_options(node)
    if output == "json":
        return _json(got)
    title = ("as the agent wrote them (lb_agent_config)" if got["published"] else
             "none written (lb_agent_config is empty): the programs run with the defaults")
    t = _table("OPTION", "FLAG", "VALUE", title=title)
    for o in got["options"]:
        t.add_row(o["option"], o["flag"], "-" if o["value"] is None else str(o["value"]).lower())
    _console().print(t)


@bpf.group("ct")
def bpf_ct() -> None:
    """Conntrack map."""


@bpf_ct.command("list")
@pin_dir_option
@output_option
@click.option("--no-expired", is_flag=True, help="Hide entries the datapath already treats as absent.")
def bpf_ct_list(pin_dir, output, no_expired) -> None:
    """Conntrack entries: direction, 5-tuple, frontend, backend, state flags, age."""
    from ebpfsvc.inspect import views
    with _open(pin_dir) as node:
        rows = views.ct_list(node, include_expired=not no_expired)
    if output == "json":
        return _json(rows)
    t = _table("DIR", "PROTO", "SOURCE", "DESTINATION", "FRONTEND", "BACKEND", "FLAGS", "AGE")
    for r in rows:
        t.add_row(r["direction"], r["proto"], r["src"], r["dst"], r["frontend"],
                  f"{r['backend']} (id {r['backend_id']})", ",".join(r["flags"]) or "-",
                  f"{r['age_s']:.1f}s" + (" expired" if r["expired"] else ""))
    _console().print(t)


# ---- maglev show --------------------------------------------------------------------------------

@click.group("maglev")
def maglev() -> None:
    """Maglev tables."""


@maglev.command("show")
@click.argument("service_name", metavar="SERVICE")
@pin_dir_option
@output_option
@click.option("--first", default=32, show_default=True, help="How many leading slots to print.")
def maglev_show(service_name, pin_dir, output, first) -> None:
    """The Maglev table(s) of SERVICE ("ns/name[:port][/PROTO]" or a frontend "addr:port[/PROTO]"):
    size, slots per backend, the first slots."""
    from ebpfsvc.inspect import views
    with _open(pin_dir) as node:
        fes = views.find_frontends(node, service_name)
        if not fes:
            raise click.ClickException(f"no frontend of {service_name!r} in {pin_dir}")
        rows = [views.maglev_show(node, fe, first=first) for fe in fes]
    if output == "json":
        return _json(rows)
    con = _console()
    for r in rows:
        con.print(f"[bold]{_esc(r['service'])} {_esc(r['frontend'])} ({r['scope']})[/bold]: "
                  f"table size {r['table_size']} at offset {r['maglev_offset']}")
        t = _table("BACKEND", "STATE", "SLOTS", "SHARE")
        for b in r["backends"]:
            t.add_row(f"{b['id']}) {b['backend']}", b["state"] + (", local" if b["local"] else ""),
                      str(b["slots"]), f"{b['share']:.2%}")
        con.print(t)
        con.print(f"first slots: {' '.join(map(str, r['first_slots']))}\n")


# ---- why ----------------------------------------------------------------------------------------

def _parse_dst(value: str) -> tuple[str, int, str]:
    import ipaddress
    try:
        hostport, _, proto = value.partition("/")
        host, _, port = hostport.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = str(ipaddress.IPv6Address(host[1:-1]))      # [IPv6]:PORT, as in a URL
        else:
            ipaddress.IPv4Address(host)
        return host, int(port), (proto or "TCP").upper()
    except ValueError:
        raise click.BadParameter(f"{value!r} is not ADDRESS:PORT[/PROTO] ([ADDRESS]:PORT for IPv6)",
                                 param_hint="DST:PORT/PROTO")


@click.command("why")
@click.argument("src")
@click.argument("dst")
@click.option("--sport", type=int, default=None, help="Client source port (the Maglev slot depends on it).")
@click.option("--scope", type=click.Choice(["internal", "external"]), default="internal", show_default=True,
              help="internal: sent by a pod on this node; external: entered from outside the node.")
@pin_dir_option
@output_option
def why(src, dst, sport, scope, pin_dir, output) -> None:
    """Walk one new flow SRC -> DST:PORT/PROTO through the datapath's decisions (conntrack, frontend,
    traffic policy, affinity, Maglev slot) and name the backend it gets, and why."""
    from ebpfsvc.inspect import views
    daddr, dport, proto = _parse_dst(dst)
    with _open(pin_dir) as node:
        r = views.why(node, src, daddr, dport, proto, sport, scope)
    if output == "json":
        return _json(r)
    con = _console()
    con.print(f"[bold]{_esc(r['flow'])}[/bold] ({r['scope']})")
    for i, s in enumerate(r["steps"], 1):
        con.print(f"  {i}. {s['step']:<15} {_esc(s['outcome'])}")
    target = f" -> {_esc(r['backend'])} (id {r['backend_id']})" if r["backend"] else ""
    con.print(f"[bold]verdict: {r['verdict']}{target}[/bold], because: {_esc(r['reason'])}")


# ---- drift --------------------------------------------------------------------------------------

@click.command("drift")
@pin_dir_option
@output_option
@click.option("--manifests", type=click.Path(exists=True, file_okay=False), help="Desired state from this directory.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), envvar="KUBECONFIG",
              help="Desired state from the API server ($KUBECONFIG, as kubectl).")
@click.option("--in-cluster", is_flag=True, help="Desired state from the API server, in-cluster config.")
@click.option("--node-name", envvar="NODE_NAME", required=True, help="This node's name (the agent's).")
@click.option("--node-address", "node_addresses", multiple=True, help="A NodePort address (as given to the agent).")
@click.option("--nodeport-addresses", multiple=True, help="As given to the agent; default: every node address, "
              "found as the agent finds them (its Node object, this namespace's interfaces).")
@click.option("--service-cidr", default=None, help="As given to the agent, if it was.")
@click.option("--ip-families", default=AUTO_IP_FAMILIES, show_default=True,
              help="As given to the agent (auto: the ServiceCIDRs' families; IPv4, IPv6, IPv4,IPv6).")
@click.option("--service-node-port-range", default=format_port_range(DEFAULT_NODEPORT_RANGE), show_default=True,
              type=PortRange())
@click.option("--proxy-name", default="")
@click.option("--legacy-source-ranges-annotation/--no-legacy-source-ranges-annotation",
              default=NodeConfig.legacy_source_ranges, show_default=True, help="As given to the agent.")
@click.option("--lb-algorithm", type=click.Choice(["maglev", "random"]), default="maglev", show_default=True)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the API lists.")
def drift(pin_dir, output, manifests, kubeconfig, in_cluster, node_name, node_addresses, nodeport_addresses,
          service_cidr, ip_families, service_node_port_range, proxy_name, legacy_source_ranges_annotation,
          lb_algorithm, timeout) -> None:
    """Compare the desired state (manifests or API) with the node's maps; exit 1 on drift."""
    from ebpfsvc.inspect import views
    from ebpfsvc.inspect.desired import load_desired
    from ebpfsvc.nodeinfo import NodeSettings

    if (manifests or in_cluster) and \
            click.get_current_context().get_parameter_source("kubeconfig") == ParameterSource.ENVIRONMENT:
        kubeconfig = None       # $KUBECONFIG is a default, not a second choice
    if bool(manifests) + bool(kubeconfig) + bool(in_cluster) != 1:
        raise click.UsageError("give exactly one of --manifests, --kubeconfig, --in-cluster")
    auto = ip_families == AUTO_IP_FAMILIES
    try:
        node_cfg = NodeConfig(node_name=node_name, node_addresses=node_addresses, service_cidr=service_cidr,
                              nodeport_range=service_node_port_range, proxy_name=proxy_name,
                              default_algorithm=lb_algorithm, legacy_source_ranges=legacy_source_ranges_annotation,
                              ip_families=DEFAULT_IP_FAMILIES if auto else ip_families)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        settings = NodeSettings(node_addresses=node_cfg.node_addresses, nodeport_addresses=nodeport_addresses,
                                ip_families=node_cfg.ip_families)
        problems: list = []
        desired = load_desired(node_cfg, manifests=manifests, kubeconfig=kubeconfig, in_cluster=in_cluster,
                               timeout=timeout, settings=settings, problems=problems, ip_families_auto=auto)
    except (OSError, TimeoutError, ValueError) as e:
        raise click.ClickException(str(e))
    with _open(pin_dir) as node:
        diffs = views.drift(desired, node, problems=problems)
    if output == "json":
        _json({"drift": bool(diffs), "frontends": len(desired.frontends), "differences": diffs})
    elif diffs:
        t = _table("FRONTEND", "SERVICE", "PROBLEM", title=f"{len(diffs)} frontends differ")
        for d in diffs:
            t.add_row(d["frontend"], d["service"], d["problem"])
        _console().print(t)
    else:
        click.echo(f"no drift: the maps serve the {len(desired.frontends)} desired frontends exactly")
    sys.exit(1 if diffs else 0)


# ---- cleanup ------------------------------------------------------------------------------------

@click.command("cleanup")
@click.option("--pin-dir", required=True, help="The agent's pin directory: its maps are unpinned.")
@click.option("--netns", default=None, help="Network namespace (name under /var/run/netns) to clean; default: this one.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
@click.option("--socket-lb-cgroup", default=None,
              help="The agent's --socket-lb-cgroup: detach the socket programs from it too.")
def cleanup(pin_dir, netns, dry_run, socket_lb_cgroup) -> None:
    """Remove what the agent attached (its TC programs: at TCX by name, on clsact by priority and handle) and
    pinned. Established Service connections stop being translated: run it only with the agent gone."""
    from ebpfsvc.datapath.cleanup import cleanup as do_cleanup
    try:
        report = do_cleanup(pin_dir, netns=netns, dry_run=dry_run, socket_lb_cgroup=socket_lb_cgroup)
    except (OSError, ValueError, RuntimeError) as e:
        raise click.ClickException(str(e))
    verb = "would remove" if dry_run else "removed"
    for f in report.filters:
        click.echo(f"{verb} {f}")
    for p in report.pins:
        click.echo(f"{verb} pin {p}")
    if not report.filters and not report.pins:
        click.echo("nothing to remove")



