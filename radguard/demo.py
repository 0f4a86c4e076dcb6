"""A two-minute end-to-end walk through radguard's provenance layer.

Creates a local CA and a device key, signs a radiograph, then shows what verification says
about the untouched file, a one-bit pixel change, an edited patient name, an added unsigned
element, and a verifier that does not trust the signer's CA.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from radguard.dicom.io import read_dataset, write_dataset
from radguard.dicom.uids import new_uid
from radguard.provenance.keys import (
    Identity,
    create_ca,
    create_signer,
    load_signer,
    save_certificate,
    save_private_key,
)
from radguard.provenance.sign import sign_file
from radguard.provenance.trust import TrustStore
from radguard.provenance.verify import VerificationReport, verify_file

__all__ = ["flip_pixel_bit", "run_demo", "synthetic_radiograph"]

DEFAULT_INPUT = Path("../shared/data/dicom/nhsx/nih_dx.dcm")


def flip_pixel_bit(ds: Dataset, byte_index: int | None = None, bit: int = 0) -> None:
    """Flip one bit of the stored pixel data (in the middle by default), in place."""
    data = bytearray(ds.PixelData)
    index = len(data) // 2 if byte_index is None else byte_index
    data[index] ^= 1 << bit
    ds.PixelData = bytes(data)


def synthetic_radiograph(rows: int = 256, cols: int = 256, bits: int = 12) -> Dataset:
    """A small, clearly labelled synthetic DX image for when no real file is at hand."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = np.exp(-(((xx - cols / 2) / (cols / 3)) ** 2 + ((yy - rows / 2) / (rows / 2.2)) ** 2))
    rng = np.random.default_rng(0)
    img = (body * (2**bits - 200) + rng.normal(0, 20, size=body.shape)).clip(0, 2**bits - 1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - Presentation
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.Modality = "DX"
    ds.PatientName = "DEMO^SYNTHETIC"
    ds.PatientID = "DEMO0001"
    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
    ds.SyntheticData = "YES"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = img.astype("<u2").tobytes()
    ds.set_original_encoding(False, True)
    return ds


def _line(report: VerificationReport) -> str:
    reason = report.signatures[0].reason if report.signatures else (report.error or "")
    extra = f"; not covered: {', '.join(report.uncovered)}" if report.uncovered else ""
    return f"{report.status.upper():<10} {reason}{extra}"


def run_demo(workdir: Path, input_path: Path | None, echo: Callable[[str], None]) -> bool:
    """Run the walkthrough in ``workdir``; True when every verdict is the expected one."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    echo("1. a local CA and a device key it certifies")
    ca_key, ca_cert = create_ca("Demo Radiology CA", organization="Demo Hospital")
    save_private_key(ca_key, pki / "ca.key.pem")
    save_certificate(ca_cert, pki / "ca.cert.pem")
    key, cert = create_signer(Identity("DX Room 3", "device", "Demo Hospital", "SN-0003"),
                              ca_key=ca_key, ca_cert=ca_cert)
    save_private_key(key, pki / "dx3.key.pem")
    save_certificate([cert, ca_cert], pki / "dx3.cert.pem")
    echo(f"   {pki / 'ca.cert.pem'}, {pki / 'dx3.key.pem'} (0600), {pki / 'dx3.cert.pem'}")

    source = input_path or DEFAULT_INPUT
    if not source.exists():
        source = workdir / "synthetic_dx.dcm"
        write_dataset(synthetic_radiograph(), source)
        echo(f"   (no {DEFAULT_INPUT}: using a synthetic image, labelled SyntheticData=YES)")

    echo(f"2. sign {source} with the Creator RSA profile")
    signed = workdir / "signed.dcm"
    signer = load_signer(pki / "dx3.key.pem", pki / "dx3.cert.pem")
    info = sign_file(source, signed, signer, profile="creator", mac="sha256")
    echo(f"   {signed}: MAC ID {info.mac_id}, {len(info.covered)} elements, signer {info.signer}")

    trust = TrustStore([ca_cert])
    cases: list[tuple[str, Path, str]] = [("untouched", signed, "valid")]

    ds = read_dataset(signed)
    flip_pixel_bit(ds)
    write_dataset(ds, workdir / "tampered_pixel.dcm")
    cases.append(("one pixel bit flipped", workdir / "tampered_pixel.dcm", "invalid"))

    ds = read_dataset(signed)
    ds.PatientName = "SOMEONE^ELSE"
    write_dataset(ds, workdir / "tampered_name.dcm")
    cases.append(("PatientName edited", workdir / "tampered_name.dcm", "invalid"))

    ds = read_dataset(signed)
    ds.ImageComments = "added after signing"
    write_dataset(ds, workdir / "added_element.dcm")
    cases.append(("unsigned element added", workdir / "added_element.dcm", "valid"))

    echo("3. verify (trusting the demo CA)")
    ok = True
    for label, path, expected in cases:
        report = verify_file(path, trust)
        ok &= report.status == expected
        echo(f"   {label:<24} {_line(report)}")

    echo("4. verify with a trust store that does not hold the demo CA")
    _, other_ca = create_ca("Some Other CA")
    report = verify_file(signed, TrustStore([other_ca]))
    ok &= report.status == "untrusted"
    echo(f"   {'other CA trusted':<24} {_line(report)}")
    echo("all verdicts as expected" if ok else "UNEXPECTED verdicts above")
    return ok
