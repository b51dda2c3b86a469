"""The kernel datapath from Python: compile and load (loader), attach to TC
(tc) and uplinks (uplink), keep the maps equal to the desired state (writer), run
programs on test packets (testrun), remove what the agent left (cleanup). The
kernel interfaces have one home each: bpf(2) in bpfsys, network namespaces in
nsenter, netlink through pyroute2 entered there.

    from ebpfsvc.datapath import load, MapWriter, tc
    dp = load(pin_dir)
    nodeaddrs.write(dp.maps, nodeaddrs.NodeAddrs(hairpin4="198.18.0.1"))    # the node's addresses: a map
    MapWriter(dp.maps).apply(state)
    tc.attach(ifindex, dp.programs["from_pod"].fd, "from_pod", tc.INGRESS, netns="node1")
    tc.attach(ifindex, dp.programs["to_pod"].fd, "to_pod", tc.EGRESS, netns="node1")
"""

from ebpfsvc.datapath.loader import Datapath, Limits, load, unpin
from ebpfsvc.datapath.writer import ApplyStats, MapWriter

__all__ = ["Datapath", "Limits", "load", "unpin", "ApplyStats", "MapWriter"]
