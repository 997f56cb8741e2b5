"""The MQTT side: connection, availability, topics, and a bounded queue that never blocks.

``publish()`` never blocks. While the broker is connected, nothing is queued and the window has
room, the caller hands the message to paho itself: a message costs what paho's publish costs.
Otherwise it goes into a bounded queue that a sender thread hands to paho, keeping at most a
window of QoS 1/2 messages unacknowledged, so paho's own queue stays small. When the broker is
slow or away the queue fills and the oldest messages are dropped and counted: live labels want
the newest. States, events, snapshots and replies that cannot go at once wait in a second lane
(``keep=True``) that is sent first and never loses a message to a flood of labels. The
retained ``status`` is ``online`` while connected, with a retained ``offline`` last will, and
``offline`` is published before a clean disconnect (the broker sends the will only on an
unclean one).

What went wrong with the connection is said by :mod:`edge_daemon.connection`, once per
reason and never from paho's network thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.backoff import Backoff
from edge_daemon.connection import ConnectionWatch, tls_context
from edge_daemon.control import Inbox
from edge_daemon.recall import Recall
from edge_daemon.settings import Settings
from edge_daemon.stage import StageThread

log = logging.getLogger(__name__)

#: QoS 1/2 messages handed to paho and not yet acknowledged, at most.
INFLIGHT_WINDOW = 100

#: Queued messages a caller of ``publish`` sends itself at most, when the window has room.
DRAIN_AT_MOST = 32


@dataclass(frozen=True, slots=True)
class Message:
    """One message waiting to be sent."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def close_client(client: mqtt.Client, clean: bool = True) -> None:
    """Disconnect a paho client, stop its network thread and close all of its sockets.

    ``clean=False`` drops the connection without a DISCONNECT, so the broker publishes the
    client's last will. paho closes the socket pair that wakes its loop only when the client is
    garbage-collected (eclipse-paho/paho.mqtt.python#627); a client held in a reference cycle
    by its callbacks keeps those two descriptors until the cycle collector runs, so close them
    here.
    """
    if clean:
        client.disconnect()
    client.loop_stop()
    reset = getattr(client, "_reset_sockets", None)
    if callable(reset):
        reset()


