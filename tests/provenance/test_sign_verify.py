"""Signing and verification semantics: profiles, coverage, dates, malformed signatures."""

from __future__ import annotations

import datetime as dt
import struct

import pytest
from pydicom.datadict import tag_for_keyword

from radguard.dicom import read_dataset, write_dataset
from radguard.errors import SignatureError
from radguard.provenance import TrustStore, sign_dataset, sign_file, verify_dataset, verify_file
from radguard.provenance.keys import Identity, Signer, create_signer
from tests.conftest import MR_NATIVE, NIH_DX, RG1_J2K, utc_now


def _tags(*keywords):
    return [tag_for_keyword(k) for k in keywords]


@pytest.mark.parametrize("profile", ["base", "creator", "authorization"])
def test_every_profile_verifies_and_is_recognised(pki, tmp_path, profile):
    out = tmp_path / "s.dcm"
    info = sign_file(MR_NATIVE, out, pki.signer, profile=profile, purpose=14)
    report = verify_file(out, TrustStore([pki.ca_cert]))
    assert report.status == "valid" and report.ok
    sig = report.signatures[0]
    assert {"base", "creator", "authorization"} <= set(sig.profiles)
    assert sig.uid == info.uid and "DX Room 3" in report.signer
    ds = read_dataset(out)
    code = ds.DigitalSignaturesSequence[0].DigitalSignaturePurposeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("14", "ASTM-sigpurpose")


