"""`GET /_gateway/account`: one billable's usage page, for its customer; `/_gateway/account/banner`: the banner alone.

Opened with a signed link (gateway/web/links.py: the API's app asks for one with the admin token) or with the
billable's API key in Authorization or X-Api-Key. Everything on it is the status (one status.lua call) and
this month's usage per route and day from the record (a query, no Redis); every value is escaped. A team's
or a key's page is its org's, with the member's own budgets and requests beside (`/_gateway/usage`).
With Stripe configured: "Buy credits" (Checkout for each pack) and "Manage billing" (the customer portal).
"""

from __future__ import annotations

import asyncio
import calendar
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.bounds import integer
from gateway.catalog import Catalog
from gateway.engine import Engine
from gateway.errors import GatewayError
from gateway.problems import json_body, problem
from gateway.severity import noun
from gateway.store.db import Database
from gateway.usage import current_period, daily_usage
from gateway.web import links
from gateway.web.page import document

if TYPE_CHECKING:  # stripe is imported only when it is configured
    from gateway.billing import Billing

log = logging.getLogger("gateway.account")
RECORD_TIMEOUT_S = 2.0  # the chart's query: a page without it beats a page that hangs on the record

Identify = Callable[[Request], Awaitable[str | None]]

# The page's own headers: its URL is a credential (never sent on as a Referer), never cached, no script.
HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' https:; "
    "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
}

STYLE = """
h2{font-size:1.25rem;margin:0 0 .75rem}
.cards{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(min(100%,18rem),1fr))}
.card{background:#fff;border:1px solid #dde1ea;border-radius:12px;padding:1.25rem;min-width:0}
section{margin:0 0 1.5rem}
.banner{border-radius:12px;padding:1rem 1.25rem;border:1px solid;display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center}
.banner h2{margin:0;font-size:1.15rem}
.banner p{margin:0;flex:1 1 16rem}
.sev-ok{border-color:#86efac}
.sev-warning{border-color:#fcd34d}
.sev-at_limit{border-color:#fdba74}
.sev-grace,.sev-blocked{border-color:#fca5a5}
.banner.sev-ok{background:#ecfdf3}
.banner.sev-warning{background:#fffbeb}
.banner.sev-at_limit{background:#fff7ed}
.banner.sev-grace,.banner.sev-blocked{background:#fef2f2}
.card h3{margin:0 0 .5rem;font-size:1rem}
.button{display:inline-block;padding:.6rem 1rem;border-radius:8px;border:0;background:#4f46e5;color:#fff;font:inherit;font-weight:600;text-decoration:none;cursor:pointer}
.button.quiet{background:#eef0f6;color:#1d2330}
.meter h3{margin:0;text-transform:capitalize}
.numbers{margin:.25rem 0;font-size:1.1rem;font-weight:600}
.track{height:.6rem;border-radius:999px;background:#e5e7ef;overflow:hidden}
.fill{height:100%;background:#15803d}
.meter.sev-warning .fill{background:#b45309}
.meter.sev-at_limit .fill{background:#c2410c}
.meter.sev-grace .fill,.meter.sev-blocked .fill{background:#b91c1c}
.note,.window{margin:.4rem 0 0;color:#4a5368;font-size:.9rem}
h2 + .note{margin:0 0 .75rem}
.note.alert{color:#1d2330}
dl{margin:0;display:grid;grid-template-columns:auto 1fr;gap:.25rem 1rem}
dt{color:#4a5368}
dd{margin:0;font-weight:600;overflow-wrap:anywhere}
.chart{list-style:none;margin:0;padding:0;display:grid;gap:.6rem}
.chart li{display:grid;grid-template-columns:minmax(0,1fr) auto;gap:.1rem .75rem;align-items:center}
.chart .route{overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:.9rem}
.chart svg{grid-column:1 / -1;width:100%;height:2.5rem;display:block}
.chart rect.bg{fill:#e5e7ef}
.chart rect.bar{fill:#4f46e5}
.actions{display:flex;flex-wrap:wrap;gap:.75rem;align-items:center}
.actions form{margin:0}
.who{overflow-wrap:anywhere}
.bill{width:100%;border-collapse:collapse;font-size:.95rem}
.bill caption{text-align:left;margin:0 0 .5rem}
.bill th,.bill td{padding:.4rem .35rem;border-bottom:1px solid #e5e7ef;text-align:left;vertical-align:top}
.bill .item{overflow-wrap:break-word;word-break:normal}
.bill .num{text-align:right}
.bill td.num{white-space:nowrap}
.bill tfoot th,.bill tfoot td{font-weight:700;border-bottom:0}
"""

