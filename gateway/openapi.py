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

from gateway import __version__, admin_bodies
from gateway.admin_bodies import RECORDABLE
from gateway.catalog import Catalog
from gateway.check import METHODS as CHECKED_METHODS
from gateway.check import CheckAnswer, SettleAnswer
from gateway.check_http import CheckQuestion, SettleQuestion
from gateway.forward_auth import METHOD, SOURCES
from gateway.forward_auth import PATH as AUTH_PATH
from gateway.identity import ID_LENGTH
from gateway.ids import BillableId
from gateway.overrides import Overrides
from gateway.paths import RAW_PATH, SEGMENT_TEXT
from gateway.problems import PROBLEM_JSON, Problem
from gateway.terms import MemberTerms
from gateway.usage import PERIOD
from gateway.web import links

__all__ = ["document"]

_REF = "#/components/schemas/{model}"
_QUESTIONS: tuple[Any, ...] = (
    CheckQuestion, SettleQuestion, admin_bodies.KeyQuestion, admin_bodies.PlanQuestion, admin_bodies.GrantQuestion,
    admin_bodies.LimitQuestion, admin_bodies.SuspensionQuestion, admin_bodies.AutoRechargeQuestion,
    admin_bodies.AccountLinkQuestion, admin_bodies.ParentQuestion, MemberTerms, Overrides,
)  # fmt: skip
_SCHEMAS: tuple[Any, ...] = (Problem, CheckAnswer, SettleAnswer, *_QUESTIONS)
_BILLABLE = "/_gateway/admin/billables/{billable}"
# Bodies with a shape of their own, by (method, path): (question, answer); the rest are JSON objects.
_BODIES: dict[tuple[str, str], tuple[str | None, str | None]] = {
    ("post", "/_gateway/check"): ("CheckQuestion", "CheckAnswer"),
    ("post", "/_gateway/settle"): ("SettleQuestion", "SettleAnswer"),
    ("post", "/_gateway/admin/keys"): ("KeyQuestion", None),
    ("put", f"{_BILLABLE}/plan"): ("PlanQuestion", None),
    ("post", f"{_BILLABLE}/credits"): ("GrantQuestion", None),
    ("put", f"{_BILLABLE}/limits/{{limit}}"): ("LimitQuestion", None),
    ("put", f"{_BILLABLE}/suspension"): ("SuspensionQuestion", None),
    ("put", f"{_BILLABLE}/auto-recharge"): ("AutoRechargeQuestion", None),
    ("post", f"{_BILLABLE}/account-link"): ("AccountLinkQuestion", None),
    ("put", f"{_BILLABLE}/parent"): ("ParentQuestion", None),
    ("put", f"{_BILLABLE}/terms"): ("MemberTerms", None),
    ("put", "/_gateway/admin/keys/{key_id}/terms"): ("MemberTerms", None),
    ("put", f"{_BILLABLE}/overrides"): ("Overrides", None),
}
# Any JSON the record can keep (no NUL in a string or a key): what a body's fields beyond its own may be.
_RECORDABLE_JSON = {"anyOf": [
    {"type": "string", "pattern": RECORDABLE}, {"type": ["number", "boolean", "null"]},
    {"type": "array", "items": {"$ref": "#/components/schemas/RecordableJson"}},
    {"type": "object", "propertyNames": {"pattern": RECORDABLE}, "additionalProperties": {"$ref": "#/components/schemas/RecordableJson"}},
]}  # fmt: skip
_BILLABLE_SCHEMA = TypeAdapter(BillableId).json_schema()
_NAME = "^[A-Za-z0-9_.~-]+$"  # a name in a path segment as sent, no percent-encoding needed
_QUESTION_REQUIRED = {typed.__name__: TypeAdapter(typed).json_schema().get("required") for typed in _QUESTIONS}
_SECURITY = {
    "adminToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_ADMIN_TOKEN, or a named one of GATEWAY_ADMIN_TOKENS"},
    "apiKey": {"type": "http", "scheme": "bearer", "description": "A customer's API key (gw_...)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Api-Key", "description": "A customer's API key (gw_...)"},
    "metricsToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_METRICS_TOKEN (the admin token also works)"},
}
_CUSTOMER: list[dict[str, list[str]]] = [{"apiKey": []}, {"apiKeyHeader": []}]
_BY_CUSTOMER = frozenset({"/_gateway/usage", "/_gateway/check", "/_gateway/settle"})
_FORWARD_AUTH_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")  # any: all OpenAPI has
# A request the edge names: a method, and a path the canonical-path rules take, with its query.
_EDGE_METHOD = {"type": "string", "pattern": f"^{METHOD}$"}
_QUERY = "(?:\\?[\\x20-\\x7e]*)?"
_EDGE_URI = {"type": "string", "pattern": f"^{RAW_PATH}{_QUERY}$"}
_NOTHING: dict[str, Any] = {"not": {}}  # a name the catalog has none of
_DESCRIPTION = "The gateway's own endpoints under /_gateway: the admin API, check and settle, the customer's usage, forward-auth."
_MEDIA = {"/_gateway/pricing": "text/html", "/_gateway/metrics": "text/plain"}  # the rest answer JSON
_PUBLIC = frozenset({"/_gateway/health", "/_gateway/pricing", "/_gateway/stripe/webhook"})
# The customer's usage pages answer HTML whatever happens (a person reads them), and are opened by a signed
# link (its fields in the query) or the customer's key; their POSTs are the page's own forms.
_PAGE = links.ACCOUNT_PAGE