def test_subset_signature_reports_what_it_leaves_out(pki):
    ds = read_dataset(NIH_DX)
    wanted = _tags("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                   "PixelData")
    sign_dataset(ds, pki.signer, tags=wanted)
    report = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert report.status == "valid"
    assert "PatientName" in report.uncovered and "PixelData" not in report.uncovered
    assert report.signatures[0].profiles == ["base"]  # too little covered for creator


def test_creator_profile_refuses_a_subset_missing_required_elements(pki):
    ds = read_dataset(NIH_DX)
    with pytest.raises(SignatureError, match="requires signing: .*Rows"):
        sign_dataset(ds, pki.signer, profile="creator",
                     tags=_tags("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                "SeriesInstanceUID", "PixelData"))
    assert "DigitalSignaturesSequence" not in ds


def test_removed_signed_element_is_named(pki):
    ds = read_dataset(NIH_DX)
    sign_dataset(ds, pki.signer)
    del ds.PatientAge
    report = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert report.status == "invalid" and "removed: PatientAge" in report.signatures[0].reason


def test_un_elements_are_never_signed_but_reported(pki):
    ds = read_dataset(MR_NATIVE)
    ds.add_new(0x00091010, "UN", b"opaque\0\0")
    sign_dataset(ds, pki.signer)
    report = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert report.status == "valid" and "(0009,1010)" in report.uncovered
    with pytest.raises(SignatureError, match="unsignable"):
        sign_dataset(ds, pki.signer, tags=[0x00091010])


def test_untrusted_and_missing_trust(pki):
    ds = read_dataset(NIH_DX)
    sign_dataset(ds, pki.signer)
    _, stranger = create_signer(Identity("Stranger"))
    assert verify_dataset(ds, TrustStore([stranger])).status == "untrusted"
    report = verify_dataset(ds, None)
    assert report.status == "untrusted" and "no trust store" in report.signatures[0].reason


def test_expired_certificate_is_not_valid(pki):
    start = utc_now() - dt.timedelta(days=10)
    key, cert = create_signer(Identity("Retired CR"), not_before=start,
                              not_after=start + dt.timedelta(days=9))
    ds = read_dataset(NIH_DX)
    sign_dataset(ds, Signer(key, cert), signed_at=start + dt.timedelta(days=1))
    report = verify_dataset(ds, TrustStore([cert]))
    assert report.status == "untrusted"
    assert "expired" in report.signatures[0].reason
    # ...while a verifier looking back at a time inside the validity accepts it
    assert verify_dataset(ds, TrustStore([cert]),
                          now=start + dt.timedelta(days=2)).status == "valid"


def test_signature_dated_before_certificate_is_not_valid(pki):
    ds = read_dataset(NIH_DX)
    sign_dataset(ds, pki.signer, signed_at=utc_now() - dt.timedelta(days=30))
    report = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert report.status == "untrusted" and "not valid before" in report.signatures[0].reason


def test_ecdsa_keys_need_profile_none(pki):
    key, cert = create_signer(Identity("EC"), algorithm="ecdsa-p256")
    with pytest.raises(SignatureError, match="RSA-only"):
        sign_dataset(read_dataset(NIH_DX), Signer(key, cert), profile="base")


@pytest.mark.parametrize("mac", ["md5", "sha1", "ripemd160", "SHA-999"])
def test_weak_or_unknown_macs_are_not_offered_for_signing(pki, mac):
    with pytest.raises(SignatureError, match="not offered"):
        sign_dataset(read_dataset(NIH_DX), pki.signer, mac=mac)


def test_malformed_signature_items_are_invalid_not_crashes(pki):
    ds = read_dataset(NIH_DX)
    sign_dataset(ds, pki.signer)
    ds.DigitalSignaturesSequence[0].CertificateOfSigner = b"\x30\x03junk"
    report = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert report.status == "invalid" and "malformed" in report.signatures[0].reason
    ds2 = read_dataset(NIH_DX)
    sign_dataset(ds2, pki.signer)
    ds2.MACParametersSequence[0].MACIDNumber = 7
    assert "no MAC Parameters" in verify_dataset(ds2, None).signatures[0].reason
    ds3 = read_dataset(NIH_DX)
    sign_dataset(ds3, pki.signer)
    ds3.MACParametersSequence[0].MACCalculationTransferSyntaxUID = "1.2.840.10008.1.2"
    assert "transfer syntax" in verify_dataset(ds3, None).signatures[0].reason


def test_signature_inside_a_sequence_item_is_found_but_vouches_for_its_item_only(pki):
    """PS3.15: a signature in an item covers that item; the file stays unsigned."""
    ds = read_dataset(RG1_J2K)
    sign_dataset(ds.SourceImageSequence[0], pki.signer)
    report = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert [s.location for s in report.signatures] == ["SourceImageSequence[0]"]
    assert report.signatures[0].status == "valid"
    assert report.status == "unsigned" and report.signer is None
    assert not report.pixels_covered and report.covered == []
    ds.SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    changed = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert changed.signatures[0].status == "invalid" and changed.status == "unsigned"
    sign_dataset(ds, pki.signer)  # a top-level signature decides; the broken item one stays
    both = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert both.status == "valid" and both.pixels_covered
    assert [(s.location, s.status) for s in both.signatures] == [
        ("", "valid"), ("SourceImageSequence[0]", "invalid")]


def test_unsigned_file_and_verification_leaves_data_untouched(pki, tmp_path):
    ds = read_dataset(NIH_DX)
    report = verify_dataset(ds, TrustStore([pki.ca_cert]))
    assert report.status == "unsigned" and "PatientName" in report.uncovered
    sign_dataset(ds, pki.signer)
    write_dataset(ds, tmp_path / "s.dcm")
    fresh = read_dataset(tmp_path / "s.dcm")
    verify_dataset(fresh, TrustStore([pki.ca_cert]))
    assert fresh.get_item(tag_for_keyword("PatientName")).is_raw


def test_resigning_in_place_keeps_earlier_signatures(pki, tmp_path):
    path = tmp_path / "x.dcm"
    sign_file(NIH_DX, path, pki.signer)
    sign_file(path, path, pki.signer, profile="authorization", mac="sha512")
    report = verify_file(path, TrustStore([pki.ca_cert]))
    assert [s.mac_id for s in report.signatures] == [0, 1]
    assert [s.mac_algorithm for s in report.signatures] == ["SHA256", "SHA512"]
    assert report.status == "valid"


def test_file_that_cannot_be_spliced_is_written_whole_and_verifies(pki, tmp_path):
    # a group length in the signature's own group would go stale if the sequence were
    # spliced in, so the data set is encoded anew instead
    data = MR_NATIVE.read_bytes()
    at = read_dataset(MR_NATIVE)._dict[0x7FE00010].value_tell - 12
    src = tmp_path / "with_group_length.dcm"
    src.write_bytes(data[:at] + struct.pack("<HH2sHL", 0x4FFE, 0, b"UL", 4, 0) + data[at:])
    assert 0x4FFE0000 in read_dataset(src)
    out = tmp_path / "signed.dcm"
    info = sign_file(src, out, pki.signer, profile="creator")
    report = verify_file(out, TrustStore([pki.ca_cert]))
    assert report.status == "valid" and report.signatures[0].uid == info.uid


def test_pixel_bytes_are_copied_unchanged_while_hashed(pki, tmp_path):
    out = tmp_path / "signed.dcm"
    sign_file(MR_NATIVE, out, pki.signer)
    before, after = read_dataset(MR_NATIVE), read_dataset(out)
    assert after.PixelData == before.PixelData
    assert after.DataSetTrailingPadding == before.DataSetTrailingPadding
    assert verify_file(out, TrustStore([pki.ca_cert])).status == "valid"