_PER_WORDS = {"month": "this month", "week": "this week", "day": "today", "billing_cycle": "this billing period", "year": "this year"}


def _date(iso: str | None) -> str:
    if not iso:
        return ""
    at = datetime.fromisoformat(iso)
    return f"{at:%B} {at.day}, {at.year} at {at:%H:%M} UTC"


def _month(period: str) -> str:
    return datetime.strptime(period, "%Y-%m").strftime("%B %Y")


def banner(status: dict[str, Any]) -> str:
    """The overall severity, its sentence and its call to action: the page's top, and the embeddable fragment."""
    found = status["overall"]
    sentence = found["message"] or ("You're within every limit of your plan." if found["severity"] == "ok" else "")
    message = f"<p>{escape(sentence)}</p>" if sentence else ""
    return (
        f'<section class="banner gateway-banner sev-{escape(found["severity"])}" role="status" '
        f'data-severity="{escape(found["severity"])}" aria-label="Plan status">'
        f"<h2>{escape(found['title'])}</h2>{message}"
        f'<a class="button" href="{escape(found["cta_url"])}">{escape(found["cta_text"])}</a></section>'
    )


def _meter(name: str, limit: dict[str, Any]) -> str:
    to, usage = limit["limit"], limit["usage"]
    percent = limit["percent_used"]
    if to is None:
        numbers = f'<span class="usage">{usage:,}</span> used, <span class="limit">unlimited</span>'
        bar = ""
    else:
        shown = f" ({percent:g}%)" if percent is not None else ""
        numbers = f'<span class="usage">{usage:,}</span> of <span class="limit">{to:,}</span> used{escape(shown)}'
        width = 100 if to == 0 else min(100.0, 100 * usage / to)
        bar = (
            f'<div class="track" role="progressbar" aria-label="{escape(noun(name))} used" aria-valuemin="0" '
            f'aria-valuemax="{to}" aria-valuenow="{min(usage, to)}"><div class="fill" style="width:{width:.1f}%"></div></div>'
        )
    if limit["per"]:
        window = f"Counted {_PER_WORDS.get(limit['per'], 'per ' + limit['per'])}; resets {_date(limit['window_end'])}."
    else:
        window = "Counted in total (it goes down when you remove some)."
    message = f'<p class="note alert">{escape(limit["message"])}</p>' if limit["message"] else ""
    return (
        f'<article class="card meter sev-{escape(limit["severity"])}" data-limit="{escape(name)}">'
        f"<h3>{escape(noun(name))}</h3><p class=\"numbers\">{numbers}</p>{bar}"
        f'<p class="window">{escape(window)}</p>{_billed(limit.get("billed"))}{message}</article>'
    )


def _billed(billed: dict[str, Any] | None) -> str:
    """A billed limit's period so far: the units past the limit, what they cost, and the spend cap."""
    if billed is None:
        return ""
    currency = billed["currency"].upper()
    cap = f"; spend cap {billed['cap']} {currency}" + (" (reached: further requests are refused)" if billed["cap_reached"] else "")
    text = (f"Past the limit: {billed['units']:,} billed at {billed['unit_price']} {currency} each, "
            f"{billed['amount']} {currency} so far this period{cap if billed['cap'] is not None else ''}.")  # fmt: skip
    return f'<p class="note billed" data-billed="{escape(billed["amount"])}">{escape(text)}</p>'


