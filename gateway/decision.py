"""What one decision says: admitted or not, why, and the headers and problem body the client reads."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from gateway.catalog import CREDITS, Catalog, Route
from gateway.levels import EXPIRED, level_sentence
from gateway.problems import problem_body
from gateway.state.decide import PolicyState, Violation  # the decision speaks the script's words
from gateway.state.hold import Hold

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"

# Status precedence of DESIGN §3: the first row that applies decides.
_OUTCOMES: dict[str, tuple[int, str, str]] = {
    "unauthorized": (401, "urn:gateway:unauthorized", "Unauthorized"),
    "suspended": (403, "urn:gateway:suspended", "Suspended"),
    EXPIRED: (403, "urn:gateway:expired", "Expired"),
    "feature": (403, "urn:gateway:feature-not-in-plan", "Feature not in plan"),
    "cap": (403, "urn:gateway:limit-reached", "Limit reached"),
    "size": (403, "urn:gateway:limit-reached", "Limit reached"),
    "credits": (402, "urn:gateway:insufficient-credits", "Insufficient credits"),
    "spend": (402, "urn:gateway:spend-cap-reached", "Spend cap reached"),
    "rate": (429, QUOTA_EXCEEDED, "Quota exceeded"),
    "allow": (429, QUOTA_EXCEEDED, "Quota exceeded"),
    "unavailable": (503, "urn:gateway:unavailable", "Service unavailable"),
    "no_route": (404, "urn:gateway:no-route", "No route"),
}
_RANK = {kind: i for i, kind in enumerate(_OUTCOMES)}

# The 401's sentence names what this gateway identifies a billable by.
API_KEY_REQUIRED = "A valid API key is required: send Authorization: Bearer <key> or X-Api-Key: <key>."
APP_NAMED_NONE = "The app named no billable for this request: sign in first, or send the credentials the app expects."


def header_required(header: str) -> str:
    """The 401's sentence in trusted-header mode."""
    return f"This gateway reads the billable from the {header} header: send {header}: <billable id>."