def document(routes: Iterable[BaseRoute], admin_paths: Collection[str], catalog: Catalog) -> dict[str, Any]:
    """The OpenAPI document of `routes` (the `/_gateway` router's), `admin_paths` needing the admin token; the
    names a request may use (plans, limits) are the running `catalog`'s."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            verb = method.lower()
            paths.setdefault(route.path, {})[verb] = _operation(verb, route, route.path in admin_paths, catalog)
    for path in (AUTH_PATH.decode(), AUTH_PATH.decode() + "/{path}"):
        paths[path] = {verb: _forward_auth(verb, path) for verb in _FORWARD_AUTH_METHODS}
    return {
        "openapi": "3.1.0",
        "info": {"title": "gateway", "version": __version__, "description": _DESCRIPTION},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": _schemas(catalog), "securitySchemes": _SECURITY},
    }


def _operation(verb: str, route: Route, admin: bool, catalog: Catalog) -> dict[str, Any]:
    path = route.path
    operation: dict[str, Any] = {"operationId": _operation_id(verb, path), "summary": f"{verb.upper()} {path}"}
    parameters = [{"name": name, "in": "path", "required": True, "schema": _path_schema(name, path, catalog)}
                  for name in route.param_convertors]  # fmt: skip
    parameters += _query(path, catalog)
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
    if question is not None:  # an empty body is {}: required when the question has a required field
        needed = bool(_QUESTION_REQUIRED.get(question))
        operation["requestBody"] = {"required": needed, "content": {"application/json": {"schema": _ref(question)}}}
    elif (verb, path) == ("post", "/_gateway/admin/catalog"):
        toml = {"type": "string", "description": "A plans.toml, checked by the catalog's own rules"}
        operation["requestBody"] = {"required": True, "content": {"text/plain": {"schema": toml}}}
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
    """Envoy names the request by the path after /_gateway/auth; the others by one header pair. OpenAPI cannot
    say "one of two pairs", so the document declares the first (Traefik's, Caddy's) and names nginx's."""
    if path.endswith("}"):
        parameters = [{"name": "path", "in": "path", "required": True, "schema": {"type": "string", "pattern": f"^{SEGMENT_TEXT}$"},
                       "description": "Envoy's: the request to decide, after its path_prefix (asked with its own method)"}]  # fmt: skip
    else:
        (method, uri), (nginx_method, nginx_uri) = SOURCES
        parameters = [
            {"name": method, "in": "header", "required": True, "schema": _EDGE_METHOD,
             "description": f"The method of the request to decide ({nginx_method} in its place: nginx auth_request)"},
            {"name": uri, "in": "header", "required": True, "schema": _EDGE_URI,
             "description": f"Its path and query ({nginx_uri} in its place: nginx auth_request)"},
        ]  # fmt: skip
    identity = {name: {"schema": {"type": "string"}} for name in ("X-Billable-Id", "X-Plan")}
    admitted = {"description": "Admitted: copy the identity upstream, the quota headers to the client", "headers": identity}
    return {
        "operationId": _operation_id(verb, path),
        "summary": "Decide the request an edge proxy names, forwarding nothing",
        "parameters": parameters,
        "security": [*_CUSTOMER, {}],  # the key, or the trusted header; a public route needs neither
        "responses": {"200": admitted, "default": _problem("The denial the request would get")},
    }


