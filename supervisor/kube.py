"""The Kubernetes adapter — the only module that imports ``kubernetes_asyncio``.

Everything the supervisor does to a cluster goes through ``KubeClient``: each request runs
under the one deadline helper and the one retry policy, and the library's exceptions come
out as ``KubeTemporaryError`` (unreachable, 5xx, 409, 429: worth retrying) or
``KubePermanentError`` (any other 4xx) with the original chained as the cause.

Node conditions are written with a strategic-merge patch on ``nodes/{name}/status``: the
API server merges ``status.conditions`` by ``type``, so only the types we send change and
conditions owned by the kubelet, NPD or anyone else are left alone.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from supervisor.errors import KubeError, KubePermanentError, KubeTemporaryError
from supervisor.runtime.deadline import with_deadline
from supervisor.runtime.retry import call_with_retry

T = TypeVar("T")

_TEMPORARY_STATUSES = {409, 429, 500, 502, 503, 504}
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


def _rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeClient:
    """A thin, typed, deadline-bound wrapper over the calls the supervisor makes."""

    def __init__(self, api: client.ApiClient, timeout: float = 10.0) -> None:
        self._api = api
        # Typed as Any on purpose: the package's stubs omit documented keyword arguments
        # such as ``_content_type``; this adapter is where its loose typing stops.
        self._core: Any = client.CoreV1Api(api)
        self.timeout = timeout

    @classmethod
    async def connect(cls, kubeconfig: str = "", timeout: float = 10.0) -> KubeClient:
        """From a kubeconfig file, or the pod's in-cluster ServiceAccount when empty."""
        try:
            if kubeconfig:
                api = await config.new_client_from_config(config_file=kubeconfig)
            else:
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
                api = client.ApiClient(configuration=cfg)
        except (ConfigException, OSError) as exc:
            raise KubePermanentError(f"cannot load Kubernetes client config: {exc}") from exc
        return cls(api, timeout)

    async def close(self) -> None:
        await self._api.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *,
                    retry: bool = True) -> T:
        async def once() -> T:
            try:
                return await with_deadline(f"kubernetes {what}", fn(), self.timeout)
            except ApiException as exc:
                msg = f"kubernetes {what}: {exc.status} {exc.reason}"
                if exc.status in _TEMPORARY_STATUSES:
                    raise KubeTemporaryError(msg, status=exc.status) from exc
                raise KubePermanentError(msg, status=exc.status) from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise KubeTemporaryError(f"kubernetes {what}: {exc!r}") from exc

        if not retry:
            return await once()
        try:
            return await call_with_retry(once)
        except KubeError:
            raise
        except Exception as exc:  # DeadlineExceeded after the last attempt
            raise KubeTemporaryError(f"kubernetes {what}: {exc}") from exc

    # --- nodes ----------------------------------------------------------------------------

    async def read_node(self, name: str) -> dict[str, Any]:
        node = await self._call(f"get node {name}", lambda: self._core.read_node(name))
        result: dict[str, Any] = self._api.sanitize_for_serialization(node)
        return result

    async def node_conditions(self, name: str) -> list[dict[str, Any]]:
        node = await self.read_node(name)
        conditions: list[dict[str, Any]] = node.get("status", {}).get("conditions") or []
        return conditions

    async def patch_node_conditions(self, name: str,
                                    conditions: Sequence[Mapping[str, Any]]) -> None:
        """Strategic-merge our conditions into ``status.conditions`` (merged by ``type``)."""
        body = {"status": {"conditions": [dict(c) for c in conditions]}}
        await self._call(
            f"patch node {name} status",
            lambda: self._core.patch_node_status(name, body, _content_type=STRATEGIC_MERGE),
        )

    @staticmethod
    def condition(ctype: str, status: bool, reason: str, message: str,
                  transition: float, heartbeat: float) -> dict[str, Any]:
        return {
            "type": ctype,
            "status": "True" if status else "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": _rfc3339(transition),
            "lastHeartbeatTime": _rfc3339(heartbeat),
        }

    # --- events ---------------------------------------------------------------------------

    async def node_event(self, node: str, node_uid: str | None, *, warning: bool,
                         reason: str, message: str, component: str, now: float,
                         namespace: str = "default") -> None:
        """Record a core/v1 Event on the Node, as NPD and the kubelet do."""
        stamp = _rfc3339(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{node}.", "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node,
                               **({"uid": node_uid} if node_uid else {})},
            "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component, "host": node},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "reportingComponent": component,
            "reportingInstance": node,
        }
        # Events are best effort and not idempotent: no retry, so a slow API server never
        # turns one transition into several identical events.
        await self._call(f"create event on node {node}",
                         lambda: self._core.create_namespaced_event(namespace, body),
                         retry=False)
