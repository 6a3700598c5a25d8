"""A token bucket for the optional bandwidth cap (``--bandwidth-limit``).

One bucket is shared by every connection in a direction, so the cap holds for
the node as a whole however many peers it talks to. Time comes from
``trio.current_time()`` so tests run it under ``MockClock``.

Tokens may go negative: a frame larger than the burst is let through at once
and the *next* caller waits for the debt to be repaid. That keeps the average
exact without splitting frames, and waiting happens before the next read or
write, so TCP flow control pushes back on the sender.
"""

from __future__ import annotations

import trio


class TokenBucket:
    """``rate`` bytes per second on average, bursts of up to ``burst`` bytes."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate / 4, 64 * 1024))
        self._tokens = self.burst
        self._last: float | None = None

    def _refill(self) -> None:
        now = trio.current_time()
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def consume(self, amount: int) -> None:
        """Take ``amount`` tokens, sleeping while the bucket is in debt."""
        self._refill()
        self._tokens -= amount
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


class Limits:
    """The node's upload and download buckets (either may be absent)."""

    def __init__(self, upload: TokenBucket | None = None, download: TokenBucket | None = None):
        self.upload = upload
        self.download = download

    @classmethod
    def symmetric(cls, rate: float | None) -> Limits:
        """Both directions capped at ``rate`` bytes/s, or unlimited when None."""
        if not rate:
            return cls()
        return cls(TokenBucket(rate), TokenBucket(rate))
