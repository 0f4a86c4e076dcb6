"""Interoperability with dcmtk's dcmsign, in both directions, on real radiographs.

radguard signs -> ``dcmsign --verify +cf CA +rc`` accepts; ``dcmsign --sign KEY CERT -pw +pX +m2``
signs -> ``radguard verify`` accepts; a change to any signed element is caught by both.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from radguard.demo import flip_pixel_bit
from radguard.dicom import read_dataset, write_dataset
from radguard.provenance import TrustStore, create_signer, sign_file, verify_file
from radguard.provenance.keys import Identity, Signer, save_certificate, save_private_key
from tests.conftest import MR_NATIVE, NIH_DX, RG1_J2K, RG2_JLS, RG2_JPLL, run_dcmsign

#: implicit VR DX; JPEG 2000, JPEG-LS and JPEG lossless CR; native Explicit VR Little Endian
#: MR with trailing padding (the pixel data is hashed while it is copied into the output)
FILES = {"nih_dx": NIH_DX, "rg1_j2k": RG1_J2K, "rg2_jls": RG2_JLS, "rg2_jpll": RG2_JPLL,
         "mr_native": MR_NATIVE}
DCMSIGN_PROFILE = {"base": "+pb", "creator": "+pc", "authorization": "+pa"}
REQUIRE_FLAG = {"base": "+rg", "creator": "+rc", "authorization": "+ru"}


def dcmsign_verify(path, *certs, require="+rc"):
    args = ["--verify"]
    for cert in certs:
        args += ["+cf", cert]
    return run_dcmsign(*args, require, path)


@pytest.mark.parametrize("profile", ["base", "creator", "authorization"])
@pytest.mark.parametrize("name", ["nih_dx", "rg1_j2k", "rg2_jls", "mr_native"])
def test_radguard_signature_passes_dcmsign(dcmsign, pki, tmp_path, name, profile):
    out = tmp_path / f"{name}.{profile}.dcm"
    sign_file(FILES[name], out, pki.signer, profile=profile, mac="sha256")
    for flag in ("+rc", REQUIRE_FLAG[profile]):
        result = dcmsign_verify(out, pki.ca_cert_path, require=flag)
        assert result.returncode == 0, result.stderr
    assert verify_file(out, TrustStore([pki.ca_cert])).status == "valid"


@pytest.mark.parametrize("profile", ["base", "creator", "authorization"])
@pytest.mark.parametrize("name", ["nih_dx", "rg1_j2k", "rg2_jpll"])
def test_dcmsign_signature_passes_radguard(dcmsign, pki, tmp_path, name, profile):
    out = tmp_path / f"{name}.dcmsign.{profile}.dcm"
    result = run_dcmsign("--sign", pki.key_path, pki.cert_path, "-pw",
                         DCMSIGN_PROFILE[profile], "+m2", FILES[name], out)
    assert result.returncode == 0, result.stderr
    report = verify_file(out, TrustStore([pki.ca_cert]))
    assert report.status == "valid", report.to_dict()
    sig = report.signatures[0]
    assert sig.mac_algorithm == "SHA256" and "DX Room 3" in sig.signer
    assert profile in sig.profiles
    assert report.uncovered == []


@pytest.mark.parametrize("mac", ["sha384", "sha512"])
def test_other_macs_both_ways(dcmsign, pki, tmp_path, mac):
    ours = tmp_path / "ours.dcm"
    sign_file(RG1_J2K, ours, pki.signer, mac=mac)
    assert dcmsign_verify(ours, pki.ca_cert_path).returncode == 0
    theirs = tmp_path / "theirs.dcm"
    flag = {"sha384": "+m3", "sha512": "+m5"}[mac]
    assert run_dcmsign("--sign", pki.key_path, pki.cert_path, "-pw", flag, NIH_DX,
                       theirs).returncode == 0
    report = verify_file(theirs, TrustStore([pki.ca_cert]))
    assert report.status == "valid" and report.signatures[0].mac_algorithm == mac.upper()


def _tamper_pixel(ds):
    flip_pixel_bit(ds)


def _tamper_name(ds):
    ds.PatientName = "Forged^Patient"


def _tamper_rows(ds):
    ds.Rows = int(ds.Rows) - 1


def _tamper_study_uid(ds):
    uid = str(ds.StudyInstanceUID)
    ds.StudyInstanceUID = uid[:-1] + ("1" if uid[-1] != "1" else "2")


TAMPERS = {"pixel bit": _tamper_pixel, "PatientName": _tamper_name, "Rows": _tamper_rows,
           "StudyInstanceUID": _tamper_study_uid}


@pytest.mark.parametrize("signed_by", ["radguard", "dcmsign"])
@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize("name", ["nih_dx", "rg1_j2k"])
def test_tampering_is_caught_by_both(dcmsign, pki, tmp_path, signed_by, tamper, name):
    signed = tmp_path / "signed.dcm"
    if signed_by == "radguard":
        sign_file(FILES[name], signed, pki.signer, profile="creator")
    else:
        assert run_dcmsign("--sign", pki.key_path, pki.cert_path, "-pw", "+pc", "+m2",
                           FILES[name], signed).returncode == 0
    ds = read_dataset(signed)
    TAMPERS[tamper](ds)
    tampered = tmp_path / "tampered.dcm"
    write_dataset(ds, tampered)
    report = verify_file(tampered, TrustStore([pki.ca_cert]))
    assert report.status == "invalid"
    assert "changed after signing" in report.signatures[0].reason
    result = dcmsign_verify(tampered, pki.ca_cert_path, require="+rg")
    assert result.returncode == 101, (result.returncode, result.stderr)


def test_nested_sequence_element_is_signed(dcmsign, pki, tmp_path):
    """RG1 carries SourceImageSequence; a change inside an item breaks the signature."""
    signed = tmp_path / "signed.dcm"
    sign_file(RG1_J2K, signed, pki.signer)
    ds = read_dataset(signed)
    item = ds.SourceImageSequence[0]
    item.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID + ".9"
    write_dataset(ds, tmp_path / "t.dcm")
    assert verify_file(tmp_path / "t.dcm", TrustStore([pki.ca_cert])).status == "invalid"
    assert dcmsign_verify(tmp_path / "t.dcm", pki.ca_cert_path).returncode == 101


@pytest.mark.parametrize("signed_by", ["radguard", "dcmsign"])
def test_added_unsigned_element_is_reported_uncovered(dcmsign, pki, tmp_path, signed_by):
    signed = tmp_path / "signed.dcm"
    if signed_by == "radguard":
        sign_file(NIH_DX, signed, pki.signer)
    else:
        assert run_dcmsign("--sign", pki.key_path, pki.cert_path, "-pw", "+m2", NIH_DX,
                           signed).returncode == 0
    ds = read_dataset(signed)
    ds.ImageComments = "pasted nodule here"
    ds.InstitutionName = "Elsewhere"
    write_dataset(ds, tmp_path / "added.dcm")
    report = verify_file(tmp_path / "added.dcm", TrustStore([pki.ca_cert]))
    assert report.status == "valid"  # PS3.15: adding elements does not break a signature
    assert set(report.uncovered) == {"ImageComments", "InstitutionName"}
    assert dcmsign_verify(tmp_path / "added.dcm", pki.ca_cert_path,
                          require="+rg").returncode == 0


def test_second_signature_keeps_the_first_for_both_tools(dcmsign, pki, tmp_path):
    first = tmp_path / "first.dcm"
    assert run_dcmsign("--sign", pki.key_path, pki.cert_path, "-pw", "+pc", "+m2", NIH_DX,
                       first).returncode == 0
    both = tmp_path / "both.dcm"
    info = sign_file(first, both, pki.signer, profile="authorization")
    assert info.mac_id == 1
    report = verify_file(both, TrustStore([pki.ca_cert]))
    assert [s.status for s in report.signatures] == ["valid", "valid"]
    assert dcmsign_verify(both, pki.ca_cert_path, require="+ru").returncode == 0
    # radguard rewrote the implicit-VR file as explicit VR; dcmsign's signature survived that
    assert read_dataset(both).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_synthetic_data_attribute_is_signed_in_implicit_vr_input(dcmsign, pki, tmp_path):
    """dcmtk 3.6.7 does not know (0008,001C); radguard writes explicit VR so both agree."""
    ds = read_dataset(NIH_DX)
    ds.SyntheticData = "YES"
    write_dataset(ds, tmp_path / "synthetic_implicit.dcm")
    assert read_dataset(tmp_path / "synthetic_implicit.dcm").original_encoding == (True, True)
    out = tmp_path / "signed.dcm"
    info = sign_file(tmp_path / "synthetic_implicit.dcm", out, pki.signer)
    assert "SyntheticData" in info.covered_keywords
    assert dcmsign_verify(out, pki.ca_cert_path).returncode == 0
    forged = read_dataset(out)
    forged.SyntheticData = "NO"  # hiding that an image is synthetic must break the signature
    write_dataset(forged, tmp_path / "forged.dcm")
    assert verify_file(tmp_path / "forged.dcm", TrustStore([pki.ca_cert])).status == "invalid"
    assert dcmsign_verify(tmp_path / "forged.dcm", pki.ca_cert_path).returncode == 101


def test_signature_survives_transcoding_by_dcmtk(dcmsign, pki, tmp_path):
    signed = tmp_path / "signed.dcm"
    sign_file(NIH_DX, signed, pki.signer)
    for flag in ("+ti", "+tb"):  # implicit VR, explicit VR big endian
        out = tmp_path / f"conv{flag}.dcm"
        conv = shutil.which("dcmconv")
        assert conv, "dcmconv missing"
        subprocess.run([conv, flag, str(signed), str(out)], check=True, capture_output=True)
        assert verify_file(out, TrustStore([pki.ca_cert])).status == "valid", flag


def test_ecdsa_signature_without_profile_verifies_in_dcmsign(dcmsign, pki, tmp_path):
    key, cert = create_signer(Identity("Tech Anna", "technologist", serial="T-1"),
                              ca_key=pki.ca_key, ca_cert=pki.ca_cert, algorithm="ecdsa-p256")
    signer = Signer(key, cert)
    out = tmp_path / "ecdsa.dcm"
    sign_file(NIH_DX, out, signer, profile="none")
    report = verify_file(out, TrustStore([pki.ca_cert]))
    assert report.status == "valid" and report.signatures[0].key_type == "ECDSA"
    assert report.signatures[0].profiles == []  # PS3.15 defines no ECDSA profile
    assert dcmsign_verify(out, pki.ca_cert_path, require="+rg").returncode == 0
    save_private_key(key, tmp_path / "e.key.pem")
    save_certificate(cert, tmp_path / "e.cert.pem")
    theirs = tmp_path / "theirs.dcm"
    assert run_dcmsign("--sign", tmp_path / "e.key.pem", tmp_path / "e.cert.pem", "-pw", "+m2",
                       NIH_DX, theirs).returncode == 0
    assert verify_file(theirs, TrustStore([pki.ca_cert])).status == "valid"
