"""The JSON bodies the admin endpoints read (gateway/admin.py, gateway/web/account.py): each field, its type and
its bounds, as the handlers check them, written once here for the OpenAPI document (gateway/openapi.py turns
these TypedDicts into JSON Schema with pydantic, as it does check's and settle's)."""

from __future__ import annotations

from typing import Annotated, Required

from pydantic import ConfigDict, Field
from typing_extensions import TypedDict

from gateway import ids
from gateway.bounds import MAX_INT
from gateway.web import links

MAX_NAME = 255  # a key's name, an idempotency key: labels, not documents
MAX_REASON = 1000  # a suspension's reason
# The record keeps no NUL (bounds.unrecordable refuses a body with one anywhere, keys included).
RECORDABLE = "^[^\\x00]*$"

Recordable = Annotated[str, Field(pattern=RECORDABLE)]


class KeyQuestion(TypedDict, total=False):
    """`POST /_gateway/admin/keys`."""

    billable: Required[ids.BillableId]
    name: Annotated[str, Field(max_length=MAX_NAME, pattern=RECORDABLE)]


class ParentQuestion(TypedDict):
    """`PUT /_gateway/admin/billables/{billable}/parent`: the org (or team) it is a member of."""

    parent: ids.BillableId


class PlanQuestion(TypedDict):
    """`PUT /_gateway/admin/billables/{billable}/plan` (the plan is one of the running catalog's)."""

    plan: str


class GrantQuestion(TypedDict, total=False):
    """`POST /_gateway/admin/billables/{billable}/credits`: a grant (negative takes back), named for retries."""

    amount: Required[Annotated[int, Field(ge=-MAX_INT, le=MAX_INT, json_schema_extra={"not": {"const": 0}})]]
    # str.isprintable: no control, format, separator (but the space) or unassigned character
    idempotency_key: Required[Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern="^[\\x20-\\x7e]+$")]]
    reason: Recordable


class LimitQuestion(TypedDict):
    """`PUT /_gateway/admin/billables/{billable}/limits/{limit}`: a persistent cap's count."""

    usage: Annotated[int, Field(ge=0, le=MAX_INT)]


class SuspensionQuestion(TypedDict, total=False):
    """`PUT /_gateway/admin/billables/{billable}/suspension`."""

    reason: Annotated[str, Field(max_length=MAX_REASON, pattern=RECORDABLE)]


class AutoRechargeQuestion(TypedDict, total=False):
    """`PUT /_gateway/admin/billables/{billable}/auto-recharge` (enabling needs amount_cents)."""

    __pydantic_config__ = ConfigDict(json_schema_extra={  # type: ignore[misc]
        "if": {"properties": {"enabled": {"const": True}}, "required": ["enabled"]},
        "then": {"required": ["amount_cents"], "properties": {"amount_cents": {"type": "integer"}}},
    })  # fmt: skip
    enabled: Required[bool]
    amount_cents: Annotated[int, Field(ge=1, le=MAX_INT)] | None
    threshold: Annotated[int, Field(ge=0, le=MAX_INT)] | None


class AccountLinkQuestion(TypedDict, total=False):
    """`POST /_gateway/admin/billables/{billable}/account-link`: how long the customer's link works."""

    expires_in: Annotated[int, Field(ge=1, le=links.MAX_EXPIRES_IN)] | None
