"""The catalog: the example plans.toml loads and means what it says; every bad file lists its problems."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from gateway.catalog import Catalog, load_catalog, parse_catalog
from gateway.errors import CatalogError

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

EXAMPLE = Path(__file__).resolve().parents[1] / "plans.toml"

MINIMAL = """
[catalog]
default_plan = "free"
[plans.free]
allows = ["api_access"]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text)
    return [str(p) for p in info.value.problems]


def test_example_loads_with_every_element() -> None:
    """The project's plans.toml (DESIGN §2's example) loads, and each element means what its comment says."""
    catalog = load_catalog(EXAMPLE)
    assert isinstance(catalog, Catalog)
    assert catalog.settings.default_plan == "free"
    assert catalog.settings.past_due_grace_seconds == 3 * 86400
    free, pro, enterprise = catalog.plans["free"], catalog.plans["pro"], catalog.plans["enterprise"]
    assert free.rate is not None and (free.rate.limit, free.rate.per_seconds, free.rate.burst) == (5, 1, 5)
    assert pro.rate is not None and (pro.rate.limit, pro.rate.burst, pro.rate.window) == (100, 200, 2)
    assert pro.limits["custom_models"].grace_seconds == 7 * 86400
    assert pro.limits["custom_models"].warn_at == (0.6, 0.8, 0.95)
    assert free.limits["projects"].per is None and free.limits["projects"].after_limit == "block_usage"
    assert pro.credit_period.kind == "billing_cycle" and free.credit_period.kind == "month"
    assert enterprise.is_unlimited("credits") and enterprise.meta == {"support_tier": "dedicated"}
    assert catalog.plan_for_price("price_pro_29") == "pro"
    chat = catalog.operations["chat"]
    assert chat.metered and chat.hold == 50 and chat.price(1234.2) == 1235 and chat.price(10**9) == 20000
    assert catalog.operations["generate_image"].cost == 1
    assert catalog.packs["starter"].credits == 1000 and catalog.packs["starter"].bonus == 100
    assert catalog.feature_title("flux_hd_access") == "Flux HD"
    assert catalog.plan_title("pro") == "Pro"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/images", "POST /v1/images"),
        ("POST", "/v1/images/", "POST /v1/images"),
        ("DELETE", "/v1/projects/42", "DELETE /v1/projects/{id}"),
        ("DELETE", "/v1/projects/42/x", "* /v1/*"),
        ("GET", "/v1/status", "GET /v1/status"),
        ("HEAD", "/v1/status", "GET /v1/status"),
        ("GET", "/v1", "* /v1/*"),
        ("GET", "/v1/anything/deep/down", "* /v1/*"),
        ("GET", "/v2/x", None),
        ("GET", "/v1images", None),
    ],
)
def test_route_matching(method: str, path: str, expected: str | None) -> None:
    """First match wins; {name} is one segment; a final * is any rest; trailing slash ignored; HEAD uses GET."""
    route = load_catalog(EXAMPLE).route_for(method, path)
    assert (route.match if route else None) == expected


def test_rate_limit_forms() -> None:
    """A rate limit is "N/unit", "N/duration" or a table with limit, per and burst."""
    catalog = parse_catalog(
        MINIMAL.replace('allows = ["api_access"]', 'allows = ["api_access"]\nrate_limit = "600/minute"')
        + '[[routes]]\nmatch = "GET /x"\nrate_limit = { limit = 10, per = "5s", burst = 3 }\n'
    )
    rate = catalog.plans["free"].rate
    assert rate is not None and (rate.limit, rate.per_seconds, rate.burst) == (600, 60, 600)
    route_rate = catalog.routes[0].rate
    assert route_rate is not None and route_rate.name == "rate:GET /x" and route_rate.per_seconds == 5


def test_unknown_key_is_named_with_its_place() -> None:
    """An unknown key is an error naming its dotted place, not silently ignored."""
    assert problems(MINIMAL + 'colour = "red"\n') == ['plans.free.colour: unknown key "colour": remove it or check its spelling']


def test_wrong_type() -> None:
    """A wrong type names the place, what was expected and what was found."""
    (found,) = problems(MINIMAL + "credits = \"lots\"\n")
    assert found.startswith("plans.free.credits: expected a whole number")


def test_unknown_period() -> None:
    """An unknown period gives the message of DESIGN §2."""
    text = MINIMAL + 'limits.custom_models = { to = 3, per = "fortnight" }\n'
    (found,) = problems(text)
    assert found.startswith('plans.free.limits.custom_models.per: unknown period "fortnight"')


def test_thresholds_out_of_range() -> None:
    """Warning thresholds must lie in (0, 1]."""
    (found,) = problems(MINIMAL + "limits.x = { to = 3, warn_at = [0.5, 1.5] }\n")
    assert "plans.free.limits.x.warn_at" in found and "(0, 1]" in found


