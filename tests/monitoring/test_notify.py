"""Alarm notifications, tested against real local receivers: an HTTP server for webhooks (JSON,
signature, retries, failures into the audit log, timeouts that never block the monitor) and an
SMTP server for e-mail (subject, body, recipients, header injection); configuration errors."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from radguard.governance.auditlog import AuditLog
from radguard.monitoring.notify import (
    DeliveryError,
    Dispatcher,
    EmailNotifier,
    NotifyError,
    WebhookNotifier,
    format_body,
    format_subject,
    notifiers_from_config,
)

EVENT = {"id": 7, "state": "opened", "site": "CT1", "signal": "drift",
         "model_version": "chest 1.2", "start_seq": 120, "start": "2026-12-08T02:00:00+00:00",
         "peak": 14.2, "peak_seq": 131, "end_seq": None,
         "changes": [{"feature": "mean", "direction": "up"},
                     {"feature": "p95", "direction": "down"}],
         "summary": "Image statistics at CT1 moved away from the reference."}


# -- a local webhook receiver --------------------------------------------------------------------

class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST; answers ``statuses`` in turn (the
    last one repeated), or holds the answer until ``release`` is set when ``hang``."""

    def __init__(self, statuses=(200,), hang=False):
        self.statuses = list(statuses)
        self.hang = hang
        self.release = threading.Event()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((dict(self.headers.items()), body))
                if receiver.hang:
                    receiver.release.wait(5)
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 \
                    else receiver.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def url(self, userinfo=""):
        return f"http://{userinfo}127.0.0.1:{self.server.server_address[1]}/hooks/radguard"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    made = []

    def make(statuses=(200,), hang=False):
        made.append(Receiver(statuses, hang))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_webhook_delivers_signed_json(receiver):
    rx = receiver()
    with Dispatcher([WebhookNotifier(rx.url(), secret="s3cret-key")]) as dispatcher:
        assert dispatcher.notify(EVENT)
        assert dispatcher.flush(5)
        assert (dispatcher.sent, dispatcher.failed, dispatcher.dropped) == (1, 0, 0)
    headers, body = rx.requests[0]
    assert json.loads(body.decode("utf-8")) == EVENT
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Radguard-Event"] == "opened"
    expected = "sha256=" + hmac.new(b"s3cret-key", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Radguard-Signature"], expected)
    # a forged body does not verify
    assert headers["X-Radguard-Signature"] != "sha256=" + hmac.new(
        b"s3cret-key", body + b" ", hashlib.sha256).hexdigest()


def test_no_signature_without_secret_and_basic_auth_from_url(receiver):
    rx = receiver()
    notifier = WebhookNotifier(rx.url("alice:pa%3Ass@"))
    notifier.send({"id": 1, "state": "closed", "note": "é"})
    headers, body = rx.requests[0]
    assert "X-Radguard-Signature" not in headers
    assert base64.b64decode(headers["Authorization"].split()[1]) == b"alice:pa:ss"
    assert json.loads(body.decode("utf-8"))["note"] == "é"
    assert "pa%3Ass" not in repr(notifier) and "alice" not in notifier.target


def test_webhook_retries_until_delivered(receiver):
    rx = receiver(statuses=(500, 500, 200))
    with Dispatcher([WebhookNotifier(rx.url())], retries=3, backoff=0.01) as dispatcher:
        dispatcher.notify(EVENT)
        assert dispatcher.flush(5)
        assert (dispatcher.sent, dispatcher.failed) == (1, 0)
    assert len(rx.requests) == 3
    assert len({body for _, body in rx.requests}) == 1  # the same event each time


def test_webhook_failure_is_audited_without_credentials(receiver, tmp_path, caplog):
    rx = receiver(statuses=(500,))
    audit = AuditLog(tmp_path / "audit.jsonl")
    notifier = WebhookNotifier(rx.url("bob:hunter2@"), secret="topsecret")
    with caplog.at_level(logging.INFO, logger="radguard.monitoring"), \
            Dispatcher([notifier], audit_log=audit, retries=2, backoff=0.01) as dispatcher:
        dispatcher.notify(EVENT)
        assert dispatcher.flush(5)
        assert (dispatcher.sent, dispatcher.failed) == (0, 1)
    assert len(rx.requests) == 3  # the first try and two retries
    entries = AuditLog(tmp_path / "audit.jsonl").recent(actions=("monitoring.notify_failed",))
    assert len(entries) == 1
    entry = entries[0]
    assert entry.actor == "radguard-monitor"
    assert entry.details["episode"] == 7 and "HTTP 500" in entry.details["error"]
    assert entry.target == rx.url()  # the URL without its user name and password
    assert audit.verify().intact
    shown = caplog.text + json.dumps(entry.to_dict())
    assert "failed after 3 attempt(s)" in caplog.text
    assert "hunter2" not in shown and "bob" not in shown and "topsecret" not in shown


def test_a_refusal_is_not_retried(receiver):
    rx = receiver(statuses=(404,))
    with Dispatcher([WebhookNotifier(rx.url())], retries=3, backoff=0.01) as dispatcher:
        dispatcher.notify(EVENT)
        assert dispatcher.flush(5)
        assert dispatcher.failed == 1
    assert len(rx.requests) == 1


def test_a_hanging_receiver_times_out_and_never_blocks_notify(receiver):
    rx = receiver(hang=True)
    with Dispatcher([WebhookNotifier(rx.url(), timeout=0.3)], retries=0) as dispatcher:
        started = time.monotonic()
        assert dispatcher.notify(EVENT)
        assert dispatcher.notify({**EVENT, "id": 8})
        assert time.monotonic() - started < 0.1  # while the receiver holds its answer
        assert not dispatcher.flush(0.1)  # the first delivery is still waiting
        assert dispatcher.flush(5)  # both time out after 0.3 s each
        assert (dispatcher.sent, dispatcher.failed) == (0, 2)
        rx.release.set()  # the receiver answers again: later events go through
        dispatcher.notify({**EVENT, "id": 9})
        assert dispatcher.flush(5) and dispatcher.sent == 1


def test_timeout_is_a_delivery_error(receiver):
    rx = receiver(hang=True)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="timed out") as info:
        WebhookNotifier(rx.url(), timeout=0.2).send(EVENT)
    assert time.monotonic() - started < 2 and info.value.retry


