"""Inspection of a node's live datapath, read-only: pinned maps (read through
ebpfsvc/datapath/bpfsys.py) decoded into rows (node), turned into what the CLI and the metrics
show (views), drift against the desired state (desired). Removing what the agent left is
ebpfsvc/datapath/cleanup.py."""
