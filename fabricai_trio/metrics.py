"""Prometheus metrics: one `CollectorRegistry` per app (served at `GET /metrics` by
api/routes.py).

`Metrics` is the `GenerationObserver` the `GenerationService` calls (tokens, latency,
outcomes, cancellations, 429s, store errors) and what the request wrapper reports HTTP
requests to. Queue depth and active generations are gauges read from the admission
stats at scrape time, so they can never drift from the truth; so are the batched
engine's figures (sequences per decode step, prefix-cache reuse), from `Engine.info()`.
A per-app registry (not prometheus_client's global one) lets several apps live in one
process (tests).
See docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .core.events import CancelCause, FinishReason
from .observer import FinishedGeneration, StoreErrorKind

if TYPE_CHECKING:
    from .admission import Admission
    from .core.engine import EngineInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CANCEL_CAUSES = get_args(CancelCause)
STORE_ERROR_KINDS = get_args(StoreErrorKind)
FINISH_REASONS = get_args(FinishReason)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: The `method` label's values: any other method counts as `OTHER`, so a client cannot
#: add a series (kept for ever) per made-up method.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The bounded `method` label of an HTTP request."""
    return method if method in HTTP_METHODS else "OTHER"


def _stat(admission: Admission, attribute: str) -> Callable[[], float]:
    return lambda: float(getattr(admission.stats(), attribute))


class BatchingCollector(Collector):
    """The batched engine's step figures, read from `Engine.info().extra` at scrape time
    (nothing for an engine that does not batch)."""

    def __init__(self, engine_info: Callable[[], EngineInfo]) -> None:
        self._engine_info = engine_info

    def collect(self) -> Iterator[Metric]:
        extra = self._engine_info().extra
        steps = extra.get("batch_size_steps")
        if not isinstance(steps, dict):
            return
        counts = {int(size): int(n) for size, n in steps.items()}
        yield HistogramMetricFamily(
            "fabricai_batch_size", "Sequences decoded together, per decode step.",
            buckets=[(str(float(le)), sum(n for size, n in counts.items() if size <= le))
                     for le in BATCH_BUCKETS] + [("+Inf", sum(counts.values()))],
            sum_value=sum(size * n for size, n in counts.items()),
        )
        for name, key, doc in (
            ("fabricai_prefix_cache_hits", "prefix_cache_hits",
             "Prompts that started from a cached prefix."),
            ("fabricai_prompt_tokens_reused", "prompt_tokens_reused",
             "Prompt tokens taken from the prefix cache instead of evaluated."),
        ):
            value = extra.get(key)
            yield CounterMetricFamily(name, doc, value=value if isinstance(value, int) else 0)


class Metrics:
    """Every instrument of one app; implements `observer.GenerationObserver`."""

    def __init__(self, admission: Admission, engine_info: Callable[[], EngineInfo]) -> None:
        self.registry = registry = CollectorRegistry()
        registry.register(BatchingCollector(engine_info))
        self.http_requests = Counter(
            "fabricai_http_requests", "HTTP requests by route template, method and status.",
            ["route", "method", "status"], registry=registry,
        )
        self.http_duration = Histogram(
            "fabricai_http_request_duration_seconds",
            "Time from request to the end of the response (whole stream included).",
            ["route"], registry=registry,
        )
        self.rejections = Counter(
            "fabricai_queue_rejections", "Requests refused with 429 because the queue was full.",
            registry=registry,
        )
        self.generations = Counter(
            "fabricai_generations", "Generations that ended, by finish reason.",
            ["finish_reason"], registry=registry,
        )
        self.cancellations = Counter(
            "fabricai_cancellations", "Generations cancelled, by cause.",
            ["cause"], registry=registry,
        )
        self.completion_tokens = Counter(
            "fabricai_generation_tokens", "Tokens generated (cancelled generations included).",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "fabricai_prompt_tokens", "Prompt tokens of generations that got a slot.",
            registry=registry,
        )
        self.ttft = Histogram(
            "fabricai_time_to_first_token_seconds",
            "From accepting a request (queue wait included) to its first visible token.",
            buckets=TTFT_BUCKETS, registry=registry,
        )
        self.token_latency = Histogram(
            "fabricai_time_per_output_token_seconds",
            "Decode time of each token after the first.",
            buckets=TOKEN_BUCKETS, registry=registry,
        )
        self.store_errors = Counter(
            "fabricai_session_store_errors", "Session store calls that failed or timed out.",
            ["kind"], registry=registry,
        )
        gauges = {
            "fabricai_queue_depth": ("Requests waiting for a slot.", "queued"),
            "fabricai_active_generations": ("Generations holding a slot.", "active"),
            "fabricai_queue_capacity": ("MAX_QUEUE_SIZE.", "queue_capacity"),
            "fabricai_max_concurrent_generations": ("MAX_CONCURRENT_REQUESTS.", "max_concurrent"),
        }
        for name, (doc, attribute) in gauges.items():
            Gauge(name, doc, registry=registry).set_function(_stat(admission, attribute))
        # Known label values start at 0, so a rate() works from the first scrape.
        for cause in CANCEL_CAUSES:
            self.cancellations.labels(cause)
        for kind in STORE_ERROR_KINDS:
            self.store_errors.labels(kind)
        for reason in FINISH_REASONS:
            self.generations.labels(reason)

    # --- GenerationObserver ---

    def on_rejected(self) -> None:
        self.rejections.inc()

    def on_token_timing(self, seconds: float, tokens: int) -> None:
        for _ in range(tokens):  # 0 for a final flush, which decoded nothing
            self.token_latency.observe(seconds / tokens)

    def on_finished(self, generation: FinishedGeneration, *, admitted: bool) -> None:
        reason = generation.finish_reason
        if reason is None or reason == "cancelled":
            reason = "cancelled"
            self.cancellations.labels(generation.cancel_cause or "disconnect").inc()
        self.generations.labels(reason).inc()
        self.completion_tokens.inc(generation.completion_tokens)
        if admitted:
            self.prompt_tokens.inc(generation.prompt_tokens)
        if generation.ttft_seconds is not None:
            self.ttft.observe(generation.ttft_seconds)

    def on_store_error(self, kind: StoreErrorKind) -> None:
        self.store_errors.labels(kind).inc()

    # --- HTTP ---

    def on_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method_label(method), str(status)).inc()
        self.http_duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
