"""`mnist-bench --retries N`: the clients' retry policy (serving.channels.RetryPolicy), applied by the load
generator itself, so that every attempt is a record of its own. gRPC's own retries are never on in the
load generator: they would hide attempts from the figures.

As in gRPC (gRFC A6): a failed attempt with a retryable status is sent again after a random delay up to the
policy's exponential back-off, at most N times, and a token bucket per generator process throttles the
resends: a retryable failure takes a token, a success gives back a fraction of one, and while half the
bucket is gone no request is resent. A stream that the server ended without answering a request
(STREAM_CLOSED: the server never read it) is resent like UNAVAILABLE; over HTTP, so are a 503 and a
connection that failed (UNAVAILABLE).
"""

import random

from serving.channels import RETRY_POLICY, RetryPolicy

STREAM_CLOSED = "STREAM_CLOSED"
HTTP_UNAVAILABLE = "HTTP_503"  # UNAVAILABLE as the HTTP front end answers it (serving.http.status)


class Retrier:
    def __init__(self, retries: int, policy: RetryPolicy = RETRY_POLICY, seed: int = 0) -> None:
        self.retries = retries
        self.policy = policy
        self.retryable = frozenset((*policy.retryable, STREAM_CLOSED, HTTP_UNAVAILABLE))
        self.tokens = float(policy.max_tokens)
        self._random = random.Random(seed)

    def after(self, status: str, attempt: int, time_left_s: float = float("inf")) -> float | None:
        """The delay before sending again a request whose attempt number `attempt` (0: the first send)
        ended with `status`, or None: that attempt is the request's last."""
        if not self.retries:
            return None
        if status == "OK":
            self.tokens = min(self.policy.max_tokens, self.tokens + self.policy.token_ratio)
            return None
        if status not in self.retryable:
            return None
        self.tokens = max(0.0, self.tokens - 1)
        if attempt >= self.retries or self.tokens <= self.policy.max_tokens / 2:
            return None
        delay = self._random.uniform(0, self.policy.backoff_s(attempt + 1))
        return delay if delay < time_left_s else None
