"""The Prometheus exposition of the gateway's plain counters."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

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
