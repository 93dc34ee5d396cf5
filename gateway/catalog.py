"""plans.toml → a validated, immutable Catalog.

Structure is checked by pydantic (unknown keys are errors); the cross-references and lints of
DESIGN §2 run afterwards over the parsed models. Every problem is collected, each with its dotted
place, before one CatalogError is raised, so a user fixes a file in one pass.
"""

from __future__ import annotations

import math
import re
import tomllib
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.bounds import MAX_DEPTH, MAX_INT, toml_too_deep
from gateway.errors import CatalogError, Problem
from gateway.meter import UnitsSource, parse_units_source
from gateway.money import Price, units_within
from gateway.periods import Period, parse_duration, parse_period

AfterLimit = Literal["block_usage", "just_warn", "grace_then_block", "bill"]
OnRedisDown = Literal["open", "closed", "local"]
Enforce = Literal["enforce", "shadow"]
PlanStatus = Literal["active", "archived"]
DEFAULT_WARN_AT = (0.6, 0.8, 0.95)
DEFAULT_GRACE = "7d"
CREDITS = "credits"

_RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

# Every number of the catalog, and of a billable's overrides (checked by these same models): at most 2^53 - 1,
# what the Redis scripts, doubles and JSON clients hold exactly.
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Positive = Annotated[int, Field(gt=0, le=MAX_INT)]
Amount = Annotated[float, Field(ge=0, le=MAX_INT)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogSettings(_Model):
    default_plan: str = "free"
    highlighted_plan: str | None = None
    timezone: str = "UTC"
    upgrade_url: str | None = None
    on_redis_down: OnRedisDown = "open"
    unmatched: Literal["forward", "deny"] = "forward"
    past_due_grace: str = "3d"
    credits_per_dollar: Positive = 100
    currency: str = "usd"
    auto_recharge_max_per_month: Count = 10
    enforce: Enforce = "enforce"
    # How requests reach the gateway: through it (its proxy or middleware), or asked about by an edge
    # proxy at /_gateway/auth (gateway/forward_auth.py), which never shows it the answer.
    mode: Literal["proxy", "forward-auth"] = "proxy"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f'unknown timezone "{value}": use an IANA name such as "UTC" or "Europe/Berlin"')
        return value

    @field_validator("past_due_grace")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @cached_property
    def past_due_grace_seconds(self) -> int:
        return parse_duration(self.past_due_grace)


class PayAsYouGo(_Model):
    """An operation's `metered = { meter, unit_price }`: every unit billed on `meter` (a request, or the units
    its answer reports), invoiced by Stripe at the period's end."""

    meter: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,99}$")]
    unit_price: Price


class Operation(_Model):
    """Something that spends credits: a fixed `cost`, or `per_unit` × units read from the request or answer;
    or that is billed by the unit (`metered`, pay-as-you-go), with or without credits."""

    cost: Count | None = None
    per_unit: Annotated[float, Field(gt=0, le=MAX_INT)] | None = None
    units: str | None = None
    reserve: Count | None = None
    max_units: Positive | None = None
    payg: PayAsYouGo | None = Field(default=None, alias="metered")

    @field_validator("units")
    @classmethod
    def _units_source(cls, value: str | None) -> str | None:
        if value is not None:
            parse_units_source(value)
        return value

    @model_validator(mode="after")
    def _one_pricing(self) -> Operation:
        if self.payg is not None and self.cost is None and self.per_unit is None:
            if self.units is not None and not self.units.startswith("response."):
                raise ValueError('metered units are read from the answer (units = "response.json:PATH" or "response.header:NAME"), '
                                 "or each request is one unit (no units)")  # fmt: skip
            if self.reserve is not None:
                raise ValueError("reserve only applies with per_unit (credits held until the answer)")
            return self
        if self.cost is None and self.per_unit is None:
            raise ValueError('give either cost = N (credits per request) or per_unit = N with units = "..."')
        if self.cost is not None and self.per_unit is not None:
            raise ValueError("give cost or per_unit, not both")
        if self.per_unit is not None and self.units is None:
            raise ValueError('per_unit needs units = "response.json:PATH" (or response.header:, request.json:, request.header:)')
        if self.per_unit is None and (self.units or self.reserve is not None or self.max_units):
            raise ValueError("units, reserve and max_units only apply with per_unit")
        return self

    @cached_property
    def units_source(self) -> UnitsSource | None:
        return parse_units_source(self.units) if self.units else None

    @property
    def metered(self) -> bool:
        """Priced from the upstream's answer: held as a reserve, settled after."""
        return self.units_source is not None and self.units_source.where.startswith("response.")

    @property
    def hold(self) -> int:
        """Credits taken at admission for a metered operation (its reserve, one unit when none is set)."""
        if self.reserve is not None:
            return self.reserve
        return math.ceil(self.per_unit or 0)

    def charged_units(self, units: float) -> float:
        """The units `units` are charged as: within `[0, max_units]` (2^53 - 1 without one)."""
        return min(max(0.0, units), float(MAX_INT if self.max_units is None else self.max_units))

    def price(self, units: float) -> int:
        """Credits for `units`, rounded up and clamped to `[0, max_units]`."""
        return math.ceil(self.charged_units(units) * (self.per_unit or 0) - 1e-9)


