"""Notification hooks: tell people when the monitor opens or closes an alarm episode.

A :class:`Dispatcher` takes episode events from the monitor and delivers them to e-mail
(:class:`EmailNotifier`) and webhooks (:class:`WebhookNotifier`) on one background thread, so
the monitor's hot path never waits for a slow mail server nor fails because one is down: it
only puts the event in a bounded queue. Each delivery is retried with exponential backoff; one
that still fails is logged and, with an audit log, recorded there, because an alarm nobody
heard of must at least leave a trace. A webhook body can be signed with a shared secret
(``X-Radguard-Signature: sha256=<HMAC>``, as GitHub does) so the receiver can tell our events
from forged ones. Standard library only (urllib, smtplib).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import logging
import queue
import smtplib
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from email.message import EmailMessage
from typing import Any, Protocol

from radguard.errors import RadguardError

__all__ = ["DeliveryError", "Dispatcher", "EmailNotifier", "Notifier", "NotifyError",
           "WebhookNotifier", "format_body", "format_subject", "notifiers_from_config"]

log = logging.getLogger("radguard.monitoring")

SIGNATURE_HEADER = "X-Radguard-Signature"


class NotifyError(RadguardError):
    """A notification target is misconfigured (bad URL, address, key or type)."""


class DeliveryError(OSError):
    """One delivery failed. ``retry`` is False when trying again cannot help (the receiver
    refused the event for good, or some recipients already have it)."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Notifier(Protocol):
    """Something that delivers one event, raising (OSError or other) when it could not."""

    def send(self, event: dict[str, object]) -> None:
        """Deliver ``event`` now (called on the dispatcher's thread)."""


def _redact(url: str) -> str:
    """The URL without user name and password (the one redact() of the code base)."""
    from radguard.dicom.web import redact

    try:
        return redact(url)
    except ValueError:  # a port out of range: cut the credentials off by hand
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"


