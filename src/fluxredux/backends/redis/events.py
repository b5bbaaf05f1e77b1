"""The event bus over Redis pub/sub: wake-ups between machines.

One channel per deployment (``{prefix}events``), one line per event (``JobEvent.encode``).
A publisher is one PUBLISH; a bus also holds one subscriber connection, read by a thread
that hands every event to this process's listeners. When Redis goes away (restart,
failover, network) the thread reconnects and subscribes again, backing off up to a
second; what was published meanwhile is lost, which the design tolerates: an event is
only a wake-up, and long-polls re-read the store on a slow timer anyway.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import redis

from fluxredux.backends.redis.common import ClientOrUrl, RedisSeam
from fluxredux.jobs.events import JobEvent, Listener, LocalEventBus, Unsubscribe

log = logging.getLogger(__name__)

# How long the reader waits for a message before it looks at ``closed`` again: bounds
# how long ``close`` takes, and costs nothing while messages flow (they wake it at once).
_POLL_SECONDS = 0.2
_MAX_BACKOFF_SECONDS = 1.0
# How long the constructor waits for Redis to confirm the subscription: events published
# after the constructor returns then reach this bus (when Redis is up).
_SUBSCRIBE_WAIT_SECONDS = 2.0


def channel(prefix: str) -> str:
    return f"{prefix}events"


class RedisEventPublisher(RedisSeam):
    """EventPublisher for any process (a GPU worker, an API node); never raises."""

    def __init__(self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:") -> None:
        super().__init__(url_or_client)
        self._channel = channel(prefix)

    def publish(self, event: JobEvent) -> None:
        try:
            self._redis.publish(self._channel, event.encode())
        except (redis.RedisError, OSError) as exc:  # Redis away: waiters re-read the store
            log.debug("event not published (%s): %s", exc, event)
        except Exception:  # the contract: never raises (a lost wake-up only delays a waiter)
            log.exception("event not published: %s", event)


class RedisEventBus(RedisSeam):
    """EventBus shared by every machine of a deployment: what any of them publishes, the
    listeners of every bus hear (its own events too, through Redis, once each)."""

    def __init__(self, url_or_client: ClientOrUrl, *, prefix: str = "fluxredux:") -> None:
        super().__init__(url_or_client)
        self._channel = channel(prefix)
        self._publisher = RedisEventPublisher(self._redis, prefix=prefix)
        self._local = LocalEventBus()  # fans each received event out to our listeners
        self._closed = threading.Event()
        self._pubsub: Any = None  # redis-py's PubSub (untyped results); owned by the reader
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="redis-events", daemon=True)
        self._reader.start()
        # Wait (briefly) until subscribed, so that what is published from now on is heard;
        # with Redis down, go on: the reader keeps trying, and the store stays the truth.
        if not self._subscribed.wait(_SUBSCRIBE_WAIT_SECONDS):
            log.warning("Redis event bus not subscribed yet; wake-ups start once Redis answers")

    def add_listener(self, listener: Listener) -> Unsubscribe:
        return self._local.add_listener(listener)

    @property
    def listener_count(self) -> int:
        return self._local.listener_count

    def publish(self, event: JobEvent) -> None:
        self._publisher.publish(event)

    def _subscribe(self) -> Any:
        pubsub = self._redis.pubsub()
        try:
            pubsub.subscribe(self._channel)
            # The confirmation: from here on, Redis delivers this channel's messages to us.
            while not self._closed.is_set():
                message = pubsub.get_message(timeout=_POLL_SECONDS)
                if message is not None and message["type"] == "subscribe":
                    return pubsub
            return pubsub
        except BaseException:
            pubsub.close()
            raise

    def _read(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            try:
                self._pubsub = self._subscribe()
                self._subscribed.set()
                backoff = 0.05
                while not self._closed.is_set():
                    message = self._pubsub.get_message(timeout=_POLL_SECONDS)
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["data"])
            except Exception as exc:
                # Whatever broke (Redis away, a connection closed under redis-py), the reader
                # must live on: it is this process's only ear for other machines' events.
                if self._closed.is_set():
                    break
                expected = isinstance(exc, (redis.RedisError, OSError))
                log.log(
                    logging.INFO if expected else logging.ERROR,
                    "Redis event bus lost its subscription (%s); reconnecting",
                    exc,
                    exc_info=not expected,
                )
                self._closed.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
            finally:
                if self._pubsub is not None:
                    self._close_pubsub()

    def _close_pubsub(self) -> None:
        # Already broken: nothing left to release.
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()
        self._pubsub = None

    def _dispatch(self, data: str | bytes) -> None:
        if isinstance(data, bytes):  # a given client without decode_responses
            data = data.decode("utf-8", "replace")
        try:
            event = JobEvent.decode(data)
        except ValueError:
            log.warning("malformed event on %s: %r", self._channel, data[:200])
            return
        self._local.publish(event)  # isolates a broken listener from the others

    def close(self) -> None:
        self._closed.set()
        self._reader.join(_POLL_SECONDS * 4 + 2)
        self._local.close()
        super().close()