def _bill(status: dict[str, Any]) -> str:
    """The period's bill so far (the status's `invoice`): its lines, the total, and what each spend cap leaves."""
    bill = status["invoice"]
    if not any(line["kind"] != "plan" for line in bill["lines"]):
        return ""  # nothing billed by use on this plan: its price is on the pricing page
    currency = bill["currency"].upper()
    rows = "".join(
        f'<tr data-line="{escape(line["kind"])}" data-meter="{escape(line.get("meter") or "")}">'
        f'<td class="item">{escape(line["description"])}</td><td class="num">{line["quantity"]:,}</td>'
        f'<td class="num">{escape(line["unit_price"])}</td><td class="num amount">{escape(line["amount"])}</td></tr>'
        for line in bill["lines"]
    )
    caps = "".join(
        f'<p class="note" data-cap="{escape(line["limit"])}" data-cap-left="{escape(line["cap_left"])}">'
        f"{escape(noun(line['limit'])[:1].upper() + noun(line['limit'])[1:])}: spend cap {escape(line['cap'])} {currency}, "
        f"{escape(line['cap_left'])} {currency} left"
        + (" (reached: further requests are refused)" if line["cap_reached"] else "") + ".</p>"
        for line in bill["lines"] if line["kind"] == "overage" and line["cap"] is not None
    )  # fmt: skip
    return (
        f'<section class="card" aria-label="This period so far"><h2>This period so far</h2>'
        f'<table class="bill"><caption class="note">Amounts in {currency}, each as the invoice will show it.</caption>'
        '<thead><tr><th scope="col">Item</th><th scope="col" class="num">Units</th><th scope="col" class="num">Unit price</th>'
        f'<th scope="col" class="num">Amount</th></tr></thead><tbody>{rows}</tbody>'
        f'<tfoot><tr><th scope="row" colspan="3">Total so far</th><td class="num" data-total="{escape(bill["total"])}">'
        f"{escape(bill['total'])}</td></tr></tfoot></table>{caps}</section>"
    )


def _credits(status: dict[str, Any], catalog: Catalog, plan_rollover: bool) -> str:
    credits = status["credits"]
    if credits["balance"] is None:
        rows = [("Balance", "unlimited")]
    else:
        renews = "rolls over" if plan_rollover else "renews"
        period = f"{credits['period']:,} left, {renews} {_date(credits['period_ends_at'])}"
        rows = [("Balance", f"{credits['balance']:,}"), ("This period", period),
                ("Purchased", f"{credits['purchased']:,} (never expire)")]  # fmt: skip
        if credits["held"]:
            rows.append(("Held by requests in flight", f"{credits['held']:,}"))
        if credits["debt"]:
            rows.append(("Owed", f"{credits['debt']:,}"))
    listed = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    message = f'<p class="note alert">{escape(credits["message"])}</p>' if credits["message"] else ""
    return (
        f'<article class="card sev-{escape(credits["severity"])}" data-credits="{escape(str(credits["balance"]))}">'
        f"<h3>Credits</h3><dl>{listed}</dl>{message}</article>"
    )


def _rates(status: dict[str, Any]) -> str:
    if not status["rate_limits"]:
        return ""
    rows = "".join(
        f"<dt>{escape('Requests' if name == 'rate' else name)}</dt>"
        f"<dd>{rate['remaining']:,} of {rate['limit']:,} available now</dd>"
        for name, rate in status["rate_limits"].items()
    )
    return f'<article class="card"><h3>Rate limit</h3><dl>{rows}</dl></article>'


