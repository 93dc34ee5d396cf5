"""BENCH_TRACING=1: the gateway lines of ../shared/bench trace every request (gateway/tracing.py) with the SDK's
real TracerProvider and BatchSpanProcessor, into an exporter that drops each batch in process (no collector on
the machine to share the cores with), so they measure tracing on against off."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def wanted() -> bool:
    return os.environ.get("BENCH_TRACING") == "1"


def provider() -> Any:
    """A TracerProvider whose spans are made, batched and exported as in production, then dropped."""
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    made = TracerProvider()
    made.add_span_processor(BatchSpanProcessor(Dropped()))
    return made
