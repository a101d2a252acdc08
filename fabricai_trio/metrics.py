"""Prometheus metrics: one `CollectorRegistry` per app (served at `GET /metrics` by
api/routes.py).

`Metrics` is the `GenerationObserver` the `GenerationService` calls (tokens, latency,
outcomes, cancellations, 429s, store errors) and what the request wrapper reports HTTP
requests to. Queue depth and active generations are gauges read from the admission
stats at scrape time, so they can never drift from the truth; so are the batched
engine's figures (sequences per decode step, prefix-cache reuse), from `Engine.info()`.
Everything about generations has a `model` label, whose values are the served models
(MODELS, or the one LLM_MODEL): a bounded set, each present from the first scrape.
Per-class figures add `priority_class`, whose values are PRIORITY_CLASSES (at most 8,
fixed at start-up; a request's class is always one of them), and refusals `reason`,
one of `observer.RefusalReason`: no label a client can grow.
A per-app registry (not prometheus_client's global one) lets several apps live in one
process (tests).
See docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .core.events import CancelCause, FinishReason
from .observer import FinishedGeneration, RefusalReason, StoreErrorKind

if TYPE_CHECKING:
    from .models import ModelSet

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CANCEL_CAUSES = get_args(CancelCause)
STORE_ERROR_KINDS = get_args(StoreErrorKind)
FINISH_REASONS = get_args(FinishReason)
REFUSAL_REASONS = get_args(RefusalReason)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: The `method` label's values: any other method counts as `OTHER`, so a client cannot
#: add a series (kept for ever) per made-up method.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The bounded `method` label of an HTTP request."""
    return method if method in HTTP_METHODS else "OTHER"


ADMISSION_GAUGES = {
    "fabricai_queue_depth": ("Requests waiting for a slot.", "queued"),
    "fabricai_active_generations": ("Slots held by running generations (a request for n "
                                    "choices holds n).", "active"),
    "fabricai_queue_capacity": ("MAX_QUEUE_SIZE.", "queue_capacity"),
    "fabricai_max_concurrent_generations": ("MAX_CONCURRENT_REQUESTS.", "max_concurrent"),
}


