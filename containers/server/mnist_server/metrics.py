"""Prometheus metrics of the server, served at ``GET /metrics``.

``http_requests_total`` and ``http_request_duration_seconds`` count every
request by route template and status. Labels use the template, not the raw
path, so unknown paths cannot grow the label set. ``predictions_total``
counts predicted digits by model version.
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
            self.metrics.requests.labels(route_path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route_path).observe(
                time.perf_counter() - started
            )
