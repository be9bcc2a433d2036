"""Per-key request rates (GCRA, the token bucket's exact form): in-process, or shared by every
replica through Redis when the session store is Redis."""

from __future__ import annotations

import time

from redis.exceptions import ClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .store.base import translate_errors
from .store.redis import connect, primed, riding_failovers

# KEYS[1]: the key's theoretical arrival time (ms). ARGV: interval ms, burst tolerance ms.
# Redis's own clock, so replicas with skewed clocks agree. Returns 0, or ms until allowed.
GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[1])
local wait = new_tat - tonumber(ARGV[2]) - now
if wait > 0 then return wait end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1)
return 0
"""


class Unlimited:
    async def acquire(self, owner: str) -> float | None:
        return None

    async def close(self) -> None:
        return None


class LocalLimiter:
    """GCRA in this process: ``rate`` per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int):
        self._interval = 1.0 / rate
        self._tolerance = self._interval * burst
        self._tat: dict[str, float] = {}

    async def acquire(self, owner: str) -> float | None:
        now = time.monotonic()
        tat = max(self._tat.get(owner, now), now)
        new_tat = tat + self._interval
        wait = new_tat - self._tolerance - now
        if wait > 0:
            return wait
        self._tat[owner] = new_tat
        return None

    async def close(self) -> None:
        return None


@translate_errors(RedisConnectionError, RedisTimeoutError, ClusterError)
@primed
@riding_failovers
class RedisLimiter:
    def __init__(self, url: str, rate: float, burst: int, prefix: str = "optim", timeout_seconds: float = 5.0):
        self._redis = connect(url, timeout_seconds)
        self._timeout = timeout_seconds
        self._script = self._redis.register_script(GCRA)
        self._interval_ms = 1000.0 / rate
        self._tolerance_ms = self._interval_ms * burst
        self._prefix = prefix

    async def acquire(self, owner: str) -> float | None:
        wait_ms = await self._script(keys=[f"{self._prefix}:rate:{owner}"],
                                     args=[self._interval_ms, self._tolerance_ms])
        return float(wait_ms) / 1000 if float(wait_ms) > 0 else None

    async def close(self) -> None:
        await self._redis.aclose()


def open_limiter(store_url: str, rate: float, burst: int, timeout_seconds: float = 5.0):
    if rate <= 0:
        return Unlimited()
    if store_url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")):
        return RedisLimiter(store_url, rate, burst, timeout_seconds=timeout_seconds)
    return LocalLimiter(rate, burst)
