"""kube-proxy's iptables and nftables modes as benchmark baselines, generated from an LBState.

The benchmark compares ebpfsvc with what a cluster would otherwise run, so the
baselines are not hand-written rule sets: they are rendered from the same
LBState the eBPF datapath serves, laid out as kube-proxy lays them out (same
chains, maps, hashes, probabilities and masquerade marks), and loaded with the
same tools (iptables-restore, nft -f).

    names        kube-proxy's chain / map naming and hashing
    serviceports LBState (per frontend) -> per service port, as kube-proxy walks it
    iptables     iptables-restore payload (iptables mode)
    nftables     nft script (nftables mode)
    synthetic    N real services over a pool of real backends
    load         loading either into a lab namespace, timed
"""

from ebpfsvc.bench.baselines.iptables import iptables_restore_payload
from ebpfsvc.bench.baselines.nftables import nft_script
from ebpfsvc.bench.baselines.synthetic import synthetic_state

__all__ = ["iptables_restore_payload", "nft_script", "synthetic_state"]