def chart(report: dict[str, Any] | None, period: str) -> str:
    """This month's requests per route and day: per route, one bar per day (inline SVG, no script)."""
    if report is None:
        return '<p class="note">Usage history needs the record (a database): this gateway has none.</p>'
    if report.get("unavailable"):
        return '<p class="note">Usage history is unavailable right now: the record did not answer.</p>'
    per_route: dict[str, dict[str, int]] = {}
    for row in report["days"]:
        days = per_route.setdefault(row["route"], {})
        days[row["day"]] = days.get(row["day"], 0) + int(row["requests"])
    if not any(sum(d.values()) for d in per_route.values()):
        return '<p class="note">No requests recorded this month yet.</p>'
    year, month = (int(x) for x in period.split("-"))
    month_days = [f"{period}-{d:02d}" for d in range(1, calendar.monthrange(year, month)[1] + 1)]
    top = max(n for d in per_route.values() for n in d.values())
    items = []
    for route, days in sorted(per_route.items(), key=lambda item: (-sum(item[1].values()), item[0])):
        total = sum(days.values())
        bars = []
        for x, day in enumerate(month_days):
            count = days.get(day, 0)
            height = 30 * count / top if count else 0
            bars.append(
                f'<g data-day="{day}" data-requests="{count}"><title>{day}: {count:,} request{"s" if count != 1 else ""}</title>'
                f'<rect class="bg" x="{x * 4}" width="3" height="30"></rect>'
                f'<rect class="bar" x="{x * 4}" y="{30 - height:.2f}" width="3" height="{height:.2f}"></rect></g>'
            )
        label = f"{route}: {total:,} request{'s' if total != 1 else ''} this month, per day"
        items.append(
            f'<li data-route="{escape(route)}"><span class="route">{escape(route)}</span><span class="count">{total:,}</span>'
            f'<svg viewBox="0 0 {len(month_days) * 4 - 1} 30" preserveAspectRatio="none" role="img" aria-label="{escape(label)}">'
            f'{"".join(bars)}</svg></li>'
        )
    return f'<ul class="chart">{"".join(items)}</ul>'


def _bar(label: str, used: int, to: int) -> str:
    width = 100 if to == 0 else min(100.0, 100 * used / to)
    return (
        f'<div class="track" role="progressbar" aria-label="{escape(label)}" aria-valuemin="0" aria-valuemax="{to}" '
        f'aria-valuenow="{min(used, to)}"><div class="fill" style="width:{width:.1f}%"></div></div>'
    )


def _level(member: dict[str, Any]) -> str:
    """A team's or a key's own numbers (`/_gateway/usage`'s `members`), beside its organization's."""
    title = "This key" if member["level"] == "key" else f"Team {member['member']}"
    parts = []
    if member["suspended"]:
        parts.append('<p class="note alert">Suspended: its requests are refused while the organization goes on.</p>')
    month = member.get("this_month")
    if month is not None:
        parts.append(f'<p class="numbers"><span class="requests">{month["requests"]:,}</span> request'
                     f'{"s" if month["requests"] != 1 else ""} and {month["credits"]:,} credits this month</p>')  # fmt: skip
    credits = member.get("credits")
    if credits is not None:
        per = _PER_WORDS.get(credits["per"], "per " + credits["per"])
        parts.append(
            f'<p class="window" data-member-credits="{credits["spent"]}">Credits: {credits["spent"]:,} of '
            f'{credits["allowance"]:,} spent {escape(per)}, {credits["balance"]:,} left</p>'
            + _bar(f"{title}: credits spent", credits["spent"], credits["allowance"])
        )
    for name, limit in (member.get("limits") or {}).items():
        counted = _PER_WORDS.get(limit["per"], "per " + limit["per"]) if limit["per"] else "in total"
        named = noun(name)
        parts.append(
            f'<p class="window" data-member-limit="{escape(name)}">{escape(named[:1].upper() + named[1:])}: {limit["usage"]:,} of '
            f'{limit["limit"]:,} used {escape(counted)}</p>' + _bar(f"{title}: {noun(name)} used", limit["usage"], limit["limit"])
        )
    return (
        f'<article class="card" data-member="{escape(member["member"])}" data-level="{escape(member["level"])}">'
        f'<h3>{escape(title)}</h3>{"".join(parts)}</article>'
    )


def members(status: dict[str, Any], report: dict[str, Any] | None, period: str) -> str:
    """For a team's or a key's page: each level's own budget (nearest first) and the nearest's own requests."""
    levels = status.get("members")
    if not levels:
        return ""
    own = "this key" if levels[0]["level"] == "key" else "this team"
    return (
        f'<section aria-label="Own budgets"><h2>Own budgets</h2><p class="note">Counted beside those of the '
        f'organization, {escape(status["billable"])}: a request is admitted only within every one.</p>'
        f'<div class="cards">{"".join(_level(m) for m in levels)}</div></section>'
        f'<section class="card" aria-label="Requests per route by {own}"><h2>Requests per route by {own} this month</h2>'
        f'<p class="note">{escape(_month(period))}, per day, from the usage record.</p>{chart(report, period)}</section>'
    )


