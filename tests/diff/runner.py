"""Differential run: the same packets through the real pod-side programs (BPF_PROG_TEST_RUN) and
through the reference model (tests/diff/model.py), compared packet by packet: verdict, output
bytes, and the conntrack / affinity / fragment entries the packet touched (every map compared
whole at the end of each epoch).

Used by tests/diff/test_differential.py (a short run in the bpf tier) and by `make fuzz`
(`python -m tests.diff.runner --packets 1000000`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ebpfsvc import abi
from ebpfsvc.datapath import batch, loader, nodeaddrs, stats
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.datapath.writer import MapWriter
from ebpfsvc.lbmodel import (
    Algorithm, Backend, Frontend, FrontendKey, LBState, Protocol, ServicePortName,
)

from . import model as M
from .generator import Generator

HAIRPIN = "198.18.0.1"
# Flows per epoch stay far below the LRU sizes, so no entry is ever evicted behind the model's back.
# Lifetimes far above the seconds a run takes, so that only the runner's time jumps age entries
# (a slow run on a busy machine must not see a closed flow expire behind the model's back); each
# jump expires some states and not others (TCP closing 1 jump, UDP 2, SYN and SCTP 3, UDP stream 5,
# half-closed 10, established 87).
LIMITS = loader.Limits(
    frontends=1024, services=1024, backends=1024, maglev_slots=1 << 16,
    ct_entries=65536, affinity_entries=16384, frag_entries=16384, snat_entries=4096, source_ranges=256,
    ct_tcp_close_s=600, ct_udp_s=1200, ct_tcp_syn_s=2400, ct_other_s=2400, ct_udp_stream_s=4800,
    ct_tcp_close_wait_s=9600, ct_tcp_established_s=86400,
)
JUMP_S = 1000         # one time jump (Runner.time_passes)
TIME_JUMP = 0.0008    # chance, per packet, of a time jump
CHURN = 0.002         # chance, per packet, that a backend changes first (Runner.churn)
EPOCH = 4000          # packets between map resets (both sides start again from empty flow maps)


def _be(addr, port, proto=Protocol.TCP, **kw):
    return Backend(ipaddress.IPv4Address(addr), port, proto, **kw)


def _fe(vip, port, backends, proto=Protocol.TCP, name="web", **kw):
    return Frontend(key=FrontendKey(ipaddress.IPv4Address(vip), port, proto),
                    service=ServicePortName("default", name, "", proto), backends=tuple(backends), **kw)


def scenario() -> LBState:
    """The Services the run is against: every kind of frontend the pod hook serves."""
    U = Protocol.UDP
    b3 = ["198.18.2.1", "198.18.2.2", "198.18.2.3"]
    return LBState.of([
        _fe("198.19.0.10", 80, [_be(a, 8080) for a in b3], name="web"),
        _fe("198.19.0.10", 53, [_be(a, 5353, U) for a in b3[:2]], proto=U, name="dns"),
        _fe("198.19.0.11", 80, [_be(a, 8081) for a in b3], name="rnd", algorithm=Algorithm.RANDOM),
        _fe("198.19.0.11", 53, [_be(a, 5354, U) for a in b3], proto=U, name="rndu", algorithm=Algorithm.RANDOM),
        _fe("198.19.0.12", 443, [_be(a, 8443) for a in b3] + [_be("198.18.2.4", 8443)],
            name="sticky", affinity_timeout=10800),
        _fe("198.19.0.12", 53, [_be(a, 53, U) for a in b3], proto=U, name="stickyu", affinity_timeout=10800),
        _fe("198.19.0.13", 80, [], name="empty"),
        _fe("198.19.0.13", 53, [], proto=U, name="emptyu"),
        _fe("198.19.0.14", 80, [], name="local", local_only=True),
        _fe("198.19.0.16", 3868, [_be(a, 13868, Protocol.SCTP) for a in b3[:2]] + [_be("198.18.2.4", 3868, Protocol.SCTP)],
            proto=Protocol.SCTP, name="diameter"),
        _fe("198.19.0.13", 3868, [], proto=Protocol.SCTP, name="emptys"),
        _fe("198.19.0.15", 80, [_be("198.18.2.1", 8080), _be("198.18.2.5", 8080, terminating=True),
                                _be("198.18.2.6", 8080, not_ready=True)], name="drain"),
    ])


# ---------------------------------------------------------------- reading the real maps

def _a(v: int) -> bytes:
    return struct.pack("=I", v)


def _p(v: int) -> int:
    return int.from_bytes(struct.pack("=H", v), "big")


def read_config(dp) -> tuple[dict, dict, dict, set]:
    frontends = {}
    for k, v in dp.maps["lb4_frontends"].items():
        frontends[(_a(k.address), _p(k.port), k.proto, k.scope)] = M.Service(
            v.service_id, v.frontend_id, v.maglev_offset, v.maglev_size, v.backend_count,
            v.affinity_timeout, v.flags)
    backends = {k.value: M.BackendEntry(_a(v.address), _p(v.port), v.proto, v.flags)
                for k, v in dp.maps["lb4_backends"].items()}
    maglev = {}
    high = max((svc.maglev_offset + svc.maglev_size for svc in frontends.values()), default=0)
    slots = batch.read_slots(dp.maps["lb_maglev"], high).tolist()
    for svc in frontends.values():
        for slot in range(svc.maglev_offset, svc.maglev_offset + svc.maglev_size):
            maglev[slot] = slots[slot]
    members = {(k.backend_id, k.frontend_id) for k in dp.maps["lb4_affinity_match"].keys()}
    return frontends, backends, maglev, members


def _ct_key(t, k: tuple):
    key = t.Key()
    key.saddr, key.daddr = struct.unpack("=I", k[0])[0], struct.unpack("=I", k[1])[0]
    key.sport, key.dport = struct.unpack("=H", k[2].to_bytes(2, "big"))[0], \
        struct.unpack("=H", k[3].to_bytes(2, "big"))[0]
    key.proto, key.dir, key.pad0 = k[4], k[5], 0
    return key


def _flow(v) -> M.Flow:
    return M.Flow(v.backend_id, v.service_id, v.frontend_id, _a(v.frontend_addr), _a(v.backend_addr),
                  _p(v.frontend_port), _p(v.backend_port), v.flags)


def real_entry(dp, kind: str, k):
    """The real map's value for the model's key, in the model's terms; None when absent."""
    if kind == "ct":
        t = dp.maps["ct4"]
        v = t.get(_ct_key(t, k))
        return None if v is None else _flow(v)
    if kind == "affinity":
        t = dp.maps["lb4_affinity"]
        key = t.Key()
        key.client_addr, key.service_id = struct.unpack("=I", k[0])[0], k[1]
        v = t.get(key)
        return None if v is None else v.backend_id
    t = dp.maps["frag4"]
    key = t.Key()
    key.saddr, key.daddr = struct.unpack("=I", k[0])[0], struct.unpack("=I", k[1])[0]
    key.id = struct.unpack("=H", k[2].to_bytes(2, "big"))[0]
    key.proto, key.pad0 = k[3], 0
    v = t.get(key)
    return None if v is None else (_p(v.sport), _p(v.dport))