def test_an_unreachable_receiver_fails():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Dispatcher([WebhookNotifier(f"http://127.0.0.1:{port}/")], retries=1,
                    backoff=0.01) as dispatcher:
        dispatcher.notify(EVENT)
        assert dispatcher.flush(5) and dispatcher.failed == 1


# -- the queue -----------------------------------------------------------------------------------

class Gate:
    """A notifier that holds every delivery until opened (to fill the queue)."""

    target = "gate"

    def __init__(self):
        self.open = threading.Event()
        self.events = []

    def send(self, event):
        self.open.wait(5)
        self.events.append(event)


def test_a_full_queue_drops_events_without_raising(caplog):
    gate = Gate()
    with Dispatcher([gate], queue_size=2) as dispatcher:
        assert dispatcher.notify({"id": 1}) and dispatcher.notify({"id": 2})
        assert not dispatcher.notify({"id": 3})
        assert dispatcher.dropped == 1 and "queue is full" in caplog.text
        gate.open.set()
        assert dispatcher.flush(5)
        assert dispatcher.sent == 2 and [e["id"] for e in gate.events] == [1, 2]
        assert dispatcher.notify({"id": 4}) and dispatcher.flush(5)  # room again
    assert not dispatcher.notify({"id": 5})  # closed: dropped, no exception
    assert not dispatcher.notify(None)  # not an event: dropped too
    assert dispatcher.dropped == 3


def test_a_broken_notifier_does_not_stop_the_others():
    class Broken:
        def send(self, event):
            raise RuntimeError("boom")

    gate = Gate()
    gate.open.set()
    with Dispatcher([Broken(), gate], retries=1, backoff=0.001) as dispatcher:
        dispatcher.notify(EVENT)
        assert dispatcher.flush(5)
        assert (dispatcher.sent, dispatcher.failed) == (1, 1) and gate.events == [EVENT]


# -- a local SMTP receiver -----------------------------------------------------------------------

