"""Prometheus metrics of the server, served at ``GET /metrics``.

``http_requests_total`` and ``http_request_duration_seconds`` count every
request by route template and status. Labels use the template, not the raw
path, so unknown paths cannot grow the label set. ``predictions_total``
counts predicted digits by model version.

``labels()`` looks its child up under a lock on every call, so the
labelled children are cached per label set. There are few label sets,
because the labels are route templates, the HTTP methods uvicorn's parser
accepts, status codes, and ten digits per model version.
"""

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServerMetrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from request start to the end of the response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "predictions_total",
            "Predicted digits by model version.",
            ["digit", "model_version"],
            registry=self.registry,
        )
        self._request_counters: dict[tuple[str, str, int], Any] = {}
        self._latency_histograms: dict[str, Any] = {}
        self._prediction_counters: dict[tuple[int, str], Any] = {}

    def record_request(
        self, route: str, method: str, status: int, seconds: float
    ) -> None:
        """Count one request and record its duration."""
        key = (route, method, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self.requests.labels(route, method, str(status))
            self._request_counters[key] = counter
        counter.inc()

        histogram = self._latency_histograms.get(route)
        if histogram is None:
            histogram = self.latency.labels(route)
            self._latency_histograms[route] = histogram
        histogram.observe(seconds)

    def count_prediction(self, digit: int, model_version: str) -> None:
        """Count one predicted digit."""
        key = (digit, model_version)
        counter = self._prediction_counters.get(key)
        if counter is None:
            counter = self.predictions.labels(str(digit), model_version)
            self._prediction_counters[key] = counter
        counter.inc()


class MetricsMiddleware:
    """ASGI middleware that records each HTTP request in `ServerMetrics`."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        status = 500

        async def send_and_record_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", "unmatched")
            self.metrics.record_request(
                route_path, scope["method"], status, time.perf_counter() - started
            )