def real_maps(dp) -> tuple[dict, dict, dict]:
    ct = {(_a(k.saddr), _a(k.daddr), _p(k.sport), _p(k.dport), k.proto, k.dir): _flow(v)
          for k, v in dp.maps["ct4"].items()}
    aff = {(_a(k.client_addr), k.service_id): v.backend_id for k, v in dp.maps["lb4_affinity"].items()}
    frag = {(_a(k.saddr), _a(k.daddr), _p(k.id), k.proto): (_p(v.sport), _p(v.dport))
            for k, v in dp.maps["frag4"].items()}
    return ct, aff, frag


def read_model_maps(dp) -> M.Maps:
    """The model's maps, starting from the configuration the writer put in the real ones."""
    frontends, backends, maglev, members = read_config(dp)
    return M.Maps(frontends=frontends, backends=backends, maglev=maglev, members=members)


def lifetimes() -> M.Lifetimes:
    """The model's conntrack and fragment lifetimes: the ones LIMITS gives the kernel."""
    return M.Lifetimes(LIMITS.ct_tcp_syn_s, LIMITS.ct_tcp_established_s, LIMITS.ct_tcp_close_wait_s,
                       LIMITS.ct_tcp_close_s, LIMITS.ct_udp_s, LIMITS.ct_udp_stream_s, LIMITS.ct_other_s,
                       abi.FRAG_TIMEOUT_S, JUMP_S)


