"""The gateway's drift monitor: one alarm per episode, shown on the worklist, posted to a
webhook ([notify]), with bad [notify] settings refused at start."""

from __future__ import annotations

import http.server
import json
import threading

import httpx
import pytest

from radguard.dicom.web import DicomWebClient
from radguard.gateway.config import ConfigError, GatewayConfig
from tests.gateway.conftest import fitted_monitor, small_images, web_gateway
from tests.security.conftest import wait_until


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, object]] = []

    def do_POST(self):  # noqa: N802 - the http.server API
        length = int(self.headers["Content-Length"])
        type(self).received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_shift_is_one_episode_on_the_worklist_and_the_webhook(tmp_path):
    monitor_db = fitted_monitor(tmp_path)
    # a "new scanner": every image much brighter than the reference's (grey levels 0-254)
    bright = small_images(tmp_path / "bright", 30, studies=30, low=200)
    _Receiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gateway = web_gateway(tmp_path / "data", monitor_db=str(monitor_db),
                          notify_webhook=f"http://127.0.0.1:{server.server_port}/radguard")
    try:
        client = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",
                                token=gateway.tokens["tech"])
        for path in bright:
            client.store([path.read_bytes()])
        assert gateway.wait_idle(120)
        wait_until(lambda: _Receiver.received, 30, "the webhook")
        page = httpx.get(f"http://127.0.0.1:{gateway.http_port}/",
                         headers={"Authorization": f"Bearer {gateway.tokens['rad']}"},
                         trust_env=False)
        assert page.status_code == 200
        assert "Monitoring: open episodes" in page.text and "drift at site" in page.text
        alarms = gateway.pipeline.monitor.alarms()
        assert len(alarms) == 1 and alarms[0]["detector"] == "drift"  # not one per image
        event = _Receiver.received[0]
        assert event["event"] == "monitoring.alarm" and event["state"] == "open"
        assert event["signal"] == "drift" and event["id"] == alarms[0]["episode"]
    finally:
        gateway.stop()
        server.shutdown()


@pytest.mark.parametrize(("settings", "message"), [
    ({"notify_webhook": "ftp://example.org/x"}, "http"),
    ({"notify_email_to": ["radiology@example.org"]}, "email_from"),
    ({"notify_smtp_user": "u", "notify_smtp_password": "p", "notify_email_to": ["a@b.org"],
      "notify_email_from": "c@d.org", "notify_smtp_host": "mail"}, "starttls"),
])
def test_bad_notify_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        GatewayConfig(data_dir=str(tmp_path), **settings).validate()
