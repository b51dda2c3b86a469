"""ebpfsvc: an eBPF Kubernetes Service data plane that replaces kube-proxy."""

__version__ = "0.1.0"