# ---------------------------------------------------------------- the run

@dataclass
class Mismatch:
    index: int
    prog: str
    what: str
    packet: bytes
    detail: str

    def __str__(self):
        return f"#{self.index} {self.prog} {self.what}: {self.detail}\n  packet {self.packet.hex()}"


@dataclass
class Result:
    packets: int = 0
    seconds: float = 0.0
    mismatches: list = field(default_factory=list)
    kinds: dict = field(default_factory=dict)       # generator kind -> packets
    verdicts: dict = field(default_factory=dict)    # verdict -> packets
    translated: int = 0                             # packets passed on rewritten (DNAT, reverse NAT, ICMP)

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0


class Runner:
    def __init__(self, dp, hairpin=HAIRPIN):
        self.dp = dp
        self.maps = read_model_maps(dp)
        self.model = M.Model(self.maps, ipaddress.IPv4Address(hairpin).packed, lifetimes())
        self.fds = {name: dp.programs[name].fd for name in ("from_pod", "to_pod")}
        table = dp.maps["lb4_backends"]
        self.original_backends = {k.value: (k, v) for k, v in table.items()}
        matches = dp.maps["lb4_affinity_match"]
        self.original_members = {(k.backend_id, k.frontend_id): (k, v) for k, v in matches.items()}
        self.drops_before = stats.drops(dp.maps)       # counters are never reset: compare the increase

    def churn(self, rng) -> str:
        """Change one backend behind the tables' back, as the moments between the writer's steps
        (and a removed endpoint) look to packets: it turns terminating or not ready, is removed,
        leaves an affinity service while staying in the backends map, or comes back as it was.
        Both sides see the same change."""
        table = self.dp.maps["lb4_backends"]
        bid = sorted(self.original_backends)[int(rng.integers(len(self.original_backends)))]
        key, leaf = self.original_backends[bid]
        action = ["terminating", "not_ready", "removed", "restored", "restored", "left_service"][
            int(rng.integers(6))]
        if action == "left_service":
            # The backend left an affinity service but stays in lb4_backends (another service
            # keeps it): remembered affinity to it must no longer be used.
            pair = sorted(self.original_members)[int(rng.integers(len(self.original_members)))]
            try:
                del self.dp.maps["lb4_affinity_match"][self.original_members[pair][0]]
            except KeyError:
                pass
            self.maps.members.discard(pair)
            return action
        if action == "removed":
            self.put_backend(bid, None)
        else:
            self.put_backend(bid, table.Leaf(leaf.address, leaf.port, leaf.proto, {
                "terminating": M.BE_TERMINATING, "not_ready": M.BE_NOT_READY}.get(action, leaf.flags)))
        self.maps.version += 1
        return action

    def put_backend(self, bid: int, leaf) -> None:
        """Backend `bid` as `leaf` in the kernel's lb4_backends and the model's (None: removed)."""
        key = self.original_backends[bid][0]
        if leaf is None:
            self.dp.maps["lb4_backends"].pop(key, None)
            self.maps.backends.pop(bid, None)
        else:
            self.dp.maps["lb4_backends"][key] = leaf
            self.maps.backends[bid] = M.BackendEntry(_a(leaf.address), _p(leaf.port), leaf.proto, leaf.flags)

    def restore_backends(self):
        matches = self.dp.maps["lb4_affinity_match"]
        for pair, (key, leaf) in self.original_members.items():
            matches[key] = leaf
            self.maps.members.add(pair)
        for bid, (_, leaf) in self.original_backends.items():
            self.put_backend(bid, leaf)
        self.maps.version += 1

    AGED = (("ct4", "last_seen_ns"), ("frag4", "first_seen_ns"))     # (map, its entries' timestamp)

    def time_passes(self):
        """Every conntrack and fragment entry (AGED) gets JUMP_S older, in the kernel (timestamps
        moved back, as tests/bpf/conftest.py's `age`) and in the model."""
        for name, stamp in self.AGED:
            table = self.dp.maps[name]
            for k, v in list(table.items()):
                setattr(v, stamp, (getattr(v, stamp) - JUMP_S * 10**9) % (1 << 64))
                table[k] = v
        self.model.time_passes()

    def reset_flows(self):
        """Both sides start from empty flow maps (an epoch boundary)."""
        for name in ("ct4", "lb4_affinity", "frag4"):
            self.dp.maps[name].clear()
        self.maps.ct.clear()
        self.maps.affinity.clear()
        self.maps.frag.clear()
        self.maps.age.clear()
        self.maps.frag_age.clear()

    def compare_all(self, index: int) -> list[Mismatch]:
        ct, aff, frag = real_maps(self.dp)
        return self.compare_maps(index, (("ct4", ct, self.maps.ct), ("lb4_affinity", aff, self.maps.affinity),
                                         ("frag4", frag, self.maps.frag)))

    def passed_on(self, verdict: int) -> bool:
        """Whether a packet with this verdict leaves the program (its bytes are compared)."""
        return verdict == M.OK

    def compare_maps(self, index: int, maps) -> list[Mismatch]:
        """The drop counters' increase and each (name, kernel's, model's) map, compared whole."""
        out = []
        real_drops = {k: v - self.drops_before[k] for k, v in stats.drops(self.dp.maps).items()
                      if v != self.drops_before[k]}
        if real_drops != self.model.drops:
            out.append(Mismatch(index, "-", "drop counters", b"",
                                f"kernel {sorted(real_drops.items())}, model {sorted(self.model.drops.items())}"))
            self.model.drops = dict(real_drops)        # report a difference once
        for name, real, mine in maps:
            if real != mine:
                extra = {k: real[k] for k in real.keys() - mine.keys()}
                missing = {k: mine[k] for k in mine.keys() - real.keys()}
                diff = {k: (real[k], mine[k]) for k in real.keys() & mine.keys() if real[k] != mine[k]}
                out.append(Mismatch(index, "-", f"map {name}", b"",
                                    f"only in kernel {list(extra.items())[:3]}, only in model "
                                    f"{list(missing.items())[:3]}, differ {list(diff.items())[:3]}"))
        return out

    def one(self, index: int, prog: str, frame: bytes) -> tuple[list[Mismatch], int, bytes]:
        res = prog_test_run(self.fds[prog], frame)
        drawn = {}

        def pick(outcomes):
            # The kernel drew a random slot: its forward conntrack entry says which backend
            # (none: the walk from its slot found no backend, and the packet was dropped).
            p = M.parse(frame)
            k = (p.saddr, p.daddr, p.sport, p.dport, p.proto, M.FWD)
            flow = real_entry(self.dp, "ct", k)
            drawn["bid"], drawn["outcomes"] = (flow.backend_id if flow else None), outcomes
            if drawn["bid"] in outcomes:
                return drawn["bid"]
            return min((o for o in outcomes if o is not None), default=None)

        verdict, data = getattr(self.model, prog)(frame, pick)
        out = []
        if "bid" in drawn and drawn["bid"] not in drawn["outcomes"]:
            out.append(Mismatch(index, prog, "random backend", frame,
                                f"kernel drew backend {drawn['bid']}, not a possible outcome "
                                f"{sorted(drawn['outcomes'], key=str)}"))
        out += self.compare_packet(index, prog, frame, (res.retval, res.data), (verdict, data))
        return out, res.retval, res.data

    def touched_entries(self):
        """(kind, key, model's value, kernel's value) of each flow entry the last packet touched."""
        for kind, key in self.model.touched:
            mine = {"ct": self.maps.ct, "affinity": self.maps.affinity, "frag": self.maps.frag}[kind].get(key)
            yield kind, key, mine, real_entry(self.dp, kind, key)

    def compare_packet(self, index: int, prog: str, frame: bytes, kernel, model) -> list[Mismatch]:
        """One packet's outcome, the kernel's and the model's (verdict, bytes), and the entries it touched."""
        (kverdict, kdata), (verdict, data) = kernel, model
        out = []
        if kverdict != verdict:
            out.append(Mismatch(index, prog, "verdict", frame, f"kernel {kverdict}, model {verdict}"))
        elif verdict != M.SHOT and kdata != data:
            out.append(Mismatch(index, prog, "bytes", frame, f"kernel {kdata.hex()}\n  model  {data.hex()}"))
        for kind, key, mine, real in self.touched_entries():
            if real != mine:
                out.append(Mismatch(index, prog, f"{kind} entry", frame, f"key {key}: kernel {real}, model {mine}"))
        return out


