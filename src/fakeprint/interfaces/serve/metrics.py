"""What the service counts, for ``GET /metrics`` in the Prometheus text format (``prometheus_client``).

Each app has its own registry (several apps in one process, as in the tests, never mix their counts). Paths are
the service's own routes or ``other``, so that a scanner trying random URLs cannot grow the number of series.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

ROUTES = ("/v1/predict", "/v1/model", "/healthz", "/metrics", "/")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The service's counters, gauges and histograms, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("fakeprint_http_requests", "HTTP requests answered, by route and status code",
                                ("path", "status"), registry=r)
        self.request_seconds = Histogram("fakeprint_predict_request_seconds",
                                         "Time from a POST /v1/predict's arrival to its answer (successful ones)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("fakeprint_images_classified", "Images classified", registry=r)
        self.uploads_in_progress = Gauge("fakeprint_uploads_in_progress",
                                         "Predict requests admitted: being read, decoded, waiting or in a batch",
                                         registry=r)
        self.queue_depth = Gauge("fakeprint_batch_queue_depth", "Requests waiting for a model call", registry=r)
        self.queue_seconds = Histogram("fakeprint_batch_queue_seconds",
                                       "Time a request's images waited for their model call", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.batch_images = Histogram("fakeprint_batch_images", "Images per model call", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("fakeprint_batch_requests", "Requests per model call", buckets=BATCH_BUCKETS,
                                        registry=r)
        self.model_seconds = Histogram("fakeprint_model_call_seconds", "Time of one model call (a whole batch)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.refused = Counter("fakeprint_refused_requests",
                               "Predict requests refused for load: queue_full or deadline_exceeded", ("reason",),
                               registry=r)
        self.batch_failures = Counter("fakeprint_batch_failures",
                                      "Model calls that raised (their requests then run one by one)", registry=r)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
