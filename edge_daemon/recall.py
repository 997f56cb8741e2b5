"""Reading back retained messages once, at the first connection, before publishing anything.

At start the daemon needs what the broker kept from its last run (the regions' states, its
Home Assistant configs) before it says anything new. :class:`Recall` subscribes to them when the
first connection is accepted, before ``online`` can be sent, and ends when the echo of our own
``online`` comes back: a broker such as mosquitto delivers the retained messages of a
subscription before a message published after it, so the echo follows every retained one. As
insurance against brokers that send retained messages asynchronously, the recall ends no sooner
than :data:`GRACE_S` after the broker acknowledged the subscription. A refused subscription (a
broker ACL without read access) ends it at once, and no reply at all ends it after the timeout,
each with one error saying what to grant.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

#: The recall ends no sooner than this after the broker acknowledged the subscription.
GRACE_S = 0.3


class Recall:
    """Retained messages on ``filters``, read back once; ``status`` is our own status topic."""

    def __init__(
        self,
        client: mqtt.Client,
        filters: list[str],
        status: str,
        *,
        on_retained: Callable[[str, bytes], None],
        on_done: Callable[[], None],
        timeout: float,
    ) -> None:
        self._client = client
        self.filters = filters
        self._status = status
        self._on_retained = on_retained
        self._on_done = on_done
        self.timeout = timeout
        self._lock = threading.Lock()
        self.deadline = float("inf")
        self.done = False
        #: The SUBSCRIBE's message id, and when the broker acknowledged it.
        self._mid = -1
        self._acked_at: float | None = None
        #: Our own ``online`` came back: every retained message should be here.
        self._echoed = False
        for topic in filters:
            client.message_callback_add(topic, self._on_message)
        client.message_callback_add(status, self._on_status)
        client.on_subscribe = self._on_subscribe

    @property
    def _topics(self) -> list[str]:
        return [*self.filters, self._status]

    def connected(self) -> None:
        """The broker accepted us (paho's thread, before anything is sent): subscribe."""
        if self.done:
            return
        self.deadline = time.monotonic() + self.timeout
        self._acked_at, self._echoed = None, False
        _, mid = self._client.subscribe([(topic, 1) for topic in self._topics])
        self._mid = -1 if mid is None else mid

    def poll(self) -> None:
        """End the recall once its end has come (after the grace), or its time is up."""
        if self.done:
            return
        if self._complete():
            self._end()
        elif time.monotonic() > self.deadline:
            log.error(
                "the broker did not return the retained messages on %s in %.0f s: going on "
                "without them, so a state may be announced again as a change. Give this "
                "client read access to those topics and to %s",
                ", ".join(self.filters),
                self.timeout,
                self._status,
            )
            self._end()

    def _complete(self) -> bool:
        return (
            self._echoed
            and self._acked_at is not None
            and time.monotonic() >= self._acked_at + GRACE_S
        )

    # --- paho callbacks --------------------------------------------------------------------

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        del client, userdata, properties
        if self.done or mid != self._mid:
            return
        refused = [
            topic
            for topic, code in zip(self._topics, reason_codes, strict=False)
            if getattr(code, "is_failure", False)
        ]
        if refused:
            log.error(
                "the broker refused the subscription to %s: going on without the retained "
                "messages there, so a state may be announced again as a change. Give this "
                "client read access to it",
                ", ".join(refused),
            )
            self._end()
            return
        self._acked_at = time.monotonic()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        del client, userdata
        if self.done or not message.retain:
            return
        try:
            self._on_retained(message.topic, bytes(message.payload))
        except Exception:
            log.exception("reading back %s failed", message.topic)

    def _on_status(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        del client, userdata
        if message.retain or bytes(message.payload) != b"online":
            return
        self._echoed = True
        if self._complete():
            self._end()  # else poll() ends it once the grace has passed

    def _end(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        self._client.unsubscribe(self._topics)
        try:
            self._on_done()
        except Exception:
            log.exception("ending the read-back of retained messages failed")