class Publisher:
    """An MQTT client that reconnects by itself and never blocks the caller."""

    def __init__(self, settings: Settings, inbox: Inbox | None = None) -> None:
        self.settings = settings
        self.prefix = settings.topic_prefix
        mqtt_cfg = settings.mqtt
        self._v5 = mqtt_cfg.protocol == "5"
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else True,
        )
        if mqtt_cfg.username:
            password = mqtt_cfg.password.get_secret_value() if mqtt_cfg.password else None
            self._client.username_pw_set(mqtt_cfg.username, password)
        context = tls_context(settings) if mqtt_cfg.use_tls else None
        if context is not None:
            self._client.tls_set_context(context)
            if mqtt_cfg.tls_insecure:
                log.warning(
                    "EDGE_MQTT__TLS_INSECURE is set: the broker's certificate is not "
                    "checked against %s; anyone in between can read and change the "
                    "traffic",
                    mqtt_cfg.host,
                )
        #: Says what goes wrong with the connection, once per reason, off paho's thread.
        self.watcher = ConnectionWatch(settings, context)
        self._client.will_set(self.topic("status"), b"offline", qos=1, retain=True)
        # paho doubles its reconnect delay without jitter; we pick each delay ourselves
        # (jittered, doubling up to the maximum) and give paho exactly that one.
        self._backoff = Backoff(mqtt_cfg.reconnect_min_s, mqtt_cfg.reconnect_max_s)
        self._next_reconnect_delay()
        self._client.max_inflight_messages_set(INFLIGHT_WINDOW)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_connect_fail = self._on_connect_fail
        #: Topics subscribed to on every connect (``watch``), besides ``cmd``.
        self._watched: list[str] = []
        if inbox is not None:
            self.watch(self.topic("cmd"), inbox.put)
        self._queue: collections.deque[Message] = collections.deque()
        #: Messages that must not be lost to a flood of labels: sent first, dropped only when
        #: this lane itself overflows.
        self._priority: collections.deque[Message] = collections.deque()
        self._recall: Recall | None = None
        self._cond = threading.Condition()
        #: Held while a message is handed to paho, by the sender or a direct publish: one at a
        #: time, so messages reach paho in the order they left the lanes. Taken before
        #: ``_cond``, never after.
        self._send_lock = threading.Lock()
        self._connected = False
        #: Messages handed to paho and not yet confirmed, by message id: their QoS.
        self._pending: dict[int, int] = {}
        #: Confirmations that arrived before ``publish()`` returned the message id.
        self._acked_early: set[int] = set()
        #: After a reconnect, new messages wait (until this time) for paho to re-send the old.
        self._drain_until = 0.0
        self._retained: dict[str, Message] = {}
        self._stop = threading.Event()
        self._sender: StageThread | None = None
        self._started = False
        #: Set by stop(): from then on the status is ``offline``, whatever reconnects.
        self._stopping = False
        self.sent = 0
        self.dropped = 0

    # --- topics ----------------------------------------------------------------------------

    def topic(self, *parts: str) -> str:
        """A topic under this device's prefix."""
        return "/".join((self.prefix, *parts))

    def watch(self, topic: str, callback: Callable[[bytes], None]) -> None:
        """Call ``callback(payload)`` for each new (not retained) message on ``topic``, on paho's
        thread: keep it short. Subscribed on every connect; call before ``start``."""

        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            del client, userdata
            if message.retain:  # news only: a retained message is an old announcement
                return
            try:
                # paho's payload is bytes already: bytes() does not copy it.
                callback(bytes(message.payload))
            except Exception:
                # An exception here would end paho's network thread: log it and go on.
                log.exception("handling a message on %s failed", message.topic)

        self._client.message_callback_add(topic, on_message)
        self._watched.append(topic)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (the broker may be away; paho keeps retrying)."""
        cfg = self.settings.mqtt
        self._client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive)
        self._client.loop_start()
        self._started = True
        self._sender = StageThread("mqtt-sender", self._send_loop)
        self._sender.start()
        self.watcher.start()

    def deaths(self) -> list[tuple[str, str | None]]:
        """For the supervisor: each of our threads, and why it ended if it ended too soon."""
        if not self._started or self._stop.is_set():
            return []
        paho = getattr(self._client, "_thread", None)
        threads = [t for t in (self._sender, self.watcher.thread) if t is not None]
        return [(t.name, t.death()) for t in threads] + [
            ("mqtt-network", None if paho is not None and paho.is_alive() else "paho's loop ended")
        ]

    def stop(self, flush_timeout: float = 3.0) -> None:
        """Publish ``offline`` (first, before anything still queued), flush what is queued up
        to ``flush_timeout``, disconnect; within about ``flush_timeout`` + 1 s whatever paho is
        doing. Unless everything was confirmed, the connection is dropped without a DISCONNECT,
        so the broker publishes the retained ``offline`` will in any case."""
        deadline = time.monotonic() + flush_timeout
        offline = Message(self.topic("status"), b"offline", 1, True)
        with self._cond:
            # An ``online`` still queued (a reconnect just now) must not follow it out, and
            # a reconnect from here on sends ``offline`` (see _on_connect).
            self._stopping = True
            self._retained[offline.topic] = offline
            for lane in (self._priority, self._queue):  # in place: others hold these lanes
                kept = [m for m in lane if m.topic != offline.topic]
                lane.clear()
                lane.extend(kept)
            self._priority.appendleft(offline)
            self._cond.notify_all()
        with self._cond:
            while (self._queue or self._priority or self._pending) and self._connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            left = len(self._queue) + len(self._priority) + len(self._pending)
        if left:
            log.warning("stopping with %d message(s) not delivered to the broker", left)
        self._stop.set()
        self.watcher.stop()
        with self._cond:
            self._cond.notify_all()
        if self._sender is not None:
            self._sender.join(0.5)
        # paho's thread may be inside a connect attempt (seconds, for a broker that does not
        # answer): close from a thread of its own, waited for only so long.
        closer = threading.Thread(
            target=close_client, args=(self._client, not left), name="mqtt-close", daemon=True
        )
        closer.start()
        closer.join(max(0.5, deadline + 1.0 - time.monotonic()))
        if closer.is_alive():
            log.debug("paho's network thread did not stop in time; not waiting for it")

    @property
    def connects(self) -> int:
        """Times the broker accepted us."""
        return self.watcher.connects

    @property
    def refusals(self) -> int:
        """CONNACKs that refused us (a wrong password: one each retry)."""
        return self.watcher.refusals

    @property
    def last_refusal(self) -> str | None:
        """Why the broker last refused us, until it accepts us again."""
        return self.watcher.last_refusal

    @property
    def connected(self) -> bool:
        """True while the broker has accepted our connection."""
        return self._connected

    @property
    def queued(self) -> int:
        """Messages waiting in the queue."""
        return len(self._queue) + len(self._priority)

    def backlog(self) -> int:
        """Labels waiting for room in the window while the broker is connected: more than the
        broker takes are being made. 0 while it is away (then they wait for it, and the
        oldest make room for the newest)."""
        return len(self._queue) if self._connected else 0

    # --- publishing ------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int | None = None,
        retain: bool = False,
        keep: bool = False,
    ) -> None:
        """Hand a message to paho, or queue it when it cannot go at once; when the queue is
        full the oldest one is dropped and counted.

        ``keep=True`` (states, events, snapshots, replies): queued, it waits in the lane sent
        first, which labels never push out."""
        qos = self.settings.mqtt.qos if qos is None else qos
        # Kept messages go at least once: a QoS 0 one put back after a broken connection
        # could land in front of the new connection's ``online``.
        message = Message(topic, payload, max(qos, 1) if keep else qos, retain)
        # The common case costs what paho's publish costs: with nothing queued and room in the
        # window, the caller hands the message to paho itself (no queue, no thread to wake).
        # (Read without the lock, the lanes only say whether to try: checked again below.) A
        # kept message only tries the lock: paho's own thread publishes some from a callback,
        # and must not wait for a thread that may be waiting for paho.
        if not self._queue and not self._priority and self._send_lock.acquire(blocking=not keep):
            try:
                with self._cond:
                    direct = not self._queue and not self._priority and self._can_send(True)
                if direct and self._hand_over(message):
                    return
                # Not taken (the connection just broke): queued for the next connection.
            finally:
                self._send_lock.release()
        with self._cond:
            lane = self._priority if keep else self._queue
            if keep and retain:
                # Only the newest retained message of a topic matters (a snapshot per region
                # while the broker is away, not one per change).
                stale = [m for m in lane if m.retain and m.topic == topic]
                for old in stale:
                    lane.remove(old)
            if len(lane) >= self.settings.mqtt.queue_size:
                lane.popleft()
                self.dropped += 1
            lane.append(message)
            # The sender is woken only for what the caller leaves to it, and only when it can
            # send: a kept message (its caller does not send), or more than the caller sends.
            # A full window wakes it when an acknowledgement makes room (``_on_publish``).
            if (keep or len(lane) > DRAIN_AT_MOST) and self._can_send():
                self._cond.notify_all()
        if not keep:
            self._drain(DRAIN_AT_MOST)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Queue a retained QoS 1 state message, sent before labels and re-sent after every
        reconnect."""
        message = Message(topic, payload, 1, True)
        with self._cond:
            self._retained[topic] = message
        self.publish(topic, payload, qos=1, retain=True, keep=True)

    # --- reading retained messages back -----------------------------------------------------

    def recall(
        self,
        filters: list[str],
        on_retained: Callable[[str, bytes], None],
        on_done: Callable[[], None],
        timeout: float = 5.0,
    ) -> None:
        """Read back the retained messages on ``filters`` once, at the first connection, before
        anything is published (see :class:`~edge_daemon.recall.Recall`). Call before
        ``start``; call :meth:`poll_recall` from time to time."""
        self._recall = Recall(
            self._client,
            filters,
            self.topic("status"),
            on_retained=on_retained,
            on_done=on_done,
            timeout=timeout,
        )

    def poll_recall(self) -> None:
        """End a recall whose end has come, or whose time is up."""
        if self._recall is not None:
            self._recall.poll()

    @property
    def recalling(self) -> bool:
        """True until the recall (if any) has ended."""
        return self._recall is not None and not self._recall.done

    # --- paho callbacks (on paho's network thread) -------------------------------------------

    def _next_reconnect_delay(self) -> None:
        delay = self._backoff.next()
        # paho's annotation says int; its wait loop takes any number of seconds.
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        del client, userdata
        self._next_reconnect_delay()
        self.watcher.connect_failed()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        del client, userdata, flags, properties
        if reason_code.is_failure:
            self._next_reconnect_delay()
            self.watcher.refused(reason_code)
            return
        self.watcher.accepted()
        self._backoff.reset()
        if self._recall is not None:
            # Before ``online`` can be sent (the sender waits for _connected): its echo marks
            # the end of the retained messages.
            self._recall.connected()
        with self._cond:
            # State first: the broker must see ``online`` and camera states before labels.
            self._connected = True
            # paho re-sends what was unconfirmed when the connection broke, right after this
            # callback; new messages wait for those, so every topic stays in order.
            self._drain_until = time.monotonic() + 10.0 if self._pending else 0.0
            states = [m for t, m in self._retained.items() if t != self.topic("status")]
            resent = {m.topic for m in states}
            kept = [m for m in self._priority if not (m.retain and m.topic in resent)]
            self._priority.clear()
            status = b"offline" if self._stopping else b"online"
            self._priority.extend([Message(self.topic("status"), status, 1, True), *states, *kept])
            self._cond.notify_all()
        if self._watched:
            self._client.subscribe([(topic, 1) for topic in self._watched])

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        del client, userdata, properties
        with self._cond:
            was = self._connected
            self._connected = False
            # paho re-sends unconfirmed QoS 1/2 messages itself after reconnecting; QoS 0 ones
            # not yet written are gone.
            self._pending = {mid: qos for mid, qos in self._pending.items() if qos > 0}
            self._cond.notify_all()
        self._next_reconnect_delay()
        if not self._stop.is_set():
            from_server = bool(getattr(flags, "is_disconnect_packet_from_server", False))
            self.watcher.lost(was, reason_code, from_server)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        del client, userdata, reason_code, properties
        with self._cond:
            if self._pending.pop(mid, None) is None:
                self._acked_early.add(mid)
            if self._queue or self._priority:
                # Room in the window for what waits; with nothing queued nobody needs waking
                # (``stop`` polls), and waking the sender on every acknowledgement costs.
                self._cond.notify_all()

    # --- sender thread ---------------------------------------------------------------------

    def _can_send(self, direct: bool = False) -> bool:
        """Called under the lock: connected, something queued (or ``direct``: one in hand),
        room in the window, and no re-sent messages from before a reconnect still
        unconfirmed."""
        waiting = direct or self._queue or self._priority
        if not (self._connected and waiting and len(self._pending) < INFLIGHT_WINDOW):
            return False
        if direct and self._stopping:
            return False  # from here on everything goes through the lanes, behind ``offline``
        return not (self._pending and time.monotonic() < self._drain_until)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not self._can_send():
                    self._cond.wait(0.2)
                if self._stop.is_set():
                    return
            with self._send_lock:
                self._send_one()

    def _send_one(self, pause: float = 0.05) -> bool:
        """Hand the first queued message to paho, if it can go (under ``_send_lock``);
        False when nothing went. One paho would not take is put back, and the caller waits
        ``pause`` (the connection just broke: on_disconnect is on its way)."""
        with self._cond:
            if not self._can_send():
                return False
            lane = self._priority if self._priority else self._queue
            message = lane.popleft()
        if not self._hand_over(message):
            with self._cond:
                lane.appendleft(message)
                if pause:
                    self._cond.wait(pause)
            return False
        return True

    def _drain(self, most: int) -> None:
        """A caller that queued a label sends what the window has room for, itself, unless
        the sender is at it: a queue that filled once (a burst) would otherwise keep every
        later label on the slower way through the sender thread for as long as labels come."""
        if len(self._pending) >= INFLIGHT_WINDOW or not self._send_lock.acquire(blocking=False):
            # A full window (read without the lock: an acknowledgement that makes room wakes
            # the sender for what waits), or the sender is at it.
            return
        try:
            for _ in range(most):
                if not self._send_one(pause=0.0):
                    return
        finally:
            self._send_lock.release()

    def _hand_over(self, message: Message) -> bool:
        """Give ``message`` to paho (the caller holds ``_send_lock``, which keeps each topic in
        order); False when it must be kept for the next connection."""
        # Not under ``_cond``: paho calls on_publish holding its own lock, which would deadlock.
        info = self._client.publish(
            message.topic, message.payload, qos=message.qos, retain=message.retain
        )
        if info.rc == mqtt.MQTT_ERR_NO_CONN and message.qos == 0:
            # The connection broke and paho's on_disconnect has not run yet: keep it for the
            # next connection, and let on_disconnect say we are offline.
            return False
        # At QoS 1 and 2 paho keeps a message it could not send and sends it once connected
        # again (NO_CONN included): it is handed over, like a sent one.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("could not publish to %s: %s", message.topic, mqtt.error_string(info.rc))
            return True
        with self._cond:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._pending[info.mid] = message.qos
        # paho calls on_publish for every message: when QoS 0 is written, when 1/2 is acked.
        self.sent += 1
        return True
