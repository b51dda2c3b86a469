"""What the inspection commands show, as plain data (dicts and lists, JSON-ready).

Each function takes an open NodeMaps and returns rows; ebpfsvc/cli/inspect.py
renders them as tables or JSON, tests compare them with the traffic they sent.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from ebpfsvc import abi
from ebpfsvc.datapath.flowhash import flow_hash
from ebpfsvc.inspect.node import (PROTO_NUMBERS, AgentOptions, BackendRow, CtEntry, FrontendRow, NodeMaps,
                                  address_port_name, ct_closing, hostport, monotonic_ns)
from ebpfsvc.lbmodel import table_backends

# Slots the datapath tries past a terminating backend (bpf/lib/lb.h, defined in abi.h).
TERMINATING_PROBES = abi.LB_TERMINATING_PROBES


def _backend_row(b: BackendRow | None, ident: int) -> dict:
    if b is None:
        return {"id": ident, "backend": None, "state": "missing", "local": False}
    return {"id": ident, "backend": b.name, "state": b.state, "local": b.local}


def _frontend_row(fe: FrontendRow) -> dict:
    return {"frontend": fe.name, "scope": fe.scope, "kind": fe.kind, "flags": fe.flag_names,
            "algorithm": fe.algorithm, "affinity_timeout": fe.affinity_timeout, "id": fe.frontend_id,
            "service_id": fe.service_id, "backend_count": fe.backend_count, "maglev_size": fe.maglev_size,
            "maglev_offset": fe.maglev_offset}


def east_west_path(fe: FrontendRow, socket_programs) -> str:
    """Which path a pod's (or a node process's) connection to `fe` takes on this node: the rules of
    bpf/lib/sock.h lb_sock_frontend and lb_sock_xlate, for processes in the agent's
    --socket-lb-cgroup (anything outside it takes TC). `socket_programs`: the names
    NodeMaps.socket_programs found loaded; an IPv6 frontend needs connect6 among them."""
    if fe.scope != "internal":
        return "uplink"                         # north-south: the uplink programs
    if ("connect6" if fe.is_ipv6 else "connect4") not in socket_programs:
        return "tc"
    if fe.proto not in ("TCP", "UDP"):
        return "tc (protocol)"
    if fe.flags & abi.LB_SVC_F_AFFINITY:
        return "tc (sessionAffinity)"
    if (not fe.backend_count or not fe.maglev_size) and fe.flags & abi.LB_SVC_F_LOCAL_ONLY:
        return "tc (Local, no local endpoint)"
    return "socket"


def service_list(node: NodeMaps, *, with_ct: bool = True) -> list[dict]:
    """Per service port: its frontends with counters, each with its backends (from the Maglev table,
    plus backends no longer in the table that still carry tracked flows of this frontend)."""
    fes = [f for f in node.frontends() if not f.is_marker]
    node.prefetch_maglev(fes)
    backends = node.backends()
    flows: dict[int, Counter] = {}
    if with_ct:
        for e in node.ct():
            if e.direction == "forward" and not e.expired:
                flows.setdefault(e.frontend_id, Counter())[e.backend_id] += 1
    fe_traffic = node.traffic_all("frontend", max((f.frontend_id for f in fes), default=0))
    be_traffic = node.traffic_all("backend", max(backends, default=0))
    socket_programs = node.socket_programs()
    connects = node.socket_connects_all(max((f.frontend_id for f in fes), default=0))
    services: dict[str, dict] = {}
    for fe in fes:
        svc = services.setdefault(fe.service or f"<unnamed service id {fe.service_id}>",
                                  {"service": fe.service, "service_id": fe.service_id, "frontends": [],
                                   "packets": 0, "bytes": 0})
        row = _frontend_row(fe)
        row["packets"], row["bytes"] = fe_traffic.get(fe.frontend_id, (0, 0))
        # The socket path's flows are counted per socket at connect(), not per packet.
        row["path"], row["socket_connects"] = east_west_path(fe, socket_programs), connects.get(fe.frontend_id, 0)
        svc["packets"] += row["packets"]
        svc["bytes"] += row["bytes"]
        slots = Counter(node.maglev_table(fe)) if fe.maglev_size else Counter()
        fe_flows = flows.get(fe.frontend_id, Counter())
        rows = []
        for ident in sorted(set(slots) | set(fe_flows)):
            r = _backend_row(backends.get(ident), ident)
            r["slots"] = slots.get(ident, 0)
            r["flows"] = fe_flows.get(ident, 0)
            if not r["slots"] and r["state"] == "active":
                r["state"] = "draining"       # out of the table, flows still tracked
            # Per-backend counters count every frontend's packets to that backend.
            r["packets"], r["bytes"] = be_traffic.get(ident, (0, 0))
            rows.append(r)
        row["backends"] = rows
        svc["frontends"].append(row)
    out = list(services.values())
    # Services the agent left out of the maps (a conflict, full maps, a failure): said, not hidden.
    for name, (reason, detail) in node.service_status().items():
        out.append({"service": name, "service_id": 0, "frontends": [], "packets": 0, "bytes": 0,
                    "not_programmed": f"{reason}: {detail}"})
    return out


def lb_list(node: NodeMaps) -> list[dict]:
    """Raw frontend -> backends, one row per lb4_frontends entry (markers included)."""
    backends = node.backends()
    out = []
    fes = node.frontends()
    node.prefetch_maglev(fes)
    for fe in fes:
        row = _frontend_row(fe)
        row["service"] = fe.service
        ids = sorted(set(node.maglev_table(fe))) if fe.maglev_size else []
        row["backends"] = [_backend_row(backends.get(i), i) for i in ids]
        out.append(row)
    return out


# The agent's datapath options (inspect/node.py AgentOptions) and the `ebpfsvc agent` flag of each.
_OPTION_FLAGS = (("snat_keep_client_port", "--nodeport-snat-keep-client-port"),
                 ("host_clients", "--host-clients"),
                 ("reset_removed_endpoint_tcp", "--reset-removed-endpoint-tcp"),
                 ("masquerade_external_to_local_backends", "--masquerade-external-to-local-backends"),
                 ("cluster_cidr", "--cluster-cidr"))


def datapath_options(node: NodeMaps) -> dict:
    """The options the node's programs run with, as they read them (lb_agent_config, written by
    the agent before it attaches anything): each with its agent flag. `published` False: no agent
    wrote the word, and the programs run with the defaults (listed)."""
    got = node.agent_options()
    values = got if got is not None else AgentOptions()
    return {"published": got is not None,
            "options": [{"option": name, "flag": flag,
                         "value": str(getattr(values, name)) if name == "cluster_cidr" and values.cluster_cidr
                         else getattr(values, name)} for name, flag in _OPTION_FLAGS]}


def ct_list(node: NodeMaps, *, include_expired: bool = True) -> list[dict]:
    out = []
    for e in node.ct():
        if e.expired and not include_expired:
            continue
        out.append({"direction": e.direction, "proto": e.proto, "src": hostport(e.saddr, e.sport),
                    "dst": hostport(e.daddr, e.dport), "frontend": e.frontend, "backend": e.backend,
                    "backend_id": e.backend_id, "service_id": e.service_id, "frontend_id": e.frontend_id,
                    "flags": e.flag_names, "age_s": round(e.age_s, 3), "expired": e.expired})
    return out


def find_frontends(node: NodeMaps, service: str) -> list[FrontendRow]:
    """Frontends of a service port, by name: "ns/name[:port][/PROTO]", or a frontend "addr:port[/PROTO]"."""
    fes = [f for f in node.frontends() if not f.is_marker]
    exact = [f for f in fes if f.service == service or f.name == service]
    if exact:
        return exact
    # Prefix forms: "ns/name" matches every port; "addr:port" matches every protocol.
    return [f for f in fes if f.service.startswith(service + ":") or f.service.startswith(service + "/")
            or f.name.startswith(service + "/")]


def maglev_show(node: NodeMaps, fe: FrontendRow, *, first: int = 32) -> dict:
    table = node.maglev_table(fe)
    backends = node.backends()
    counts = Counter(table)
    size = len(table)
    rows = []
    for ident, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        r = _backend_row(backends.get(ident), ident)
        r["slots"] = n
        r["share"] = round(n / size, 4) if size else 0.0
        rows.append(r)
    return {"service": fe.service, "frontend": fe.name, "scope": fe.scope, "table_size": size,
            "maglev_offset": fe.maglev_offset, "backend_count": fe.backend_count, "backends": rows,
            "first_slots": table[:first]}


# ---- why: one flow walked like the datapath walks it -------------------------------------------

def why(node: NodeMaps, src: str, dst: str, dport: int, proto: str, sport: int | None = None,
        scope: str = "internal", now_ns: int | None = None) -> dict:
    """Follow a new packet (the first of a connection: a SYN for TCP) from `src` to dst:dport/proto
    through the datapath: scope "internal" is a pod's packet (bpf/lib/flow.h lb4_from_pod), scope
    "external" one entering from an uplink (bpf/lib/nodeport.h np4_from_uplink, nodeport6.h
    np6_from_uplink for IPv6: north-south flows only, loadBalancerSourceRanges, SNAT to the node for
    a remote backend). Steps: conntrack,
    frontend, source ranges, traffic policy, affinity, Maglev slot. Returns the steps and the
    outcome: verdict, backend and reason."""
    external = scope == "external"
    # The agent's datapath options, the word its programs read (None: an agent that publishes
    # none, whose defaults then hold).
    options = node.agent_options()
    resets_removed_tcp = options is None or options.reset_removed_endpoint_tcp
    masquerades_local = options is not None and options.masquerade_external_to_local_backends
    keeps_client_port = options is None or options.snat_keep_client_port
    now_ns = monotonic_ns() if now_ns is None else now_ns
    proto = proto.upper()
    steps: list[dict] = []
    fe_flags = [0]          # the matched frontend's flags, once known

    def step(name: str, outcome: str, **detail) -> None:
        steps.append({"step": name, "outcome": outcome, **detail})

    def result(verdict: str, reason: str, backend: BackendRow | None = None, backend_id: int = 0) -> dict:
        if external and verdict == "dnat" and backend is not None and reason != "conntrack":
            if fe_flags[0] & abi.LB_SVC_F_LOCAL_ONLY:
                step("source", "policy Local: the client address is kept")
            elif backend.local and not masquerades_local:
                step("source", "local backend: the client address is kept (kube-proxy's masquerade: "
                     "--masquerade-external-to-local-backends)")
            else:
                ports = f"one of {abi.SNAT_PORT_MIN}-{abi.SNAT_PORT_MAX}"
                if proto == "TCP" and not keeps_client_port:
                    ports = f"{ports} (the agent runs with --no-nodeport-snat-keep-client-port)"
                elif proto == "TCP" and (sport is None or sport >= abi.SNAT_KEEP_PORT_MIN):
                    kept = sport if sport is not None else "the client's"
                    ports = (f"the port stays {kept} unless another flow or a node socket to this backend "
                             f"holds it, then {ports} (always {ports} with --no-nodeport-snat-keep-client-port)")
                who = ("local backend, masqueraded as kube-proxy (the agent runs with --masquerade-external-to-"
                       "local-backends): source SNATed to the node, sent to the pod's veth, its reply translated "
                       "back where it leaves the pod" if backend.local else
                       "remote backend: source SNATed to the node, so the reply comes back here")
                step("source", f"{who}; {ports}")
        elif verdict == "dnat" and backend is not None and backend.address == src and reason != "conntrack":
            step("source", "hairpin: the client is the backend; its source becomes the node's hairpin "
                 "address (if the agent has one), so the reply returns through the datapath")
        return {"flow": f"{src}:{sport if sport is not None else '*'} -> {dst}:{dport}/{proto}",
                "scope": scope, "steps": steps, "verdict": verdict, "reason": reason,
                "backend": backend.name if backend else None, "backend_id": backend_id or None}

    if proto not in PROTO_NUMBERS:
        step("parse", f"{proto} has no ports: passes untouched")
        return result("pass", "not load-balanced protocol")

    # 1. Conntrack: an established flow keeps its backend whatever the tables say now.
    if sport is None:
        step("conntrack", "skipped: no --sport, a flow is identified by its 5-tuple")
    else:
        e = node.ct_lookup(src, dst, sport, dport, proto, "forward", now_ns)
        if e is not None and external and not e.flags & getattr(abi, "CT_F_NODEPORT", 0):
            step("conntrack", "an entry of a pod-side flow: not the uplink's, ignored", entry=_ct_brief(e))
            e = None
        elif e is not None and external and e.flags & getattr(abi, "CT_F_SNAT", 0) and not e.expired \
                and node.snat_entry(src, dst, sport, dport, proto) is None:
            step("conntrack", "SNATed flow without its SNAT entry (evicted): started over", entry=_ct_brief(e))
            e = None
        if e is None:
            if not steps or steps[-1]["step"] != "conntrack":
                step("conntrack", "no entry: a new flow")
        elif e.expired:
            step("conntrack", f"entry expired ({e.age_s:.1f}s old): deleted, a new flow", entry=_ct_brief(e))
        elif proto == "TCP" and ct_closing(e.flags):
            step("conntrack", "entry is closing (FIN both ways or RST): a new SYN starts a new flow",
                 entry=_ct_brief(e))
        else:
            be = node.backend(e.backend_id)
            if be is not None and proto == "UDP" and be.not_ready:
                # lb4_flow_keeps_backend: a not-ready backend keeps its TCP flows only.
                step("conntrack", f"tracked UDP flow, backend {e.backend_id} is not ready: balanced again",
                     entry=_ct_brief(e))
            elif be is not None:
                step("conntrack", f"tracked flow ({', '.join(e.flag_names) or 'no flags'}, "
                     f"{e.age_s:.1f}s idle) pinned to backend {e.backend_id}", entry=_ct_brief(e))
                return result("dnat", "conntrack", be, e.backend_id)
            elif proto == "TCP" and not resets_removed_tcp:
                # lb4_flow_keeps_backend with LB_RESET_REMOVED_TCP 0: the entry's address, as kube-proxy.
                step("conntrack", f"tracked flow, backend {e.backend_id} was removed from its slice: the flow goes "
                     f"on to {e.backend} (its conntrack entry) until it closes or expires, as kube-proxy "
                     f"(the agent runs with --no-reset-removed-endpoint-tcp)", entry=_ct_brief(e))
                return {**result("dnat", "conntrack"), "backend": f"{e.backend}/{proto}", "backend_id": e.backend_id}
            elif proto == "TCP":
                setting = ("the agent's --reset-removed-endpoint-tcp, the default" if options is not None else
                           "the default; the agent publishes no setting")
                step("conntrack", f"tracked flow, but backend {e.backend_id} was removed: reset ({setting})",
                     entry=_ct_brief(e))
                return result("reject", "backend_gone")
            else:
                step("conntrack", f"tracked flow, backend {e.backend_id} removed: balanced again",
                     entry=_ct_brief(e))

    # 2. Frontend, in the scope of where the packet comes from.
    fe = node.frontend(dst, dport, proto, scope)
    if fe is None or fe.is_marker:
        marker = node.frontend(dst, 0, proto, scope)
        what = "a frontend address, but not this port" if marker is not None else "not a frontend"
        step("frontend", f"{dst}:{dport}/{proto} ({scope}) is {what}: passes untouched")
        return result("pass", "not a service")
    step("frontend", f"{fe.name} ({fe.scope}, {fe.kind}) of {fe.service or 'service ' + str(fe.service_id)}",
         flags=fe.flag_names, backend_count=fe.backend_count, maglev_size=fe.maglev_size)
    if not external:
        path = east_west_path(fe, node.socket_programs())
        if path == "socket":
            step("socket path", "on: a process in the node's --socket-lb-cgroup is translated at connect() "
                 "(unconnected UDP: each sendmsg()), the same table slotted by its socket cookie (its 5-tuple "
                 "when bound); the steps below are the TC path's, for the rest", path=path)
        else:
            step("socket path", f"not taken: {path}", path=path)
    cluster_cidr = options.cluster_cidr if options is not None else None
    # The cluster CIDR is IPv4 (the uplink's np4_from_cluster): np6_lookup_frontend has no such step,
    # so an IPv6 source meets the Local set.
    if external and fe.flags & abi.LB_SVC_F_LOCAL_ONLY and cluster_cidr is not None and ":" not in src \
            and ipaddress.ip_address(src) in cluster_cidr:
        # bpf/lib/nodeport.h np4_lookup_frontend: a pod (of another node) to a Local-policy external
        # frontend takes its INTERNAL twin's cluster-wide set, as kube-proxy's short-circuit.
        twin = node.frontend(dst, dport, proto, "internal")
        if twin is not None and not twin.is_marker:
            step("cluster CIDR", f"{src} is inside the agent's --cluster-cidr {cluster_cidr}: pod traffic, "
                 f"served by {twin.name} (internal), the cluster-wide backends, as kube-proxy; a backend on "
                 "another node is SNATed to this one (docs/semantics.md)")
            fe = twin
    fe_flags[0] = fe.flags
    if external and fe.flags & getattr(abi, "LB_SVC_F_SOURCE_RANGES", 0):
        if not node.source_allowed(fe, src):
            step("source ranges", f"{src} is outside loadBalancerSourceRanges: dropped")
            return result("drop", "source_range")
        step("source ranges", f"{src} is inside loadBalancerSourceRanges")

    # 3. Traffic policy: the backend set was filtered by the control plane; empty means no service.
    if not fe.backend_count or not fe.maglev_size:
        if fe.flags & abi.LB_SVC_F_LOCAL_ONLY:
            step("traffic policy", "Local and no backend on this node: dropped")
            return result("drop", "no_local_backend")
        step("traffic policy", "no usable backend: rejected (TCP RST / ICMP port unreachable)")
        return result("reject", "no_backend")
    policy = "Local: node-local backends only" if fe.flags & abi.LB_SVC_F_LOCAL_ONLY else "Cluster"
    step("traffic policy", f"{policy}: {fe.backend_count} usable backends")

    # 4. Session affinity.
    if fe.flags & abi.LB_SVC_F_AFFINITY and fe.affinity_timeout:
        a = node.affinity(src, fe.service_id, now_ns)
        if a is None:
            step("affinity", f"ClientIP ({fe.affinity_timeout}s): no entry for {src}")
        elif a.age_s >= fe.affinity_timeout:
            step("affinity", f"ClientIP: entry for backend {a.backend_id} is stale "
                 f"({a.age_s:.1f}s >= {fe.affinity_timeout}s)")
        else:
            be = node.backend(a.backend_id)
            if be is None:
                step("affinity", f"ClientIP: backend {a.backend_id} of the fresh entry is gone")
            elif not be.takes_new_flows:
                step("affinity", f"ClientIP: backend {a.backend_id} is {be.state}: affinity ignored")
            elif not node.affinity_matches(a.backend_id, fe.frontend_id):
                step("affinity", f"ClientIP: backend {a.backend_id} is not in this frontend's set in use "
                     f"(left the service, or out of its traffic policy's set): affinity ignored")
            else:
                step("affinity", f"ClientIP: fresh entry ({a.age_s:.1f}s < {fe.affinity_timeout}s) "
                     f"-> backend {a.backend_id}")
                return result("dnat", "affinity", be, a.backend_id)
    else:
        step("affinity", "sessionAffinity None")

    # 5. The Maglev slot (or a random one).
    table = node.maglev_table(fe)
    if fe.flags & abi.LB_SVC_F_RANDOM:
        ids = sorted(set(table))
        step("maglev", f"algorithm random: a random slot of {fe.maglev_size}, any of backends {ids}")
        return result("dnat", "random", None, 0)
    if sport is None:
        ids = sorted(set(table))
        step("maglev", f"the slot depends on the source port: one of backends {ids}")
        return result("dnat", "maglev (source port unknown)")
    h = flow_hash(src, dst, sport, dport, PROTO_NUMBERS[proto])
    slot = h % fe.maglev_size
    fallback: tuple[int, BackendRow] | None = None
    for i in range(TERMINATING_PROBES):
        ident = table[slot]
        be = node.backend(ident)
        if be is not None:
            if be.takes_new_flows:
                step("maglev", f"hash {h:#010x} % {fe.maglev_size} = slot {slot} -> backend {ident}"
                     + (f" (after {i} terminating or not ready)" if i else ""), slot=slot, hash=h)
                return result("dnat", "maglev", be, ident)
            if fallback is None and not be.not_ready:
                fallback = (ident, be)
        slot = 0 if slot + 1 == fe.maglev_size else slot + 1
    if fallback is not None:
        step("maglev", f"every probed slot is terminating: backend {fallback[0]} (terminating fallback)")
        return result("dnat", "maglev (terminating fallback)", fallback[1], fallback[0])
    step("maglev", "the table names a missing backend: dropped")
    return result("drop", "no_backend")


def _ct_brief(e: CtEntry) -> dict:
    return {"backend_id": e.backend_id, "backend": e.backend, "flags": e.flag_names, "age_s": round(e.age_s, 3)}


# ---- drift: desired state against the maps ---------------------------------------------------------

def drift(desired, node: NodeMaps, fes: list[FrontendRow] | None = None,
          backends: dict[int, BackendRow] | None = None, problems=()) -> list[dict]:
    """Differences between an LBState (what the control plane wants) and the maps: frontends missing
    or unexpected, and frontends whose service, flags or backend set differ. [] = no drift.
    `fes` and `backends`, when given, are the maps' contents just read (saves reading them again).
    `problems`: validation problems of the listed objects; a frontend in the maps of a Service
    whose current version is invalid is the last good version the agent keeps, and is said so."""
    from ebpfsvc.datapath.pinned import parse_service_name
    from ebpfsvc.datapath.writer import service_name

    invalid = {(p.namespace, p.name): p for p in problems if p.kind == "Service"}

    fes = node.frontends() if fes is None else fes
    node.prefetch_maglev(fes)
    have = {(f.address, f.port, f.proto, f.scope): f for f in fes}
    backends = node.backends() if backends is None else backends
    out: list[dict] = []
    want_keys = set()
    for key, fe in desired.frontends.items():
        k = (str(key.address), key.port, key.protocol.value, "internal" if int(key.scope) else "external")
        want_keys.add(k)
        want_keys.add((k[0], 0, k[2], k[3]))          # its address marker
        name = f"{address_port_name(k[0], k[1], k[2])} ({k[3]})"
        got = have.get(k)
        if got is None:
            out.append({"frontend": name, "service": str(fe.service), "problem": "missing from the maps"})
            continue
        problems = []
        if got.service != service_name(fe.service):
            problems.append(f"service {got.service!r}, want {service_name(fe.service)!r}")
        if got.affinity_timeout != fe.affinity_timeout:
            problems.append(f"affinity timeout {got.affinity_timeout}, want {fe.affinity_timeout}")
        if got.algorithm != fe.algorithm.value:
            problems.append(f"algorithm {got.algorithm}, want {fe.algorithm.value}")
        if bool(got.flags & abi.LB_SVC_F_LOCAL_ONLY) != fe.local_only:
            problems.append(f"local-only {bool(got.flags & abi.LB_SVC_F_LOCAL_ONLY)}, want {fe.local_only}")
        if got.kind != fe.kind.value:
            problems.append(f"kind {got.kind}, want {fe.kind.value}")
        unique = {b.name: b for b in fe.backends}
        want = {b.name for b in table_backends(unique.values())}
        table_ids = set(node.maglev_table(got)) if got.maglev_size else set()
        have_names = {backends[i].name if i in backends else f"<missing id {i}>" for i in table_ids}
        if have_names != want:
            problems.append(f"backends: missing {sorted(want - have_names)}, unexpected {sorted(have_names - want)}")
        if got.backend_count != len(want):
            problems.append(f"backend count {got.backend_count}, want {len(want)}")
        if problems:
            out.append({"frontend": name, "service": str(fe.service), "problem": "; ".join(problems)})
    kept = {}
    for k, f in have.items():
        spn = parse_service_name(f.service) if k not in want_keys else None
        bad = invalid.get((spn.namespace, spn.name)) if spn is not None else None
        if bad is not None:
            kept[k] = bad
            want_keys.add((k[0], 0, k[2], k[3]))      # its address marker goes with it
    for k, f in have.items():
        if k not in want_keys or k in kept:
            bad = kept.get(k)
            problem = (f"kept in the maps: the Service's current version is invalid "
                       f"({bad.field + ': ' if bad.field else ''}{bad.message}); the agent keeps its last good "
                       f"version" if bad is not None else "in the maps, not desired")
            out.append({"frontend": f"{k[0]}:{k[1]}/{k[2]} ({k[3]})", "service": f.service, "problem": problem})
    return sorted(out, key=lambda d: d["frontend"])


