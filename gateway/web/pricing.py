"""`GET /_gateway/pricing`: the catalog's plans as a pricing table people read, on a phone too.

Plans come from plans.toml (names, descriptions, bullets, the highlighted plan); amounts come from the
latest Stripe snapshot when a sync stored one, else from plans.toml. It needs no Stripe to render.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from gateway.billing.sync import PriceBook
from gateway.catalog import CREDITS, Catalog, Plan
from gateway.money import show, to_minor
from gateway.web.page import document

PERIOD_WORDS = {"month": "a month", "week": "a week", "day": "a day", "billing_cycle": "per billing period"}

STYLE = """
.plans{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(min(100%,16rem),1fr));align-items:stretch}
.plan{position:relative;background:#fff;border:1px solid #dde1ea;border-radius:12px;padding:1.5rem;display:flex;flex-direction:column;gap:.75rem}
.plan h2{margin:0;font-size:1.25rem}
.plan.highlighted{border:2px solid #4f46e5;box-shadow:0 8px 24px rgba(79,70,229,.15)}
.badge{align-self:flex-start;margin:0;padding:.15rem .6rem;border-radius:999px;background:#4f46e5;color:#fff;font-size:.8rem;font-weight:600}
.description{margin:0;color:#4a5368}
.price{margin:0;display:flex;align-items:baseline;gap:.25rem;flex-wrap:wrap}
.amount{font-size:2.25rem;font-weight:700;line-height:1}
.amount.words{font-size:1.25rem;line-height:2.25rem}
.per,.yearly{color:#4a5368}
.yearly{margin:0;font-size:.9rem}
ul{margin:0;padding-left:1.2rem}
li{margin:.2rem 0}
.cta{display:block;margin-top:auto;padding:.75rem 1rem;border-radius:8px;text-align:center;text-decoration:none;font-weight:600;background:#eef0f6;color:#1d2330}
.highlighted .cta{background:#4f46e5;color:#fff}
.packs{margin-top:2.5rem}
.packs h2{text-align:center;font-size:1.4rem}
.pack-list{list-style:none;padding:0;display:grid;gap:.75rem;grid-template-columns:repeat(auto-fit,minmax(min(100%,14rem),1fr))}
.pack{background:#fff;border:1px solid #dde1ea;border-radius:12px;padding:1rem}
.pack strong{display:block}
"""


def _plan_price(catalog: Catalog, name: str, plan: Plan, synced: dict[str, Any]) -> tuple[str, str, str | None]:
    """(amount, "/month" or "", yearly line or None) for one plan card."""
    currency = catalog.settings.currency
    prices = (synced.get(name) or {}).get("prices") or {}
    month, year = prices.get("month"), prices.get("year")
    yearly = None
    if year and year.get("unit_amount") is not None:
        yearly = f"or {show(int(year['unit_amount']), year.get('currency') or currency)}/year"
    elif plan.price_yearly is not None:
        yearly = f"or {show(to_minor(plan.price_yearly, currency), currency)}/year"
    if month and month.get("unit_amount") is not None:
        return show(int(month["unit_amount"]), month.get("currency") or currency), "/month", yearly
    if plan.price_string:
        return plan.price_string, "", yearly
    if plan.price is not None:
        return show(to_minor(plan.price, currency), currency), "/month", yearly
    if year and year.get("unit_amount") is not None:
        return show(int(year["unit_amount"]), year.get("currency") or currency), "/year", None
    return "Contact us", "", None


def _bullets(catalog: Catalog, plan: Plan) -> list[str]:
    """The plan's own bullets; without any, what it includes, read from the catalog."""
    if plan.bullets:
        return list(plan.bullets)
    out = [catalog.feature_title(f) for f in plan.allows]
    for name in plan.unlimited:
        out.append("Unlimited " + ("credits" if name == CREDITS else name.replace("_", " ")))
    for name, limit in plan.limits.items():
        per = f"/{limit.per}" if limit.per else ""
        out.append(f"{limit.to:,} {name.replace('_', ' ')}{per}")
    if plan.credits and not plan.is_unlimited(CREDITS):
        out.append(f"{plan.credits:,} credits {PERIOD_WORDS.get(plan.credits_per, 'every ' + plan.credits_per)}")
    return out


def render(catalog: Catalog, snapshot: dict[str, Any]) -> str:
    synced = snapshot.get("plans") or {}
    highlighted = catalog.settings.highlighted_plan
    cards = []
    for name in catalog.plans_by_price():
        plan = catalog.plans[name]
        title = catalog.plan_title(name)
        amount, per, yearly = _plan_price(catalog, name, plan, synced)
        classes = "plan highlighted" if name == highlighted else "plan"
        parts = [f'<article class="{classes}" aria-label="{escape(title)} plan" data-plan="{escape(name)}">']
        if name == highlighted:
            parts.append('<p class="badge">Most popular</p>')
        parts.append(f"<h2>{escape(title)}</h2>")
        if plan.description:
            parts.append(f'<p class="description">{escape(plan.description)}</p>')
        # A price in words ("Contact us") is a label, set at a title's size: only figures take the large type.
        amount_class = "amount" if any(c.isdigit() for c in amount) else "amount words"
        parts.append(f'<p class="price"><span class="{amount_class}">{escape(amount)}</span><span class="per">{escape(per)}</span></p>')
        if yearly:
            parts.append(f'<p class="yearly">{escape(yearly)}</p>')
        bullets = _bullets(catalog, plan)
        if bullets:
            parts.append("<ul>" + "".join(f"<li>{escape(b)}</li>" for b in bullets) + "</ul>")
        url = catalog.settings.upgrade_url
        if url:
            label = "Contact us" if plan.price is None and not (synced.get(name) or {}).get("prices") else f"Choose {title}"
            parts.append(f'<a class="cta" href="{escape(url)}">{escape(label)}</a>')
        parts.append("</article>")
        cards.append("".join(parts))
    packs = _packs(catalog, snapshot.get("packs") or {})
    return document(
        "Pricing",
        STYLE,
        "<h1>Pricing</h1>"
        '<p class="lead">Pick the plan that fits your usage. Upgrade or downgrade at any time.</p>'
        f'<section class="plans">{"".join(cards)}</section>{packs}',
    )


def _packs(catalog: Catalog, synced: dict[str, Any]) -> str:
    if not catalog.packs:
        return ""
    currency = catalog.settings.currency
    items = []
    for name, pack in catalog.packs.items():
        price = (synced.get(name) or {}).get("price")
        if price and price.get("unit_amount") is not None:
            amount = show(int(price["unit_amount"]), price.get("currency") or currency)
        elif pack.price is not None:
            amount = show(to_minor(pack.price, currency), currency)
        else:
            amount = ""
        title = pack.name or name.replace("_", " ").title()
        bonus = f" + {pack.bonus:,} bonus" if pack.bonus else ""
        items.append(
            f'<li class="pack"><strong>{escape(title)}</strong>{pack.credits:,} credits{escape(bonus)}'
            f"{' for ' + escape(amount) if amount else ''}</li>"
        )
    return (
        '<section class="packs"><h2>Credit packs</h2>'
        '<p class="lead">Credits that never expire, on top of your plan.</p>'
        f'<ul class="pack-list">{"".join(items)}</ul></section>'
    )


def pricing_route(catalog: Callable[[], Catalog], book: PriceBook) -> Route:
    """The page, rendered from the catalog running when it is asked for (a published one replaces it)."""

    async def page(request: Request) -> Response:
        return HTMLResponse(render(catalog(), await book.current()))

    return Route("/_gateway/pricing", page, methods=["GET"])
