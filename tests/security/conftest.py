"""Helpers for the attacker's-eye tests: a real ``radguard serve`` process to attack, and its
memory as the kernel counts it (peak resident set of the gateway and its check processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import _free_port


def _status_kb(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the gateway's check processes)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


@dataclass
class GatewayProcess:
    """A gateway started as ``python -m radguard.cli serve --config ...`` in its own process."""

    proc: subprocess.Popen[str]
    data_dir: Path
    dicom_port: int
    http_port: int
    log: Path
    pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def family(self) -> list[int]:
        """The gateway and its check processes."""
        return [self.pid, *children(self.pid)]

    def rss_mb(self) -> float:
        """Resident memory now, gateway plus check processes, in MB."""
        return sum(_status_kb(p, "VmRSS") for p in self.family()) / 1024

    def reset_peak(self) -> None:
        """Start counting peak memory from now (``echo 5 > /proc/<pid>/clear_refs``)."""
        for p in self.family():
            try:
                Path(f"/proc/{p}/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_mb(self) -> float:
        """Peak resident memory since :meth:`reset_peak`, gateway plus check processes."""
        return sum(_status_kb(p, "VmHWM") for p in self.family()) / 1024

    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_gateway(tmp_path: Path, settings: str = "", *, check_processes: int = 0,
                  timeout: float = 120) -> GatewayProcess:
    """``radguard serve`` with ``settings`` (TOML lines) on free ports; returns once both the
    DICOM and the HTTP port accept connections."""
    data = tmp_path / "gw-data"
    dicom_port, http_port = _free_port(), _free_port()
    config = tmp_path / "gw.toml"
    config.write_text(f'data_dir = "{data}"\ndicom_port = {dicom_port}\n'
                      f'http_port = {http_port}\ncheck_processes = {check_processes}\n'
                      + settings)
    log = tmp_path / "gw.log"
    proc = subprocess.Popen([sys.executable, "-m", "radguard.cli", "serve", "--config",
                             str(config)], stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    gw = GatewayProcess(proc, data, dicom_port, http_port, log)
    deadline = time.monotonic() + timeout
    for port in (http_port, dicom_port):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    gw.stop()
                    raise AssertionError(
                        f"gateway did not start: {gw.stderr_text()[-2000:]}") from None
                time.sleep(0.1)
    return gw


@pytest.fixture
def gateway_process(tmp_path):
    """Factory: ``gateway_process(settings)`` starts a gateway process, stopped after the test."""
    started: list[GatewayProcess] = []

    def make(settings: str = "", **kw: object) -> GatewayProcess:
        gw = start_gateway(tmp_path, settings, **kw)  # type: ignore[arg-type]
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()
