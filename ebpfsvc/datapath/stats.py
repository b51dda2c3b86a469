"""Read the datapath's per-CPU counters (summed over CPUs) for metrics and the CLI."""

from __future__ import annotations

from typing import Any, Mapping

from ebpfsvc import abi


def drops(maps: Mapping[str, Any]) -> dict[str, int]:
    """Packets dropped, rejected or reset, by reason name (abi.REASONS)."""
    table = maps["lb_drops"]
    return {name: int(sum(table[table.Key(code)])) for code, name in abi.REASONS.items()}


def traffic(maps: Mapping[str, Any], kind: str, ident: int) -> tuple[int, int]:
    """(packets, bytes) of frontend or backend `ident`; kind is "frontend" or "backend"."""
    table = maps[{"frontend": "lb_frontend_stats", "backend": "lb_backend_stats"}[kind]]
    vals = table[table.Key(ident)]
    return int(sum(v.packets for v in vals)), int(sum(v.bytes for v in vals))
