"""Helpers for the attacker's-eye tests: a real ``radguard serve`` process to attack, and its
memory as the kernel counts it (peak resident set of the gateway and its check processes);
the peak memory of work done in a subprocess; a small real filesystem to fill; waiting for
a condition with a generous deadline."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, _free_port


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


def wait_until(predicate: Callable[[], object], timeout: float = 120.0,
               what: str = "condition") -> None:
    """Poll ``predicate`` every 0.2 s until it is true; an AssertionError naming ``what``
    after ``timeout`` seconds (generous: a loaded 2-core CI machine is slow, never wrong)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


# -- peak memory of work done in a fresh process ----------------------------------------------

class PeakMeter:
    """This process's peak resident memory since :meth:`reset` (``clear_refs`` + VmHWM)."""

    def __init__(self) -> None:
        self.base_kb = 0

    def reset(self) -> None:
        """Start counting from now: what setup allocated before does not count."""
        Path("/proc/self/clear_refs").write_text("5")
        self.base_kb = _status_kb(os.getpid(), "VmRSS")

    def growth_mb(self) -> float:
        return max(0, _status_kb(os.getpid(), "VmHWM") - self.base_kb) / 1024


_MEASURED = """
import importlib, json, sys
from tests.security.conftest import PeakMeter
meter = PeakMeter()
module, name = sys.argv[1].split(":")
result = getattr(importlib.import_module(module), name)(meter.reset, *sys.argv[2:])
print(json.dumps({"peak_mb": meter.growth_mb(), "result": result}))
"""


def peak_in_subprocess(function: str, *args: str, timeout: float = 600) -> tuple[float, object]:
    """Run ``function`` ("module:name") in a fresh Python process as
    ``function(reset_peak, *args)``: it prepares its input, calls ``reset_peak()``, does the
    work and returns something JSON-serialisable. Returns (MB of peak resident memory the
    work added, what it returned). The pytest process's own lifetime peak (``ru_maxrss``)
    could not tell: an earlier test may have peaked higher."""
    done = subprocess.run([sys.executable, "-c", _MEASURED, function, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{function} failed: {done.stderr[-3000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return float(answer["peak_mb"]), answer["result"]


# -- a small real filesystem to fill -------------------------------------------------------------

#: the source name of the test mounts (what ``mount`` shows for them)
_DISK_NAME = "radguard-test-disk"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 48 MB filesystem (tmpfs) to fill (:func:`fill_disk`). CI runs as root;
    anywhere a mount is not allowed this fails loudly rather than skip. It is unmounted
    after the test however it ends - and, should the test process be killed, by a guard
    process that waits for it to go."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", _DISK_NAME,
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs to fill (run as root): {done.stderr.strip()}")
    guard = subprocess.Popen(
        ["sh", "-c", 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; umount -l "$2"',
         "guard", str(os.getpid()), str(mount)], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        guard.kill()
        guard.wait(10)


def fill_disk(folder: Path) -> Path:
    """Write zeros into ``folder`` until its filesystem says ENOSPC; returns the filler file
    (delete it to give the space back)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            chunk = bytes(size)
            while True:
                try:
                    if os.write(fd, chunk) < size:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def leave_free(folder: Path, free: int) -> Path:
    """Fill ``folder``'s filesystem (:func:`fill_disk`), then give back about ``free``
    bytes; returns the filler file (delete it to give the rest back)."""
    filler = fill_disk(folder)
    os.truncate(filler, filler.stat().st_size - free)
    return filler


def scale_back_off(monkeypatch: pytest.MonkeyPatch, factor: float = 0.01) -> list[float]:
    """Make the gateway workers' back-off waits ``factor`` times as long in real time (a
    test need not sit through 1 + 2 + 4 + ... s), keeping their logic; returns the list of
    the waits the workers asked for (in their own seconds), in order."""
    from radguard.gateway.service import Gateway

    asked: list[float] = []
    back_off = Gateway._back_off

    def scaled(self: Gateway, wait: float, longest: float) -> float:
        asked.append(wait)
        return back_off(self, wait * factor, longest * factor) / factor

    monkeypatch.setattr(Gateway, "_back_off", scaled)
    return asked


@dataclass
class Pacs:
    """dcmtk's ``storescp`` as the PACS a gateway forwards to: what it received lands in
    ``folder``."""

    port: int
    folder: Path

    @property
    def target(self) -> str:
        """The gateway's ``forward_dimse`` setting for it."""
        return f"PACS@127.0.0.1:{self.port}"

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    """A real DICOM receiver (``storescp``, every transfer syntax it knows), stopped after
    the test however it ends."""
    from tests.conftest import dcmtk_tool

    folder = tmp_path / "pacs"
    folder.mkdir()
    port = _free_port()
    proc = subprocess.Popen([dcmtk_tool("storescp"), "+xa", "-aet", "PACS", "-od", str(folder),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or _listening(port), 60,
                   "storescp to listen")
        assert proc.poll() is None, "storescp did not start"
        yield Pacs(port, folder)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
