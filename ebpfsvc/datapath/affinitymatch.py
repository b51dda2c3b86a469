"""lb4_affinity_match: which backends each sessionAffinity=ClientIP frontend balances to now.

An affinity entry (client, service id) -> backend id outlives the backend's place in the set a
frontend uses: the backend may leave the Service and stay in lb4_backends because another Service
still lists it; or the service's frontends use different sets (a Local traffic policy on one
scope, the terminating fallback), while the entry is shared by all of them. kube-proxy's affinity
lives inside the chain of the set in use (its "recent" checks are in the KUBE-SVC or KUBE-SVL
chain the packet took), so the datapath uses an affinity entry's backend only while (backend id,
frontend id) is in this map (bpf/lib/affinity.h), as Cilium's LB_AFFINITY_MATCH does per service.
The pairs are a frontend's Maglev table's backends (`table_backends`), not every backend it lists.

Kept by MapWriter.apply() after the frontends are written, from the same LBState: a pair is added
once the backend's and frontend's ids exist and removed once the frontend's table no longer holds
the backend. The moment in between errs on the safe side for additions (a new backend's affinity
is not honoured yet: the flow is balanced by the table, which holds the backend); a removal lags
the frontend switch by one batch write.
"""

from __future__ import annotations

from typing import Iterable

from ebpfsvc.datapath.batch import delete_batch, update_batch
from ebpfsvc.lbmodel import Frontend, FrontendKey, LBState, table_backends

Pair = tuple[int, int]      # (backend id, frontend id)


class AffinityMatch:
    def __init__(self, table):
        self.table = table
        self._in_map: set[Pair] = {(k.backend_id, k.frontend_id) for k in table.keys()}
        self._state: LBState | None = None
        self._pairs: dict[FrontendKey, frozenset[Pair]] = {}
        self._refs: dict[Pair, int] = {}

    def sync(self, state: LBState, writer, *, full: bool, delta=None) -> None:
        """Make the map hold the pairs of `state`'s affinity frontends (ids from `writer`)."""
        if full or self._state is None:
            self._pairs, self._refs = {}, {}
            keys: Iterable[FrontendKey] = state.frontends
            touched = set(self._in_map)
        elif state is self._state:
            return
        else:
            if delta is not None and getattr(delta, "base", None) is self._state:
                keys = delta.keys
            else:
                before = self._state.frontends
                keys = [k for k, fe in state.frontends.items() if before.get(k) is not fe]
                keys += before.keys() - state.frontends.keys()
            touched = set()
        for key in keys:
            for pair in self._pairs.pop(key, ()):
                self._refs[pair] -= 1
                if not self._refs[pair]:
                    del self._refs[pair]
                touched.add(pair)
            fe = state.frontends.get(key)
            pairs = _pairs(fe, writer) if fe is not None else frozenset()
            if pairs:
                self._pairs[key] = pairs
                for pair in pairs:
                    self._refs[pair] = self._refs.get(pair, 0) + 1
                    touched.add(pair)
        add = sorted(p for p in touched if p in self._refs and p not in self._in_map)
        drop = sorted(p for p in touched if p not in self._refs and p in self._in_map)
        t = self.table
        update_batch(t, [(t.Key(*p), t.Leaf(1)) for p in add])
        self._in_map.update(add)
        delete_batch(t, [t.Key(*p) for p in drop])
        self._in_map.difference_update(drop)
        self._state = state


def _pairs(fe: Frontend, writer) -> frozenset[Pair]:
    if fe.affinity_timeout <= 0:
        return frozenset()
    fid = writer.frontend_id(fe)
    if fid is None:
        return frozenset()
    ids = (writer.backend_id(b) for b in table_backends(fe.backends))
    return frozenset((bid, fid) for bid in ids if bid is not None)
