"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own.

Counted on rank 0: HTTP answers by route and status, prompt and generated tokens, TTFT and
the time per generated token (observed when a request's generation ends), requests waiting
and sequences running (read at scrape time), and the seconds each rank has spent inside the
forward pass's all-reduces: rank 0's own figure is live; the other ranks' arrive at the end
of each run of passes (``set_ranks``), when the engine goes idle.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from mpitpi.session import Result

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4   # the text format every Prometheus reads
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class AllReduceSeconds:
    """A collector: ``mpitpi_allreduce_seconds_total{rank}``, every rank's cumulative wall
    time inside the forward pass's all-reduces (waiting for slower ranks included)."""

    def __init__(self, live: Callable[[], float], size: int):
        self.live = live                 # rank 0's own counter, read at scrape time
        self.ranks = [0.0] * size        # the last figures the ranks sent

    def collect(self):
        fam = CounterMetricFamily("mpitpi_allreduce_seconds", "Seconds each rank has spent "
                                  "in the forward pass's all-reduces (other ranks: as of the "
                                  "end of the last run of passes).", labels=["rank"])
        for rank, s in enumerate([self.live()] + self.ranks[1:]):
            fam.add_metric([str(rank)], s)
        yield fam


class Metrics:
    """Rank 0's counters. ``waiting``/``running``: callables read at scrape time;
    ``allreduce_s``: rank 0's live all-reduce seconds; ``size``: the number of ranks."""

    def __init__(self, waiting: Callable[[], int], running: Callable[[], int],
                 allreduce_s: Callable[[], float], size: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mpitpi_requests", "HTTP answers, by route and status code.",
                                ["endpoint", "code"], registry=r)
        self.prompt_tokens = Counter("mpitpi_prompt_tokens", "Prompt tokens of finished "
                                     "generations (cached ones included).", registry=r)
        self.generated = Counter("mpitpi_generated_tokens", "Tokens generated (the "
                                 "completion_tokens of every finished or cancelled "
                                 "generation).", registry=r)
        self.ttft = Histogram("mpitpi_time_to_first_token_seconds", "From admission into the "
                              "batch to the first generated token.", registry=r,
                              buckets=TTFT_BUCKETS)
        self.per_token = Histogram("mpitpi_time_per_output_token_seconds", "Time per "
                                   "generated token after the first.", registry=r,
                                   buckets=TOKEN_BUCKETS)
        Gauge("mpitpi_requests_waiting", "Requests queued for a KV slot.",
              registry=r).set_function(waiting)
        Gauge("mpitpi_requests_running", "Sequences in the running batch.",
              registry=r).set_function(running)
        self.allreduce = AllReduceSeconds(allreduce_s, size)
        r.register(self.allreduce)

    def answered(self, endpoint: str, code: int) -> None:
        self.requests.labels(endpoint, str(code)).inc()

    def finished(self, res: Result) -> None:
        """A generation ended (also cancelled): its tokens and timings."""
        self.prompt_tokens.inc(res.prompt_tokens)
        self.generated.inc(len(res.token_ids))
        if res.ttft_ms:   # a first token was made (0: cancelled before it)
            self.ttft.observe(res.ttft_ms / 1e3)
        for ms in res.step_ms:
            self.per_token.observe(ms / 1e3)

    def set_ranks(self, seconds: list[float]) -> None:
        """Every rank's cumulative all-reduce seconds (rank order), gathered at a run's end."""
        self.allreduce.ranks = list(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
