"""A billable's own terms on top of its plan (DESIGN §4 "Per-billable terms and operator tools").

    terms = validate(body, catalog, "pro", now)     the PUT body, by the catalog's own models: InvalidOverrides
                                                    names every problem's place (overrides.limits.exports.to)
    terms.to_json(), Overrides.from_json(text)      as the record and the billable's state keep them
    terms.apply(plan, catalog)                      the effective Plan, on top of whichever plan resolution gives
    await record_overrides(db, billable, terms)     the record (the truth: a restore puts them back from it)
    await record_suspension(db, billable, reason)

A limit's numbers change (`to`, `after_limit`, `grace`, `grace_max`, `warn_at`, or `unlimited`), never its
kind or `per`: those mean the same in every plan."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Self, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.catalog import (
    CREDITS,
    AfterLimit,
    Catalog,
    Count,
    Limit,
    Plan,
    RateLimitSetting,
    nearest,
    problems_of,
)
from gateway.errors import InvalidOverrides, Problem
from gateway.store.db import Database, billable_overrides

PLACE = "overrides"
_FIXED = ("per", "kind")  # what an override never changes
M = TypeVar("M", bound=BaseModel)
Whole = Annotated[Count, Field(strict=True)]  # the catalog's bound; a JSON body's 5.0 or "5" is not a count


class TermsModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeptTerms(TermsModel):
    """Terms kept as JSON (in the record and in Redis): an expiry in UTC, and a digest that names them in the
    compiled-spec caches (one entry per distinct terms, not per billable). A billable's overrides, a member's
    terms (gateway.terms)."""

    expires_at: datetime | None = None

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_defaults=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.model_validate_json(text)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]



class LimitTerms(TermsModel):
    to: Whole | None = None
    after_limit: AfterLimit | None = None
    grace: str | None = None
    grace_max: Whole | None = None
    warn_at: tuple[float, ...] | None = None
    unlimited: Annotated[bool, Field(strict=True)] = False

    def changes(self) -> dict[str, Any]:
        """The Limit fields this override replaces."""
        return self.model_dump(exclude_none=True, exclude={"unlimited"})


class Overrides(KeptTerms):
    limits: dict[str, LimitTerms] = Field(default_factory=dict)
    rate_limit: RateLimitSetting = None
    credits: Whole | None = None
    allows: tuple[str, ...] = ()
    disallows: tuple[str, ...] = ()
    reason: str = Field("", max_length=1000)

    # ---- as kept ------------------------------------------------------------------------------------

    def shown(self) -> dict[str, Any]:
        """As the admin API and the status body show them."""
        out = self.model_dump(mode="json", exclude_defaults=True)
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out

    def expires(self) -> float:
        """Unix seconds when these terms end (inf: never)."""
        return self.expires_at.timestamp() if self.expires_at is not None else float("inf")

    # ---- the effective plan -------------------------------------------------------------------------

    def apply(self, plan: Plan, catalog: Catalog) -> Plan:
        """`plan` with these terms in place of its own. A limit the catalog no longer has is skipped (the
        catalog changed since): the rest still applies."""
        limits = dict(plan.limits)
        unlimited = list(plan.unlimited)
        for name, terms in self.limits.items():
            kind = catalog.limit_kinds.get(name)
            if kind is None:
                continue
            if terms.unlimited:
                unlimited.append(name)
                continue
            base = plan.limits.get(name)
            if base is None and terms.to is None:
                continue  # the plan lacks it and the override names no number: it stays closed
            limits[name] = _fresh(_merged(base or kind, terms))
            if terms.to is not None and name in unlimited:
                unlimited.remove(name)
        update: dict[str, Any] = {"limits": limits}
        if self.credits is not None:
            update["credits"] = self.credits
            unlimited = [n for n in unlimited if n != CREDITS]
        if self.rate_limit is not None:
            update["rate_limit"] = self.rate_limit
        if self.allows or self.disallows:
            update["allows"] = tuple(f for f in dict.fromkeys([*plan.allows, *self.allows]) if f not in self.disallows)
            update["disallows"] = tuple(dict.fromkeys([*(f for f in plan.disallows if f not in self.allows), *self.disallows]))
        update["unlimited"] = tuple(dict.fromkeys(unlimited))
        return _fresh(plan.model_copy(update=update))


def _merged(base: Limit, terms: LimitTerms) -> Limit:
    changes = terms.changes()
    if changes.get("after_limit", "grace_then_block") != "grace_then_block":
        changes |= {"grace": None, "grace_max": None}  # the plan's grace goes with its policy
    return base.model_copy(update=changes)


def _fresh(model: M) -> M:
    """A copy's cached properties were computed from the fields before the update: drop them."""
    for name in [n for n in model.__dict__ if isinstance(getattr(type(model), n, None), cached_property)]:
        del model.__dict__[name]
    return model


# ---- validation ---------------------------------------------------------------------------------------


