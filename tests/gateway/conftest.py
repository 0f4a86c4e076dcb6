"""What the gateway tests share: a gateway with one user per role, and headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from radguard.gateway import Gateway, GatewayConfig
from radguard.gateway.auth import ROLES, Users

PASSWORD = "correct horse battery"
USERS = {"tech": "technologist", "rad": "radiologist", "boss": "admin", "aud": "auditor"}
assert set(USERS.values()) == set(ROLES)


def web_gateway(data_dir: Path, *, password: str = PASSWORD, start: bool = True,
                **settings: object) -> Gateway:
    """A gateway on free ports with one user per role (``gw.tokens[name]``): the checks on
    its own threads unless ``settings`` say otherwise (spawning check processes for every
    HTTP test would cost seconds each; the DIMSE, demo and kill -9 tests use them)."""
    settings.setdefault("check_processes", 0)
    gw = Gateway(GatewayConfig(data_dir=str(data_dir), dicom_port=0, http_port=0,
                               **settings))  # type: ignore[arg-type]
    users = Users(gw.store)
    for name, role in USERS.items():
        users.add(name, role, password)
    gw.tokens = {name: users.issue_token(name) for name in USERS}  # type: ignore[attr-defined]
    if start:
        gw.start()
    return gw


def chromium(profile: Path, *flags: str, log_network: bool = False) -> object:
    """Debian's headless Chromium driven by Selenium (``flags`` added to the defaults)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("chromium / chromedriver not found: run scripts/install.sh --dev")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", *flags,
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if log_network:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(120)
    return browser


def fitted_monitor(folder: Path) -> Path:
    """A drift monitor database fitted on 60 random 32x32 images (grey levels 0-254), in
    ``folder``."""
    from radguard.monitoring import IMAGE_FEATURES, Monitor, image_features

    rng = np.random.default_rng(3)
    rows = [image_features(rng.integers(0, 255, (32, 32)), 255.0) for _ in range(60)]
    monitor = Monitor(folder / "monitor.db")
    monitor.fit_reference(np.array([[f[n] for n in IMAGE_FEATURES] for f in rows]),
                          list(IMAGE_FEATURES))
    monitor.close()
    return folder / "monitor.db"


def small_images(folder: Path, n: int, *, studies: int = 25, seed: int = 0,
                 low: int = 0) -> dict[Path, str]:
    """``n`` small secondary-capture images with their own UIDs in ``studies`` studies,
    grey levels ``low``-254: path -> SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uids = [generate_uid() for _ in range(studies)]
    series_uids = [generate_uid() for _ in range(studies)]
    out = {}
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.StudyInstanceUID = study_uids[i % studies]
        ds.SeriesInstanceUID = series_uids[i % studies]
        ds.PatientID, ds.PatientName, ds.Modality = f"P{i % studies}", f"Test^{i % studies}", "OT"
        ds.StudyDate, ds.InstanceNumber = "20260101", i + 1
        ds.Rows = ds.Columns = 32
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = rng.integers(low, 255, (32, 32), dtype=np.uint8).tobytes()
        path = folder / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[path] = str(ds.SOPInstanceUID)
    return out
