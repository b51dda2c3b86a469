"""Where Kubernetes objects come from: the API server (kube.py) or a manifest directory (manifests.py)."""