class RateLimitTable(_Model):
    limit: Positive
    per: str = "1s"
    burst: Positive | None = None

    @field_validator("per")
    @classmethod
    def _per(cls, value: str) -> str:
        _rate_seconds(value)
        return value


def _rate_seconds(per: str) -> int:
    if per in _RATE_UNITS:
        return _RATE_UNITS[per]
    try:
        return parse_duration(per)
    except ValueError:
        raise ValueError(f'unknown rate period "{per}": use second, minute, hour, day or a duration like "10s"')


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A smooth (GCRA) rate: `limit` requests per `per_seconds`, up to `burst` at once."""

    name: str
    limit: int
    per_seconds: int
    burst: int

    @classmethod
    def parse(cls, name: str, value: str | RateLimitTable) -> RateLimit:
        if isinstance(value, str):
            match = re.fullmatch(r"\s*([0-9]+)\s*/\s*(\w+)\s*", value)
            digits = match[1].lstrip("0") if match else ""
            if match is None or not digits:
                raise ValueError(f'rate limit "{value}" should look like "100/second", "1000/minute" or "10/5s"')
            limit = int(digits) if len(digits) <= 16 else MAX_INT + 1
            if limit > MAX_INT:
                raise ValueError(f'rate limit "{value}" is over {MAX_INT} requests')
            return cls(name, limit, _rate_seconds(match[2]), limit)
        return cls(name, value.limit, _rate_seconds(value.per), value.burst or value.limit)

    @property
    def window(self) -> int:
        """Seconds to refill the whole burst: the `w` of RateLimit-Policy, at least 1."""
        return max(1, math.ceil(self.burst * self.per_seconds / self.limit))


def _valid_rate(value: str | RateLimitTable | None) -> str | RateLimitTable | None:
    if value is not None:
        RateLimit.parse("rate", value)
    return value


# A plan's, a route's or an override's `rate_limit`: "100/minute" or a table, checked the one way.
RateLimitSetting = Annotated[str | RateLimitTable | None, AfterValidator(_valid_rate)]


MeterName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,99}$")]


class Overage(_Model):
    """What a limit with after_limit = "bill" charges past `to`: `unit_price` a unit (the catalog's currency),
    counted on `meter`, at most `max_per_period` a period (then block_usage)."""

    unit_price: Price
    meter: MeterName
    max_per_period: Price | None = None

    @cached_property
    def max_units(self) -> int:
        """The billed units the spend cap allows a period (-1: no cap)."""
        return -1 if self.max_per_period is None else units_within(self.max_per_period, self.unit_price)


class Limit(_Model):
    to: Count
    per: str | None = None
    after_limit: AfterLimit = "block_usage"
    grace: str | None = None
    grace_max: Count | None = None
    warn_at: tuple[float, ...] = DEFAULT_WARN_AT
    overage: Overage | None = None

    @field_validator("per")
    @classmethod
    def _period(cls, value: str | None) -> str | None:
        if value is not None:
            parse_period(value)
        return value

    @field_validator("grace")
    @classmethod
    def _grace(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("warn_at")
    @classmethod
    def _thresholds(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [t for t in value if not 0 < t <= 1]
        if bad:
            raise ValueError(f"thresholds must be in (0, 1], e.g. 0.8 for 80%; got {', '.join(map(str, bad))}")
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _grace_needs_policy(self) -> Limit:
        if self.after_limit != "grace_then_block":
            for key in ("grace", "grace_max"):
                if getattr(self, key) is not None:
                    raise ValueError(f'{key} only applies with after_limit = "grace_then_block"')
        if self.after_limit == "bill":
            if self.overage is None:
                raise ValueError('after_limit = "bill" needs overage = { unit_price = "0.002", meter = "api_requests" }')
            if self.per is None:
                raise ValueError('after_limit = "bill" needs per = "month" (or another period): overage is billed per period')
        elif self.overage is not None:
            raise ValueError('overage only applies with after_limit = "bill"')
        return self

    @cached_property
    def period(self) -> Period | None:
        return parse_period(self.per) if self.per else None

    @cached_property
    def grace_seconds(self) -> int:
        if self.after_limit != "grace_then_block":
            return 0
        return parse_duration(self.grace or DEFAULT_GRACE)

    @property
    def kind(self) -> str:
        return f"per {self.per}" if self.per else "persistent cap"


class StripePrices(_Model):
    month: str | None = None
    year: str | None = None


class Seats(_Model):
    to: Count  # live API keys under a billable and its teams (gateway.seats)


class Plan(_Model):
    name: str | None = None
    description: str | None = None
    price: Amount | None = None
    price_yearly: Amount | None = None
    price_string: str | None = None
    stripe_price: str | StripePrices | None = None
    bullets: tuple[str, ...] = ()
    rate_limit: RateLimitSetting = None
    allows: tuple[str, ...] = ()
    disallows: tuple[str, ...] = ()
    credits: Count | None = None
    credits_per: str = "month"
    rollover: bool = False
    limits: dict[str, Limit] = Field(default_factory=dict)
    unlimited: tuple[str, ...] = ()
    meta: dict[str, Any] = Field(default_factory=dict)
    # Archived: its billables keep its terms; no new assignment, not on the pricing page or in sentences.
    status: PlanStatus = "active"
    enforce: Enforce | None = None
    seats: Seats | None = None  # None: any number of keys

    @field_validator("credits_per")
    @classmethod
    def _period(cls, value: str) -> str:
        parse_period(value)
        return value

    @cached_property
    def rate(self) -> RateLimit | None:
        return RateLimit.parse("rate", self.rate_limit) if self.rate_limit is not None else None

    @cached_property
    def credit_period(self) -> Period:
        return parse_period(self.credits_per)

    @property
    def stripe_price_ids(self) -> tuple[str, ...]:
        if self.stripe_price is None:
            return ()
        if isinstance(self.stripe_price, str):
            return (self.stripe_price,)
        return tuple(p for p in (self.stripe_price.month, self.stripe_price.year) if p)

    @property
    def archived(self) -> bool:
        return self.status == "archived"

    def allows_feature(self, feature: str) -> bool:
        return feature in self.allows

    def is_unlimited(self, name: str) -> bool:
        return name in self.unlimited

    @property
    def sort_price(self) -> float:
        """Order for "the cheapest plan that would admit": unpriced (Contact) plans come last."""
        return self.price if self.price is not None else math.inf


class Pack(_Model):
    name: str | None = None
    credits: Positive
    bonus: Count = 0
    price: Annotated[float, Field(gt=0, le=MAX_INT)] | None = None
    stripe_price: str | None = None

    @model_validator(mode="after")
    def _priced(self) -> Pack:
        if self.price is None and self.stripe_price is None:
            raise ValueError("a pack needs price = N (in the catalog's currency) or stripe_price = \"...\"")
        return self


class RouteConfig(_Model):
    match: str
    features: tuple[str, ...] = ()
    spend: str | None = None
    limit: str | None = None
    cost: Count = 1
    release: str | None = None
    rate_limit: RateLimitSetting = None
    on_redis_down: OnRedisDown | None = None
    public: bool = False
    enforce: Enforce | None = None

    @field_validator("match")
    @classmethod
    def _pattern(cls, value: str) -> str:
        _compile_match(value)
        return value


class Events(_Model):
    webhook_url: str | None = None


class Meter(_Model):
    """A meter billed units are counted on, and the Stripe meter they are sent to (its event_name)."""

    stripe_meter: Annotated[str, Field(min_length=1, max_length=100)]


class CatalogFile(_Model):
    catalog: CatalogSettings = Field(default_factory=lambda: CatalogSettings())
    meters: dict[MeterName, Meter] = Field(default_factory=dict)
    features: dict[str, str] = Field(default_factory=dict)
    operations: dict[str, Operation] = Field(default_factory=dict)
    plans: dict[str, Plan] = Field(default_factory=dict)
    packs: dict[str, Pack] = Field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    events: Events = Field(default_factory=Events)


_HEADER_SAFE = re.compile(r"[\x20-\x7e]+")
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"}


def _compile_match(text: str) -> tuple[str, re.Pattern[str]]:
    parts = text.split()
    if len(parts) != 2 or parts[0].upper() not in _METHODS or not parts[1].startswith("/"):
        raise ValueError(f'route match "{text}" should be "METHOD /path", e.g. "POST /v1/projects" or "* /v1/*"')
    method, path = parts[0].upper(), parts[1].rstrip("/") or "/"
    segments = [s for s in path.split("/") if s]
    pattern = ""
    for i, segment in enumerate(segments):
        if segment == "*" and i == len(segments) - 1:
            pattern += "(?:/[^/]+)*"
        elif re.fullmatch(r"\{\w+\}", segment):
            pattern += "/[^/]+"
        elif "{" in segment or "}" in segment or "*" in segment:
            raise ValueError(
                f'route match "{text}": a segment is literal, {{name}} (one segment) or a final * (any rest)'
            )
        else:
            pattern += "/" + re.escape(segment)
    return method, re.compile((pattern or "") + "/?" if pattern else "/?")


@dataclass(frozen=True)
class Route:
    """A compiled route: what a matching request needs and consumes."""

    index: int
    config: RouteConfig
    method: str
    pattern: re.Pattern[str] = field(repr=False)
    rate: RateLimit | None

    @property
    def match(self) -> str:
        return self.config.match

    def matches(self, method: str, path: str, *, any_case: bool = False) -> bool:
        if self.method != "*" and self.method != method and not (method == "HEAD" and self.method == "GET"):
            return False
        if any_case:
            return self.folded.fullmatch(path) is not None
        return self.pattern.fullmatch(path) is not None

    @cached_property
    def folded(self) -> re.Pattern[str]:
        return re.compile(self.pattern.pattern, re.IGNORECASE)


@dataclass(frozen=True)
class Catalog:
    """The validated catalog: the file's models plus what is derived from them once."""

    file: CatalogFile
    routes: tuple[Route, ...]
    source: str = "plans.toml"
    # What loads but will surprise (a route no plan can afford): printed by `gateway check`, logged at start.
    warnings: tuple[Problem, ...] = ()

    @property
    def settings(self) -> CatalogSettings:
        return self.file.catalog

    @property
    def plans(self) -> dict[str, Plan]:
        return self.file.plans

    @property
    def operations(self) -> dict[str, Operation]:
        return self.file.operations

    @property
    def packs(self) -> dict[str, Pack]:
        return self.file.packs

    @cached_property
    def payg_meters(self) -> dict[str, tuple[Decimal, tuple[str, ...]]]:
        """Each pay-as-you-go meter (sorted): its unit price and the operations billed on it (the lint gives a
        meter one price)."""
        found: dict[str, tuple[Decimal, tuple[str, ...]]] = {}
        for name, op in sorted(self.operations.items()):
            if op.payg is not None:
                price, names = found.get(op.payg.meter, (op.payg.unit_price, ()))
                found[op.payg.meter] = (price, (*names, name))
        return dict(sorted(found.items()))

    @cached_property
    def billed_limits(self) -> tuple[tuple[str, str, Limit], ...]:
        """(plan, limit name, limit) of every limit with after_limit = "bill"."""
        return tuple((p, n, lim) for p, plan in self.plans.items() for n, lim in plan.limits.items() if lim.overage is not None)

    def stripe_meter(self, meter: str) -> str | None:
        """The event_name of the Stripe meter `meter`'s units are sent to (None: no [meters] mapping)."""
        found = self.file.meters.get(meter)
        return found.stripe_meter if found is not None else None

    def unmapped_meters(self) -> list[Problem]:
        """A billed limit or pay-as-you-go operation whose meter has no Stripe meter: with Stripe configured,
        its units could not be sent."""
        used = [(f"plans.{p}.limits.{n}.overage.meter", lim.overage.meter) for p, n, lim in self.billed_limits if lim.overage]
        used += [(f"operations.{n}.metered.meter", op.payg.meter) for n, op in self.operations.items() if op.payg is not None]
        return [Problem(place, f'meter "{meter}" has no Stripe meter: add [meters.{meter}] stripe_meter = "<the event_name of a '
                        'meter in Stripe>"') for place, meter in used if self.stripe_meter(meter) is None]  # fmt: skip

    @cached_property
    def limit_kinds(self) -> dict[str, Limit]:
        """One definition per limit name (the lint guarantees every plan agrees on its kind)."""
        kinds: dict[str, Limit] = {}
        for plan in self.plans.values():
            for name, limit in plan.limits.items():
                kinds.setdefault(name, limit)
        return kinds

    @cached_property
    def feature_names(self) -> frozenset[str]:
        names = set(self.file.features)
        for plan in self.plans.values():
            names.update(plan.allows, plan.disallows)
        return frozenset(names)

    def feature_title(self, feature: str) -> str:
        return self.file.features.get(feature, feature)

    def plan_title(self, plan: str) -> str:
        found = self.plans.get(plan)
        return (found.name if found and found.name else plan.replace("_", " ").title())

    def plans_by_price(self) -> list[str]:
        """The plans on offer (archived ones are not), cheapest first."""
        offered = [name for name, plan in self.plans.items() if not plan.archived]
        return sorted(offered, key=lambda name: self.plans[name].sort_price)

    def enforcement(self, plan: str | Plan, route: Route | None) -> Enforce:
        """Whether denials are enforced or only shadowed: the route's say, else the plan's, else the catalog's.

        `plan` is a name, or the effective plan itself (a per-billable override keeps its plan's say)."""
        if route is not None and route.config.enforce is not None:
            return route.config.enforce
        found = self.plans.get(plan) if isinstance(plan, str) else plan
        if found is not None and found.enforce is not None:
            return found.enforce
        return self.settings.enforce

    def plan_for_price(self, price_id: str) -> str | None:
        for name, plan in self.plans.items():
            if price_id in plan.stripe_price_ids:
                return name
        return None

    def route_for(self, method: str, path: str) -> Route | None:
        """First route matching the decoded path (no query); a trailing slash is ignored."""
        method = method.upper()
        if len(path) > 1:
            path = path.rstrip("/") or "/"
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None

    def case_twin(self, method: str, path: str, matched: Route | None) -> Route | None:
        """A route before `matched` (the path's own) that the path matches only in another case, as `/V1/images`
        matches `POST /v1/images`: an upstream that reads paths in any case would serve it uncharged, so the
        gateway refuses it rather than guess. None for a path whose letters are all lower case (unless routes
        spell theirs in upper case), the common case: one `lower()`."""
        if path.lower() == path and not self._cased_routes:
            return None
        method = method.upper()
        if len(path) > 1:
            path = path.rstrip("/") or "/"
        for route in self.routes[: len(self.routes) if matched is None else matched.index]:
            if route.matches(method, path, any_case=True):
                return route
        return None

    @cached_property
    def _cased_routes(self) -> bool:
        return any(r.match.split()[-1] != r.match.split()[-1].lower() for r in self.routes)


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        message = f"{path} not found: pass --plans PATH or set GATEWAY_PLANS"
    except IsADirectoryError:
        message = f"{path} is a directory: name the catalog file in it, e.g. {path / 'plans.toml'}"
    except PermissionError:
        message = f"{path} cannot be read (permission denied): make it readable or pass another --plans"
    except UnicodeDecodeError as exc:
        message = f"{path} is not UTF-8 text (byte {exc.start} is not): save it as UTF-8"
    except OSError as exc:
        message = f"{path} cannot be read: {exc.strerror or exc}"
    else:
        return parse_catalog(text, str(path))
    raise CatalogError([Problem("", message)], str(path))


def parse_catalog(text: str, source: str = "plans.toml") -> Catalog:
    too_deep = CatalogError([Problem("", f"nested deeper than {MAX_DEPTH} levels (tables, arrays and dotted keys): "
                                         "a catalog needs a handful")], source)  # fmt: skip
    if toml_too_deep(text):
        raise too_deep
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError([Problem("", f"not valid TOML: {exc}")], source)
    except RecursionError:  # only if the count above was fooled: never a crash
        raise too_deep from None
    try:
        parsed = CatalogFile.model_validate(raw)
    except ValidationError as exc:
        # The file's shape is wrong somewhere; the references that can be read still get checked, so
        # one pass lists every problem.
        problems = _pydantic_problems(exc)
        places = {p.place for p in problems}
        problems += [p for p in _reference_lints(raw) if p.place not in places]
        raise CatalogError(problems, source)
    problems = list(_lint(parsed))
    if problems:
        raise CatalogError(problems, source)
    warnings = tuple(_warnings(parsed))
    routes = tuple(
        Route(
            index=i,
            config=route,
            method=_compile_match(route.match)[0],
            pattern=_compile_match(route.match)[1],
            rate=RateLimit.parse(f"rate:{route.match}", route.rate_limit) if route.rate_limit is not None else None,
        )
        for i, route in enumerate(parsed.routes)
    )
    return Catalog(file=parsed, routes=routes, source=source, warnings=warnings)


def _place(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"str", "RateLimitTable", "StripePrices"} or part.startswith(("function-", "literal[")):
            continue  # pydantic's union-member tags are not places in the file
        else:
            out += ("." if out else "") + part
    return out


_TYPE_WORDS = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string in quotes",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list, e.g. [\"a\", \"b\"]",
    "tuple_type": "a list, e.g. [\"a\", \"b\"]",
    "dict_type": "a table",
    "model_type": "a table",
}


