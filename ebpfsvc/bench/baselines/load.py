"""Loading a baseline into a lab namespace, timed, and clearing it again.

The tools are the ones kube-proxy uses: `iptables-restore` (the nf_tables
backend Debian and most distributions ship, or the legacy xtables one) and
`nft -f`.  Only ever run inside a namespace the caller created: the child
process enters it before exec (nsenter.preexec), so the root namespace's
firewall is never touched.

Timing is the wall-clock time of the whole tool run, parsing included, since
that is what a kube-proxy sync pays too.
"""

from __future__ import annotations

import subprocess
import time

from ebpfsvc.bench.baselines.iptables import iptables_restore_payload
from ebpfsvc.bench.baselines.nftables import nft_script
from ebpfsvc.datapath import nsenter
from ebpfsvc.lbmodel import LBState

IPTABLES_RESTORE = {"nft": "iptables-nft-restore", "legacy": "iptables-legacy-restore"}
_EMPTY_TABLES = "*filter\nCOMMIT\n*nat\nCOMMIT\n"


class LoadError(RuntimeError):
    """The tool refused the rules; the message carries its stderr."""


def _run(netns: str, argv: list[str], stdin: str, timeout: float) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, text=True, capture_output=True, timeout=timeout,
                          preexec_fn=nsenter.preexec(netns))
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise LoadError(f"{' '.join(argv)} in {netns} failed ({proc.returncode}): {proc.stderr.strip()[:2000]}")
    return elapsed


def load_iptables(netns: str, payload: str, *, variant: str = "nft", timeout: float = 900) -> float:
    """Replace the filter and nat tables of `netns` with `payload`; return the seconds it took."""
    return _run(netns, [IPTABLES_RESTORE[variant]], payload, timeout)


def load_nft(netns: str, script: str, *, timeout: float = 900) -> float:
    """Run `script` as one nft transaction in `netns`; return the seconds it took."""
    return _run(netns, ["nft", "-f", "-"], script, timeout)


def clear(netns: str, *, timeout: float = 300) -> None:
    """Remove every baseline from `netns`: nftables (iptables-nft lives there too) and legacy xtables.

    Legacy tables are only emptied if they exist: touching them creates them,
    and an xtables table, even empty, stays hooked into the namespace (only a
    new namespace gets rid of it), which would tax every later measurement.
    """
    _run(netns, ["nft", "flush", "ruleset"], "", timeout)
    legacy = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, timeout=timeout,
                            preexec_fn=nsenter.preexec(netns))
    if legacy.stdout.strip():
        _run(netns, [IPTABLES_RESTORE["legacy"]], _EMPTY_TABLES, timeout)


# The baselines a benchmark can name, and how each is rendered and loaded.
KINDS = ("iptables", "iptables-legacy", "nftables")


def load_baseline(netns: str, kind: str, state: LBState, **render) -> dict:
    """Render `state` as baseline `kind` and load it into `netns` (replacing what that tool holds there).

    Returns the seconds spent rendering (Python, ours) and loading (the tool's
    run, what kube-proxy's sync pays), and the payload size.  `render` goes to
    the renderer (cluster_cidr, node_addresses, masquerade_all).
    """
    start = time.perf_counter()
    if kind == "nftables":
        text = nft_script(state, replace=True, **render)
    elif kind in ("iptables", "iptables-legacy"):
        text = iptables_restore_payload(state, **render)
    else:
        raise ValueError(f"unknown baseline {kind!r}; one of {', '.join(KINDS)}")
    rendered = time.perf_counter() - start
    if kind == "nftables":
        seconds = load_nft(netns, text)
    else:
        seconds = load_iptables(netns, text, variant="legacy" if kind == "iptables-legacy" else "nft")
    return {"baseline": kind, "services": len(state.frontends), "render_seconds": rendered,
            "load_seconds": seconds, "payload_bytes": len(text), "payload_lines": text.count("\n")}
