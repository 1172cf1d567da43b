"""Prometheus metrics (CONTRACT §8), one registry per application: nothing global."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _Callback(Collector):
    def __init__(self, name: str, doc: str, labels: list[str],
                 read: Callable[[], dict[tuple[str, ...], float]]) -> None:
        self._name, self._doc, self._labels, self._read = name, doc, labels, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._doc, labels=self._labels)
        try:
            values = self._read()
        except Exception:
            values = {}
        for labels, value in values.items():
            family.add_metric(list(labels), value)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gatepass_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.signins = Counter("gatepass_signins", "Sign-in attempts by outcome", ["outcome"],
                               registry=self.registry)
        self.password_hash_seconds = Histogram(
            "gatepass_password_hash_seconds", "Time spent hashing or verifying one password",
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
            registry=self.registry)
        self.deliveries = Counter("gatepass_outbox_attempts", "Delivery attempts by kind and outcome",
                                  ["kind", "outcome"], registry=self.registry)
        self.delivery_latency = Histogram(
            "gatepass_outbox_delivery_latency_seconds", "From queued to delivered", ["kind"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600, 86400),
            registry=self.registry)

    def gauge(self, name: str, doc: str, labels: list[str],
              read: Callable[[], dict[tuple[str, ...], float]]) -> None:
        self.registry.register(_Callback(name, doc, labels, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