def _pydantic_problems(exc: ValidationError, root: type[BaseModel] | None = None) -> list[Problem]:
    """Every problem of a validation, each at its place; `root` is the model validated (the catalog's file
    unless told), whose fields an unknown key is compared with for "did you mean"."""
    problems: dict[str, Problem] = {}
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        kind = error["type"]
        place = _place(loc)
        if kind == "extra_forbidden":
            near = _nearest(str(loc[-1]), _known_keys(loc[:-1], root or CatalogFile))
            hint = f'did you mean "{near}"?' if near else "remove it or check its spelling"
            message = f'unknown key "{loc[-1]}": {hint}'
        elif kind == "missing":
            message = "required: add it"
        elif kind == "literal_error":
            expected = error.get("ctx", {}).get("expected", "")
            message = f"{error['input']!r} is not one of {expected}"
        elif kind in _TYPE_WORDS:
            message = f"expected {_TYPE_WORDS[kind]}, got {error['input']!r}"
        elif kind in {"greater_than", "greater_than_equal", "less_than_equal"}:
            message = f"{error['input']!r} is out of range: {error['msg'].lower()}"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        # A union reports one error per member; the first is the most useful, and one per place is enough.
        problems.setdefault(place + "\0" + message if kind == "extra_forbidden" else place, Problem(place, message))
    # A table given where a string or a table will do, with a problem inside: the problem inside is the one.
    found = list(problems.values())
    inner = {p.place for p in found}
    return [
        p for p in found
        if not (p.message.startswith("expected ") and any(q.startswith((p.place + ".", p.place + "[")) for q in inner))
    ]


