"""Shared fixtures: paths to ../shared/data and a small PKI made once per test session."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from radguard.provenance.keys import (
    Identity,
    Signer,
    create_ca,
    create_signer,
    save_certificate,
    save_private_key,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DICOM_DIR = SHARED / "dicom"
NIH_DX = DICOM_DIR / "nhsx" / "nih_dx.dcm"  # 8-bit DX, implicit VR
RG1_J2K = DICOM_DIR / "pylibjpeg-data" / "RG1_J2KI.dcm"  # 15-bit CR, JPEG 2000
RG2_JLS = DICOM_DIR / "pylibjpeg-data" / "RG2_JLSL.dcm"  # 10-bit CR, JPEG-LS lossless
RG2_JPLL = DICOM_DIR / "pylibjpeg-data" / "RG2_JPLL.dcm"  # 10-bit CR, JPEG lossless
RG2_JPLY = DICOM_DIR / "pylibjpeg-data" / "RG2_JPLY.dcm"  # known-corrupt lossy JPEG
MR_NATIVE = DICOM_DIR / "pydicom-data-MR2_UNCR.dcm"  # explicit VR, 12-bit


@pytest.fixture(scope="session", autouse=True)
def _shared_data_present() -> None:
    if not NIH_DX.exists():
        pytest.fail(f"shared test data missing: {SHARED} (expected beside the repository)")


@dataclass
class Pki:
    """A CA, a device signer it certifies, and their files on disk."""

    folder: Path
    ca_key: object
    ca_cert: object
    signer: Signer
    key_path: Path
    cert_path: Path
    ca_cert_path: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = create_ca("Test Radiology CA", organization="Test Hospital",
                                algorithm="rsa2048")
    key, cert = create_signer(Identity("DX Room 3", "device", "Test Hospital", "SN-3"),
                              ca_key=ca_key, ca_cert=ca_cert)
    save_private_key(ca_key, folder / "ca.key.pem")
    save_certificate(ca_cert, folder / "ca.cert.pem")
    save_private_key(key, folder / "dx3.key.pem")
    save_certificate([cert, ca_cert], folder / "dx3.cert.pem")
    return Pki(folder, ca_key, ca_cert, Signer(key, cert, [ca_cert]), folder / "dx3.key.pem",
               folder / "dx3.cert.pem", folder / "ca.cert.pem")


@pytest.fixture(scope="session")
def dcmsign() -> str:
    """Path to dcmtk's dcmsign; its absence is a failed install, not a reason to skip."""
    path = shutil.which("dcmsign")
    if path is None:
        pytest.fail("dcmsign not found: run scripts/install.sh (apt-get install dcmtk)")
    return path


def run_dcmsign(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dcmsign", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class OrthancServer:
    """A real Orthanc (Debian package) started for the tests, with DICOMweb and a password."""

    http_port: int
    dicom_port: int
    user: str
    password: str
    aet: str = "ORTHANC"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.http_port}/dicom-web/"

    def upload(self, path: Path) -> None:
        """Store one file through Orthanc's REST API."""
        import base64
        import urllib.request

        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(f"{self.url}/instances", data=Path(path).read_bytes(),
                                     headers={"Authorization": f"Basic {token}"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_orthanc(folder: Path, name: str = "radguard-test", **settings: object
                    ) -> Iterator[OrthancServer]:
    """A real Orthanc (Debian package, DICOMweb plugin) on free high ports with remote
    access off and a password, its files in ``folder``, stopped on leaving; ``settings``
    are added to its JSON configuration."""
    import glob
    import json
    import time
    import urllib.error
    import urllib.request

    binary = shutil.which("Orthanc")
    plugins = glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")
    if binary is None or not plugins:
        pytest.fail("Orthanc or its DICOMweb plugin not found: run scripts/install.sh")
    server = OrthancServer(_free_port(), _free_port(), "radguard", "test-" + folder.name[-6:])
    config = {
        "Name": name, "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"), "HttpPort": server.http_port,
        "DicomPort": server.dicom_port, "DicomAet": server.aet, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {server.user: server.password},
        "Plugins": [sorted(plugins)[0]], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpTimeout": 60, "StableAge": 1, **settings,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{server.url}/system", timeout=2)
        except urllib.error.HTTPError:
            break  # 401: it is up and asks for the password
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-500:]}")
            time.sleep(0.1)
        else:
            break
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc for the whole session (tests that share it must not depend on its content)."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def copy_dicom(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of ``src`` as a new instance (new SOP Instance UID; the file meta follows the
    SOP Class and Instance UIDs) with ``changes`` applied; returns ``dst``."""
    from pydicom.uid import generate_uid

    from radguard.dicom.io import read_dataset, write_dataset

    ds = read_dataset(src)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    write_dataset(ds, dst)
    return dst


def dcmtk_tool(name: str) -> str:
    """A dcmtk command-line tool. pynetdicom installs Python apps with the same names
    (storescu, echoscu...) that may come first on PATH, so Debian's binary is preferred."""
    for candidate in (Path("/usr/bin") / name, Path("/usr/local/bin") / name):
        if candidate.exists():
            return str(candidate)
    pytest.fail(f"dcmtk's {name} not found: run scripts/install.sh (apt-get install dcmtk)")


class PostgresServer:
    """A real PostgreSQL server (Debian package) in a temporary folder, on a free port, that
    a test may stop, start and restart (``pg_ctl -m fast``: connections are cut, as when a
    database server fails over). Runs as user postgres when the tests run as root."""

    def __init__(self, **settings: object) -> None:
        import glob
        import os
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            pytest.fail("PostgreSQL not found: run scripts/install.sh --dev (apt-get install "
                        "postgresql)")
        self.bindir = Path(bins[-1]).parent
        # not under pytest's tmp folder: that is private to root, and the server runs as
        # postgres
        self.folder = Path(tempfile.mkdtemp(prefix="radguard-pg-"))
        self.data = self.folder / "data"
        self.log_path = self.folder / "log"
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.folder, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.port = _free_port()
        #: extra server settings (-c name=value), e.g. max_connections=100
        self.settings = settings
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "radguard", "--no-sync")

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.run_as, str(self.bindir / tool), *args],
                              capture_output=True, text=True, timeout=120)
        if check and done.returncode:
            pytest.fail(f"PostgreSQL {tool} {' '.join(args[-1:])} failed: "
                        f"{(done.stderr or done.stdout)[-800:]} {self.log()[-800:]}")
        return done

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://radguard@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        options += "".join(f" -c {k}={v}" for k, v in self.settings.items())
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                 "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``: every connection is cut, the server is back when it returns."""
        # -l again: without it the new server writes to pg_ctl's stdout (our pipe)
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-m", mode, "-w",
                 "-t", "60", "restart")

    def running(self) -> bool:
        return self._pg("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "radguard", name)
        return self.url(name)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        """Stop (if running) and delete everything."""
        if self.data.exists():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(**settings: object) -> Iterator[PostgresServer]:
    """A started :class:`PostgresServer`, removed on leaving."""
    import time

    server = PostgresServer(**settings)
    try:
        server.start()
        time.sleep(0.2)
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (Debian package) in a temporary folder, on a free port."""
    with running_postgres() as server:
        yield server.url()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie awaiting its parent's wait() does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
