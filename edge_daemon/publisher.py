"""The MQTT side: connection, availability, topics, and a bounded queue that never blocks.

``publish()`` only appends to a bounded queue; a sender thread hands messages to paho while the
broker is connected, keeping at most a window of QoS 1/2 messages unacknowledged, so paho's own
queue stays small. When the broker is slow or away the queue fills and the oldest messages are
dropped and counted: live labels want the newest. The retained ``status`` is ``online`` while
connected, with a retained ``offline`` last will, and ``offline`` is published before a clean
disconnect (the broker sends the will only on an unclean one).

Nothing slow runs on paho's network thread: when a connection fails, a diagnosis thread finds
out why (unreachable, TLS trouble, a TLS port spoken to in plain MQTT) and says it once per
reason. A broker that refuses us says so once per reason too, and a broker that keeps closing
a connection it had accepted is taken for what it nearly always is: another client with the
same client id.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.backoff import Backoff
from edge_daemon.control import Inbox
from edge_daemon.errors import ConfigError
from edge_daemon.settings import Settings
from edge_daemon.stage import StageThread

log = logging.getLogger(__name__)

#: QoS 1/2 messages handed to paho and not yet acknowledged, at most.
INFLIGHT_WINDOW = 100
#: A connection the broker closes within this many seconds of accepting it counts as short.
SHORT_SESSION_S = 10.0
#: Short sessions in a row after which another client with our id is the likely cause.
TAKEOVERS_TO_WARN = 2
#: MQTT 5 reason code "Session taken over".
SESSION_TAKEN_OVER = 142


@dataclass(frozen=True, slots=True)
class Message:
    """One message waiting to be sent."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context for the broker: verify its certificate and name unless told not to."""
    cfg = settings.mqtt
    try:
        context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        if cfg.cert_file and cfg.key_file:
            context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"EDGE_MQTT__CA_FILE / CERT_FILE / KEY_FILE: cannot load the TLS files "
            f"({type(exc).__name__}: {getattr(exc, 'reason', None) or exc.strerror or exc})"
        ) from exc
    if cfg.tls_insecure:
        context.check_hostname = False
    return context


def speaks_tls(host: str, port: int, timeout: float = 5.0) -> bool:
    """True when ``host:port`` completes a TLS handshake (certificate not checked)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return True
    except (OSError, ValueError):
        return False


def diagnose(host: str, port: int, context: ssl.SSLContext | None, timeout: float = 5.0) -> str:
    """Why a connection to the broker fails: unreachable, TLS trouble, or a TLS port that was
    spoken to without TLS. Blocks for up to a few ``timeout``s: never call it on paho's thread."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if context is None:
                if speaks_tls(host, port, timeout):
                    return (
                        f"port {port} expects TLS: set EDGE_MQTT__TLS=true (and "
                        "EDGE_MQTT__CA_FILE if the broker's certificate is not signed by a "
                        "public CA), or use the broker's plain port"
                    )
                return "the broker closed the connection before answering"
            with context.wrap_socket(sock, server_hostname=host):
                return "the broker closed the connection after the TLS handshake"
    except ssl.SSLCertVerificationError as exc:
        return (
            f"TLS: the broker's certificate is not trusted ({exc.verify_message}): check "
            "EDGE_MQTT__CA_FILE and that the certificate names EDGE_MQTT__HOST"
        )
    except ssl.SSLError as exc:
        return f"TLS: handshake failed ({exc.reason or exc}): check the broker's TLS listener"
    except OSError as exc:
        return f"{exc.strerror or exc} (is the broker running? check EDGE_MQTT__HOST and PORT)"


