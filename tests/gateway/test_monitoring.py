"""The gateway's drift monitor: one alarm per episode, shown on the worklist, posted to a
webhook ([notify]), with bad [notify] settings refused at start."""

from __future__ import annotations

import http.server
import json
import threading

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from radguard.dicom.web import DicomWebClient
from radguard.gateway.config import ConfigError, GatewayConfig
from radguard.monitoring import IMAGE_FEATURES, Monitor, image_features
from tests.gateway.conftest import web_gateway
from tests.security.conftest import wait_until


def _image(pixels: np.ndarray) -> bytes:
    import io

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "P1", "Test^Drift", "OT"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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
    rng = np.random.default_rng(3)
    reference = [image_features(rng.integers(0, 255, (32, 32)), 255.0) for _ in range(60)]
    monitor = Monitor(tmp_path / "monitor.db")
    monitor.fit_reference(np.array([[f[n] for n in IMAGE_FEATURES] for f in reference]),
                          list(IMAGE_FEATURES))
    monitor.close()
    _Receiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gateway = web_gateway(tmp_path / "data", monitor_db=str(tmp_path / "monitor.db"),
                          notify_webhook=f"http://127.0.0.1:{server.server_port}/radguard")
    try:
        client = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",
                                token=gateway.tokens["tech"])
        # a "new scanner": every image much brighter than the reference's
        for _ in range(30):
            client.store([_image(rng.integers(200, 256, (32, 32)))])
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
