"""The background task that drains the outbox: one POST in flight per (endpoint, agent) queue,
retries with jittered exponential backoff, gives up (audited) after max_attempts. Network only,
never on the kill path."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable

import aiohttp

from supervisor import __version__
from supervisor.audit import AuditLog
from supervisor.config import WebhookDelivery
from supervisor.events.endpoints import Endpoint
from supervisor.events.outbox import Outbox, OutboxRow
from supervisor.events.signing import (
    HEADER_EVENT,
    HEADER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    sign,
)
from supervisor.httpclient import tcp_connector

log = logging.getLogger(__name__)

WEBHOOK_ACTOR = "system:webhooks"
FLUSH_AT_SHUTDOWN = 2.0  # seconds the worker keeps delivering after the agents are dead
MAX_IN_FLIGHT = 16  # concurrent POSTs over all queues


_PRUNE_EVERY = 3600.0
_ERROR_SNIPPET = 200


def backoff_delay(attempts: int, initial: float, maximum: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next try after `attempts` failed ones: initial * 2^(attempts-1),
    capped at maximum, then jittered down by up to half so queues that failed together do not
    retry together."""
    base = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return base * (0.5 + 0.5 * rand())




class DeliveryWorker:
    """Background task that drains the outbox. Started once the daemon serves, stopped after
    the arbiter's shutdown so the final events are in the outbox; what it cannot deliver within
    FLUSH_AT_SHUTDOWN stays for the next start."""

    def __init__(self, outbox: Outbox, delivery: WebhookDelivery, audit: AuditLog) -> None:
        self.outbox = outbox
        self.delivery = delivery
        self.audit = audit
        self._task: asyncio.Task[None] | None = None
        self._in_flight: dict[tuple[str, str | None], asyncio.Task[None]] = {}
        self._stop_at: float | None = None
        self._failing: set[str] = set()
        self._last_prune = 0.0

    def start(self) -> None:
        if self._task is None and self.outbox.endpoints:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="webhook-delivery")

    async def stop(self, flush: float = FLUSH_AT_SHUTDOWN) -> None:
        """Deliver what is due for up to `flush` seconds, then cancel what is still in flight
        (those rows stay pending and are sent again after the next start)."""
        if self._task is None:
            return
        self._stop_at = time.monotonic() + flush
        self.outbox.wake.set()
        try:
            await asyncio.wait_for(self._task, flush + self.delivery.timeout + 1.0)
        except TimeoutError:
            log.error("the webhook worker did not stop in time; cancelled")
        except Exception:
            log.exception("the webhook worker failed")
        self._task = None

    async def _run(self) -> None:
        headers = {"User-Agent": f"agent-supervisor/{__version__}"}
        async with aiohttp.ClientSession(headers=headers, connector=tcp_connector()) as session:
            try:
                while True:
                    try:
                        delay = self._dispatch(session)
                    except Exception:
                        # The worker must outlive a bad moment (a locked or full database):
                        # the rows are safe on disk and the next pass picks them up.
                        log.exception("webhook delivery pass failed; retrying")
                        delay = self.delivery.backoff_max
                    if self._stop_at is not None:
                        left = self._stop_at - time.monotonic()
                        if left <= 0 or (not self._in_flight and (delay is None or delay > left)):
                            break
                        delay = left if delay is None else min(delay, left)
                    self.outbox.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.outbox.wake.wait(), delay)
            finally:
                tasks = list(self._in_flight.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._in_flight.clear()

    def _dispatch(self, session: aiohttp.ClientSession) -> float | None:
        """Start a POST for every due queue head; seconds until the next head is due."""
        now = time.time()
        if now - self._last_prune > _PRUNE_EVERY:
            self._last_prune = now
            if pruned := self.outbox.prune():
                log.info("pruned %d delivered webhook rows older than a week", pruned)
        next_due: float | None = None
        for head in sorted(self.outbox.heads(), key=lambda h: h.id):
            key = (head.endpoint, head.agent)
            if key in self._in_flight:
                continue
            if head.next_attempt_at > now:
                wait = head.next_attempt_at - now
                next_due = wait if next_due is None else min(next_due, wait)
                continue
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                break  # a finishing POST wakes the loop
            task = asyncio.get_running_loop().create_task(self._deliver(session, head))
            self._in_flight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return next_due

    def _done(self, key: tuple[str, str | None], task: asyncio.Task[None]) -> None:
        self._in_flight.pop(key, None)
        self.outbox.wake.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("webhook delivery failed unexpectedly", exc_info=exc)

    async def _deliver(self, session: aiohttp.ClientSession, row: OutboxRow) -> None:
        endpoint = self.outbox.endpoints[row.endpoint]
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            HEADER_EVENT: row.event_type,
            HEADER_ID: row.event_id,
            HEADER_TIMESTAMP: str(timestamp),
            HEADER_SIGNATURE: sign(endpoint.secret, timestamp, row.payload),
        }
        try:
            async with session.post(
                endpoint.url, data=row.payload, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.delivery.timeout),
            ) as response:
                status: int | None = response.status
                retry_after = response.headers.get("Retry-After")
                snippet = await response.content.read(_ERROR_SNIPPET)
        except TimeoutError:
            status, retry_after = None, None
            error = f"no answer within {self.delivery.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            status, retry_after = None, None
            error = str(exc) or type(exc).__name__
        else:
            if status is not None and 200 <= status < 300:
                self.outbox.mark_delivered(row.id, status)
                if endpoint.url in self._failing:
                    self._failing.discard(endpoint.url)
                    log.info("webhook %s delivers again", endpoint.name)
                return
            error = f"HTTP {status}: {snippet.decode(errors='replace').strip()}"
        self._failed(endpoint, row, status, error, retry_after)

    def _failed(self, endpoint: Endpoint, row: OutboxRow, status: int | None, error: str,
                retry_after: str | None) -> None:
        attempts = row.attempts + 1
        limit = self.delivery.max_attempts
        if endpoint.url not in self._failing:
            self._failing.add(endpoint.url)
            log.warning("webhook %s failed (%s); retrying with backoff", endpoint.name, error)
        if limit and attempts >= limit:
            log.error("webhook %s: gave up on event %s (%s) after %d attempts: %s",
                      endpoint.name, row.event_id, row.event_type, attempts, error)
            self.outbox.give_up(row.id, status, error, lambda: self.audit.append(
                actor=WEBHOOK_ACTOR, verb="webhook_given_up", scope="global",
                reason=f"{attempts} failed attempts", outcome="given_up",
                detail={"event_id": row.event_id, "event_type": row.event_type,
                        "agent": row.agent, "endpoint": endpoint.name, "attempts": attempts,
                        "last_error": error}))
            return
        delay = backoff_delay(attempts, self.delivery.backoff_initial, self.delivery.backoff_max)
        if retry_after is not None and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), self.delivery.backoff_max))
        self.outbox.mark_failed(row.id, status, error, time.time() + delay)
