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
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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

    # --- raw JSON requests (the controller's path) ------------------------------------------
    #
    # The controller handles thousands of objects; the generated models cost CPU and memory
    # for fields it never reads, so it talks JSON through the same authenticated client.

    async def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      retry: bool = True, ok_statuses: frozenset[int] = frozenset()
                      ) -> dict[str, Any]:
        """One API request with JSON in and out. Statuses in ``ok_statuses`` return {}."""
        async def call() -> dict[str, Any]:
            resp = await self._api.call_api(
                path, method, query_params=list((query or {}).items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body, auth_settings=["BearerToken"], _preload_content=False,
                _return_http_data_only=True)
            try:
                data = await resp.read()
                if resp.status in ok_statuses:
                    return {}
                if not 200 <= resp.status < 300:
                    raise ApiException(status=resp.status, reason=_status_reason(data))
                result: dict[str, Any] = json.loads(data) if data else {}
                return result
            finally:
                resp.release()

        return await self._call(f"{method} {path}", call, retry=retry)

    async def watch(self, path: str, resource_version: str, *, selector: str = "",
                    timeout_seconds: int = 300) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Stream (type, object) watch events from ``resource_version``.

        Raises ``KubeTemporaryError`` with status 410 when the version is too old; the
        caller relists. Ends normally when the server closes the watch.
        """
        query = [("watch", "true"), ("resourceVersion", resource_version),
                 ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_seconds))]
        if selector:
            query.append(("labelSelector", selector))
        try:
            resp = await with_deadline(
                f"watch {path}",
                self._api.call_api(path, "GET", query_params=query,
                                   header_params={"Accept": "application/json"},
                                   auth_settings=["BearerToken"], _preload_content=False,
                                   _return_http_data_only=True,
                                   _request_timeout=timeout_seconds + 30),
                self.timeout)
        except (aiohttp.ClientError, OSError) as exc:
            raise KubeTemporaryError(f"watch {path}: {exc!r}") from exc
        try:
            if resp.status != 200:
                data = await resp.read()
                status = resp.status
                if status == 410:
                    raise KubeTemporaryError(f"watch {path}: 410 Gone", status=410)
                raise _classify(status, f"watch {path}: {status} {_status_reason(data)}")
            while True:
                try:
                    line = await resp.content.readline()
                except (aiohttp.ClientError, OSError) as exc:
                    raise KubeTemporaryError(f"watch {path}: {exc!r}") from exc
                if not line:
                    return
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise KubeTemporaryError(f"watch {path}: 410 Gone", status=410)
                    raise KubeTemporaryError(f"watch {path}: {obj.get('message')}", status=code)
                yield event["type"], obj
        finally:
            resp.release()

    # --- authentication -------------------------------------------------------------------

    async def review_token(self, token: str, audiences: Sequence[str] = ()) -> tuple[
            bool, str, dict[str, list[str]]]:
        """TokenReview: (authenticated, username, extra) for a bearer token.

        ``extra`` carries what the token is bound to; for a pod-bound ServiceAccount token
        that includes ``authentication.kubernetes.io/node-name``.
        """
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        result = await self.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                                    body=body)
        status = result.get("status", {})
        user = status.get("user", {})
        extra = {str(k): [str(v) for v in vs] for k, vs in (user.get("extra") or {}).items()}
        return bool(status.get("authenticated")), user.get("username", ""), extra


def _status_reason(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message", ""))[:300]
    except (ValueError, AttributeError):
        return data[:300].decode(errors="replace")


def _classify(status: int, message: str) -> KubeError:
    if status in _TEMPORARY_STATUSES:
        return KubeTemporaryError(message, status=status)
    return KubePermanentError(message, status=status)
