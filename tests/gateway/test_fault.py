"""kill -9 while storescu sends 1,000 images: every acknowledged image survives the crash and
is processed exactly once after the restart; nothing half-written remains. A bug's exception
in a worker costs neither the worker nor the instance."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from radguard.gateway.store import Store
from tests.conftest import NIH_DX, _free_port, dcmtk_tool, process_alive
from tests.gateway.conftest import small_images
from tests.security.conftest import wait_until


def _small_images(folder, n: int) -> dict[str, str]:
    """n small secondary-capture images in one study: file name -> SOP UID."""
    return {path.name: sop for path, sop in small_images(Path(folder), n, studies=1).items()}


def _serve(data_dir, port: int) -> subprocess.Popen:
    # any free HTTP port: a fixed one (the default 8080) collides with a gateway another test
    # worker starts at the same time
    proc = subprocess.Popen([sys.executable, "-m", "radguard.cli", "serve", "--data-dir",
                             str(data_dir), "--dicom-port", str(port), "--http-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"gateway did not start: {proc.stderr.read()[-1000:]}") \
                    from None
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("gateway did not start listening")


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the gateway's check processes)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def _run_until_settled(gateway, row: int, timeout: float, what: str) -> None:
    """Start ``gateway``, wait until instance ``row`` is neither queued nor being processed,
    stop it."""
    gateway.start()
    try:
        wait_until(lambda: gateway.store.get(row).state not in ("queued", "processing"),
                   timeout, f"{what} to be processed")
    finally:
        gateway.stop()


def test_kill_9_during_a_1000_image_transfer(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sops = _small_images(images, 1000)
    data = tmp_path / "data"
    port = _free_port()
    gateway = _serve(data, port)
    sender = subprocess.Popen(
        [dcmtk_tool("storescu"), "-v", "-aet", "MODALITY", "-aec", "RADGUARD", "127.0.0.1",
         str(port), *sorted(str(p) for p in images.iterdir())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TCP_NODELAY": "1"})
    time.sleep(3.0)
    checkers = _children(gateway.pid)
    gateway.send_signal(signal.SIGKILL)  # no chance to clean up
    gateway.wait(30)
    # its check processes do not outlive it (they would hold their models forever)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(process_alive(pid) for pid in checkers):
        time.sleep(0.1)
    assert checkers and not [pid for pid in checkers if process_alive(pid)]
    log, _ = sender.communicate(timeout=120)
    acked, current = [], None
    for line in log.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = os.path.basename(m.group(1))
        elif "Received Store Response (Success)" in line and current:
            acked.append(sops[current])
            current = None
    print(f"{len(acked)} of 1000 acknowledged before kill -9")
    assert 20 < len(acked) < 1000, f"{len(acked)} acknowledged: the kill should land mid-run"

    gateway = _serve(data, port)  # restart: recovery, then the queue is worked off
    try:
        store = Store(data)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            counts = store.counts()
            if not counts.get("queued") and not counts.get("processing"):
                break
            time.sleep(0.2)
        rows = store.instances()
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
    by_sop: dict[str, list] = {}
    for row in rows:
        by_sop.setdefault(row.sop_uid, []).append(row)
    for sop in acked:
        assert sop in by_sop, f"acknowledged {sop} was lost"
        assert len(by_sop[sop]) == 1, f"{sop} stored {len(by_sop[sop])} times"
        assert by_sop[sop][0].state in ("done", "quarantined", "rejected")
        assert by_sop[sop][0].attempts == 1 or by_sop[sop][0].attempts == 2
    for row in rows:  # nothing half-written: every file is whole and matches its hash
        blob = (data / row.path).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == row.sha256 and len(blob) == row.size
    assert not [p for p in (data / "objects").glob("*/.*.tmp")]
    processed = [r for r in rows if r.state != "queued" and r.processed_at]
    assert len(processed) == len(rows)  # each processed, and (one row each) exactly once


def test_a_worker_survives_an_unexpected_error_and_requeues(tmp_path, monkeypatch, caplog):
    """Finding 10: an exception of an unexpected type outside the checks - here forwarding
    raises a bug's RuntimeError once; a real bug cannot be produced on demand - killed the
    worker thread and left the instance claimed until a restart. Now it is logged with its
    traceback, the instance goes back to the queue and the worker checks it again."""
    from radguard.gateway import Gateway, GatewayConfig
    from radguard.gateway.dimse import header_of
    from radguard.gateway.pipeline import Pipeline

    caplog.set_level("WARNING", logger="radguard.gateway")
    forward, calls = Pipeline.forward, []

    def forward_broken_once(self: Pipeline, instance: object) -> str | None:
        calls.append(instance)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return forward(self, instance)  # type: ignore[arg-type]

    monkeypatch.setattr(Pipeline, "forward", forward_broken_once)
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0, workers=1).validate())
    payload = NIH_DX.read_bytes()  # a real radiograph: checked "done", so it is forwarded
    row = gateway.store.ingest(payload, header_of(payload), source="dimse")
    gateway.start()
    try:
        wait_until(lambda: gateway.store.get(row).state == "done", 120,
                   "the instance to be checked again")
        workers = [t for t in gateway._threads if t.name.startswith("radguard-worker")]
        assert workers and all(t.is_alive() for t in workers)
    finally:
        gateway.stop()
    assert gateway.store.get(row).attempts == 2 and len(calls) == 2
    failed = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert failed and failed[0].exc_info and "a bug" in str(failed[0].exc_info[1])


def test_an_instance_that_always_fails_is_quarantined_and_does_not_stall_the_queue(tmp_path,
                                                                                  monkeypatch):
    """An error the working store cannot explain (here: forwarding one instance always raises
    an OSError, as a decoder or a vanished file would) must not requeue that instance for
    ever: the oldest queued instance is claimed first, so it would stall everything behind
    it. After MAX_ATTEMPTS it is quarantined with the error, and the next one is processed."""
    from radguard.gateway import Gateway, GatewayConfig
    from radguard.gateway.dimse import header_of
    from radguard.gateway.pipeline import Pipeline
    from radguard.gateway.service import MAX_ATTEMPTS

    forward = Pipeline.forward
    payload = NIH_DX.read_bytes()
    other = _small_images(tmp_path, 1)
    second = (tmp_path / next(iter(other))).read_bytes()

    def forward_poisoned(self: Pipeline, instance: object) -> str | None:
        if instance.sop_uid == poisoned_uid:  # type: ignore[attr-defined]
            raise OSError(5, "Input/output error reading this instance")
        return forward(self, instance)  # type: ignore[arg-type]

    monkeypatch.setattr(Pipeline, "forward", forward_poisoned)
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0, workers=1).validate())
    poisoned_uid = header_of(payload)["sop_uid"]
    bad = gateway.store.ingest(payload, header_of(payload), source="dimse")
    good = gateway.store.ingest(second, header_of(second), source="dimse")
    _run_until_settled(gateway, good, 180, "the instance behind the poisoned one")
    row = gateway.store.get(bad)
    assert row.state == "quarantined" and row.attempts == MAX_ATTEMPTS
    assert "Input/output error" in row.detail["reasons"][0]
    assert gateway.store.get(good).attempts == 1  # judged once, on its merits


def test_forwarding_retries_do_not_count_as_failures(tmp_path, monkeypatch):
    """Second review H3: the quarantine counted claims, and every forwarding retry is one,
    so after a PACS outage of MAX_ATTEMPTS retries or more a single error of another kind
    quarantined an instance at once. Failures of its own are counted apart from claims:
    here the PACS is down for MAX_ATTEMPTS + 1 sends, then one send meets a read error,
    then it works - the instance is forwarded and ``done``."""
    import errno

    from radguard.gateway import Gateway, GatewayConfig
    from radguard.gateway.dimse import header_of
    from radguard.gateway.pipeline import ForwardError, Pipeline
    from radguard.gateway.service import MAX_ATTEMPTS
    from tests.security.conftest import scale_back_off

    scale_back_off(monkeypatch)  # the forwarding back-off doubles to 60 s: not in real time
    forward, sends = Pipeline.forward, []

    def forward_after_an_outage(self: Pipeline, instance: object) -> str | None:
        sends.append(instance)
        if len(sends) <= MAX_ATTEMPTS + 1:
            raise ForwardError("PACS unreachable")
        if len(sends) == MAX_ATTEMPTS + 2:
            raise OSError(errno.EIO, "Input/output error reading the instance")
        return forward(self, instance)  # type: ignore[arg-type]

    monkeypatch.setattr(Pipeline, "forward", forward_after_an_outage)
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0, workers=1).validate())
    payload = NIH_DX.read_bytes()  # checked "done", so it is forwarded
    row = gateway.store.ingest(payload, header_of(payload), source="dimse")
    _run_until_settled(gateway, row, 300, "the instance to be forwarded after the outage")
    instance = gateway.store.get(row)
    assert instance.state == "done", instance.detail
    assert instance.attempts == MAX_ATTEMPTS + 3 and len(sends) == MAX_ATTEMPTS + 3
