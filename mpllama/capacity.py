"""A Serve replica's capacity: the sequences it has taken on (at most its slots run, a
bounded queue waits, past that a request is answered 429), and mpllama's Prometheus
metrics, which show them."""

from __future__ import annotations

from .openai_api import ApiError

RETRY_AFTER_S = 1  # what a 429 tells the client to wait


class Metrics:
    """mpllama's Prometheus metrics, exported by Ray next to Serve's own (each tagged with
    the application, deployment and replica)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.tokens = Counter("mpllama_generated_tokens", description="Tokens generated.")
        self.finished = Counter(
            "mpllama_requests_finished",
            description="Sequences finished, by reason: stop, length, abort (the client "
            "went away), error.",
            tag_keys=("finish_reason",),
        )
        self.running = Gauge(
            "mpllama_requests_running", description="Sequences running (holding KV blocks)."
        )
        self.waiting = Gauge("mpllama_requests_waiting", description="Sequences waiting to run.")
        self.kv_usage = Gauge(
            "mpllama_kv_cache_usage", description="Share of the KV cache's blocks in use (0-1)."
        )
        self.prefix_hit_rate = Gauge(
            "mpllama_prefix_cache_hit_rate",
            description="Share of prompt tokens found in the prefix cache (0-1), since start.",
        )
        self.ttft = Histogram(
            "mpllama_time_to_first_token_seconds",
            description="From a request's arrival to its first token.",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
        )
        self.itl = Histogram(
            "mpllama_inter_token_latency_seconds",
            description="Between a sequence's successive tokens.",
            boundaries=[0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
        )


class Load:
    """Sequences this replica has taken on: at most ``slots`` run, up to ``queued`` more
    wait; past that a request is answered 429. Counted here, not read from the engine, so
    that requests admitted in the same instant cannot overshoot."""

    def __init__(self, slots: int, queued: int, metrics: Metrics) -> None:
        self.slots, self.capacity, self.metrics = slots, slots + queued, metrics
        self.taken = 0
        self._show()

    def take(self, n: int) -> Ticket:
        if n > self.capacity:
            raise ApiError(
                400,
                f"this request asks for {n} sequences (prompts x n); a replica runs at most "
                f"{self.capacity} at a time",
                param="n",
            )
        if self.taken + n > self.capacity:
            raise ApiError(
                429,
                f"the server is at capacity ({self.taken} sequences running or queued); "
                f"retry in {RETRY_AFTER_S}s",
                type="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.taken += n
        self._show()
        return Ticket(self, n)

    def give(self, n: int) -> None:
        self.taken -= n
        self._show()

    def _show(self) -> None:
        self.metrics.running.set(min(self.taken, self.slots))
        self.metrics.waiting.set(max(0, self.taken - self.slots))


class Ticket:
    """A request's share of the load, given back as its sequences finish. Also given back
    when the ticket is dropped: a stream whose client left before it started never runs
    its ``finally``."""

    def __init__(self, load: Load, n: int) -> None:
        self.load, self.held = load, n

    def give(self, n: int = 1) -> None:
        n = min(n, self.held)
        self.held -= n
        self.load.give(n)

    def __del__(self) -> None:
        try:
            self.give(self.held)
        except Exception:  # the interpreter is going away
            pass