@pytest.fixture()
def smtp_server():
    controller_mod = pytest.importorskip("aiosmtpd.controller")

    class Collector:
        def __init__(self):
            self.envelopes = []

        async def handle_RCPT(self, server, session, envelope, address, options):
            if address.startswith("nobody@"):
                return "550 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):
            self.envelopes.append(envelope)
            return "250 Message accepted"

    class Controller(controller_mod.Controller):
        def _trigger_server(self):
            self.port = self.server.sockets[0].getsockname()[1]  # bound to port 0
            super()._trigger_server()

    handler = Collector()
    controller = Controller(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield controller, handler
    controller.stop()


def test_email_subject_body_and_recipients(smtp_server):
    controller, handler = smtp_server
    notifier = EmailNotifier("127.0.0.1", controller.port, sender="radguard@h.org",
                             recipients=["a@b.org", "c@d.org"])
    with Dispatcher([notifier]) as dispatcher:
        dispatcher.notify(EVENT)
        assert dispatcher.flush(5) and dispatcher.sent == 1
    envelope = handler.envelopes[0]
    assert envelope.mail_from == "radguard@h.org"
    assert envelope.rcpt_tos == ["a@b.org", "c@d.org"]
    msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert msg["Subject"] == "[radguard] alarm opened: drift at site CT1 (features: mean, p95)"
    assert msg["To"] == "a@b.org, c@d.org" and msg["From"] == "radguard@h.org"
    body = msg.get_content()
    assert "opened an alarm episode" in body and EVENT["summary"] in body
    for line in ("site: CT1", "model_version: chest 1.2", "start_seq: 120", "peak: 14.2",
                 "end_seq: -", "changes: mean (up), p95 (down)"):
        assert line in body


def test_a_refused_recipient_fails_without_resending(smtp_server):
    controller, handler = smtp_server
    notifier = EmailNotifier("127.0.0.1", controller.port, sender="radguard@h.org",
                             recipients=["a@b.org", "nobody@b.org"])
    with Dispatcher([notifier], retries=3, backoff=0.01) as dispatcher:
        dispatcher.notify(EVENT)
        assert dispatcher.flush(5) and dispatcher.failed == 1
    assert len(handler.envelopes) == 1 and handler.envelopes[0].rcpt_tos == ["a@b.org"]


def test_header_injection_is_refused():
    for bad in ("a@b.org\r\nBcc: evil@x.org", "a@b.org\nX: y", "no-at-sign", "a@b.org, c@d.org"):
        with pytest.raises(NotifyError, match="e-mail"):
            EmailNotifier("mail", sender="radguard@h.org", recipients=[bad])
        with pytest.raises(NotifyError, match="e-mail"):
            EmailNotifier("mail", sender=bad, recipients=["a@b.org"])
    with pytest.raises(NotifyError, match="recipients"):
        EmailNotifier("mail", sender="radguard@h.org", recipients=[])
    # event fields end up on one line of the subject
    subject = format_subject({**EVENT, "site": "CT1\r\nBcc: evil@x.org"})
    assert "\r" not in subject and "\n" not in subject


def test_formatting_with_missing_keys():
    assert format_subject({}) == "[radguard] alarm update: monitoring"
    assert format_subject({"state": "closed", "signal": "sensitivity"}) == \
        "[radguard] alarm closed: sensitivity"
    many = [{"feature": f"f{i}"} for i in range(7)]
    assert format_subject({"changes": many}).endswith("(features: f0, f1, f2, f3, f4, +2 more)")
    # the shape of Episode.to_dict(): state "open", "version", "start_ts"
    episode = {"id": 2, "site": "MR2", "version": "v3", "signal": "metadata", "state": "open",
               "start_ts": "2026-12-08T02:00:00+00:00",
               "changes": [{"feature": "manufacturer", "value": "ACME"}]}
    assert format_subject(episode) == \
        "[radguard] alarm opened: metadata at site MR2 (features: manufacturer)"
    body = format_body(episode)
    assert "opened an alarm episode" in body and "version: v3" in body
    assert "changes: new manufacturer ACME" in body
    body = format_body({"id": 3, "changes": "odd", "extra": {"k": 1}})
    assert "reports an alarm episode" in body and "id: 3" in body and 'extra: {"k": 1}' in body


# -- configuration -------------------------------------------------------------------------------

def test_config_builds_notifiers():
    assert notifiers_from_config({}) == []
    notifiers = notifiers_from_config({
        "webhook": "https://hooks.example.org/radguard", "webhook_secret": "k",
        "email_to": "a@b.org", "email_from": "radguard@h.org", "smtp_host": "mail",
        "smtp_port": 587, "smtp_starttls": True, "smtp_user": "u", "smtp_password": "p"})
    webhook, mail = notifiers
    assert isinstance(webhook, WebhookNotifier) and isinstance(mail, EmailNotifier)
    assert mail.recipients == ["a@b.org"] and mail.port == 587 and mail.starttls


@pytest.mark.parametrize(("section", "message"), [
    ({"webhook": "https://h/x", "webhok_secret": "k"}, "unknown notification setting.*webhok"),
    ({"smtp_port": "25", "email_to": ["a@b.org"]}, "smtp_port must be an integer, not str"),
    ({"smtp_port": True}, "smtp_port must be an integer, not bool"),
    ({"email_to": ["a@b.org", 3]}, "email_to must be a string or a list of strings"),
    ({"smtp_starttls": "yes"}, "smtp_starttls must be true or false"),
    ({"webhook": "ftp://h/x"}, "not an http:// or https:// URL"),
    ({"webhook": "h/x"}, "not an http:// or https:// URL"),
    ({"webhook_secret": "k"}, "webhook .* is not"),
    ({"email_to": ["a@b.org"], "smtp_host": "mail"}, "email_from is not"),
    ({"smtp_host": "mail"}, "email_to .* is not"),
    ({"email_to": ["a@b.org"], "email_from": "r@h.org", "smtp_host": "mail",
      "smtp_user": "u", "smtp_password": "p"}, "only sent over STARTTLS"),
])
def test_config_errors(section, message):
    with pytest.raises(NotifyError, match=message):
        notifiers_from_config(section)


def test_credentials_never_appear_in_errors():
    with pytest.raises(NotifyError) as info:
        notifiers_from_config({"webhook": "ftp://alice:s3cret@host/x", "webhook_secret": "k"})
    assert "s3cret" not in str(info.value) and "alice" not in str(info.value)
    assert "ftp://host/x" in str(info.value)
    with pytest.raises(NotifyError) as info:
        WebhookNotifier("http://alice:s3cret@host:99999/x")
    assert "s3cret" not in str(info.value)
    with pytest.raises(NotifyError) as info:
        WebhookNotifier("https://h/x", secret="")
    assert "empty" in str(info.value)