def page(
    status: dict[str, Any], catalog: Catalog, report: dict[str, Any] | None, actions: str, period: str,
    own_report: dict[str, Any] | None = None,
) -> str:
    plan = catalog.plans.get(status["plan"])
    meters = "".join(_meter(name, limit) for name, limit in status["limits"].items())
    body = (
        "<h1>Usage</h1>"
        f'<p class="lead who">{escape(status["billable"])} · {escape(catalog.plan_title(status["plan"]))} plan</p>'
        f"{banner(status)}"
        f"{members(status, own_report, period)}"
        + (f'<section aria-label="Limits"><h2>Limits</h2><div class="cards">{meters}</div></section>' if meters else "")
        + _bill(status)
        + '<section aria-label="Credits and rate limit"><h2>Credits and rate limit</h2><div class="cards">'
        f"{_credits(status, catalog, plan.rollover if plan else False)}{_rates(status)}</div></section>"
        f'<section class="card" aria-label="Requests per route"><h2>Requests per route this month</h2>'
        f'<p class="note">{escape(_month(period))}, per day, from the usage record.</p>{chart(report, period)}</section>'
        f"{actions}"
    )
    return document(f"Usage · {status['billable']}", STYLE, body)


def message_page(status: int, title: str, sentence: str) -> HTMLResponse:
    body = f'<h1>{escape(title)}</h1><p class="lead">{escape(sentence)}</p>'
    return HTMLResponse(document(title, STYLE, body), status_code=status, headers=HEADERS)


