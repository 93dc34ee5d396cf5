"""The Prometheus exposition of the gateway's plain counters."""

from __future__ import annotations

from pathlib import Path

import httpx
from gateway_support import ADMIN_HEADERS, serving
from prometheus_client.parser import text_string_to_metric_families
from services import RedisServer
from waiting import wait_until

from gateway.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_counters_and_the_latency_histogram_render_as_prometheus_text() -> None:
    m = Metrics()
    m.decided("admitted")
    m.decided("admitted")
    m.decided("denied", ["hd", "rate"])
    m.decided("unauthorized", ())
    for seconds in (0.0004, 0.001, 0.0011, 3.0):  # 0.001 sits on a bound: `le` counts it in that bucket
        m.latency(seconds)
    m.redis_error()
    m.degraded()
    m.events([{"type": "warning"}, {"type": "warning"}, {"type": "block"}])
    got = samples(m)
    assert got[("gateway_decisions_total", (("outcome", "admitted"), ("policy", "")))] == 2
    assert got[("gateway_decisions_total", (("outcome", "denied"), ("policy", "hd")))] == 1
    assert got[("gateway_decisions_total", (("outcome", "denied"), ("policy", "rate")))] == 1
    assert got[("gateway_decisions_total", (("outcome", "unauthorized"), ("policy", "")))] == 1
    bucket = {dict(labels)["le"]: value for (name, labels), value in got.items() if name == "gateway_decision_seconds_bucket"}
    assert bucket["0.0005"] == 1 and bucket["0.001"] == 2 and bucket["0.002"] == 3 and bucket["1.0"] == 3
    assert bucket["+Inf"] == got[("gateway_decision_seconds_count", ())] == 4
    assert abs(got[("gateway_decision_seconds_sum", ())] - 3.0025) < 1e-9
    assert got[("gateway_redis_errors_total", ())] == 1 and got[("gateway_degraded_answers_total", ())] == 1
    assert got[("gateway_events_total", (("type", "warning"),))] == 2 and got[("gateway_events_total", (("type", "block"),))] == 1
    assert "billable" not in m.render().decode()


PROBED = """
[catalog]
default_plan = "free"

[plans.free]
price = 0
rate_limit = "1000/second"

[plans.pro]
price = 29
"""


def test_a_scrape_reads_the_breakers_the_record_and_the_outbox_as_they_are(tmp_path: Path) -> None:
    """gateway serve's /_gateway/metrics: each Redis breaker's state, the record's lag and the outbox, read when scraped."""
    with RedisServer() as redis_server, serving(tmp_path, PROBED, redis_port=redis_server.port, db_url=f"sqlite:///{tmp_path}/gw.db",
                                          billable_header="x-org") as served:

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            r = httpx.get(f"{served.url}/_gateway/metrics", headers=ADMIN_HEADERS, timeout=30)
            assert r.status_code == 200
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(r.text) for s in family.samples}  # fmt: skip

        def breakers() -> list[float]:
            return [value for (name, _), value in scrape().items() if name == "gateway_redis_breaker_state"]

        assert httpx.put(f"{served.url}/_gateway/admin/billables/org_1/plan", json={"plan": "pro"}, headers=ADMIN_HEADERS, timeout=30).is_success
        got = scrape()
        assert got[("gateway_webhook_backlog", (("state", "waiting"),))] == 1  # the plan_changed event; no webhook is set
        assert got[("gateway_webhook_backlog", (("state", "dead"),))] == 0
        assert got[("gateway_record_lag_seconds", ())] >= 0 and ("gateway_record_pending", ()) in got
        assert breakers() == [0]
        redis_server.stop()

        def tripped() -> bool:
            httpx.get(f"{served.url}/v1/anything", headers={"x-org": "org_2"}, timeout=30)
            return breakers() != [0]

        wait_until(tripped, "the Redis breaker to open")
        assert breakers()[0] in (1, 2)
