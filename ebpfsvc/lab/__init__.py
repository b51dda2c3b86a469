"""A Kubernetes cluster's data plane on one machine, in network namespaces (docs/lab.md).

`Lab` is the Python API; `ebpfsvc lab ...` (cli.py) the command line.

`Lab` is imported when first named, not with the package: the lab's small helpers run as
`python -m ebpfsvc.lab.<helper>` in pods, many times per test, and must not pay for the
Kubernetes client that `Lab` imports (half a second each).
"""

__all__ = ["Lab", "LabError"]


def __getattr__(name: str):
    if name in __all__:
        from ebpfsvc.lab import lab

        return getattr(lab, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