class Account:
    """The usage page's endpoints, and the admin endpoint that makes its links."""

    def __init__(self, *, engine: Engine, db: Database | None, identify: Identify, secret: bytes | None,
                 billing: Billing | None = None) -> None:  # fmt: skip
        self.engine = engine
        self.db = db
        self.identify = identify
        self.secret = secret
        self.billing = billing

    def routes(self) -> list[Route]:
        return [
            Route(links.ACCOUNT_PAGE, self.page, methods=["GET"]),
            Route(f"{links.ACCOUNT_PAGE}/banner", self.banner, methods=["GET"]),
            Route(f"{links.ACCOUNT_PAGE}/checkout", self.checkout, methods=["POST"]),
            Route(f"{links.ACCOUNT_PAGE}/billing", self.manage_billing, methods=["POST"]),
        ]

    def admin_routes(self) -> list[Route]:
        return [Route("/_gateway/admin/billables/{billable}/account-link", self.make_link, methods=["POST"])]

    async def make_link(self, request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        expires_in = links.DEFAULT_EXPIRES_IN if body.get("expires_in") is None else integer(body, "expires_in", low=1, high=links.MAX_EXPIRES_IN)
        if self.secret is None:  # named admin tokens only: nothing to derive a key from
            return problem(503, "urn:gateway:unavailable", "Service unavailable",
                           "Account links are off: set GATEWAY_ACCOUNT_SECRET (or GATEWAY_ADMIN_TOKEN) to sign them.")  # fmt: skip
        made = links.make(self.secret, str(request.base_url), request.path_params["billable"], expires_in, self.engine.clock())
        return JSONResponse(made)

    async def _billable(self, request: Request) -> str | Response:
        """The billable a signed link or an API key names, else the page saying why not."""
        if any(name in request.query_params for name in links.FIELDS):
            try:
                return links.verify(self.secret, request.query_params, self.engine.clock())
            except links.LinkRefused as exc:
                return message_page(403, "This link can't be used", str(exc))
        billable = await self.identify(request)
        if billable is None:
            return message_page(401, "Sign in to see your usage",
                                "Open this page with the link your account gives you, or send your API key: "
                                "Authorization: Bearer <key>.")  # fmt: skip
        return billable

    async def _status(self, request: Request) -> tuple[str, dict[str, Any]] | Response:
        billable = await self._billable(request)
        if isinstance(billable, Response):
            return billable
        try:
            return billable, await self.engine.usage(billable)  # a team's or a key's: its org's, with its own
        except GatewayError as exc:
            log.warning("account page: no status for %s: %s", billable, exc)
            return message_page(503, "Usage is unavailable right now", "The gateway cannot read your usage right now. Please try again in a minute.")

    async def page(self, request: Request) -> Response:
        found = await self._status(request)
        if isinstance(found, Response):
            return found
        _, status = found
        catalog = self.engine.catalog
        period = current_period(catalog.settings.zone, self.engine.clock())
        report = await self._report(status["billable"], period)
        own = await self._report(status["members"][0]["member"], period) if status.get("members") else None
        html = page(status, catalog, report, self._actions(request, catalog), period, own)
        return HTMLResponse(html, headers=HEADERS)

    async def _report(self, billable: str, period: str) -> dict[str, Any] | None:
        """The chart's rows of `billable` (an org, or a team's or a key's own) from the record."""
        if self.db is None:
            return None
        try:
            async with asyncio.timeout(RECORD_TIMEOUT_S):
                return {"days": await daily_usage(self.db, billable, period)}
        except Exception as exc:  # noqa: BLE001 - the page shows without its chart while the record is away
            log.warning("account page: no usage history for %s: %s", billable, exc)
            return {"unavailable": True}

    async def banner(self, request: Request) -> Response:
        found = await self._status(request)
        if isinstance(found, Response):
            return found
        return HTMLResponse(banner(found[1]), headers=HEADERS)

    def _actions(self, request: Request, catalog: Catalog) -> str:
        """Buy credits and Manage billing, with Stripe configured: forms that carry the page's own link."""
        if self.billing is None:
            return ""
        link = {k: v for k, v in request.query_params.items() if k in links.FIELDS}
        forms = [
            f'<form method="post" action="{links.ACCOUNT_PAGE}/checkout?{escape(urlencode({**link, "pack": name}))}">'
            f'<button class="button" type="submit">Buy credits: {escape(pack.name or name.replace("_", " ").title())} '
            f"({pack.credits + pack.bonus:,})</button></form>"
            for name, pack in catalog.packs.items()
        ]
        forms.append(
            f'<form method="post" action="{links.ACCOUNT_PAGE}/billing?{escape(urlencode(link))}">'
            '<button class="button quiet" type="submit">Manage billing</button></form>'
        )
        return f'<section class="actions" aria-label="Billing">{"".join(forms)}</section>'

    def _back(self, request: Request) -> str:
        """Where Stripe sends the customer back: this page, with the same link."""
        link = {k: v for k, v in request.query_params.items() if k in links.FIELDS}
        return str(request.url.replace(path=links.ACCOUNT_PAGE, query=urlencode(link)))

    async def checkout(self, request: Request) -> Response:
        billable = await self._billable(request)
        if isinstance(billable, Response):
            return billable
        if self.billing is None:
            return message_page(404, "Billing is off", "This gateway has no Stripe account configured.")
        pack = request.query_params.get("pack") or ""
        if pack not in self.engine.catalog.packs:
            return message_page(404, "No such credit pack", f"There is no credit pack named {pack!r}. Go back and choose one on the page.")
        try:
            session = await self.billing.packs.checkout(billable, pack, success_url=self._back(request))
        except Exception as exc:  # noqa: BLE001 - stripe is not imported here: any failure of Stripe's is this page
            return _stripe_failed(exc)
        return RedirectResponse(session["url"], status_code=303, headers={"referrer-policy": "no-referrer"})

    async def manage_billing(self, request: Request) -> Response:
        billable = await self._billable(request)
        if isinstance(billable, Response):
            return billable
        if self.billing is None:
            return message_page(404, "Billing is off", "This gateway has no Stripe account configured.")
        try:
            url = await self.billing.portal(billable, self._back(request))
        except Exception as exc:  # noqa: BLE001 - as in checkout
            return _stripe_failed(exc)
        return RedirectResponse(url, status_code=303, headers={"referrer-policy": "no-referrer"})


def _stripe_failed(exc: Exception) -> HTMLResponse:
    log.warning("account page: Stripe failed: %s", exc)
    return message_page(502, "Billing is unavailable right now", "Stripe could not be reached or refused the request. Please try again in a minute.")