def close_client(client: mqtt.Client) -> None:
    """Disconnect a paho client, stop its network thread and close all of its sockets.

    paho closes the socket pair that wakes its loop only when the client is garbage-collected
    (eclipse-paho/paho.mqtt.python#627); a client held in a reference cycle by its callbacks
    keeps those two descriptors until the cycle collector runs, so close them here.
    """
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
        self._tls_context = tls_context(settings) if mqtt_cfg.use_tls else None
        if self._tls_context is not None:
            self._client.tls_set_context(self._tls_context)
            if mqtt_cfg.tls_insecure:
                log.warning(
                    "EDGE_MQTT__TLS_INSECURE is set: the broker's certificate is not "
                    "checked against %s; anyone in between can read and change the "
                    "traffic",
                    mqtt_cfg.host,
                )
        self._last_failure = ""
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
        self._cond = threading.Condition()
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
        self._diagnoser: StageThread | None = None
        self._diagnose_now = threading.Event()
        #: When the broker last accepted us (monotonic), and short sessions in a row since.
        self._connected_at = 0.0
        self._short_sessions = 0
        self._said_takeover = False
        self._started = False
        self.sent = 0
        self.dropped = 0
        self.connects = 0
        #: CONNACKs that refused us (a wrong password: one each retry).
        self.refusals = 0
        self.last_refusal: str | None = None

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
        self._diagnoser = StageThread("mqtt-diagnosis", self._diagnose_loop)
        self._diagnoser.start()

    def deaths(self) -> list[tuple[str, str | None]]:
        """For the supervisor: each of our threads, and why it ended if it ended too soon."""
        if not self._started or self._stop.is_set():
            return []
        paho = getattr(self._client, "_thread", None)
        threads = [t for t in (self._sender, self._diagnoser) if t is not None]
        return [(t.name, t.death()) for t in threads] + [
            ("mqtt-network", None if paho is not None and paho.is_alive() else "paho's loop ended")
        ]

    def stop(self, flush_timeout: float = 3.0) -> None:
        """Publish ``offline``, flush what is queued up to ``flush_timeout``, disconnect."""
        deadline = time.monotonic() + flush_timeout
        self.publish_retained(self.topic("status"), b"offline")
        with self._cond:
            while (self._queue or self._pending) and self._connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            left = len(self._queue) + len(self._pending)
        if left:
            log.warning("stopping with %d message(s) not delivered to the broker", left)
        self._stop.set()
        self._diagnose_now.set()
        with self._cond:
            self._cond.notify_all()
        if self._sender is not None:
            self._sender.join(0.5)
        if self._sender is not None and self._sender.is_alive():
            # Still inside paho: leave its socket pair to the garbage collector.
            self._client.disconnect()
            self._client.loop_stop()
        else:
            close_client(self._client)

    @property
    def connected(self) -> bool:
        """True while the broker has accepted our connection."""
        return self._connected

    @property
    def queued(self) -> int:
        """Messages waiting in the queue."""
        return len(self._queue)

    # --- publishing ------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, *, qos: int | None = None, retain: bool = False
    ) -> None:
        """Queue a message; when the queue is full the oldest one is dropped and counted."""
        message = Message(topic, payload, self.settings.mqtt.qos if qos is None else qos, retain)
        with self._cond:
            if len(self._queue) >= self.settings.mqtt.queue_size:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(message)
            self._cond.notify_all()

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Queue a retained QoS 1 state message, re-sent after every reconnect."""
        message = Message(topic, payload, 1, True)
        with self._cond:
            self._retained[topic] = message
        self.publish(topic, payload, qos=1, retain=True)

    # --- paho callbacks (on paho's network thread) -------------------------------------------

    def _next_reconnect_delay(self) -> None:
        delay = self._backoff.next()
        # paho's annotation says int; its wait loop takes any number of seconds.
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        del client, userdata
        self._next_reconnect_delay()
        # paho does not say why; the diagnosis thread finds out.
        self._diagnose_now.set()

    def _diagnose_loop(self) -> None:
        """Diagnose failed connections, off paho's thread; say each new reason once."""
        cfg = self.settings.mqtt
        while not self._stop.is_set():
            self._diagnose_now.wait()
            self._diagnose_now.clear()
            if self._stop.is_set():
                return
            why = diagnose(cfg.host, cfg.port, self._tls_context)
            if why == self._last_failure or self._connected:
                log.debug("cannot connect to broker %s:%d: %s", cfg.host, cfg.port, why)
                continue
            self._last_failure = why
            level = logging.ERROR if why.startswith(("TLS", "port")) else logging.WARNING
            log.log(level, "cannot connect to broker %s:%d: %s; retrying", cfg.host, cfg.port, why)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        del client, userdata, flags, properties
        cfg = self.settings.mqtt
        if reason_code.is_failure:
            self._next_reconnect_delay()
            # Said once per reason: a retry loop must not fill the journal with one line.
            level = logging.ERROR if str(reason_code) != self.last_refusal else logging.DEBUG
            self.refusals += 1
            self.last_refusal = str(reason_code)
            log.log(
                level,
                "broker %s:%d refused the connection: %s (check EDGE_MQTT__USERNAME, "
                "EDGE_MQTT__PASSWORD and the broker's access rules); retrying",
                cfg.host,
                cfg.port,
                reason_code,
            )
            return
        self.connects += 1
        self.last_refusal = None
        self._last_failure = ""
        self._connected_at = time.monotonic()
        self._backoff.reset()
        log.info("connected to broker %s:%d as %s", cfg.host, cfg.port, self.settings.client_id)
        with self._cond:
            # State first: the broker must see ``online`` and camera states before labels.
            self._connected = True
            # paho re-sends what was unconfirmed when the connection broke, right after this
            # callback; new messages wait for those, so every topic stays in order.
            self._drain_until = time.monotonic() + 10.0 if self._pending else 0.0
            states = [m for t, m in self._retained.items() if t != self.topic("status")]
            self._queue.extendleft(reversed(states))
            self._queue.appendleft(Message(self.topic("status"), b"online", 1, True))
            self._cond.notify_all()
        if self._watched:
            self._client.subscribe([(topic, 1) for topic in self._watched])

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        del client, userdata, flags, properties
        with self._cond:
            was = self._connected
            self._connected = False
            # paho re-sends unconfirmed QoS 1/2 messages itself after reconnecting; QoS 0 ones
            # not yet written are gone.
            self._pending = {mid: qos for mid, qos in self._pending.items() if qos > 0}
            self._cond.notify_all()
        self._next_reconnect_delay()
        if self._stop.is_set():
            return
        if not was:
            # Closed before the broker answered our CONNECT: e.g. a TLS port spoken to in
            # plain MQTT. The diagnosis thread finds out which.
            self._diagnose_now.set()
            return
        code = getattr(reason_code, "value", None)
        short = time.monotonic() - self._connected_at < SHORT_SESSION_S
        self._short_sessions = self._short_sessions + 1 if short else 0
        if code == SESSION_TAKEN_OVER or self._short_sessions >= TAKEOVERS_TO_WARN:
            if not self._said_takeover:
                self._said_takeover = True
                log.error(
                    "the broker closed our connection %s: another client is connected with "
                    "client id %r (two daemons with the same EDGE_DEVICE_ID?); give each its "
                    "own EDGE_DEVICE_ID or EDGE_MQTT__CLIENT_ID",
                    "(session taken over)"
                    if code == SESSION_TAKEN_OVER
                    else f"{self._short_sessions} times in a row soon after accepting it",
                    self.settings.client_id,
                )
            return
        log.warning("lost the broker connection (%s); reconnecting", reason_code)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        del client, userdata, reason_code, properties
        with self._cond:
            if self._pending.pop(mid, None) is None:
                self._acked_early.add(mid)
            self._cond.notify_all()

    # --- sender thread ---------------------------------------------------------------------

    def _can_send(self) -> bool:
        """Called under the lock: connected, something queued, room in the window, and no
        re-sent messages from before a reconnect still unconfirmed."""
        if not (self._connected and self._queue and len(self._pending) < INFLIGHT_WINDOW):
            return False
        return not (self._pending and time.monotonic() < self._drain_until)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not self._can_send():
                    self._cond.wait(0.2)
                if self._stop.is_set():
                    return
                message = self._queue.popleft()
            # Not under our lock: paho calls on_publish holding its own, which would deadlock.
            info = self._client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                with self._cond:
                    self._queue.appendleft(message)
                    self._connected = False
                continue
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning(
                    "could not publish to %s: %s", message.topic, mqtt.error_string(info.rc)
                )
                continue
            with self._cond:
                if info.mid in self._acked_early:
                    self._acked_early.discard(info.mid)
                else:
                    self._pending[info.mid] = message.qos
            # paho calls on_publish for every message: when QoS 0 is written, when 1/2 is acked.
            self.sent += 1