def test_grace_without_grace_then_block() -> None:
    """grace (and grace_max) only with after_limit = "grace_then_block"."""
    (found,) = problems(MINIMAL + 'limits.x = { to = 3, per = "month", grace = "2d" }\n')
    assert found == 'plans.free.limits.x: grace only applies with after_limit = "grace_then_block"'


def test_route_naming_unknown_things() -> None:
    """A route naming an unknown limit, operation or feature is refused, each problem listed."""
    text = MINIMAL + '[[routes]]\nmatch = "POST /x"\nlimit = "widgets"\nspend = "nope"\nfeatures = ["ghost"]\n'
    found = problems(text)
    assert 'routes[0].limit: unknown limit "widgets": no plan defines limits.widgets' in found
    assert 'routes[0].spend: unknown operation "nope": define [operations.nope]' in found
    assert any(p.startswith('routes[0].features[0]: unknown feature "ghost"') for p in found)


def test_duplicate_stripe_prices() -> None:
    """No two plans share a Stripe price."""
    text = MINIMAL + 'stripe_price = "price_1"\n[plans.pro]\nstripe_price = { month = "price_1" }\n'
    (found,) = problems(text)
    assert found.startswith('plans.pro.stripe_price: price "price_1" is also the price of plan "free"')


def test_limit_means_the_same_in_every_plan() -> None:
    """A limit key is the same kind (cap or per-period, same per) in every plan that has it."""
    text = MINIMAL + "limits.x = { to = 3 }\n[plans.pro]\nlimits.x = { to = 3, per = \"month\" }\n"
    (found,) = problems(text)
    assert found.startswith("plans.pro.limits.x: is a per month here but a persistent cap")


def test_missing_default_and_highlighted_plans() -> None:
    """The default and highlighted plans must exist."""
    found = problems('[catalog]\ndefault_plan = "basic"\nhighlighted_plan = "gold"\n[plans.free]\n')
    assert any(p.startswith('catalog.default_plan: plan "basic" does not exist') for p in found)
    assert any(p.startswith('catalog.highlighted_plan: plan "gold" does not exist') for p in found)


def test_every_problem_listed_at_once() -> None:
    """A file with many problems lists all of them in one error, not just the first."""
    text = (
        '[catalog]\ntimezone = "Mars/Olympus"\non_redis_down = "maybe"\n'
        '[plans.free]\nrate_limit = "fast"\nlimits.a = { to = -1 }\nlimits.b = { to = 1, after_limit = "explode" }\n'
        '[[routes]]\nmatch = "FETCH /x"\n'
    )
    found = problems(text)
    places = {p.split(":")[0] for p in found}
    assert {
        "catalog.timezone",
        "catalog.on_redis_down",
        "plans.free.rate_limit",
        "plans.free.limits.a.to",
        "plans.free.limits.b.after_limit",
        "routes[0].match",
    } <= places


def test_operation_pricing_rules() -> None:
    """An operation is either a fixed cost or per_unit with a units source."""
    found = problems(MINIMAL + "[operations.a]\nper_unit = 1\n[operations.b]\n[operations.c]\ncost = 1\nunits = \"response.json:x\"\n")
    assert any(p.startswith("operations.a: per_unit needs units") for p in found)
    assert any(p.startswith("operations.b: give either cost") for p in found)
    assert any(p.startswith("operations.c: units, reserve and max_units only apply with per_unit") for p in found)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    """A file that is not TOML, or not there, says so and what to do."""
    assert problems("[plans\n")[0].startswith("not valid TOML")
    with pytest.raises(CatalogError, match="GATEWAY_PLANS"):
        load_catalog(tmp_path / "nope.toml")


def test_catalog_is_immutable() -> None:
    """The loaded catalog cannot be changed by accident."""
    catalog = load_catalog(EXAMPLE)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        catalog.plans["free"].credits = 5  # type: ignore[misc]


def test_policy_names_must_fit_in_headers() -> None:
    """Limit names and rate-limited route matches go into RateLimit headers: printable ASCII only."""
    (found,) = problems(MINIMAL + "limits.\"café\" = { to = 3 }\n")
    assert found.startswith('plans.free.limits.café: a limit name must be printable ASCII')


def test_references_checked_even_when_the_shape_is_wrong() -> None:
    """A file with a wrong type somewhere still reports its broken references in the same pass."""
    found = problems(
        '[catalog]\ndefault_plan = "gold"\n[plans.free]\ncredits = "many"\n'
        '[[routes]]\nmatch = "POST /x"\nspend = "nope"\n'
    )
    assert any(p.startswith("plans.free.credits: expected a whole number") for p in found)
    assert any(p.startswith('catalog.default_plan: plan "gold" does not exist') for p in found)
    assert any(p.startswith('routes[0].spend: unknown operation "nope"') for p in found)


