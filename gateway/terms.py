"""A member's own terms (a team's, a key's), decided with its org's plan in the same script (gateway.budgets).

    terms = validate(body, catalog)     the body, by the catalog's own models: InvalidTerms names every
                                        problem's place (terms.limits.exports.to)
    terms.to_json(), MemberTerms.from_json(text)

A member only narrows what its org's plan gives: a rate limit, credits per period and limits of its own
(each counted at its level besides the org's), features taken away, and an expiry after which the member
is refused. It never adds a feature or a limit the plan lacks: there is no `allows`, and a limit counts only
on the routes that already count it under the plan."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from pydantic import Field, ValidationError, field_validator

from gateway.catalog import Catalog, RateLimit, RateLimitSetting, nearest, problems_of
from gateway.errors import BadRequest, Problem
from gateway.overrides import KeptTerms, TermsModel, Whole
from gateway.periods import Period, parse_period

PLACE = "terms"


class InvalidTerms(BadRequest):
    """A member's terms that break the catalog's rules; `problems` lists each with its place."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"The terms do not apply ({count}); nothing changed: " + "; ".join(map(str, problems)))


def _period(value: str | None) -> str | None:
    if value is not None:
        parse_period(value)
    return value


class MemberLimit(TermsModel):
    to: Whole
    per: str | None = None  # None: a persistent cap

    @field_validator("per")
    @classmethod
    def _per(cls, value: str | None) -> str | None:
        return _period(value)

    @cached_property
    def period(self) -> Period | None:
        return parse_period(self.per) if self.per else None


class MemberTerms(KeptTerms):
    rate_limit: RateLimitSetting = None
    credits: Whole | None = None
    credits_per: str = "month"
    limits: dict[str, MemberLimit] = Field(default_factory=dict)
    disallows: tuple[str, ...] = ()

    @field_validator("credits_per")
    @classmethod
    def _credits_per(cls, value: str) -> str:
        _period(value)
        return value

    @cached_property
    def rate(self) -> RateLimit | None:
        return RateLimit.parse("rate", self.rate_limit) if self.rate_limit is not None else None

    @cached_property
    def credit_period(self) -> Period:
        return parse_period(self.credits_per)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at.timestamp() <= now

    def shown(self) -> dict[str, Any]:
        """As the admin API shows them."""
        out = self.model_dump(mode="json", exclude_defaults=True)
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out


def validate(body: Any, catalog: Catalog, now: float) -> MemberTerms:
    """The body as MemberTerms, checked against the catalog; InvalidTerms with every problem at its place."""
    if not isinstance(body, dict):
        raise InvalidTerms([Problem(PLACE, 'send a JSON object: {"credits": 500, "rate_limit": "2/second", "limits": {...}}')])
    problems: list[Problem] = []
    if "allows" in body:
        problems.append(Problem(f"{PLACE}.allows", "a member never gets more than its org's plan: take features away with disallows"))
        body = {k: v for k, v in body.items() if k != "allows"}
    terms: MemberTerms | None = None
    try:
        terms = MemberTerms.model_validate(body)
    except ValidationError as exc:
        problems += [Problem(f"{PLACE}.{p.place}" if p.place else PLACE, p.message) for p in problems_of(exc, MemberTerms)]
    limits = body.get("limits")
    for name in limits if isinstance(limits, dict) else ():
        if name not in catalog.limit_kinds:
            problems.append(Problem(f"{PLACE}.limits.{name}", _unknown("limit", name, catalog.limit_kinds)))
    listed = body.get("disallows")
    for i, feature in enumerate(listed if isinstance(listed, list) else ()):
        if isinstance(feature, str) and feature not in catalog.feature_names:
            problems.append(Problem(f"{PLACE}.disallows[{i}]", _unknown("feature", feature, catalog.feature_names)))
    if terms is not None and terms.expired(now):
        problems.append(Problem(f"{PLACE}.expires_at", f"{terms.shown()['expires_at']} is in the past: give a time to come"))
    if problems:
        raise InvalidTerms(list(dict.fromkeys(problems)))
    assert terms is not None
    return terms


def _unknown(what: str, name: str, known: Any) -> str:
    near = nearest(name, known)
    hint = f'did you mean "{near}"?' if near else f"plans.toml has {', '.join(sorted(known)) or 'none'}"
    return f'unknown {what} "{name}": {hint}'