def _known_keys(loc: Iterable[int | str], root: type[BaseModel]) -> set[str]:
    """The keys the table at `loc` may hold: its model's fields, found by following `loc` through the types."""
    found: list[Any] = [root]
    for part in loc:
        found = [child for kind in found for child in _step(kind, part)]
    return {name for kind in found if isinstance(kind, type) and issubclass(kind, BaseModel) for name in kind.model_fields}


def _step(kind: Any, part: int | str) -> list[Any]:
    """The types one step of an error's place leads to from `kind` (a field, a table's key, a list's item)."""
    if isinstance(kind, type) and part == kind.__name__:
        return [kind]  # pydantic names the member of a union it tried
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        field_info = kind.model_fields.get(str(part))
        return _members(field_info.annotation) if field_info is not None else []
    if get_origin(kind) in (dict, tuple, list):
        args = [a for a in get_args(kind) if a is not Ellipsis]
        return _members(args[-1]) if args else []
    return []


def _members(kind: Any) -> list[Any]:
    if get_origin(kind) in (Union, types.UnionType):
        return [m for a in get_args(kind) for m in _members(a)]
    return [kind]


def problems_of(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """The problems of validating `root` (a body the catalog's own models check, like a billable's overrides)."""
    return _pydantic_problems(exc, root)


def nearest(word: str, known: Iterable[str]) -> str | None:
    return _nearest(word, known)


def _nearest(word: str, known: Iterable[str]) -> str | None:
    """The known word within two edits of `word` (the closest, then the first in order), for "did you mean"."""
    best: tuple[int, str] | None = None
    for candidate in sorted(known):
        distance = _edits(word, candidate)
        if distance <= 2 and (best is None or distance < best[0]):
            best = (distance, candidate)
    return best[1] if best else None


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _reference_lints(raw: dict[str, Any]) -> Iterable[Problem]:
    """The cross-references of a file that did not validate, read defensively from the raw TOML."""

    def table(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    settings, plans = table(raw.get("catalog")), table(raw.get("plans"))
    for key in ("default_plan", "highlighted_plan"):
        name = settings.get(key, "free" if key == "default_plan" else None)
        if isinstance(name, str) and name not in plans:
            yield Problem(f"catalog.{key}", f'plan "{name}" does not exist')
    limits = {n for p in plans.values() for n in table(table(p).get("limits"))}
    features = set(table(raw.get("features")))
    for p in plans.values():
        for key in ("allows", "disallows"):
            value = table(p).get(key)
            if isinstance(value, list):
                features.update(f for f in value if isinstance(f, str))
    operations = table(raw.get("operations"))
    routes = raw.get("routes")
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        route = table(route)
        if isinstance(route.get("spend"), str) and route["spend"] not in operations:
            yield Problem(f"routes[{i}].spend", f'unknown operation "{route["spend"]}": define [operations.{route["spend"]}]')
        for key in ("limit", "release"):
            if isinstance(route.get(key), str) and route[key] not in limits:
                yield Problem(f"routes[{i}].{key}", f'unknown limit "{route[key]}": no plan defines limits.{route[key]}')
        wanted = route.get("features")
        for j, feature in enumerate(wanted if isinstance(wanted, list) else []):
            if isinstance(feature, str) and feature not in features:
                yield Problem(f"routes[{i}].features[{j}]", f'unknown feature "{feature}": add it to [features] or a plan\'s allows')


def _lint(parsed: CatalogFile) -> Iterable[Problem]:
    settings = parsed.catalog
    plans = parsed.plans
    if not plans:
        yield Problem("plans", "no plans: add at least [plans.free]")
    if settings.default_plan not in plans:
        yield Problem("catalog.default_plan", f'plan "{settings.default_plan}" does not exist: add [plans.{settings.default_plan}] or name an existing plan')
    if settings.highlighted_plan is not None and settings.highlighted_plan not in plans:
        yield Problem("catalog.highlighted_plan", f'plan "{settings.highlighted_plan}" does not exist')
    for key in ("default_plan", "highlighted_plan"):
        name = getattr(settings, key)
        if name in plans and plans[name].archived:
            why = "every new billable gets it" if key == "default_plan" else "it is named in upgrade sentences"
            yield Problem(f"catalog.{key}", f'plan "{name}" is archived, and {why}: name an active plan')

    seen_prices: dict[str, str] = {}
    for name, plan in plans.items():
        for price in plan.stripe_price_ids:
            if price in seen_prices:
                yield Problem(f"plans.{name}.stripe_price", f'price "{price}" is also the price of plan "{seen_prices[price]}": each Stripe price belongs to one plan')
            seen_prices.setdefault(price, name)

    kinds: dict[str, tuple[str, str | None]] = {}
    for name, plan in plans.items():
        for limit_name, limit in plan.limits.items():
            place = f"plans.{name}.limits.{limit_name}"
            if limit_name == CREDITS:
                yield Problem(place, '"credits" is reserved: use credits = N on the plan')
            first = kinds.setdefault(limit_name, (name, limit.per))
            if first[1] != limit.per:
                other = plans[first[0]].limits[limit_name]
                yield Problem(place, f'is a {limit.kind} here but a {other.kind} in plan "{first[0]}": a limit means the same in every plan')

    # Policy names travel in RateLimit headers (structured-field strings): printable ASCII only.
    for name, plan in plans.items():
        for limit_name in plan.limits:
            if not _HEADER_SAFE.fullmatch(limit_name):
                yield Problem(f"plans.{name}.limits.{limit_name}", "a limit name must be printable ASCII (it is sent in RateLimit headers)")
    for i, route in enumerate(parsed.routes):
        if route.rate_limit is not None and not _HEADER_SAFE.fullmatch(route.match):
            yield Problem(f"routes[{i}].match", "a route with its own rate_limit must match printable ASCII (its policy name is sent in headers)")

    features = set(parsed.features)
    for plan in plans.values():
        features.update(plan.allows, plan.disallows)
    for name, plan in plans.items():
        both = set(plan.allows) & set(plan.disallows)
        if both:
            yield Problem(f"plans.{name}.disallows", f"{', '.join(sorted(both))} is both allowed and disallowed")
        for i, item in enumerate(plan.unlimited):
            if item != CREDITS and item not in kinds:
                yield Problem(f"plans.{name}.unlimited[{i}]", f'unknown limit "{item}": name a limit some plan defines, or "credits"')

    for i, route in enumerate(parsed.routes):
        place = f"routes[{i}]"
        for j, feature in enumerate(route.features):
            if feature not in features:
                yield Problem(f"{place}.features[{j}]", f'unknown feature "{feature}": add it to [features] or a plan\'s allows')
        if route.spend is not None and route.spend not in parsed.operations:
            yield Problem(f"{place}.spend", f'unknown operation "{route.spend}": define [operations.{route.spend}]')
        for key in ("limit", "release"):
            name = getattr(route, key)
            if name is not None and name not in kinds:
                yield Problem(f"{place}.{key}", f'unknown limit "{name}": no plan defines limits.{name}')
        if route.release is not None and route.release in kinds and kinds[route.release][1] is not None:
            yield Problem(f"{place}.release", f'"{route.release}" is a per-period allowance: only persistent caps can be released')
        if route.public and (route.features or route.spend or route.limit or route.release):
            yield Problem(place, "a public route has no billable: it cannot name features, spend, limit or release")

    # One unit price a meter, and a meter is overage or pay-as-you-go: its month's units are one counter.
    payg_price: dict[str, tuple[str, Decimal]] = {}
    overage_meters = {lim.overage.meter for plan in parsed.plans.values() for lim in plan.limits.values() if lim.overage}
    for name, op in sorted(parsed.operations.items()):
        if op.payg is None:
            continue
        place, meter = f"operations.{name}.metered.meter", op.payg.meter
        priced = payg_price.setdefault(meter, (name, op.payg.unit_price))
        if priced[1] != op.payg.unit_price:
            yield Problem(place, f'meter "{meter}" is billed at {priced[1]} by operation "{priced[0]}": give both one unit_price, or each a meter of its own')
        if meter in overage_meters:
            yield Problem(place, f'meter "{meter}" is also a limit\'s overage meter: give pay-as-you-go a meter of its own')

    for name, pack in parsed.packs.items():
        if pack.stripe_price is not None and pack.stripe_price in seen_prices:
            yield Problem(f"packs.{name}.stripe_price", f'price "{pack.stripe_price}" is already the price of plan "{seen_prices[pack.stripe_price]}"')


def _warnings(parsed: CatalogFile) -> Iterable[Problem]:
    """What loads but surprises: a route a plan opens whose hold is more than the plan's credits, so a
    billable on that plan is refused (402) until it buys credits; in forward-auth mode, a route priced
    from what forward-auth never sees."""
    if parsed.catalog.mode == "forward-auth":
        yield from _forward_auth_warnings(parsed)
    for route in parsed.routes:
        operation = parsed.operations.get(route.spend) if route.spend else None
        if operation is None:
            continue
        hold = operation.hold if operation.per_unit is not None else (operation.cost or 0)
        for name, plan in parsed.plans.items():
            opens = all(plan.allows_feature(f) for f in route.features) and (
                route.limit is None or route.limit in plan.limits or plan.is_unlimited(route.limit)
            )
            if not opens or plan.is_unlimited(CREDITS) or plan.credits is None or hold <= plan.credits:
                continue
            yield Problem(f"plans.{name}", f"{route.match} holds {hold} credits; the plan has {plan.credits} {_per_words(plan.credits_per)}")


def _forward_auth_warnings(parsed: CatalogFile) -> Iterable[Problem]:
    for i, route in enumerate(parsed.routes):
        operation = parsed.operations.get(route.spend) if route.spend else None
        source = operation.units_source if operation is not None else None
        if operation is None or source is None:
            continue
        if operation.metered:
            yield Problem(f"routes[{i}]", f"{route.match} is metered from the answer ({source}), which forward-auth never sees: "
                                          f"each request is charged its reserve of {operation.hold} credits")  # fmt: skip
        elif source.where == "request.json":
            yield Problem(f"routes[{i}]", f"{route.match} is priced from the request body ({source}), which the edge does not send "
                                          "to forward-auth: each request is refused 400 (price it from a request.header)")  # fmt: skip


def _per_words(per: str) -> str:
    return {"month": "a month", "week": "a week", "day": "a day", "billing_cycle": "a billing cycle"}.get(per, f"every {per}")
