"""A Redis-first rate and quota gateway for APIs sold by plan.

    from gateway import GatewayApp, GatewayMiddleware, Settings

`GatewayApp` is the whole gateway (the record, reconciliation, the admin API, events) around an ASGI app
or in front of an upstream; `GatewayMiddleware` is the decision alone, inside an app.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("gateway")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from gateway.app import GatewayApp
    from gateway.check import CheckResult, HoldNotOpen, SettleResult
    from gateway.middleware import GatewayMiddleware
    from gateway.settings import Settings

# Imported when first named, so that `gateway --version` or `gateway check` load none of the serving code.
_LAZY = {
    "GatewayApp": "gateway.app", "GatewayMiddleware": "gateway.middleware", "Settings": "gateway.settings",
    "CheckResult": "gateway.check", "SettleResult": "gateway.check", "HoldNotOpen": "gateway.check",
}  # fmt: skip

__all__ = ["CheckResult", "GatewayApp", "GatewayMiddleware", "HoldNotOpen", "Settings", "SettleResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
