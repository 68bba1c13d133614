"""Apply the project's own deploy/ manifests to the test cluster, as an operator would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.utils import create_from_dict

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "manifests"


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


async def apply(api: ApiClient, *names: str) -> None:
    """Create every object in the named manifest files; existing ones are left as they are."""
    for name in names:
        for doc in load(name):
            try:
                await create_from_dict(api, doc)
            except Exception as exc:  # FailToCreateError wraps the ApiExceptions
                causes = getattr(exc, "api_exceptions", [exc])
                if not all(isinstance(c, ApiException) and c.status == 409 for c in causes):
                    raise
