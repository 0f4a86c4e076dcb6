"""Shared fixtures: paths to ../shared/data and a small PKI made once per test session."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
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
