"""The watermark on DICOM instances: derived-image bookkeeping, multi-frame, signatures."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from radguard.demo import synthetic_radiograph
from radguard.dicom import pixel_array, read_dataset, write_dataset
from radguard.provenance import TrustStore, sign_file, verify_file
from radguard.watermark import WatermarkError, check_dataset, embed_dataset, restore_dataset
from radguard.watermark.dicom import PRIVATE_CREATOR, PRIVATE_GROUP
from tests.conftest import DICOM_DIR, MR_NATIVE, NIH_DX, RG1_J2K


def test_embedding_makes_a_documented_derived_instance(wm_key, tmp_path):
    ds = read_dataset(RG1_J2K)
    marked = embed_dataset(ds, wm_key, signer="CN=DX Room 3")
    write_dataset(marked, tmp_path / "wm.dcm")
    again = read_dataset(tmp_path / "wm.dcm")
    assert again.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # decoded, native
    assert again.ImageType[0] == "DERIVED"
    assert again.SOPInstanceUID != ds.SOPInstanceUID
    source = again.SourceImageSequence[-1]
    assert source.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert source.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert again.ContributingEquipmentSequence[-1].PurposeOfReferenceCodeSequence[0] \
        .CodeValue == "109103"
    assert again.LossyImageCompression == ds.LossyImageCompression  # nothing was lost
    block = again.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert block[0x10].value == "RG-RPEE-RH" and block[0x11].value == 2
    report = check_dataset(again, wm_key).to_dict()
    assert report["intact"] and report["regions"] == []
    assert report["payload"]["signer"] == "CN=DX Room 3"
    assert report["payload"]["acquired"].startswith("1995")


def test_restore_gives_back_pixels_and_header(wm_key, tmp_path):
    ds = read_dataset(RG1_J2K)
    marked = embed_dataset(ds, wm_key)
    write_dataset(marked, tmp_path / "wm.dcm")
    restored = restore_dataset(read_dataset(tmp_path / "wm.dcm"), wm_key)
    write_dataset(restored, tmp_path / "back.dcm")
    back = read_dataset(tmp_path / "back.dcm")
    assert np.array_equal(pixel_array(back), pixel_array(ds))
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert list(back.ImageType) == list(ds.ImageType)
    assert len(back.SourceImageSequence) == len(ds.SourceImageSequence)
    assert not any((int(t) >> 16) == PRIVATE_GROUP for t in back.keys())


def test_check_works_when_the_header_is_stripped(wm_key):
    marked = embed_dataset(read_dataset(NIH_DX), wm_key)
    for tag in [t for t in marked.keys() if (int(t) >> 16) == PRIVATE_GROUP]:
        del marked[tag]
    marked.PatientName = "Renamed^ByAnAttacker"
    assert check_dataset(marked, wm_key).intact  # the mark lives in the pixels


def _multiframe() -> Dataset:
    """Three 12-bit frames cut from the real MR slice, in a multi-frame instance."""
    mr = pixel_array(read_dataset(MR_NATIVE))
    ds = synthetic_radiograph(256, 320, bits=12)
    frames = np.stack([mr[200 + 100 * i : 456 + 100 * i, 300:620] for i in range(3)])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.astype("<u2").tobytes()
    return ds


def test_multi_frame_instances(wm_key, tmp_path):
    ds = _multiframe()
    write_dataset(ds, tmp_path / "mf.dcm")
    original = pixel_array(read_dataset(tmp_path / "mf.dcm"))
    marked = embed_dataset(read_dataset(tmp_path / "mf.dcm"), wm_key)
    frames = pixel_array(marked).copy()
    report = check_dataset(marked, wm_key)
    assert report.intact and len(report.frames) == 3
    assert [f.identity.frame for f in report.frames] == [0, 1, 2]
    frames[2, 40:56, 60:76] = frames[0, 0:16, 0:16]
    marked.PixelData = frames.astype("<u2").tobytes()
    tampered = check_dataset(marked, wm_key)
    assert tampered.region_frames and set(tampered.region_frames) == {2}
    restored = restore_dataset(embed_dataset(ds, wm_key), wm_key)
    assert np.array_equal(pixel_array(restored), original)


def test_signatures_compose_with_the_watermark(wm_key, pki, tmp_path):
    watermarked = tmp_path / "wm.dcm"
    write_dataset(embed_dataset(read_dataset(NIH_DX), wm_key), watermarked)
    signed = tmp_path / "wm_signed.dcm"
    sign_file(watermarked, signed, pki.signer, profile="creator")
    trust = TrustStore([pki.ca_cert])
    assert verify_file(signed, trust).status == "valid"
    assert check_dataset(read_dataset(signed), wm_key).intact
    # a pasted patch breaks both, independently
    ds = read_dataset(signed)
    arr = pixel_array(ds).copy()
    arr[200:232, 300:332] = arr[600:632, 600:632]
    ds.PixelData = arr.tobytes()
    write_dataset(ds, tmp_path / "tampered.dcm")
    assert verify_file(tmp_path / "tampered.dcm", trust).status == "invalid"
    regions = check_dataset(read_dataset(tmp_path / "tampered.dcm"), wm_key).regions
    assert regions and all(r[0] < 332 and 300 < r[2] for r in regions)
    # embedding drops signatures that could no longer be valid
    resigned = embed_dataset(read_dataset(signed), wm_key)
    assert "DigitalSignaturesSequence" not in resigned


def test_colour_and_undecodable_inputs_are_refused(wm_key):
    with pytest.raises(WatermarkError, match="monochrome"):
        embed_dataset(read_dataset(DICOM_DIR / "pydicom-data-SC_rgb_16bit.dcm"), wm_key)
    from radguard.errors import DicomReadError

    with pytest.raises(DicomReadError):
        embed_dataset(read_dataset(DICOM_DIR / "pylibjpeg-data" / "RG2_JPLY.dcm"), wm_key)