def validate(body: Any, catalog: Catalog, plan_name: str, now: float) -> Overrides:
    """The PUT body as Overrides, checked against the catalog and the billable's plan now; InvalidOverrides
    with every problem at its place otherwise."""
    if not isinstance(body, dict):
        raise InvalidOverrides([Problem(PLACE, 'send a JSON object: {"limits": {"exports": {"to": 50}}, "credits": 5000, ...}')])
    problems: list[Problem] = []
    cleaned = dict(body)
    if isinstance(body.get("limits"), dict):
        cleaned["limits"] = {}
        for name, terms in body["limits"].items():
            if isinstance(terms, dict):
                for key in _FIXED:
                    if key in terms:
                        problems.append(Problem(f"{PLACE}.limits.{name}.{key}", "a limit's kind and per are the same in every plan: "
                                                "an override changes to, after_limit, grace, grace_max, warn_at or unlimited"))  # fmt: skip
                terms = {k: v for k, v in terms.items() if k not in _FIXED}
            cleaned["limits"][name] = terms
    try:
        terms = Overrides.model_validate(cleaned)
    except ValidationError as exc:
        problems += [Problem(f"{PLACE}.{p.place}" if p.place else PLACE, p.message) for p in problems_of(exc, Overrides)]
        problems += _names(catalog, cleaned)
        raise InvalidOverrides(_unique(problems)) from None
    problems += _names(catalog, cleaned)
    problems += _against(terms, catalog, catalog.plans[plan_name], plan_name, now)
    if problems:
        raise InvalidOverrides(_unique(problems))
    return terms


def _names(catalog: Catalog, raw: dict[str, Any]) -> list[Problem]:
    """Limit and feature names the catalog lacks, read from the raw body (it may not have validated)."""
    out = []
    limits = raw.get("limits")
    for name in limits if isinstance(limits, dict) else ():
        if name not in catalog.limit_kinds:
            out.append(Problem(f"{PLACE}.limits.{name}", _unknown("limit", name, catalog.limit_kinds)))
    for key in ("allows", "disallows"):
        listed = raw.get(key)
        for i, feature in enumerate(listed if isinstance(listed, list) else ()):
            if isinstance(feature, str) and feature not in catalog.feature_names:
                out.append(Problem(f"{PLACE}.{key}[{i}]", _unknown("feature", feature, catalog.feature_names)))
    return out


def _unknown(what: str, name: str, known: Any) -> str:
    near = nearest(name, known)
    hint = f'did you mean "{near}"?' if near else f"plans.toml has {', '.join(sorted(known)) or 'none'}"
    return f'unknown {what} "{name}": {hint}'


def _against(terms: Overrides, catalog: Catalog, plan: Plan, plan_name: str, now: float) -> list[Problem]:
    out = []
    for name, limit in terms.limits.items():
        kind = catalog.limit_kinds.get(name)
        if kind is None:
            continue  # _names said so
        place = f"{PLACE}.limits.{name}"
        if limit.unlimited and limit.changes():
            out.append(Problem(place, 'give "unlimited": true or its numbers, not both'))
            continue
        base = plan.limits.get(name)
        if base is None and limit.to is None and not limit.unlimited:
            out.append(Problem(f"{place}.to", f'plan "{plan_name}" has no {name} limit: give its to (or "unlimited": true)'))
            continue
        try:
            Limit.model_validate(_merged(base or kind, limit).model_dump())
        except ValidationError as exc:
            out += [Problem(f"{place}.{p.place}" if p.place else place, p.message) for p in problems_of(exc, Limit)]
    both = set(terms.allows) & set(terms.disallows)
    if both:
        out.append(Problem(f"{PLACE}.disallows", f"{', '.join(sorted(both))} is both allowed and disallowed"))
    if terms.expires_at is not None and terms.expires() <= now:
        out.append(Problem(f"{PLACE}.expires_at", f"{terms.shown()['expires_at']} is in the past: give a time to come"))
    if not (terms.limits or terms.rate_limit is not None or terms.credits is not None or terms.allows or terms.disallows):
        out.append(Problem(PLACE, "no terms to override: give limits, rate_limit, credits, allows or disallows (DELETE removes them)"))
    return out


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


# ---- the record ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kept:
    """What the record keeps of a billable's own terms."""

    overrides: Overrides | None
    suspension: str | None  # the reason, None when not suspended
    suspended_at: datetime | None


def overridden_billables() -> sa.Select[tuple[str]]:
    """The billables the record keeps terms of, as a query to compose."""
    return sa.select(billable_overrides.c.billable)


async def kept(db: Database, billable: str) -> Kept:
    t = billable_overrides.c
    async with db.reader.connect() as conn:
        row = (await conn.execute(sa.select(t.overrides, t.suspension, t.suspended_at).where(t.billable == billable))).first()
    if row is None:
        return Kept(None, None, None)
    return Kept(Overrides.from_json(row.overrides) if row.overrides else None, row.suspension, row.suspended_at)


async def record_overrides(db: Database, billable: str, terms: Overrides | None) -> None:
    """Before Redis sees them: the record is their truth."""
    await _upsert(db, billable, overrides=terms.to_json() if terms else None, expires_at=terms.expires_at if terms else None)


async def record_suspension(db: Database, billable: str, reason: str | None) -> None:
    await _upsert(db, billable, suspension=reason, suspended_at=datetime.now(UTC) if reason is not None else None)


async def _upsert(db: Database, billable: str, **values: Any) -> None:
    t = billable_overrides
    insert = db.insert(t).values(billable=billable, updated_at=datetime.now(UTC), **values)
    upsert = insert.on_conflict_do_update(index_elements=[t.c.billable], set_={k: insert.excluded[k] for k in [*values, "updated_at"]})
    async with db.engine.begin() as conn:
        await conn.execute(upsert)
        # Nothing left to keep: no row (the census counts a billable with a row as one the record knows).
        await conn.execute(t.delete().where(t.c.billable == billable, t.c.overrides.is_(None), t.c.suspension.is_(None)))
