"""A Kubernetes cluster's data plane on one machine, in network namespaces (docs/lab.md).

`Lab` is the Python API; `ebpfsvc lab ...` (cli.py) the command line.
"""

from ebpfsvc.lab.lab import Lab, LabError

__all__ = ["Lab", "LabError"]
