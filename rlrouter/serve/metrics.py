"""Prometheus metrics of the router server (its own registry, served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rlrouter_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("rlrouter_request_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.routes = Counter("rlrouter_routes", "Router decisions by tier and mode", ["tier", "mode"], registry=r)
        self.pool_calls = Counter("rlrouter_pool_calls", "Pool call attempts by tier and outcome (ok, retry, failed)",
                                  ["tier", "outcome"], registry=r)
        self.fallbacks = Counter("rlrouter_fallbacks", "Fallbacks by reason (malformed, pool_failure)", ["reason"],
                                 registry=r)
        self.malformed = Counter("rlrouter_malformed_router_outputs", "Router turns that did not parse", registry=r)
        self.cost = Counter("rlrouter_cost_usd", "Dollars spent on pool calls by tier", ["tier"], registry=r)
        self.budget_rejections = Counter("rlrouter_budget_rejections",
                                         "Requests whose budget could not pay for any call", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
