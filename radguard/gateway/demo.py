"""``radguard demo``: the gateway on the embedded default with a batch of real radiographs.

Builds a small hospital: a CA and a DX room key; chest radiographs from
``../shared/data/cxr-nih`` wrapped as DX objects and signed at "acquisition"; then sends them
through a running gateway over C-STORE and STOW-RS - intact ones, one whose patient name was
edited after signing, one labelled Synthetic Data = YES and one unsigned from a room that must
sign - and prints the worklist address with a freshly made admin login.
"""

from __future__ import annotations

import csv
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from radguard.dicom.io import read_dataset, write_dataset
from radguard.dicom.uids import new_uid
from radguard.errors import RadguardError

__all__ = ["prepare_images", "run_gateway_demo", "send_batch"]

def _shared() -> Path:
    """``$RADGUARD_SHARED_DATA``, else ``../shared/data`` from here or from the repository."""
    import os

    candidates = [Path(os.environ["RADGUARD_SHARED_DATA"])] if "RADGUARD_SHARED_DATA" in \
        os.environ else []
    candidates += [Path("../shared/data"), Path(__file__).resolve().parents[3] / "shared" / "data"]
    return next((c for c in candidates if (c / "cxr-nih").is_dir()), candidates[0])


SHARED = _shared()
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _dx_from_jpeg(path: Path, row: dict[str, str]) -> Dataset:
    """A real chest radiograph (8-bit JPEG) as a DX object with its patient's details."""
    pixels = np.asarray(Image.open(path).convert("L"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientName = f"NIH^{row['patient_id']}"
    ds.PatientID = f"NIH{row['patient_id']}"
    ds.PatientSex = row.get("sex", "")
    ds.PatientBirthDate = ""
    ds.ViewPosition = row.get("view", "")
    ds.StudyDate, ds.StudyTime = "20261123", "080000"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Manufacturer = "radguard demo (pixels: NIH ChestX-ray14)"
    ds.StationName = "DX Room 3"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


def prepare_images(workdir: Path, say: Callable[[str], None]) -> tuple[dict[str, Path], Path]:
    """The demo's PKI and images: name -> file, and the CA certificate to trust."""
    from radguard.provenance.keys import (
        Identity,
        Signer,
        create_ca,
        create_signer,
        save_certificate,
    )
    from radguard.provenance.sign import sign_file

    labels = SHARED / "cxr-nih" / "labels.csv"
    if not labels.exists():
        raise RadguardError(f"{labels}: the shared chest X-rays are needed for the demo")
    pki = workdir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = create_ca("Demo Hospital Radiology CA", organization="Demo Hospital")
    key, cert = create_signer(Identity("DX Room 3", "device", "Demo Hospital", "SN-0003"),
                              ca_key=ca_key, ca_cert=ca_cert)
    save_certificate(ca_cert, pki / "ca.cert.pem")
    signer = Signer(key, cert, [ca_cert])
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(11)
    picks = [rows[i] for i in rng.choice(len(rows), 8, replace=False)]
    out = workdir / "images"
    out.mkdir(exist_ok=True)
    files: dict[str, Path] = {}
    for n, row in enumerate(picks):
        raw = out / f"raw{n}.dcm"
        write_dataset(_dx_from_jpeg(SHARED / "cxr-nih" / "images" / row["file"], row), raw)
        if n == 6:  # synthetic-labelled: a generated image that says so
            ds = read_dataset(raw)
            ds.SyntheticData = "YES"
            ds.PatientName = "SYNTHETIC^IMAGE"
            write_dataset(ds, out / "synthetic.dcm")
            files["synthetic (labelled)"] = out / "synthetic.dcm"
        elif n == 7:  # unsigned, from a room whose images must be signed
            files["unsigned from DX Room 3"] = raw
        else:
            signed = out / f"signed{n}.dcm"
            sign_file(raw, signed, signer, profile="creator")
            files[f"signed chest {n + 1}"] = signed
    ds = read_dataset(files["signed chest 6"])  # edited after signing: the seeds' attack
    ds.PatientName = "SOMEONE^ELSE"
    write_dataset(ds, out / "tampered.dcm")
    files["tampered (edited after signing)"] = out / "tampered.dcm"
    del files["signed chest 6"]
    say(f"prepared {len(files)} images from ../shared/data/cxr-nih (PKI in {pki})")
    return files, pki / "ca.cert.pem"


def _send_dimse(port: int, paths: list[Path], calling_ae: str) -> int:
    from pydicom import dcmread
    from pynetdicom import AE

    from radguard.gateway.dimse import open_association

    ae = AE(ae_title=calling_ae)
    # as modalities that sign do: send in the file's own syntax (Explicit VR), because
    # converting 8-bit pixel data to Implicit VR (OB -> OW) breaks a PS3.15 signature
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = open_association(ae, "127.0.0.1", port, "RADGUARD")
    if not assoc.is_established:
        raise RadguardError("the demo could not connect to its own gateway")
    sent = 0
    try:
        for p in paths:
            status = assoc.send_c_store(dcmread(p))
            sent += int(getattr(status, "Status", 1) == 0)
    finally:
        assoc.release()
    return sent


def send_batch(gateway: object, files: dict[str, Path], say: Callable[[str], None]) -> None:
    """Send the demo images: most over C-STORE (the unsigned one from DX_ROOM3, which must
    sign), two signed ones over STOW-RS as a technologist."""
    from radguard.dicom.web import DicomWebClient
    from radguard.gateway.auth import Users

    users = Users(gateway.store)  # type: ignore[attr-defined]
    users.add("demo-tech", "technologist", secrets.token_urlsafe(12))
    names = list(files)
    by_stow = [n for n in names if n.startswith("signed chest")][-2:]
    by_dimse = [n for n in names if n not in by_stow]
    port = gateway.dicom.port  # type: ignore[attr-defined]
    sent = _send_dimse(port, [files[n] for n in by_dimse if not n.startswith("unsigned")],
                       "MODALITY")
    sent += _send_dimse(port, [files[n] for n in by_dimse if n.startswith("unsigned")],
                        "DX_ROOM3")
    client = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",  # type: ignore[attr-defined]
                            token=users.issue_token("demo-tech"))
    client.store([files[n].read_bytes() for n in by_stow])
    sent += len(by_stow)
    say(f"sent {sent} images: {len(by_dimse)} over C-STORE, {len(by_stow)} over STOW-RS")


def run_gateway_demo(workdir: Path, say: Callable[[str], None], *, wait: bool = True,
                     dicom_port: int = 11112, http_port: int = 8080) -> bool:
    """Run the demo; with ``wait`` keep serving until Ctrl-C. True if every image landed
    where the policy says."""
    from radguard.gateway import Gateway, GatewayConfig
    from radguard.gateway.auth import Users

    files, ca = prepare_images(workdir, say)
    dicom_port, http_port = _free_or_any(dicom_port), _free_or_any(http_port)
    config = GatewayConfig(data_dir=str(workdir / "data"), dicom_port=dicom_port,
                           http_port=http_port, trust=[str(ca)], must_sign=["DX_ROOM3"],
                           triage={"DX": "chest", "CR": "chest"}).validate()
    gateway = Gateway(config)
    gateway.start()
    try:
        users = Users(gateway.store)
        password = secrets.token_urlsafe(12)
        users.add("demo-admin", "admin", password)
        send_batch(gateway, files, say)
        gateway.wait_idle(300)
        ok = _report(gateway, files, say)
        url = f"http://127.0.0.1:{gateway.http_port}/"
        say(f"\nworklist: {url}  (sign in as demo-admin / {password})")
        say(f"DICOM: C-STORE to RADGUARD@127.0.0.1:{gateway.dicom.port}; DICOMweb: "
            f"{url}dicom-web/ ; audit log: radguard audit verify --log "
            f"{workdir / 'data' / 'audit.jsonl'}")
        if not wait:
            say(f"(not serving: run `radguard demo --wait`, or `radguard serve --data-dir "
                f"{workdir / 'data'}` to browse these results)")
        if wait:
            say("serving until Ctrl-C ...")
            stop = threading.Event()
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
        return ok
    finally:
        gateway.stop()


def _free_or_any(port: int) -> int:
    """The asked-for port if it is free here, else 0 (the system picks one)."""
    import socket

    if port == 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


_EXPECTED = {"tampered": "quarantined", "synthetic": "rejected", "unsigned": "quarantined",
             "signed": "done"}


def _report(gateway: object, files: dict[str, Path], say: Callable[[str], None]) -> bool:
    store = gateway.store  # type: ignore[attr-defined]
    rows = {r.sop_uid: r for r in store.instances()}
    ok = True
    say(f"{'image':<34}{'state':<13}{'trust':<22}{'AI suspicion':<14}why")
    for name, path in files.items():
        row = rows.get(str(read_dataset(path, stop_before_pixels=True).SOPInstanceUID))
        if row is None:
            say(f"{name:<34}MISSING")
            ok = False
            continue
        expected = _EXPECTED[name.split()[0]]
        ok &= row.state == expected
        ai = f"{row.ai_suspicion}/10" if row.ai_suspicion else "-"
        why = (row.detail.get("reasons") or [""])[0][:60]
        say(f"{name:<34}{row.state:<13}{str(row.trust):<22}{ai:<14}{why}")
    say("every image landed where the policy says" if ok else "UNEXPECTED routing above")
    return ok
