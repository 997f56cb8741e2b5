"""The broker connection's troubles, each said once, in words that say what to fix.

paho does not say why a connection failed. A :class:`ConnectionWatch` finds out on a thread of
its own (never paho's network thread, which must not block): unreachable, TLS trouble, or a TLS
port spoken to in plain MQTT. A broker that refuses us is said once per reason, however often
paho retries; and a broker that keeps closing a connection it had just accepted is taken for
what it nearly always is: another client connected with the same client id.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any

from edge_daemon.control import RateLimit
from edge_daemon.errors import ConfigError
from edge_daemon.settings import Settings
from edge_daemon.stage import StageThread

log = logging.getLogger(__name__)

#: A connection the broker closes within this many seconds of accepting it counts as short.
SHORT_SESSION_S = 10.0
#: Short sessions in a row, each closed by the broker without a word and each followed by a
#: reconnect that worked at once, after which another client with our id is the likely cause.
#: (mosquitto 2 just closes the old connection, with MQTT 5 too; the protocol's reason 142,
#: "session taken over", is recognised where a broker sends it.)
TAKEOVERS_TO_WARN = 3
#: MQTT 5 reason code "Session taken over".
SESSION_TAKEN_OVER = 142


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


class ConnectionWatch:
    """Counts the broker's answers and says what goes wrong with the connection, once each.

    The ``connect_failed``, ``refused``, ``accepted`` and ``lost`` calls come from paho's
    callbacks: they only count, log, or wake the diagnosis thread.
    """

    def __init__(self, settings: Settings, context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self._context = context
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = False
        self._last_failure = ""
        self._connected_at = 0.0
        self._short_sessions = 0
        self._said_takeover = False
        self._lost_log = RateLimit(rate=1 / 60, burst=3)
        #: The diagnosis thread, once started.
        self.thread: StageThread | None = None
        #: Times the broker accepted us.
        self.connects = 0
        #: CONNACKs that refused us (a wrong password: one each retry).
        self.refusals = 0
        #: Why the broker last refused us, until it accepts us again.
        self.last_refusal: str | None = None

    def start(self) -> None:
        """Start the diagnosis thread."""
        self.thread = StageThread("mqtt-diagnosis", self._diagnose_loop)
        self.thread.start()

    def stop(self) -> None:
        """End the diagnosis thread (a diagnosis under way ends within its timeout)."""
        self._stop.set()
        self._wake.set()

    def connect_failed(self) -> None:
        """paho could not connect (no reason given): find out why, off its thread."""
        # The broker was away: a restart, not another client taking our session.
        self._short_sessions = 0
        self._wake.set()

    def refused(self, reason_code: Any) -> None:
        """The broker answered CONNECT with a refusal."""
        # Said once per reason: a retry loop must not fill the journal with one line.
        level = logging.ERROR if str(reason_code) != self.last_refusal else logging.DEBUG
        self.refusals += 1
        self._short_sessions = 0
        self.last_refusal = str(reason_code)
        cfg = self.settings.mqtt
        log.log(
            level,
            "broker %s:%d refused the connection: %s (check EDGE_MQTT__USERNAME, "
            "EDGE_MQTT__PASSWORD and the broker's access rules); retrying",
            cfg.host,
            cfg.port,
            reason_code,
        )

    def accepted(self) -> None:
        """The broker accepted us."""
        cfg = self.settings.mqtt
        self.connects += 1
        self.last_refusal = None
        self._last_failure = ""
        self._connected = True
        self._connected_at = time.monotonic()
        log.info("connected to broker %s:%d as %s", cfg.host, cfg.port, self.settings.client_id)

    def lost(self, was_connected: bool, reason_code: Any, from_server: bool = False) -> None:
        """The connection closed (not on our own stop); ``from_server`` when the broker sent a
        DISCONNECT saying why (MQTT 5)."""
        self._connected = False
        if not was_connected:
            # Closed before the broker answered our CONNECT: e.g. a TLS port spoken to in
            # plain MQTT (the diagnosis thread finds out), unless a refusal explains it.
            if self.last_refusal is None:
                self._wake.set()
            return
        code = getattr(reason_code, "value", None)
        # A broker that closes without a word soon after accepting us, again and again, and
        # lets us straight back in each time: that is how a takeover looks (a keepalive
        # timeout is our link, not that).
        unexplained = not from_server and "keep" not in str(reason_code).lower()
        short = unexplained and time.monotonic() - self._connected_at < SHORT_SESSION_S
        self._short_sessions = self._short_sessions + 1 if short else 0
        taken = code == SESSION_TAKEN_OVER or self._short_sessions >= TAKEOVERS_TO_WARN
        if taken and not self._said_takeover:
            self._said_takeover = True
            log.error(
                "the broker closed our connection (%s)%s: another client is %sconnected with "
                "client id %r (two daemons with the same EDGE_DEVICE_ID?); give each its own "
                "EDGE_DEVICE_ID or EDGE_MQTT__CLIENT_ID",
                reason_code,
                ""
                if code == SESSION_TAKEN_OVER
                else f", {self._short_sessions} times in a row soon after accepting it",
                "" if code == SESSION_TAKEN_OVER else "probably ",
                self.settings.client_id,
            )
            return
        log.log(
            logging.WARNING if self._lost_log.allow() else logging.DEBUG,
            "lost the broker connection (%s); reconnecting",
            reason_code,
        )

    def _diagnose_loop(self) -> None:
        """Diagnose failed connections; say each new reason once."""
        cfg = self.settings.mqtt
        while not self._stop.is_set():
            if not self._wake.wait(1.0):
                continue
            self._wake.clear()
            if self._stop.is_set():
                return
            why = diagnose(cfg.host, cfg.port, self._context)
            if why == self._last_failure or self._connected:
                log.debug("cannot connect to broker %s:%d: %s", cfg.host, cfg.port, why)
                continue
            self._last_failure = why
            level = logging.ERROR if why.startswith(("TLS", "port")) else logging.WARNING
            log.log(level, "cannot connect to broker %s:%d: %s; retrying", cfg.host, cfg.port, why)