def _clean(text: str) -> str:
    """One line of text: control characters (CR/LF: header injection) become spaces."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text).strip()


# -- webhooks ------------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are failures: urllib would turn the POST into a bodiless GET (a 2xx for an
    event never delivered) and carry our signature to wherever the answer points."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


class WebhookNotifier:
    """POST each event as JSON to an http(s) URL; HTTP Basic from ``user:password@`` in the
    URL, an HMAC-SHA256 signature of the body when ``secret`` is set."""

    def __init__(self, url: str, *, secret: str | None = None, timeout: float = 5.0) -> None:
        if not isinstance(url, str) or not url:
            raise NotifyError("a webhook needs a URL")
        parts = urllib.parse.urlsplit(url.strip())
        shown = _redact(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise NotifyError(f"webhook {shown}: not an http:// or https:// URL")
        try:
            port = parts.port
        except ValueError as exc:
            raise NotifyError(f"webhook {shown}: bad port") from exc
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise NotifyError(f"webhook {shown}: the signing secret is empty")
        if not timeout > 0:
            raise NotifyError(f"webhook {shown}: the timeout must be positive")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        netloc = f"{host}:{port}" if port else host
        self.url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/",
                                            parts.query, ""))
        self.target = shown
        self._auth: str | None = None
        if parts.username is not None:
            pair = (f"{urllib.parse.unquote(parts.username)}:"
                    f"{urllib.parse.unquote(parts.password or '')}")
            self._auth = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
        self._secret = secret.encode("utf-8") if secret else None
        self.timeout = float(timeout)
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:  # no secret, no password
        return f"WebhookNotifier({self.target!r})"

    def body(self, event: Mapping[str, object]) -> bytes:
        """The JSON the receiver gets (and the bytes the signature covers)."""
        return json.dumps(event, ensure_ascii=False, sort_keys=True,
                          default=str).encode("utf-8")

    def sign(self, body: bytes) -> str | None:
        """The signature header's value for ``body`` (None without a secret)."""
        if self._secret is None:
            return None
        return "sha256=" + hmac.new(self._secret, body, hashlib.sha256).hexdigest()

    def send(self, event: dict[str, object]) -> None:
        """POST the event; anything but a 2xx answer within the timeout is a DeliveryError."""
        data = self.body(event)
        headers = {"Content-Type": "application/json", "User-Agent": "radguard-monitor",
                   "X-Radguard-Event": _state(event)}
        signature = self.sign(data)
        if signature:
            headers[SIGNATURE_HEADER] = signature
        if self._auth:
            headers["Authorization"] = self._auth
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                status = answer.status
                answer.read(65536)
        except urllib.error.HTTPError as exc:
            exc.close()
            # 3xx/4xx: refused for good (redirects are not followed); a rate limit is not
            permanent = 300 <= exc.code < 500 and exc.code not in (408, 425, 429)
            raise DeliveryError(f"webhook {self.target}: answered HTTP {exc.code}",
                                retry=not permanent) from None
        except urllib.error.URLError as exc:
            raise DeliveryError(f"webhook {self.target}: {_reason(exc.reason)}") from None
        except (OSError, ValueError) as exc:  # timeouts while reading, broken answers
            raise DeliveryError(f"webhook {self.target}: {_reason(exc)}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"webhook {self.target}: answered HTTP {status}")


def _reason(exc: object) -> str:
    """Why a connection failed, in a few words (never the URL: it may hold credentials)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip() if not isinstance(exc, str) else exc
    return _clean(text) or type(exc).__name__


# -- e-mail --------------------------------------------------------------------------------------

def _address(value: object, what: str) -> str:
    """A plausible single e-mail address; CR/LF (header injection), blanks, commas and
    angle brackets are refused rather than cleaned."""
    if not isinstance(value, str):
        raise NotifyError(f"{what}: an e-mail address is a string, not {type(value).__name__}")
    local, at, domain = value.partition("@")
    if not at or not local or not domain or any(
            ord(c) < 33 or ord(c) == 127 or c in ",;<>\"" for c in value):
        raise NotifyError(f"{what}: not a single e-mail address: {value!r}")
    return value


class EmailNotifier:
    """Send each event as a plain-text e-mail through an SMTP server (STARTTLS and login
    optional)."""

    def __init__(self, host: str, port: int = 25, *, sender: str, recipients: list[str],
                 starttls: bool = False, username: str | None = None,
                 password: str | None = None, timeout: float = 10.0) -> None:
        if not isinstance(host, str) or not host or any(ord(c) <= 32 for c in host):
            raise NotifyError(f"SMTP host {host!r}: not a host name")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise NotifyError(f"SMTP port {port!r}: not a port number (1-65535)")
        self.sender = _address(sender, "e-mail sender")
        if isinstance(recipients, str) or not recipients:
            raise NotifyError("e-mail notifications need a list of one or more recipients")
        self.recipients = [_address(r, "e-mail recipient") for r in recipients]
        if (username is None) != (password is None):
            raise NotifyError(f"SMTP {host}: give both a user name and a password, or neither")
        if username is not None and not starttls:
            raise NotifyError(f"SMTP {host}: a password is only sent over STARTTLS "
                              "(set smtp_starttls = true)")
        if not timeout > 0:
            raise NotifyError(f"SMTP {host}: the timeout must be positive")
        self.host, self.port, self.starttls = host, port, starttls
        self._login = (username, password) if username is not None else None
        self.timeout = float(timeout)
        self.target = f"smtp://{host}:{port} to {', '.join(self.recipients)}"

    def __repr__(self) -> str:  # no password
        return f"EmailNotifier({self.target!r})"

    def message(self, event: Mapping[str, object]) -> EmailMessage:
        """The e-mail for one event."""
        msg = EmailMessage()
        msg["Subject"] = format_subject(event)
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Date"] = email.utils.formatdate(usegmt=True)
        # a domain of our own: make_msgid() would ask DNS for this host's name
        msg["Message-ID"] = email.utils.make_msgid("radguard", self.sender.split("@", 1)[1])
        msg.set_content(format_body(event))
        return msg

    def send(self, event: dict[str, object]) -> None:
        """Hand the message to the SMTP server; a refusal or an unreachable server is a
        DeliveryError (permanent for 5xx answers and for a partial delivery)."""
        msg = self.message(event)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                smtp.ehlo()
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                    smtp.ehlo()
                if self._login is not None:
                    smtp.login(*self._login)
                refused = smtp.send_message(msg, self.sender, self.recipients)
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"{self.target}: every recipient refused "
                                f"({', '.join(exc.recipients)})", retry=False) from None
        except smtplib.SMTPResponseException as exc:
            reply = exc.smtp_error.decode("utf-8", "replace") if isinstance(
                exc.smtp_error, bytes) else str(exc.smtp_error)
            raise DeliveryError(f"{self.target}: server answered {exc.smtp_code} "
                                f"{_clean(reply)}", retry=exc.smtp_code < 500) from None
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"{self.target}: {_reason(exc)}") from None
        if refused:  # the others have it: sending again would duplicate it
            raise DeliveryError(f"{self.target}: refused for {', '.join(refused)}",
                                retry=False)


# -- what people read ----------------------------------------------------------------------------

_FIELDS = ("id", "state", "signal", "site", "model_version", "version", "start", "start_ts",
           "start_seq", "start_study", "onset_seq", "peak", "peak_seq", "end_seq", "end_ts",
           "changes", "active")


def _state(event: Mapping[str, object]) -> str:
    """``opened``/``closed`` (an episode's own state, ``open``, reads as just opened)."""
    state = _clean(str(event.get("state") or "update"))
    return {"open": "opened", "close": "closed"}.get(state, state)


def _features(event: Mapping[str, object]) -> list[str]:
    changes = event.get("changes")
    names: list[str] = []
    if isinstance(changes, list | tuple):
        for change in changes:
            name = change.get("feature") if isinstance(change, Mapping) else change
            if name is not None and str(name) not in names:
                names.append(str(name))
    return names


def format_subject(event: Mapping[str, object]) -> str:
    """``[radguard] alarm opened: drift at site CT1 (features: mean, p95)``; parts whose
    keys are missing are left out."""
    state = _state(event)
    signal = _clean(str(event.get("signal") or "monitoring"))
    subject = f"[radguard] alarm {state}: {signal}"
    if event.get("site") not in (None, ""):
        subject += f" at site {_clean(str(event['site']))}"
    names = _features(event)
    if names:
        shown = ", ".join(_clean(n) for n in names[:5])
        more = f", +{len(names) - 5} more" if len(names) > 5 else ""
        subject += f" (features: {shown}{more})"
    return subject


def _value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _change(change: object) -> str:
    """``mean (up)``; a new metadata value as ``new manufacturer X``."""
    if not isinstance(change, Mapping):
        return _value(change)
    if "value" in change:
        return f"new {change.get('feature', '?')} {_value(change['value'])}"
    return f"{change.get('feature', '?')} ({change.get('direction', '?')})"


def format_body(event: Mapping[str, object]) -> str:
    """The e-mail's text: what happened, the summary, then every field of the event."""
    what = {"opened": "opened an alarm episode", "closed": "closed an alarm episode"}.get(
        _state(event), "reports an alarm episode")
    lines = [f"The radguard monitor {what}.", ""]
    if event.get("summary"):
        lines += [str(event["summary"]), ""]
    for key in _FIELDS:
        if key not in event:
            continue
        if key == "changes":
            changes = event["changes"]
            items = changes if isinstance(changes, list | tuple) else [changes]
            text = ", ".join(_change(c) for c in items) or "-"
        else:
            text = _value(event[key])
        lines.append(f"{key}: {text}")
    lines += [f"{key}: {_value(value)}" for key, value in event.items()
              if key not in _FIELDS and key != "summary"]
    return "\n".join(lines) + "\n"


# -- delivery in the background ------------------------------------------------------------------

_STOP = object()


class Dispatcher:
    """Deliver events to every notifier on one daemon thread, from a bounded queue.

    ``notify`` never blocks and never raises: the monitor calls it inside its update. Each
    notifier gets each event; a failed delivery is tried again up to ``retries`` times,
    waiting ``backoff``, 2x, 4x... seconds. Counters (per event and notifier): ``sent``,
    ``failed``; ``dropped`` counts events not queued (queue full, dispatcher closed).
    """

    def __init__(self, notifiers: list[Notifier], *, audit_log: object | None = None,
                 queue_size: int = 1000, retries: int = 3, backoff: float = 1.0) -> None:
        if queue_size < 1 or retries < 0 or backoff < 0:
            raise NotifyError("a dispatcher needs queue_size >= 1, retries >= 0, backoff >= 0")
        self.notifiers = list(notifiers)
        self.audit_log = audit_log
        self.queue_size, self.retries, self.backoff = queue_size, retries, backoff
        self.sent = self.failed = self.dropped = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending = 0  # queued or being delivered (the bound of the queue)
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="radguard-notify", daemon=True)
        self._thread.start()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def notify(self, event: Mapping[str, object]) -> bool:
        """Queue ``event`` for delivery; False (and a warning) when it was dropped."""
        try:
            copy = dict(event)  # the caller may go on changing its own
        except (TypeError, ValueError):
            copy, why = None, f"it is not a mapping but a {type(event).__name__}"
        with self._lock:
            if copy is not None and not self._closed and self._pending < self.queue_size:
                self._pending += 1
                self._queue.put(copy)
                return True
            self.dropped += 1
        if copy is not None:
            why = "the dispatcher is closed" if self._closed else \
                f"the queue is full ({self.queue_size} waiting)"
        log.warning("notification of episode %s dropped: %s",
                    copy.get("id") if copy else None, why)
        return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event was delivered or given up; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0 or not self._thread.is_alive(),
                                       timeout) and self._pending == 0

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the thread: no more events are taken, retries are abandoned, and what is
        still queued is dropped (call ``flush`` first to deliver it)."""
        with self._lock:
            self._closed = True
        self._stop.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if self._stop.is_set():
                    with self._lock:
                        self.dropped += 1
                    continue
                for notifier in self.notifiers:
                    self._deliver(notifier, item)  # type: ignore[arg-type]
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()

    def _deliver(self, notifier: Notifier, event: dict[str, object]) -> None:
        target = str(getattr(notifier, "target", type(notifier).__name__))
        attempt = 0
        while True:
            try:
                notifier.send(event)
            except Exception as exc:  # whatever a notifier raises is a failure
                error = str(exc) or type(exc).__name__
                if attempt < self.retries and getattr(exc, "retry", True) \
                        and not self._stop.wait(self.backoff * 2 ** attempt):
                    attempt += 1
                    log.info("notification of episode %s to %s failed (%s); trying again",
                             event.get("id"), target, error)
                    continue
                self._failed(target, event, error, attempt + 1)
                return
            with self._lock:
                self.sent += 1
            return

    def _failed(self, target: str, event: dict[str, object], error: str, attempts: int) -> None:
        with self._lock:
            self.failed += 1
        log.error("notification of episode %s to %s failed after %d attempt(s): %s",
                  event.get("id"), target, attempts, error)
        if self.audit_log is None:
            return
        try:
            self.audit_log.append("monitoring.notify_failed", target,  # type: ignore[attr-defined]
                                  {"error": error, "episode": event.get("id")},
                                  actor="radguard-monitor")
        except Exception as exc:  # the thread must go on delivering
            log.error("cannot record the failed notification in the audit log: %s", exc)


# -- configuration -------------------------------------------------------------------------------

_CONFIG: dict[str, tuple[type | tuple[type, ...], str]] = {
    "webhook": (str, "a string (an http:// or https:// URL)"),
    "webhook_secret": (str, "a string"),
    "email_to": ((str, list), "a string or a list of strings"),
    "email_from": (str, "a string (an e-mail address)"),
    "smtp_host": (str, "a string"),
    "smtp_port": (int, "an integer"),
    "smtp_starttls": (bool, "true or false"),
    "smtp_user": (str, "a string"),
    "smtp_password": (str, "a string"),
}


def notifiers_from_config(section: Mapping[str, object]) -> list[Notifier]:
    """The notifiers a configuration section asks for (none for an empty one). Keys:
    ``webhook``, ``webhook_secret``, ``email_to``, ``email_from``, ``smtp_host``,
    ``smtp_port`` (25), ``smtp_starttls`` (false), ``smtp_user``, ``smtp_password``."""
    if not isinstance(section, Mapping):
        raise NotifyError(f"notification settings must be a table, not {type(section).__name__}")
    unknown = sorted(set(section) - set(_CONFIG))
    if unknown:
        raise NotifyError(f"unknown notification setting(s): {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(_CONFIG)})")
    for key, value in section.items():
        kind, expected = _CONFIG[key]
        wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if key == "email_to" and isinstance(value, list):
            wrong = not all(isinstance(v, str) for v in value)
        if wrong:
            raise NotifyError(f"notification setting {key} must be {expected}, "
                              f"not {type(value).__name__}")
    cfg: dict[str, Any] = dict(section)  # checked above
    notifiers: list[Notifier] = []
    if "webhook" in cfg:
        notifiers.append(WebhookNotifier(cfg["webhook"], secret=cfg.get("webhook_secret")))
    elif "webhook_secret" in cfg:
        raise NotifyError("webhook_secret is set but webhook (the URL) is not")
    smtp = [k for k in cfg if k.startswith("smtp_") or k == "email_from"]
    if "email_to" in cfg:
        for key in ("email_from", "smtp_host"):
            if key not in cfg:
                raise NotifyError(f"email_to is set but {key} is not")
        to = cfg["email_to"]
        notifiers.append(EmailNotifier(
            cfg["smtp_host"], cfg.get("smtp_port", 25), sender=cfg["email_from"],
            recipients=[to] if isinstance(to, str) else to,
            starttls=cfg.get("smtp_starttls", False), username=cfg.get("smtp_user"),
            password=cfg.get("smtp_password")))
    elif smtp:
        raise NotifyError(f"{', '.join(sorted(smtp))} set but email_to (the recipients) is not")
    return notifiers
