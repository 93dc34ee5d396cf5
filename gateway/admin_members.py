"""The admin API of members (gateway.members): a billable's parent, a team's and a key's own terms.

Every change is in the record first and audited; every gateway process decides with it within
gateway.members.TTL_S (a key's change is announced on the revocation feed, so its next use reads it)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.catalog import Catalog
from gateway.errors import RedisUnavailable
from gateway.identity import KeyStore
from gateway.ids import billable as billable_id
from gateway.members import key_member, parent_of, set_parent, set_terms
from gateway.problems import bad_request, json_body, problem
from gateway.store.db import Database
from gateway.terms import MemberTerms, validate

Audit = Callable[[Request, str, str | None, Any, Any], Awaitable[None]]
Endpoint = Callable[[Request], Awaitable[Response]]


class MemberAdmin:
    def __init__(self, db: Database | None, keys: KeyStore | None, catalog: Callable[[], Catalog], clock: Callable[[], float], audit: Audit) -> None:
        self.db = db
        self.keys = keys
        self.catalog = catalog
        self.clock = clock
        self.audit = audit

    def org_only(self, endpoint: Endpoint) -> Endpoint:
        """An endpoint that changes a billable's own plan, credits, limits or overrides: refused (409) for a
        member, which decides with its org's (its own state would count for nothing)."""

        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            billable = request.path_params["billable"]
            found = await parent_of(self.db, billable) if self.db is not None and request.method != "GET" else None
            if found is not None:
                return problem(409, "urn:gateway:member", "Member",
                               f"{billable} is a member of {found[0]}: its plan, credits, limits and overrides are "
                               f"{found[0]}'s. Give it terms of its own with PUT /_gateway/admin/billables/{billable}/terms.")  # fmt: skip
            return await endpoint(request)

        return guarded

    async def parent(self, request: Request) -> Response:
        """PUT {"parent": "org_1"}: the billable becomes a team of its org (two levels at most: org → team
        → key); DELETE: a billable of its own again. Answers {"billable", "parent"}."""
        if self.db is None:
            return _no_record()
        billable = billable_id(request.path_params["billable"], "billable")
        parent: str | None = None
        if request.method == "PUT":
            body = await json_body(request)
            if isinstance(body, JSONResponse):
                return body
            parent = billable_id(body.get("parent"), "parent")
        before = await parent_of(self.db, billable)
        await set_parent(self.db, billable, parent)
        await self.audit(request, "parent.set" if parent else "parent.remove", billable,
                         {"parent": before[0]} if before else None, {"parent": parent} if parent else None)  # fmt: skip
        return JSONResponse({"billable": billable, "parent": parent})

    async def team_terms(self, request: Request) -> Response:
        """PUT: a team's own terms (rate_limit, credits, credits_per, limits, disallows, expires_at), counted
        beside its org's; DELETE removes them. Answers {"billable", "parent", "terms"}."""
        if self.db is None:
            return _no_record()
        billable = billable_id(request.path_params["billable"], "billable")
        terms = await self._terms(request)
        if isinstance(terms, Response):
            return terms
        before = await parent_of(self.db, billable)
        await set_terms(self.db, billable, terms)
        await self.audit(request, "terms.set" if terms else "terms.remove", billable,
                         _shown(before[1]) if before else None, _shown(terms))  # fmt: skip
        return JSONResponse({"billable": billable, "parent": before[0] if before else None, "terms": _shown(terms)})

    async def key_terms(self, request: Request) -> Response:
        """PUT: a key's own terms: its budget beside its owner's (and the org's); DELETE removes them.
        Answers {"id", "billable", "terms"}."""
        if self.db is None or self.keys is None:
            return _no_record()
        key_id = request.path_params["key_id"]
        owner = await self.keys.owner(key_id)
        if owner is None or owner[1]:
            return problem(404, "urn:gateway:not-found", "Not found", "No such API key (or it is revoked).")
        terms = await self._terms(request)
        if isinstance(terms, Response):
            return terms
        return await self.put_key_terms(request, key_id, owner[0], terms)

    async def put_key_terms(self, request: Request, key_id: str, owner: str, terms: MemberTerms | None, status: int = 200) -> Response:
        assert self.db is not None and self.keys is not None
        member = key_member(key_id)
        before = await parent_of(self.db, member)
        await set_terms(self.db, member, terms, parent=owner)
        await self.audit(request, "key.terms", owner, {"id": key_id, "terms": _shown(before[1]) if before else None},
                         {"id": key_id, "terms": _shown(terms)})  # fmt: skip
        try:
            await self.keys.refresh(key_id)
        except RedisUnavailable as exc:
            detail = f"{exc} The terms are in the record; other gateway processes may use the old ones for a few minutes: put them again."
            return problem(503, "urn:gateway:unavailable", "Service unavailable", detail)
        return JSONResponse({"id": key_id, "billable": owner, "terms": _shown(terms)}, status_code=status)

    async def _terms(self, request: Request) -> MemberTerms | Response | None:
        if request.method == "DELETE":
            return None
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        if not body:
            return bad_request('Send the terms: {"credits": 500, "rate_limit": "2/second"} (DELETE removes them).')
        return validate(body, self.catalog(), self.clock())


def _shown(terms: MemberTerms | None) -> dict[str, Any] | None:
    return terms.shown() if terms is not None else None


def _no_record() -> Response:
    return problem(503, "urn:gateway:unavailable", "Service unavailable", "No record: members and their terms are kept in it.")