def _path_schema(name: str, path: str, catalog: Catalog) -> dict[str, Any]:
    """A path parameter's values: a billable id, a key id, a limit of the catalog (a cap's count is set, a
    per-period allowance reset)."""
    if name == "billable":
        return _BILLABLE_SCHEMA
    if name == "key_id":
        return {"type": "string", "pattern": f"^[A-Za-z0-9]{{{ID_LENGTH}}}$"}
    if name == "limit":
        caps = sorted(n for n, kind in catalog.limit_kinds.items() if kind.per is None)
        if path.endswith("/reset"):  # an allowance; a name the catalog lacks is a 404, a cap's a 400
            named: dict[str, Any] = {"type": "string", "pattern": _NAME}
            return {**named, "not": {"enum": caps}} if caps else named
        return {"type": "string", "enum": caps} if caps else {"type": "string"}
    return {"type": "string"}


def _query(path: str, catalog: Catalog) -> list[dict[str, Any]]:
    """The query parameters an admin endpoint reads."""
    if path == f"{_BILLABLE}/overage":
        return [{"name": "plan", "in": "query", "required": True, "schema": {"type": "string", "enum": list(catalog.plans)},
                 "description": "the plan to compare with"}]  # fmt: skip
    if path == f"{_BILLABLE}/usage":
        month = {"type": "string", "anyOf": [{"maxLength": 0}, {"pattern": PERIOD.pattern}]}
        return [{"name": "period", "in": "query", "required": False, "schema": month,
                 "description": "YYYY-MM (empty or left out: this month)"}]  # fmt: skip
    if path == "/_gateway/admin/audit":
        since = {"type": "string", "anyOf": [{"maxLength": 0}, {"format": "date-time"}]}
        return [{"name": "billable", "in": "query", "required": False, "schema": {"type": "string", "anyOf": [{"maxLength": 0}, _BILLABLE_SCHEMA]}},
                {"name": "since", "in": "query", "required": False, "schema": since,
                 "description": "an ISO 8601 time (empty or left out: from the start)"}]  # fmt: skip
    return []


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": _ref("Problem")}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _operation_id(verb: str, path: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", path.removeprefix("/_gateway"))
    return "_".join([verb, *words]) if words else verb


def _schemas(catalog: Catalog) -> dict[str, Any]:
    out: dict[str, Any] = {"RecordableJson": _RECORDABLE_JSON}
    for typed in _SCHEMAS:
        schema = TypeAdapter(typed).json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        if typed in _QUESTIONS and "additionalProperties" not in schema:  # beyond its fields: what the record keeps
            schema |= {"propertyNames": {"pattern": RECORDABLE}, "additionalProperties": _ref("RecordableJson")}
        out[typed.__name__] = schema
    out["PlanQuestion"]["properties"]["plan"]["enum"] = list(catalog.plans)
    _ask_one(out["CheckQuestion"], catalog)
    for terms in (out["MemberTerms"], out["Overrides"]):  # names the running catalog has; at least one term
        _named(terms, catalog)
    return dict(sorted(out.items()))


def _named(terms: dict[str, Any], catalog: Catalog) -> None:
    fields, features = terms["properties"], sorted(catalog.feature_names)
    fields["limits"]["propertyNames"] = {"enum": sorted(catalog.limit_kinds)}
    for listed in ("allows", "disallows"):
        if listed in fields:
            fields[listed]["items"] = {"type": "string", "enum": features} if features else _NOTHING
    terms["minProperties"] = 1


def _ask_one(question: dict[str, Any], catalog: Catalog) -> None:
    """A check names exactly one of a route, a feature, a limit or an operation, each one the running catalog
    has (gateway/check.py's rules); an operation priced from the request needs its units."""
    names = {"feature": sorted(catalog.feature_names), "limit": sorted(catalog.limit_kinds), "operation": sorted(catalog.operations)}
    fields = question["properties"]
    methods = "|".join("".join(f"[{c}{c.lower()}]" for c in method) for method in CHECKED_METHODS)
    fields["route"] = {"type": "string", "pattern": f"^(?:{methods}) /{SEGMENT_TEXT}(?:/{SEGMENT_TEXT})*{_QUERY}$",
                       "description": 'The request to decide, as "METHOD /path"'}  # fmt: skip
    fields["route"] = {"anyOf": [fields["route"], {"type": "null"}]}
    for name, known in names.items():
        fields[name] = {"anyOf": [{"type": "string", "enum": known}, {"type": "null"}]} if known else {"type": "null"}
    asked = ("route", *(name for name, known in names.items() if known))
    question["oneOf"] = [{"required": [name], "properties": {name: {"type": "string"}}} for name in asked]  # null: not named
    priced = sorted(name for name, spend in catalog.operations.items() if spend.units_source is not None and not spend.metered)
    if priced:
        question["allOf"] = [{"if": {"properties": {"operation": {"enum": priced}}, "required": ["operation"]}, "then": {"required": ["units"]}}]