@dataclass(slots=True)
class Decision:
    admitted: bool
    billable: str | None
    plan: str | None
    route: Route | None = None
    violations: list[Violation] = field(default_factory=list)
    policies: list[PolicyState] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    credits: int | None = None  # balance right after admission, when the billable has one or the route spends
    hold: Hold | None = None  # what settle needs: credits taken, limit units held, their windows
    now: float = 0.0  # Redis TIME of the decision, in seconds
    degraded: bool = False
    recharge: bool = False  # this spend took the lease to start an auto-recharge
    shadowed: list[Violation] = field(default_factory=list)  # what an admission in shadow would have been denied for
    members: tuple[str, ...] = ()  # the member levels (a key's, a team's budget) decided with the billable, nearest first

    @property
    def deciding(self) -> Violation | None:
        if not self.violations:
            return None
        return min(self.violations, key=lambda v: _RANK[v.kind])

    @property
    def status(self) -> int:
        deciding = self.deciding
        return 200 if deciding is None else _OUTCOMES[deciding.kind][0]

    @property
    def problem_type(self) -> str | None:
        deciding = self.deciding
        return None if deciding is None else _OUTCOMES[deciding.kind][1]

    @property
    def retry_after(self) -> int | None:
        waits = [v.retry_after for v in self.violations if v.retry_after is not None]
        if self.status != 429:
            return None
        return max([1, *waits])

    @property
    def violated_policies(self) -> list[str]:
        return list(dict.fromkeys(v.name for v in self.violations))

    @property
    def shadow(self) -> str | None:
        """`X-Gateway-Shadow`: the status a shadowed admission would have had and its violated policies."""
        if not self.shadowed:
            return None
        deciding = min(self.shadowed, key=lambda v: _RANK[v.kind])
        return " ".join([str(_OUTCOMES[deciding.kind][0]), *self.shadowed_policies])

    @property
    def shadowed_policies(self) -> list[str]:
        return list(dict.fromkeys(v.name for v in self.shadowed))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """RateLimit-Policy, RateLimit, X-RateLimit-*, Retry-After, X-Credits-Remaining, X-Gateway-Degraded,
        X-Gateway-Shadow."""
        out: list[tuple[bytes, bytes]] = []
        shown: list[tuple[str, int, int | None]] = []
        credits_item = b""  # its q follows the purchased credits on hand: not worth a cache entry per value
        items: list[str] = []
        tight: PolicyState | None = None
        tight_key = (2.0, 0)  # (share left, units left) of the tightest policy: the X-RateLimit-* one
        for p in self.policies:
            name, kind, quota, window, remaining, reset = p
            if quota < 0:
                continue
            if kind == "credits":
                credits_item = f"{_sf_string(name)};q={quota}".encode()
            else:
                shown.append((name, quota, window))
            left = remaining if remaining is not None and remaining > 0 else 0
            items.append(f"{_sf_string(name)};r={left}" if reset is None else f"{_sf_string(name)};r={left};t={reset}")
            if remaining is not None and quota > 0:
                key = (left / quota, left)
                if key < tight_key:
                    tight, tight_key = p, key
        if items:
            policy = _policy_header(tuple(shown))
            if credits_item:
                policy = policy + b", " + credits_item if policy else credits_item
            out.append((b"ratelimit-policy", policy))
            out.append((b"ratelimit", ", ".join(items).encode()))
            if tight is not None:
                out.append((b"x-ratelimit-limit", b"%d" % tight.quota))
                out.append((b"x-ratelimit-remaining", b"%d" % tight_key[1]))
                if tight.reset is not None:
                    out.append((b"x-ratelimit-reset", b"%d" % (int(self.now) + tight.reset)))
                out.append((b"x-ratelimit-resource", tight.name.encode()))
        retry = self.retry_after if self.violations else None
        if retry is not None:
            out.append((b"retry-after", b"%d" % retry))
        if self.credits is not None:
            out.append((b"x-credits-remaining", b"%d" % self.credits))
        if self.degraded:
            out.append((b"x-gateway-degraded", b"redis"))
        if self.shadowed:
            out.append((b"x-gateway-shadow", (self.shadow or "").encode()))
        return out

    def problem(self, catalog: Catalog, *, unauthorized: str = API_KEY_REQUIRED) -> dict[str, Any]:
        """The problem+json body; `unauthorized` is the 401's sentence, naming how this gateway identifies."""
        deciding = self.deciding
        assert deciding is not None, "an admitted decision has no problem"
        status, type_, title = _OUTCOMES[deciding.kind]
        members: dict[str, Any] = {}
        if status not in (400, 401):  # no billable yet, so no plan and no policy
            members["plan"] = self.plan
            members["violated_policies"] = [name for name in self.violated_policies if name]
        if catalog.settings.upgrade_url:
            members["upgrade_url"] = catalog.settings.upgrade_url
        return problem_body(status, type_, title, detail(self, catalog, unauthorized=unauthorized), **members)


@functools.lru_cache(maxsize=4096)
def _sf_string(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=4096)
def _policy_header(policies: tuple[tuple[str, int, int | None], ...]) -> bytes:
    """RateLimit-Policy is the same for every request of a plan and route: built once."""
    items = []
    for name, quota, window in policies:
        item = f"{_sf_string(name)};q={quota}"
        if window is not None:
            item += f";w={window}"
        items.append(item)
    return ", ".join(items).encode()


def _noun(limit: str) -> str:
    return limit.replace("_", " ")


def upgrade_plan(decision: Decision, catalog: Catalog) -> str | None:
    """The cheapest plan that would admit this request, else the highlighted plan, else none."""
    return upgrade_target(decision.plan, decision.violations, catalog)


def upgrade_target(on: str | None, violations: list[Violation], catalog: Catalog) -> str | None:
    """The cheapest plan, not cheaper than `on`, under which none of `violations` would be one; else the
    highlighted plan; else none."""
    current = catalog.plans.get(on or "")
    for name in catalog.plans_by_price():
        plan = catalog.plans[name]
        if name == on or (current is not None and plan.sort_price < current.sort_price):
            continue
        if all(_would_admit(plan, v, catalog) for v in violations):
            return name
    highlighted = catalog.settings.highlighted_plan
    return highlighted if highlighted and highlighted != on else None


