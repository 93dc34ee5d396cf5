"""The OpenAPI 3.1 description of the gateway's own endpoints, made from the code so it cannot drift.

The operations are the routes the `/_gateway` router serves (every path and method, its path parameters,
admin or not) and forward-auth's `/_gateway/auth`; the bodies with a typed shape are the TypedDicts their
code builds or reads (`CheckQuestion`, `CheckAnswer`, `SettleQuestion`, `SettleAnswer`, `Problem`), turned
into JSON Schema by pydantic. The other bodies are described as JSON objects.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

from pydantic import TypeAdapter
from starlette.routing import BaseRoute, Route

from gateway import __version__
from gateway.check import CheckAnswer, SettleAnswer
from gateway.check_http import CheckQuestion, SettleQuestion
from gateway.forward_auth import PATH as AUTH_PATH
from gateway.problems import PROBLEM_JSON, Problem
from gateway.web import links

__all__ = ["document"]

_REF = "#/components/schemas/{model}"
_SCHEMAS: tuple[Any, ...] = (Problem, CheckQuestion, CheckAnswer, SettleQuestion, SettleAnswer)
# Bodies with a shape of their own, by (method, path); the rest are JSON objects.
_BODIES = {
    ("post", "/_gateway/check"): ("CheckQuestion", "CheckAnswer"),
    ("post", "/_gateway/settle"): ("SettleQuestion", "SettleAnswer"),
}
_SECURITY = {
    "adminToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_ADMIN_TOKEN, or a named one of GATEWAY_ADMIN_TOKENS"},
    "apiKey": {"type": "http", "scheme": "bearer", "description": "A customer's API key (gw_...)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Api-Key", "description": "A customer's API key (gw_...)"},
    "metricsToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_METRICS_TOKEN (the admin token also works)"},
}
_CUSTOMER: list[dict[str, list[str]]] = [{"apiKey": []}, {"apiKeyHeader": []}]
_BY_CUSTOMER = frozenset({"/_gateway/usage", "/_gateway/check", "/_gateway/settle"})
_FORWARD_AUTH_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")  # any: all OpenAPI has
_EDGE_HEADERS = ("X-Original-Method", "X-Original-URI", "X-Forwarded-Method", "X-Forwarded-Uri")
_DESCRIPTION = "The gateway's own endpoints under /_gateway: the admin API, check and settle, the customer's usage, forward-auth."
_MEDIA = {"/_gateway/pricing": "text/html", "/_gateway/metrics": "text/plain"}  # the rest answer JSON
_PUBLIC = frozenset({"/_gateway/health", "/_gateway/pricing", "/_gateway/stripe/webhook"})
# The customer's usage pages answer HTML whatever happens (a person reads them), and are opened by a signed
# link (its fields in the query) or the customer's key; their POSTs are the page's own forms.
_PAGE = links.ACCOUNT_PAGE


def document(routes: Iterable[BaseRoute], admin_paths: Collection[str]) -> dict[str, Any]:
    """The OpenAPI document of `routes` (the `/_gateway` router's), `admin_paths` needing the admin token."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            verb = method.lower()
            paths.setdefault(route.path, {})[verb] = _operation(verb, route, route.path in admin_paths)
    for path in (AUTH_PATH.decode(), AUTH_PATH.decode() + "/{path}"):
        paths[path] = {verb: _forward_auth(verb, path) for verb in _FORWARD_AUTH_METHODS}
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway", "version": __version__, "description": _DESCRIPTION},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": _schemas(), "securitySchemes": _SECURITY},
    }


def _operation(verb: str, route: Route, admin: bool) -> dict[str, Any]:
    path = route.path
    operation: dict[str, Any] = {"operationId": _operation_id(verb, path), "summary": f"{verb.upper()} {path}"}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in route.param_convertors]
    if (verb, path) in _BODIES:
        parameters.append({"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255},
                           "description": "A retry with the same key within 24 h answers the first answer and takes nothing more"})  # fmt: skip
    if parameters:
        operation["parameters"] = parameters
    if admin:
        operation["security"] = [{"adminToken": []}]
    elif path in _BY_CUSTOMER:
        operation["security"] = [{"adminToken": []}, *_CUSTOMER] if path != "/_gateway/usage" else _CUSTOMER
    elif path == "/_gateway/metrics":
        operation["security"] = [{"metricsToken": []}, {"adminToken": []}]
    elif path in _PUBLIC:
        operation["security"] = []
    if path == _PAGE or path.startswith(_PAGE + "/"):
        return _page(verb, path, operation)
    question, answer = _BODIES.get((verb, path), (None, None))
    if question is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(question)}}}
    elif verb in ("post", "put"):
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
    answered = _ref(answer) if answer is not None else {}
    operation["responses"] = {
        "2XX": {"description": "Done", "content": {_MEDIA.get(path, "application/json"): {"schema": answered}}},
        "default": _problem("A refusal or an error"),
    }
    return operation


def _page(verb: str, path: str, operation: dict[str, Any]) -> dict[str, Any]:
    operation["parameters"] = [{"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                                "description": "the signed link's"} for name in links.FIELDS]  # fmt: skip
    operation["security"] = [*_CUSTOMER, {}]  # the key, or the link in the query
    if verb == "post":
        form = {"type": "object", "additionalProperties": {"type": "string"}}
        operation["requestBody"] = {"required": False, "content": {"application/x-www-form-urlencoded": {"schema": form}}}
    html = {"text/html": {"schema": {"type": "string"}}}
    operation["responses"] = {
        "2XX": {"description": "The page", "content": html},
        "3XX": {"description": "On to Stripe (Checkout or the billing portal)"},
        "default": {"description": "A page saying what is wrong (a link expired or altered, no key)", "content": html},
    }
    return operation


def _forward_auth(verb: str, path: str) -> dict[str, Any]:
    parameters = [{"name": name, "in": "header", "required": False, "schema": {"type": "string"}} for name in _EDGE_HEADERS]
    if path.endswith("}"):
        parameters.insert(0, {"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
                              "description": "Envoy's: the request to decide, after its path_prefix"})  # fmt: skip
    identity = {name: {"schema": {"type": "string"}} for name in ("X-Billable-Id", "X-Plan")}
    admitted = {"description": "Admitted: copy the identity upstream, the quota headers to the client", "headers": identity}
    return {
        "operationId": _operation_id(verb, path),
        "summary": "Decide the request an edge proxy names, forwarding nothing",
        "parameters": parameters,
        "security": [*_CUSTOMER, {}],  # the key, or the trusted header; a public route needs neither
        "responses": {"200": admitted, "default": _problem("The denial the request would get")},
    }


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": _ref("Problem")}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _operation_id(verb: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path.removeprefix("/_gateway"))
    return "_".join([verb, *words]) if words else verb


def _schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for typed in _SCHEMAS:
        schema = TypeAdapter(typed).json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        out[typed.__name__] = schema
    return dict(sorted(out.items()))
