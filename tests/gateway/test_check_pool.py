"""Check processes: a process that cannot load the layers is a clear error at start-up."""

from __future__ import annotations

import time

import pytest

from radguard.errors import RadguardError
from radguard.gateway.config import GatewayConfig
from radguard.gateway.pipeline import CheckPool
from tests.conftest import process_alive


def test_a_check_process_that_cannot_load_the_layers_is_a_clear_error(tmp_path, monkeypatch):
    """The watermark key vanished between the configuration check and the start: the check
    process reports why, the pool refuses to start and leaves no process behind."""
    started: list[int] = []
    real_init = CheckPool.__init__

    def spying_init(self, config):  # noqa: ANN001, ANN202
        try:
            real_init(self, config)
        finally:
            started.extend(p.process.pid for p in getattr(self, "_all", []))

    monkeypatch.setattr(CheckPool, "__init__", spying_init)
    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           watermark_key=str(tmp_path / "gone.key"), check_processes=1)
    with pytest.raises(RadguardError, match="cannot load the layers.*gone.key"):
        CheckPool(config)
    assert len(started) == 1
    deadline = time.monotonic() + 10
    while process_alive(started[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(started[0])
