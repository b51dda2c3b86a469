"""Inspection of a node's live datapath: pinned maps read by path (bpfmap), decoded into rows
(node), turned into what the CLI and the metrics show (views); drift and cleanup."""