def _would_admit(plan: Any, v: Violation, catalog: Catalog) -> bool:
    if v.kind == "feature":
        if v.name in catalog.limit_kinds:
            return v.name in plan.limits or plan.is_unlimited(v.name)
        return bool(plan.allows_feature(v.name))
    if v.kind in {"cap", "size", "allow"}:
        if plan.is_unlimited(v.name):
            return True
        limit = plan.limits.get(v.name)
        return limit is not None and (v.usage or 0) + (v.cost or 0) <= limit.to
    if v.kind == "credits":
        return bool(plan.is_unlimited(CREDITS) or (plan.credits or 0) >= (v.cost or 0))
    return True  # rates are not sold by plan in the sentences: waiting is the answer


def detail(decision: Decision, catalog: Catalog, *, unauthorized: str = API_KEY_REQUIRED) -> str:
    """The human sentence of a denial, in the words pricing libraries made familiar."""
    plan_title = catalog.plan_title(decision.plan or "")
    target = upgrade_plan(decision, catalog)
    target_title = catalog.plan_title(target) if target else None
    sentences: list[str] = []
    for v in sorted(decision.violations, key=lambda v: _RANK[v.kind]):
        if (at_level := level_sentence(v, decision.policies, decision.credits)) is not None:
            s = at_level
        elif v.kind == "feature":
            if v.name in catalog.limit_kinds:
                what = _noun(v.name)
                s = f"Your current plan ({plan_title}) doesn't include {what}."
                if target_title:
                    s += f" Please upgrade to {target_title} or higher to get {what}."
            else:
                what = catalog.feature_title(v.name)
                s = f"Your current plan ({plan_title}) doesn't allow you to use {what}."
                if target_title:
                    s += f" Please upgrade to {target_title} or higher to access {what}."
        elif v.kind in {"cap", "allow"}:
            s = f"You've reached your limit of {v.limit} {_noun(v.name)} (currently using {v.usage})."
            if target_title:
                s += f" Upgrade to {target_title} for higher limits."
            elif v.kind == "allow" and v.retry_after:
                s += f" It resets in {_duration(v.retry_after)}."
        elif v.kind == "size":
            s = f"This request needs {v.cost} {_noun(v.name)}, more than your plan's limit of {v.limit}."
            if target_title:
                s += f" Upgrade to {target_title} for higher limits."
        elif v.kind == "spend":
            s = _spend_cap(decision, v, catalog)
        elif v.kind == "credits":
            s = f"You're out of credits: this request needs {v.cost} and you have {max(0, v.balance or 0)}."
        elif v.kind == "rate":
            s = f"Too many requests ({v.name}): retry in {_duration(v.retry_after or 1)}."
        elif v.kind == "suspended":
            s = "This account is suspended: every request is refused until it is lifted. Please contact support."
        elif v.kind == "unavailable":
            s = "The gateway cannot reach its state store right now; please retry shortly."
        elif v.kind == "no_route":
            s = "No route matches this request."
        else:
            s = unauthorized
        sentences.append(s)
    return " ".join(dict.fromkeys(sentences))


def _spend_cap(decision: Decision, v: Violation, catalog: Catalog) -> str:
    plan = catalog.plans.get(decision.plan or "")
    limit = plan.limits.get(v.name) if plan is not None else None
    overage = limit.overage if limit is not None else None
    if overage is None or overage.max_per_period is None:  # the catalog changed since the decision
        return f"You've reached this period's spend cap on {_noun(v.name)} beyond your plan's limit."
    cap = f"{overage.max_per_period} {catalog.settings.currency.upper()}"
    return (f"You've reached this period's spend cap of {cap} for {_noun(v.name)} over your plan's {limit.to if limit else 0} "
            f"({v.usage} billed at {overage.unit_price} each): further requests are refused until the period resets. "
            "Ask your account owner to raise the cap.")  # fmt: skip


def _duration(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = round(seconds / size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


__all__ = ["API_KEY_REQUIRED", "APP_NAMED_NONE", "QUOTA_EXCEEDED", "Decision", "PolicyState", "Violation", "detail",
           "header_required", "upgrade_plan", "upgrade_target"]  # fmt: skip