def test_unknown_keys_get_did_you_mean() -> None:
    """A key within two edits of a known one at the same place is suggested; a far one is not."""
    found = problems(
        MINIMAL + 'rate_limt = "5/second"\nlimits.p = { tto = 1 }\nrate_limit = { limit = 1, prr = "1s" }\n'
        "[[route]]\nmatch = \"GET /x\"\n[operations.x]\ncots = 1\n[catalog2]\n"
    )
    assert 'plans.free.rate_limt: unknown key "rate_limt": did you mean "rate_limit"?' in found
    assert 'plans.free.limits.p.tto: unknown key "tto": did you mean "to"?' in found
    assert 'plans.free.rate_limit.prr: unknown key "prr": did you mean "per"?' in found
    assert 'route: unknown key "route": did you mean "routes"?' in found
    assert 'operations.x.cots: unknown key "cots": did you mean "cost"?' in found
    assert 'catalog2: unknown key "catalog2": did you mean "catalog"?' in found
    # The table form of rate_limit was understood: no "expected a string" beside the problem inside it.
    assert not any(p.startswith("plans.free.rate_limit: expected") for p in found)
    assert problems(MINIMAL + "zebra = 1\n") == ['plans.free.zebra: unknown key "zebra": remove it or check its spelling']


def test_a_hold_larger_than_a_plans_credits_is_a_warning() -> None:
    """A route a plan opens (features and limit) that holds more than the plan's credits loads, with a warning
    naming both numbers; plans without the route's features, unlimited or without credits are not named."""
    text = MINIMAL.replace('allows = ["api_access"]', 'allows = ["api_access"]\ncredits = 100') + (
        '[plans.pro]\nallows = ["api_access", "hd"]\ncredits = 500\ncredits_per = "week"\n'
        '[plans.max]\nallows = ["api_access", "hd"]\nunlimited = ["credits"]\n'
        '[plans.payg]\nallows = ["api_access", "hd"]\n'
        '[operations.chat]\nper_unit = 1\nunits = "response.json:usage.total_tokens"\nreserve = 2000\n'
        '[operations.render]\ncost = 300\n'
        '[[routes]]\nmatch = "POST /v1/chat"\nfeatures = ["api_access"]\nspend = "chat"\n'
        '[[routes]]\nmatch = "POST /v1/render"\nfeatures = ["hd"]\nspend = "render"\n'
        '[[routes]]\nmatch = "POST /v1/cheap"\nspend = "render"\n'
    )
    catalog = parse_catalog(text)
    assert [str(w) for w in catalog.warnings] == [
        "plans.free: POST /v1/chat holds 2000 credits; the plan has 100 a month",
        "plans.pro: POST /v1/chat holds 2000 credits; the plan has 500 a week",
        "plans.free: POST /v1/cheap holds 300 credits; the plan has 100 a month",
    ]
    assert load_catalog(EXAMPLE).warnings == ()


def test_a_catalog_that_cannot_be_read_says_why(tmp_path: Path) -> None:
    """A directory or a file that is not UTF-8 is one problem naming the file and what to do."""
    with pytest.raises(CatalogError) as info:
        load_catalog(tmp_path)
    assert str(info.value) == f"gateway: {tmp_path} is a directory: name the catalog file in it, e.g. {tmp_path / 'plans.toml'}"
    latin = tmp_path / "plans.toml"
    latin.write_bytes(b'[catalog]\ndefault_plan = "fr\xe9e"\n')
    with pytest.raises(CatalogError, match="is not UTF-8 text"):
        load_catalog(latin)


