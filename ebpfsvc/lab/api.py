"""The lab's client of its real API server: plain dicts in and out, one error type.

Objects go to the API server by server-side apply (what `kubectl apply --server-side`
sends), so the server validates, defaults and allocates (clusterIPs, nodePorts) exactly
as in a cluster, and its refusal comes back as one line: the API's own Status message.
"""

from __future__ import annotations

import json
from typing import Any, Iterable
from urllib.parse import quote

from kubernetes.client.exceptions import ApiException

FIELD_MANAGER = "ebpfsvc-lab"
APPLY_PATCH = "application/apply-patch+yaml"

# kind -> (API group path, resource, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("api/v1", "namespaces", False),
    "Node": ("api/v1", "nodes", False),
    "Pod": ("api/v1", "pods", True),
    "Service": ("api/v1", "services", True),
    "Endpoints": ("api/v1", "endpoints", True),
    "ServiceAccount": ("api/v1", "serviceaccounts", True),
    "ConfigMap": ("api/v1", "configmaps", True),
    "EndpointSlice": ("apis/discovery.k8s.io/v1", "endpointslices", True),
    "ClusterRole": ("apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "ServiceCIDR": ("apis/networking.k8s.io/v1", "servicecidrs", False),
}


class APIError(RuntimeError):
    """The API server refused a request; `status` is its HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def path_of(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    try:
        group, resource, namespaced = RESOURCES[kind]
    except KeyError:
        raise APIError(f"kind {kind!r} is not known to the lab ({', '.join(RESOURCES)}); "
                       f"use kubectl for it") from None
    path = f"/{group}"
    if namespaced and namespace:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{resource}"
    if name:
        path += f"/{quote(name)}"
    if sub:
        path += f"/{sub}"
    return path


class LabAPI:
    def __init__(self, kubeconfig: str):
        from ebpfsvc.sources.kube import load_api_client

        self.client = load_api_client(kubeconfig, in_cluster=False)

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: Iterable[tuple[str, str]] = (), timeout: float = 30.0) -> dict[str, Any]:
        if body is not None and content_type == APPLY_PATCH:
            body = json.dumps(body)    # sent as is (JSON is YAML); dicts go out as JSON by type
        try:
            method, url, headers, body, _ = self.client.param_serialize(
                method, path, query_params=list(query), body=body, auth_settings=["BearerToken"],
                header_params={"Content-Type": content_type, "Accept": "application/json"})
            response = self.client.call_api(method, url, header_params=headers, body=body, _request_timeout=timeout)
            data = response.read()
        except ApiException as exc:
            raise APIError(_status_message(exc.body, exc.status, exc.reason), exc.status or 0) from None
        except OSError as exc:
            raise APIError(f"API server unreachable: {exc}") from None
        except Exception as exc:   # urllib3's errors are not OSErrors
            if type(exc).__module__.startswith("urllib3"):
                raise APIError(f"API server unreachable: {exc}") from None
            raise
        if not 200 <= response.status < 300:
            raise APIError(_status_message(data, response.status, response.reason), response.status)
        try:
            return json.loads(data) if data else {}
        except ValueError:
            return {"raw": data.decode(errors="replace")}   # /readyz and friends answer text

    # -- objects -------------------------------------------------------------------------------

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of one object; returns it as stored."""
        meta = obj.get("metadata") or {}
        path = path_of(obj.get("kind", ""), meta.get("namespace"), meta.get("name"))
        return self.request("PATCH", path, obj, content_type=APPLY_PATCH,
                            # Strict: an unknown field (`port:` for `ports:`) is refused, not dropped.
                            query=[("fieldManager", FIELD_MANAGER), ("force", "true"), ("fieldValidation", "Strict")])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create one object (POST); APIError with status 409 if it exists. Cheaper for the API
        server than an apply (no structured merge against a live object), for creating many."""
        meta = obj.get("metadata") or {}
        return self.request("POST", path_of(obj.get("kind", ""), meta.get("namespace")), obj,
                            query=[("fieldManager", FIELD_MANAGER), ("fieldValidation", "Strict")])

    def create_or_apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create, or apply if it exists already (a rerun over the same names)."""
        try:
            return self.create(obj)
        except APIError as exc:
            if exc.status != 409:
                raise
            return self.apply(obj)

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path_of(kind, namespace, name))
        except APIError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None = None, label_selector: str = "",
             field_selector: str = "") -> list[dict[str, Any]]:
        query = [(k, v) for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v]
        items = self.request("GET", path_of(kind, namespace), query=query).get("items") or []
        kind_api = RESOURCES[kind][0].removeprefix("api/").removeprefix("apis/")
        for item in items:     # list items carry no kind/apiVersion; objects elsewhere do
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", kind_api)
        return items

    def delete(self, kind: str, namespace: str | None, name: str, grace: float | None = None,
               uid: str | None = None) -> bool:
        """Delete; False if it was not there. `uid` guards against deleting a newer namesake."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace is not None:
            body["gracePeriodSeconds"] = int(grace)
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path_of(kind, namespace, name), body)
        except APIError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    def patch_status(self, kind: str, namespace: str | None, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path_of(kind, namespace, name, "status"), {"status": status},
                            content_type="application/merge-patch+json")


def _status_message(body: Any, status: int | None, reason: str | None) -> str:
    """The API's Status message ("Service "x" is invalid: spec.ports[0].port: ..."), else the reason."""
    try:
        return json.loads(body).get("message") or f"HTTP {status} {reason}"
    except (TypeError, ValueError, AttributeError):
        return f"HTTP {status} {reason}"