class ModelsCollector(Collector):
    """Each model's admission (queue, slots) and its engine's step and prefix-cache
    figures (for engines that report them), read at scrape time, labelled by model."""

    def __init__(self, models: ModelSet) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        for name, (doc, attribute) in ADMISSION_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model in self._models:
                family.add_metric([model.name], float(getattr(model.admission.stats(), attribute)))
            yield family
        depth = GaugeMetricFamily(
            "fabricai_queue_depth_by_class", "Requests waiting for a slot, by priority class.",
            labels=["model", "priority_class"],
        )
        admissions = CounterMetricFamily(
            "fabricai_admissions", "Requests that got a slot, by priority class.",
            labels=["model", "priority_class"],
        )
        for model in self._models:
            for figures in model.admission.stats().classes:
                depth.add_metric([model.name, figures.name], float(figures.queued))
                admissions.add_metric([model.name, figures.name], figures.admitted)
        yield depth
        yield admissions
        extras = [(m.name, m.engine.info().extra) for m in self._models]
        kv = [(n, x) for n, x in extras if isinstance(x.get("kv_cells_total"), int)]
        if kv:
            usage = GaugeMetricFamily(
                "fabricai_kv_cache_usage_ratio",
                "KV cells in use (running sequences and cached prefixes) over the cells "
                "the model's context holds, from 0 to 1.", labels=["model"],
            )
            for model_name, extra in kv:
                used, total = extra.get("kv_cells_used"), extra["kv_cells_total"]
                assert isinstance(used, int) and isinstance(total, int)
                usage.add_metric([model_name], used / total if total else 0.0)
            yield usage
        batched = [(n, x) for n, x in extras if isinstance(x.get("batch_size_steps"), dict)]
        if batched:
            sizes = HistogramMetricFamily(
                "fabricai_batch_size", "Sequences decoded together, per decode step.",
                labels=["model"],
            )
            for model_name, extra in batched:
                steps = extra["batch_size_steps"]
                assert isinstance(steps, dict)
                counts = {int(size): int(n) for size, n in steps.items()}
                sizes.add_metric(
                    [model_name],
                    buckets=[(str(float(le)), sum(n for size, n in counts.items() if size <= le))
                             for le in BATCH_BUCKETS] + [("+Inf", sum(counts.values()))],
                    sum_value=sum(size * n for size, n in counts.items()),
                )
            yield sizes
        caching = [(n, x) for n, x in extras if isinstance(x.get("prefix_cache_hits"), int)]
        if not caching:
            return
        for name, key, doc in (
            ("fabricai_prefix_cache_hits", "prefix_cache_hits",
             "Prompts that started from a cached prefix."),
            ("fabricai_prompt_tokens_reused", "prompt_tokens_reused",
             "Prompt tokens taken from the prefix cache instead of evaluated."),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model"])
            for model_name, extra in caching:
                value = extra.get(key)
                counter.add_metric([model_name], value if isinstance(value, int) else 0)
            yield counter


class Metrics:
    """Every instrument of one app; implements `observer.GenerationObserver`."""

    def __init__(self, models: ModelSet) -> None:
        self.registry = registry = CollectorRegistry()
        registry.register(ModelsCollector(models))
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
            "fabricai_queue_rejections",
            "Requests refused with 429 because the model's queue was full.",
            ["model"], registry=registry,
        )
        self.fast_refusals = Counter(
            "fabricai_fast_refusals",
            "429s answered before the web framework ran (FAST_REFUSALS); each is also in "
            "fabricai_http_requests_total, and a full queue's in fabricai_queue_rejections.",
            registry=registry,
        )
        self.generations = Counter(
            "fabricai_generations", "Generations that ended, by model and finish reason.",
            ["model", "finish_reason"], registry=registry,
        )
        self.cancellations = Counter(
            "fabricai_cancellations", "Generations cancelled, by cause.",
            ["cause"], registry=registry,
        )
        self.completion_tokens = Counter(
            "fabricai_generation_tokens", "Tokens generated (cancelled generations included).",
            ["model"], registry=registry,
        )
        self.prompt_tokens = Counter(
            "fabricai_prompt_tokens", "Prompt tokens of generations that got a slot.",
            ["model"], registry=registry,
        )
        self.refusals = Counter(
            "fabricai_refusals",
            "Requests refused with 429 for their identity alone: `per_key_limit` "
            "(MAX_QUEUED_PER_KEY) or `rate_limited` (RATE_LIMIT_*_PER_MINUTE).",
            ["model", "reason", "priority_class"], registry=registry,
        )
        self.ttft = Histogram(
            "fabricai_time_to_first_token_seconds",
            "From accepting a request (queue wait included) to its first visible token.",
            ["model", "priority_class"], buckets=TTFT_BUCKETS, registry=registry,
        )
        self.queue_wait = Histogram(
            "fabricai_queue_wait_seconds",
            "From accepting a request to its slot, for requests that got one (observed "
            "when they end).",
            ["model", "priority_class"], buckets=TTFT_BUCKETS, registry=registry,
        )
        self.token_latency = Histogram(
            "fabricai_time_per_output_token_seconds",
            "Decode time of each token after the first.",
            ["model"], buckets=TOKEN_BUCKETS, registry=registry,
        )
        self.store_errors = Counter(
            "fabricai_session_store_errors", "Session store calls that failed or timed out.",
            ["kind"], registry=registry,
        )
        # Children by label values, looked up once (`labels()` is a locked lookup that
        # builds its key each time: the largest cost of a metric on a 429's path).
        self._rejections: dict[str, Any] = {}
        self._http: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        # Known label values start at 0, so a rate() works from the first scrape.
        for cause in CANCEL_CAUSES:
            self.cancellations.labels(cause)
        for kind in STORE_ERROR_KINDS:
            self.store_errors.labels(kind)
        for model in models:
            for reason in FINISH_REASONS:
                self.generations.labels(model.name, reason)
            for per_model in (self.rejections, self.completion_tokens, self.prompt_tokens,
                              self.token_latency):
                per_model.labels(model.name)
            for priority_class in model.admission.classes:
                self.ttft.labels(model.name, priority_class)
                self.queue_wait.labels(model.name, priority_class)
                for refusal in REFUSAL_REASONS:
                    self.refusals.labels(model.name, refusal, priority_class)

    # --- GenerationObserver ---

    def on_rejected(self, model: str) -> None:
        child = self._rejections.get(model)
        if child is None:
            child = self._rejections[model] = self.rejections.labels(model)
        child.inc()

    def on_refused(self, model: str, reason: RefusalReason, *, priority_class: str) -> None:
        self.refusals.labels(model, reason, priority_class).inc()

    def on_token_timing(self, seconds: float, tokens: int, *, model: str) -> None:
        histogram = self.token_latency.labels(model)
        for _ in range(tokens):  # 0 for a final flush, which decoded nothing
            histogram.observe(seconds / tokens)

    def on_finished(self, generation: FinishedGeneration, *, admitted: bool) -> None:
        reason = generation.finish_reason
        if reason is None or reason == "cancelled":
            reason = "cancelled"
            self.cancellations.labels(generation.cancel_cause or "disconnect").inc()
        model = generation.model_name
        self.generations.labels(model, reason).inc()
        self.completion_tokens.labels(model).inc(generation.completion_tokens)
        if admitted:
            self.prompt_tokens.labels(model).inc(generation.prompt_tokens)
        priority_class = generation.priority_class
        if generation.queue_wait_seconds is not None:
            self.queue_wait.labels(model, priority_class).observe(generation.queue_wait_seconds)
        if generation.ttft_seconds is not None:
            self.ttft.labels(model, priority_class).observe(generation.ttft_seconds)

    def on_store_error(self, kind: StoreErrorKind) -> None:
        self.store_errors.labels(kind).inc()

    # --- HTTP ---

    def on_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method_label(method), status)  # bounded: templates, HTTP_METHODS
        children = self._http.get(key)
        if children is None:
            children = self._http[key] = (
                self.http_requests.labels(route, key[1], str(status)),
                self.http_duration.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def on_fast_refusal(self) -> None:
        self.fast_refusals.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