SHADOW = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"
enforce = "shadow"
[plans.free]
price = 0
allows = ["api_access"]
[plans.pro]
price = 29
allows = ["api_access"]
enforce = "enforce"
[plans.old_pro]
price = 19
status = "archived"
allows = ["api_access"]
[[routes]]
match = "POST /v1/exports"
enforce = "shadow"
[[routes]]
match = "* /v1/*"
"""


def test_enforcement_is_the_most_specific_say_route_then_plan_then_catalog() -> None:
    """`enforce` on a route wins over its plan's, which wins over [catalog]'s; the default is "enforce"."""
    catalog = parse_catalog(SHADOW)
    exports, other = catalog.route_for("POST", "/v1/exports"), catalog.route_for("GET", "/v1/x")
    assert catalog.enforcement("pro", exports) == "shadow"
    assert catalog.enforcement("pro", other) == "enforce"
    assert catalog.enforcement("free", other) == "shadow"
    assert catalog.enforcement("free", None) == "shadow"
    assert parse_catalog(MINIMAL).enforcement("free", None) == "enforce"


def test_an_archived_plan_loads_and_is_not_on_offer() -> None:
    """status = "archived" keeps the plan (its billables keep its terms) but leaves it off the plans on offer."""
    catalog = parse_catalog(SHADOW)
    assert catalog.plans["old_pro"].archived and not catalog.plans["pro"].archived
    assert catalog.plans_by_price() == ["free", "pro"]
    assert catalog.plan_for_price("x") is None and "old_pro" in catalog.plans


def test_status_and_enforce_take_only_their_words_and_the_default_and_highlighted_plans_stay_active() -> None:
    """A wrong word for either key is a problem at its place; an archived default or highlighted plan too."""
    bad = SHADOW.replace('enforce = "shadow"\n[plans.free]', 'enforce = "loud"\n[plans.free]')
    bad = bad.replace('status = "archived"', 'status = "retired"')
    found = problems(bad)
    assert any(p.startswith("catalog.enforce:") for p in found), found
    assert any(p.startswith("plans.old_pro.status:") for p in found), found
    archived_default = SHADOW.replace('default_plan = "free"', 'default_plan = "old_pro"')
    assert any(p.startswith("catalog.default_plan:") and "archived" in p for p in problems(archived_default))
    archived_highlight = SHADOW.replace('highlighted_plan = "pro"', 'highlighted_plan = "old_pro"')
    assert any(p.startswith("catalog.highlighted_plan:") and "archived" in p for p in problems(archived_highlight))


def test_an_archived_plan_is_never_named_in_an_upgrade_sentence() -> None:
    """The cheapest plan that would admit is chosen among active plans: a cheaper archived one that has
    the feature is passed over."""
    from gateway.decision import Decision, Violation, upgrade_plan

    text = """
[catalog]
default_plan = "free"
[plans.free]
price = 0
allows = ["api_access"]
disallows = ["hd"]
[plans.legacy]
price = 5
status = "archived"
allows = ["api_access", "hd"]
[plans.pro]
price = 29
allows = ["api_access", "hd"]
"""
    catalog = parse_catalog(text)
    denied = Decision(False, "org_1", "free", violations=[Violation("hd", "feature")])
    assert upgrade_plan(denied, catalog) == "pro"
    assert "Pro" in denied.problem(catalog)["detail"] and "Legacy" not in denied.problem(catalog)["detail"]


def test_every_number_is_at_most_2_53_minus_1() -> None:
    """A rate of 2**60 or 10**30 requests, credits, counts, costs and prices past 2**53 - 1, and a duration of
    aeons are problems at their place: the scripts and the headers hold every number that loads."""
    huge = MINIMAL + f"""
rate_limit = {{ limit = {2**60}, per = "1s", burst = {10**30} }}
credits = {10**30}
limits.projects = {{ to = {2**53} }}
limits.exports = {{ to = 5, per = "99999999999999w" }}
[operations.chat]
per_unit = 1e300
units = "response.json:usage.total_tokens"
max_units = {2**60}
[[routes]]
match = "POST /v1/x"
rate_limit = "{10**30}/second"
cost = {2**63}
"""
    found = problems(huge)
    assert sorted(p.split(":")[0] for p in found) == sorted([
        "plans.free.rate_limit.limit", "plans.free.rate_limit.burst", "plans.free.credits", "plans.free.limits.projects.to",
        "plans.free.limits.exports.per", "operations.chat.per_unit", "operations.chat.max_units", "routes[0].rate_limit",
        "routes[0].cost"]), found  # fmt: skip
    assert all("9007199254740991" in p or "century" in p for p in found), found


def test_a_path_that_is_an_earlier_route_in_another_case_has_a_case_twin() -> None:
    """`/V1/images` is POST /v1/images in another case (the catch-all it matches comes later); a route spelled with
    capitals is found from a lower-case path too; a path whose {id} or * part has capitals is its own route."""
    catalog = parse_catalog(MINIMAL + '[[routes]]\nmatch = "POST /v1/images"\n[[routes]]\nmatch = "GET /v1/Files/{id}"\n'
                            '[[routes]]\nmatch = "* /*"\n')  # fmt: skip
    twins = {(m, p): catalog.case_twin(m, p, catalog.route_for(m, p)) for m, p in [
        ("POST", "/V1/images"), ("post", "/v1/Images/"), ("GET", "/v1/files/1"), ("GET", "/v1/Files/AbC"), ("POST", "/v1/images"),
        ("GET", "/V1/images")]}  # fmt: skip
    assert {k: t.match if t else None for k, t in twins.items()} == {
        ("POST", "/V1/images"): "POST /v1/images", ("post", "/v1/Images/"): "POST /v1/images",
        ("GET", "/v1/files/1"): "GET /v1/Files/{id}", ("GET", "/v1/Files/AbC"): None, ("POST", "/v1/images"): None,
        ("GET", "/V1/images"): None}  # fmt: skip
