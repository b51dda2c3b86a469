"""Admission: which Services get into the maps, decided in one place, and told.

    DesiredStateBuilder.build() -> DesiredState --Admission.admit()--> Admitted(state, delta) -> MapWriter.apply()

The desired state says what this node should serve; the maps have fixed sizes (the agent's
--max-* flags, datapath/loader.Limits).  When everything fits (the usual case) the desired state
passes through untouched, at the cost of keeping a few running totals up to date with the
frontends that changed.  When it does not, Services are admitted whole, in a deterministic order
that is the same on every node:

  1. Services the maps already serve (they hold ids there), oldest first: an existing Service is
     never evicted for a newer one; if its new version does not fit, its previous version stays;
  2. then new Services, oldest first (creationTimestamp, then namespace/name: Service.seniority).

What is not admitted is reported by name, once per change of reason, as is every Service the
desired state left out for a conflict (two Services claiming one frontend: the oldest wins,
desired.py) or a failure (its frontends could not be computed): a log line, a counter
(ebpfsvc_sync_proxy_rules_services_not_programmed_total{reason}), current gauges per reason and
per map (ebpfsvc_map_pressure{map}: what the desired state needs over what the map holds), the
/healthz body ("notProgrammed"), and the pinned lb_service_status map that `ebpfsvc service list`
reads.  Nothing is retried in a loop: admission runs again when the cluster changes, and at
every periodic resync.  A Service whose writes the kernel refuses (MapWriter.apply(isolate=True):
the others are written, it keeps its last good entries) is told the same way, reason "failure",
with the map named (Admission.written), and counted per map (ebpfsvc_map_write_failures_total);
the agent retries it with back-off (BoundedFrequencyRunner.retry_later).

Last good state across restarts: at start the agent hands admission what the pinned maps hold,
per Service (datapath/pinned.py).  A Service the maps serve whose current version is invalid (the
tracker has a problem for it and no good version) keeps those frontends, reported as "kept", until
it becomes valid or the API says it is gone (then it is no longer listed, and is withdrawn).

The writer writes new entries (ids, a new Maglev table) before it deletes the ones nothing uses
any more, so that no packet sees a half-done change: during one apply, what that apply releases
still counts.  MAGLEV_RESERVE of the slots is kept out of admission for tables being replaced,
and when a sync releases more than the room left (Services deleted while others wait for room),
the waiting Services that would not fit beside what is being released are deferred to the next
sync (Admitted.deferred: the agent asks for it at once), when the room is free.  What a sync
releases is over-estimated (every id and slot of the frontends it removes or changes), so a
deferral costs at most one more sync, never a map write that fails.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Iterable, Mapping

from ebpfsvc import heap, maglev
from ebpfsvc.k8s.fields import Problem
from ebpfsvc.lbmodel import Frontend, FrontendKey, LBState, ServicePortName, backend_rows

log = logging.getLogger(__name__)

ServiceKey = tuple[str, str]
MAGLEV_RESERVE = 0.10           # of lb_maglev's slots, for tables being replaced (see above)

# Reasons a Service is not programmed (metric label values, and lb_service_status codes).
CONFLICT, CAPACITY, FAILURE = "conflict", "capacity", "failure"
KEPT = "kept"       # not a loss: an invalid Service's last good version, from the pinned maps
_DEFERRED = "waits for the next sync"


# What a frontend needs, per resource; the map each resource lives in, and its --max-* flag.
RESOURCES = {
    "frontends": ("lb4_frontends", "--max-frontends"),
    "service_ports": ("lb_service_names", "--max-service-ports"),
    "backends": ("lb4_backends", "--max-backends"),
    "maglev_slots": ("lb_maglev", "--max-maglev-slots"),
    "source_ranges": ("lb4_source_ranges", "--max-source-ranges"),
    "affinity_backends": ("lb4_affinity_match", "--max-affinity-backends"),
}


@dataclass(frozen=True)
class Capacity:
    """How much of each resource admission may hand out (ids start at 1: a map of n has n - 1)."""

    frontends: int
    service_ports: int
    backends: int
    maglev_slots: int
    source_ranges: int
    affinity_backends: int
    maglev_total: int = 0           # every slot of lb_maglev (maglev_slots is the admitted share)

    @classmethod
    def of(cls, limits) -> "Capacity":
        """From datapath/loader.Limits."""
        return cls(frontends=limits.frontends - 1, service_ports=limits.services - 1,
                   backends=limits.backends - 1,
                   maglev_slots=int(limits.maglev_slots * (1 - MAGLEV_RESERVE)),
                   source_ranges=limits.source_ranges, affinity_backends=limits.affinity_matches,
                   maglev_total=limits.maglev_slots)


class _Need:
    """One frontend's needs: counted ones (frontend, slots, ranges) and shared ones (its service
    port and backends are needed once however many frontends list them)."""

    __slots__ = ("fe", "slots", "ranges", "matches", "backends")

    def __init__(self, fe: Frontend):
        self.fe = fe
        # A backend as the writer keys it (address, port, protocol), by its name, which says just
        # that and is already computed (desired state's rows): this runs for every backend of a
        # full sync, and a str keeps its hash.
        rows = backend_rows(fe.backends)
        keys = rows.names               # (distinct: one row per name)
        usable = len(keys) if rows.plain else len(rows.table_rows())
        self.backends = keys
        self.slots = maglev.table_size(usable) if usable else 0
        self.ranges = len(fe.source_ranges)
        self.matches = len(keys) if fe.affinity_timeout > 0 else 0


class _Totals:
    """Running totals of what a set of frontends needs."""

    def __init__(self) -> None:
        self.frontends = self.slots = self.ranges = self.matches = 0
        self.ports: dict[ServicePortName, int] = {}
        self.backends: dict[str, int] = {}     # by Backend.name

    @classmethod
    def of(cls, needs: Iterable[_Need]) -> "_Totals":
        """The totals of `needs`, as add(n, 1) for each would make them: counted in C (a full sync)."""
        needs = list(needs)
        out = cls()
        out.frontends = len(needs)
        out.slots, out.ranges, out.matches = (sum(map(attrgetter(f), needs)) for f in ("slots", "ranges", "matches"))
        out.ports = dict(Counter(n.fe.service for n in needs))
        out.backends = Counter(itertools.chain.from_iterable(n.backends for n in needs))   # (a dict: add uses get)
        return out

    def add(self, n: _Need, sign: int) -> None:
        self.frontends += sign
        self.slots += sign * n.slots
        self.ranges += sign * n.ranges
        self.matches += sign * n.matches
        _count(self.ports, n.fe.service, sign)
        backends = self.backends
        for b in n.backends:
            c = backends.get(b, 0) + sign       # _count, inline: every backend of a full sync
            if c:
                backends[b] = c
            else:
                del backends[b]

    def demand(self) -> dict[str, int]:
        return {"frontends": self.frontends, "service_ports": len(self.ports), "backends": len(self.backends),
                "maglev_slots": self.slots, "source_ranges": self.ranges, "affinity_backends": self.matches}


def _count(d: dict, key, sign: int) -> None:
    n = d.get(key, 0) + sign
    if n:
        d[key] = n
    else:
        del d[key]


@dataclass(frozen=True)
class Admitted:
    state: LBState
    delta: object | None                     # the desired state's LBDelta, for the writer
    not_programmed: Mapping[ServiceKey, tuple[str, str]] = field(default_factory=dict)   # -> (reason, detail)
    demand: Mapping[str, int] = field(default_factory=dict)     # resource -> what the desired state needs
    deferred: bool = False           # some Service waits for slots this apply releases: sync again after it


class Admission:
    """Decides, per sync, which Services of the desired state go into the maps (module docstring)."""

    def __init__(self, capacity: Capacity, status=None):
        self.capacity = capacity
        self.status = status                 # ServiceStatusMap, or None (no pinned status)
        self._needs: dict[FrontendKey, _Need] = {}
        self._totals = _Totals()
        self._seen: LBState | None = None    # the desired state the totals are for
        self._admitted: LBState | None = None
        self.last: Admitted | None = None
        self.reported: dict[ServiceKey, tuple[str, str]] = {}     # what was logged, to log changes only
        self.counts: dict[str, int] = {CONFLICT: 0, CAPACITY: 0, FAILURE: 0}   # not-programmed events
        self.held: dict[ServiceKey, tuple[Frontend, ...]] = {}   # what the pinned maps held at start
        # Services whose map writes the kernel refused at the last apply (MapWriter.apply(isolate=True)),
        # -> detail naming the map; and how many times a write failed, per map.
        self.write_failures: dict[ServiceKey, str] = {}
        self.write_failures_by_map: dict[str, int] = {}

    def hold(self, pinned: Mapping[ServiceKey, tuple[Frontend, ...]]) -> None:
        """What the pinned maps held at start (datapath/pinned.py), per Service."""
        self.held = dict(pinned)

    def admit(self, result, services: Mapping[ServiceKey, object], existing,
              invalid: frozenset[ServiceKey] | set[ServiceKey] = frozenset()) -> Admitted:
        """`result`: a desired.DesiredState; `services`: the snapshot's Services (for their age);
        `existing(spn)`: whether the maps already serve that service port (MapWriter.service_id);
        `invalid`: Services whose current version is invalid (the tracker's problems)."""
        desired = result.state
        kept = self._kept(desired, services, invalid)
        if kept:
            desired = LBState({**{fe.key: fe for fes in kept.values() for fe in fes}, **desired.frontends})
        self._update_totals(desired, result.delta)
        demand = self._totals.demand()
        cap = self.capacity
        releasing = self._releasing(desired, result.delta)
        fits = all(demand[r] <= getattr(cap, r) for r in RESOURCES) and not self._crowded(demand, releasing)
        if fits:
            state, delta, rejected = desired, (result.delta if not kept else None), {}
        else:
            state, rejected = self._choose(desired, services, existing, releasing)
            delta = None                     # the writer finds the difference itself
        # Sync again at once only if this apply really frees something the waiting ones need (else
        # they wait for a change, or the periodic resync: never a loop).
        deferred = (any(detail.startswith(_DEFERRED) for _, detail in rejected.values())
                    and bool(self._releasing(state)))
        out: dict[ServiceKey, tuple[str, str]] = dict(rejected)
        for problem in result.conflicts:
            out.setdefault((problem.namespace, problem.name), (CONFLICT, _detail(problem)))
        for problem in getattr(result, "failures", ()):
            out.setdefault((problem.namespace, problem.name), (FAILURE, _detail(problem)))
        for key, detail in self.write_failures.items():     # until the next apply says otherwise
            if key in services:
                out.setdefault(key, (FAILURE, detail))
        for key in kept:
            out.setdefault(key, (KEPT, "its current version is invalid; the last good version, from the pinned "
                                       "maps, stays in force"))
        self._report(out)
        self._admitted = state
        self.last = Admitted(state, delta, out, demand, deferred)
        return self.last

    def written(self, failed: Mapping[ServiceKey, tuple[str, str]]) -> None:
        """After an apply: the Services whose writes failed (ApplyStats.failed: -> (map, detail)), each
        told once per change of its detail: a log line naming it and the map, the counters (by reason,
        and ebpfsvc_map_write_failures_total by map), /healthz and lb_service_status."""
        now = {key: detail for key, (_, detail) in failed.items()}
        if now == self.write_failures:
            return
        for key, (map_name, detail) in failed.items():
            if map_name and self.write_failures.get(key) != detail:
                self.write_failures_by_map[map_name] = self.write_failures_by_map.get(map_name, 0) + 1
        last = self.last
        if last is None:
            self.write_failures = now
            return
        out = {k: v for k, v in last.not_programmed.items()
               if not (v[0] == FAILURE and self.write_failures.get(k) == v[1])}
        for key, detail in now.items():
            out.setdefault(key, (FAILURE, detail))
        self.write_failures = now
        self._report(out)
        self.last = replace(last, not_programmed=out)

    def _crowded(self, demand: Mapping[str, int], releasing: Mapping[str, int]) -> str:
        """The first resource whose `demand` does not fit beside what this apply releases only at its
        end ("" when all do): ids have no reserve; Maglev slots are bounded by the whole array."""
        cap = self.capacity
        for r, n in releasing.items():
            limit = (cap.maglev_total or float("inf")) if r == "maglev_slots" else getattr(cap, r)
            if n and demand[r] + n > limit:
                return r
        return ""

    def _releasing(self, desired: LBState, delta=None) -> dict[str, int]:
        """What the state applied last holds that this apply frees only at its end: every id and table
        of the frontends it removes or changes (an upper bound)."""
        last = self._admitted
        if last is None or last is desired:
            return {}
        now, before = desired.frontends, last.frontends
        # Usually the last admitted state is the desired state the delta is relative to: look at
        # the frontends it names only.
        keys = delta.keys if delta is not None and getattr(delta, "base", None) is last else before.keys()
        # Frontend ids and Maglev tables of the frontends removed or changed; backend and service
        # port ids only when the desired state no longer has them at all.
        out = {"frontends": 0, "maglev_slots": 0}
        ports, backends = set(), set()
        for key in keys:
            fe = before.get(key)
            if fe is None or now.get(key) is fe:
                continue
            n = _Need(fe)
            out["maglev_slots"] += n.slots
            out["frontends"] += key not in now
            if fe.service not in self._totals.ports:
                ports.add(fe.service)
            backends.update(b for b in n.backends if b not in self._totals.backends)
        out["service_ports"], out["backends"] = len(ports), len(backends)
        return {r: v for r, v in out.items() if v > 0}

    def _kept(self, desired: LBState, services, invalid) -> dict[ServiceKey, tuple[Frontend, ...]]:
        """The held Services still to keep; the others are let go for good (valid again, or gone)."""
        if not self.held:
            return {}
        for key in [k for k in self.held if k in services or k not in invalid]:
            del self.held[key]
        return {key: tuple(fe for fe in fes if fe.key not in desired.frontends) for key, fes in self.held.items()}

    # ---- totals, kept up to date with the frontends that changed ------------------------------

    def _update_totals(self, desired: LBState, delta) -> None:
        if self._seen is not None and desired is self._seen:
            return
        if self._seen is None or delta is None or getattr(delta, "base", None) is not self._seen:
            # Every frontend's needs at a full sync: long-lived objects made in bulk, no cycle
            # collection meanwhile (ebpfsvc.heap; at 100,000 Services the collector's passes over the
            # growing heap cost more than the needs themselves), and the totals counted at once.
            with heap.bulk_for(len(desired.frontends)):
                self._needs = {key: _Need(fe) for key, fe in desired.frontends.items()}
                self._totals = _Totals.of(self._needs.values())
            self._seen = desired
            return
        keys: Iterable[FrontendKey] = delta.keys
        with heap.bulk_for(len(keys)):
            for key in keys:
                old = self._needs.pop(key, None)
                if old is not None:
                    self._totals.add(old, -1)
                fe = desired.frontends.get(key)
                if fe is not None:
                    need = _Need(fe)
                    self._needs[key] = need
                    self._totals.add(need, 1)
        self._seen = desired

    # ---- the slow path: something does not fit ---------------------------------------------------

    def _choose(self, desired: LBState, services, existing, releasing=None) -> tuple[LBState, dict]:
        by_service: dict[ServiceKey, list[Frontend]] = {}
        for fe in desired.frontends.values():
            by_service.setdefault((fe.service.namespace, fe.service.name), []).append(fe)
        previous: dict[ServiceKey, list[Frontend]] = {}
        for fe in (self._admitted.frontends.values() if self._admitted is not None else ()):
            previous.setdefault((fe.service.namespace, fe.service.name), []).append(fe)

        def seniority(key: ServiceKey):
            svc = services.get(key)
            return getattr(svc, "seniority", ("", *key))

        def served(key: ServiceKey) -> bool:
            return any(existing(fe.service) for fe in by_service[key] + previous.get(key, []))

        order = sorted(by_service, key=lambda k: (not served(k), seniority(k)))
        totals, cap = _Totals(), self.capacity
        chosen: dict[FrontendKey, Frontend] = {}
        rejected: dict[ServiceKey, tuple[str, str]] = {}
        for key in order:
            short = self._try(totals, cap, by_service[key], chosen, releasing)
            if not short:
                continue
            old = previous.get(key)
            if old and old != by_service[key] and not self._try(totals, cap, old, chosen, releasing):
                what = short if short.startswith(_DEFERRED) else f"its update does not fit ({short})"
                rejected[key] = (CAPACITY, f"{what}; its previous version stays")
            elif short.startswith(_DEFERRED):
                rejected[key] = (CAPACITY, short)
            else:
                rejected[key] = (CAPACITY, f"does not fit ({short})")
        return LBState(chosen), rejected

    def _try(self, totals: _Totals, cap: Capacity, fes: list[Frontend], chosen: dict, releasing=None) -> str:
        """Add `fes` to `totals` and `chosen` if they fit (""), else leave both alone and say what is short."""
        needs = []
        for fe in fes:
            if fe.key in chosen:
                continue                # an older Service's previous version holds it
            n = self._needs.get(fe.key)
            needs.append(n if n is not None and n.fe is fe else _Need(fe))
        for n in needs:
            totals.add(n, 1)
        demand = totals.demand()
        short = [r for r in RESOURCES if demand[r] > getattr(cap, r)]
        crowded = "" if short else self._crowded(demand, releasing or {})
        if not short and not crowded:
            for n in needs:
                chosen[n.fe.key] = n.fe
            return ""
        for n in needs:
            totals.add(n, -1)
        if not short:
            return (f"{_DEFERRED} ({RESOURCES[crowded][0]}: {releasing[crowded]} {crowded.replace('_', ' ')} are "
                    f"released by this sync)")
        r = short[0]
        return f"{RESOURCES[r][0]}: {getattr(cap, r)} {r.replace('_', ' ')} available, raise {RESOURCES[r][1]}"

    # ---- telling ---------------------------------------------------------------------------------

    def _report(self, now: dict[ServiceKey, tuple[str, str]]) -> None:
        before = self.reported
        if now == before:
            return
        for key in sorted(now):
            if before.get(key) != now[key]:
                reason, detail = now[key]
                if reason == KEPT:
                    log.warning("Service %s/%s: %s", key[0], key[1], detail)
                    continue
                self.counts[reason] += 1
                log.warning("Service %s/%s not programmed (%s): %s", key[0], key[1], reason, detail)
        for key in sorted(before.keys() - now.keys()):
            log.info("Service %s/%s is programmed now", *key)
        self.reported = now
        if self.status is not None:
            try:
                self.status.sync(now)
            except OSError as err:          # inspection only: never worth a failed sync
                log.warning("cannot write lb_service_status: %s", err)

    def details(self) -> dict:
        """For the /healthz body: Services not programmed, by reason, and the maps under pressure."""
        last = self.last
        if last is None:
            return {}
        out: dict = {}
        if last.not_programmed:
            out["notProgrammed"] = {f"{ns}/{name}": f"{reason}: {detail}"
                                    for (ns, name), (reason, detail) in sorted(last.not_programmed.items())}
        pressure = self.pressure()
        full = {m: round(p, 3) for m, p in pressure.items() if p > 0.9}
        if full:
            out["mapPressure"] = full
        return out

    def pressure(self) -> dict[str, float]:
        """Map name -> what the desired state needs / what admission may hand out (> 1: some do not fit)."""
        last = self.last
        if last is None:
            return {}
        return {RESOURCES[r][0]: (last.demand[r] / getattr(self.capacity, r) if getattr(self.capacity, r) else 0.0)
                for r in RESOURCES}

    def collector(self):
        """A prometheus Collector of the counters and gauges above."""
        return _AdmissionCollector(self)


class ServiceStatusMap:
    """The pinned lb_service_status map: "namespace/name" -> (LB_STATUS_*, detail) of every Service
    not programmed, so `ebpfsvc service list` shows them without asking the agent."""

    def __init__(self, table):
        self.table = table
        self._held: dict[bytes, tuple[int, bytes]] = {
            bytes(k.name): (v.reason, bytes(v.detail)) for k, v in table.items()}

    def sync(self, now: Mapping[ServiceKey, tuple[str, str]]) -> None:
        from ebpfsvc import abi

        codes = {CONFLICT: abi.LB_STATUS_CONFLICT, CAPACITY: abi.LB_STATUS_CAPACITY, FAILURE: abi.LB_STATUS_FAILURE,
                 KEPT: abi.LB_STATUS_KEPT}
        want = {_text(f"{ns}/{name}", 127): (codes[reason], _text(detail, 123))
                for (ns, name), (reason, detail) in now.items()}
        t = self.table
        for name, val in want.items():
            if self._held.get(name) != val:
                t[t.Key(name)] = t.Leaf(*val)
        for name in self._held.keys() - want.keys():
            try:
                del t[t.Key(name)]
            except KeyError:
                pass
        self._held = want


def _text(s: str, limit: int) -> bytes:
    """Printable UTF-8, cut to `limit` bytes on a character boundary (lone surrogates escaped)."""
    data = s.encode("utf-8", "backslashreplace")[:limit]
    return data.decode("utf-8", "ignore").encode()


def _detail(problem: Problem) -> str:
    where = f"{problem.field}: " if problem.field else ""
    return where + problem.message


class _AdmissionCollector:
    def __init__(self, admission: Admission):
        self.admission = admission

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        a = self.admission
        total = CounterMetricFamily("ebpfsvc_sync_proxy_rules_services_not_programmed",
                                    "Times a Service was left out of the maps, by reason (conflict: another "
                                    "Service holds its frontend; capacity: the maps are full; failure: its "
                                    "frontends could not be computed, or the kernel refused their writes).",
                                    labels=["reason"])
        current = GaugeMetricFamily("ebpfsvc_services_not_programmed", "Services not in the maps now, by reason.",
                                    labels=["reason"])
        now = list(a.reported.values())
        for reason in (CONFLICT, CAPACITY, FAILURE, KEPT):
            total.add_metric([reason], a.counts.get(reason, 0))
            current.add_metric([reason], sum(1 for r, _ in now if r == reason))
        pressure = GaugeMetricFamily("ebpfsvc_map_pressure", "What the desired state needs of a map over what "
                                     "admission may use of it (above 1: Services are left out).", labels=["map"])
        for name, p in sorted(a.pressure().items()):
            pressure.add_metric([name], p)
        refused = CounterMetricFamily("ebpfsvc_map_write_failures", "Times a Service's writes to a map failed "
                                      "(the kernel refused them, or no id was left), by map; the Service keeps "
                                      "its last good entries and is retried with back-off.", labels=["map"])
        for name, n in sorted(a.write_failures_by_map.items()):
            refused.add_metric([name], n)
        yield from (total, current, pressure, refused)