def run(dp, packets: int, seed: int, *, max_mismatches: int = 20, progress=None) -> Result:
    runner = Runner(dp)
    return drive(runner, Generator(seed, runner.maps), packets, CHURN, max_mismatches, progress)


def drive(runner: Runner, gen, packets: int, churn: float, max_mismatches: int, progress) -> Result:
    """`packets` of the generator's packets through the runner's two sides, epoch by epoch, with
    backend churn (chance `churn` per packet) and time jumps; the pod side's and the uplink's run."""
    result = Result()
    t0 = time.monotonic()
    runner.reset_flows()
    for i in range(packets):
        if i and i % EPOCH == 0:
            result.mismatches += runner.compare_all(i)
            runner.reset_flows()
            runner.restore_backends()
            gen.forget_flows()
            if progress:
                progress(i, result, time.monotonic() - t0)
        if gen.rng.random() < churn:
            action = "churn_" + runner.churn(gen.rng)
            result.kinds[action] = result.kinds.get(action, 0) + 1
        if gen.rng.random() < TIME_JUMP:
            runner.time_passes()
            result.kinds["time_jump"] = result.kinds.get("time_jump", 0) + 1
        kind, prog, frame = gen.next()
        result.kinds[kind] = result.kinds.get(kind, 0) + 1
        found, verdict, data = runner.one(i, prog, frame)
        result.verdicts[verdict] = result.verdicts.get(verdict, 0) + 1
        result.translated += runner.passed_on(verdict) and data != frame
        for m in found:
            m.what = f"{m.what} [{kind}]"
        result.mismatches += found
        if len(result.mismatches) >= max_mismatches:
            break
        result.packets = i + 1
    result.mismatches += runner.compare_all(result.packets)
    runner.restore_backends()
    result.seconds = time.monotonic() - t0
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    ap.add_argument("--max-mismatches", type=int, default=20)
    args = ap.parse_args(argv)
    # A run stopped with SIGTERM still removes its pins (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pin = Path("/sys/fs/bpf") / ("esfz" + uuid.uuid4().hex[:6])
    dp = loader.load(pin, limits=LIMITS, cache=False)
    try:
        nodeaddrs.write(dp.maps, nodeaddrs.NodeAddrs(hairpin4=HAIRPIN))
        MapWriter(dp.maps).apply(scenario())
        print(f"differential run: {args.packets:,} packets, seed {args.seed}", flush=True)
        res = run(dp, args.packets, args.seed, max_mismatches=args.max_mismatches, progress=print_progress)
    finally:
        dp.close()
        loader.unpin(pin)
    return report(res, args.seed)


def print_progress(i: int, res: Result, secs: float) -> None:
    if i % 100_000 == 0:
        print(f"  {i:>9,} packets  {i / secs:,.0f} packets/s  {len(res.mismatches)} mismatches", flush=True)


def report(res: Result, seed: int) -> int:
    """A run's summary and mismatches printed; the exit status (1: any mismatch)."""
    print(f"{res.packets:,} packets in {res.seconds:.1f} s ({res.pps:,.0f} packets/s), "
          f"{len(res.mismatches)} mismatches, seed {seed}")
    print(f"translated: {res.translated:,}")
    print("verdicts: " + ", ".join(f"{M_VERDICT.get(k, k)} {v:,}" for k, v in sorted(res.verdicts.items())))
    print("kinds: " + ", ".join(f"{k} {v:,}" for k, v in sorted(res.kinds.items())))
    for m in res.mismatches:
        print(m)
    return 1 if res.mismatches else 0


M_VERDICT = {M.OK: "TC_ACT_OK", M.SHOT: "TC_ACT_SHOT", M.REDIRECT: "TC_ACT_REDIRECT"}

if __name__ == "__main__":
    sys.exit(main())
