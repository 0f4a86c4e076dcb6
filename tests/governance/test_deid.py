"""De-identification: every Table E.1-1 attribute handled, options, keyed consistency,
burned-in text, dciodvfy, re-signing, and a comparison with dicom-anonymizer."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from radguard.cli import main
from radguard.dicom.io import encode_dataset, read_dataset
from radguard.governance.deid import (
    Deidentifier,
    DeidError,
    DeidOptions,
    deidentify_file,
    profile_table,
)
from radguard.provenance.verify import verify_file
from tests.conftest import DICOM_DIR, NIH_DX, RG1_J2K, run_dcmsign

UID_ROOT = "1.2.826.0.1.3680043.9.9999."
VALUE_BY_VR = {"DA": "20010203", "TM": "101112", "DT": "20010203101112", "AS": "042Y",
               "IS": "4242", "DS": "42.42", "US": 4242, "SS": 4242, "UL": 4242, "SL": 4242,
               "FL": 42.42, "FD": 42.42}
TEXT_VRS = {"LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"}


def _value(tag: int, vr: str, i: int) -> object:
    if vr == "PN":
        return f"SECRET^PN{i}"
    if vr in TEXT_VRS:
        return f"SECRET{i}"
    if vr == "UI":
        return f"{UID_ROOT}{i}"
    if vr in ("OB", "OW", "UN"):
        return f"SECRETBYTES{i:04d}".encode()
    if vr == "UR":
        return f"http://secret.example/{i}"
    if vr == "SQ":
        item = Dataset()
        item.PersonName = f"SECRET^NESTED{i}"  # (0040,A123): D anywhere in the data set
        return Sequence([item])
    return VALUE_BY_VR.get(vr)


def filled_dataset() -> tuple[Dataset, dict[int, str]]:
    """NIH_DX with every storable Table E.1-1 attribute set to an identifying value."""
    ds = read_dataset(NIH_DX)
    filled: dict[int, str] = {}
    for i, (tag, row) in enumerate(sorted(profile_table().items())):
        group = tag >> 16
        if group in (0x0000, 0x0002) or group in (0x5000, 0x6000) or tag == 0xFFFCFFFC:
            continue  # command group, file meta and repeating-group masks: set below
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue  # attribute newer than pydicom's dictionary
        value = _value(tag, vr, i)
        if value is None:
            continue
        ds[tag] = DataElement(tag, vr, value)
        filled[tag] = row["basic"]
    ds.add_new(0x60003000, "OW", b"\x01\x02" * 8)  # overlay data
    ds.add_new(0x60004000, "LT", "SECRET overlay comment")
    ds.add_new(0x00290010, "LO", "ACME SECRET CREATOR")  # private block
    ds.add_new(0x00291001, "LO", "SECRET private value")
    # an identifier nested in a sequence the profile keeps
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D3000", "SRT", "Chest"
    code.OperatorsName = "SECRET^NESTEDOPERATOR"
    ds.AnatomicRegionSequence = Sequence([code])
    return ds, filled


def _copy(ds: Dataset) -> Dataset:
    ds.buffer = None  # a memory map cannot be deep-copied; the elements are all loaded
    return copy.deepcopy(ds)


def _leaks(data: bytes) -> list[str]:
    text = data.decode("latin-1")
    return [m for m in ("SECRET", "20010203", UID_ROOT) if m in text]


def test_every_profile_attribute_is_removed_emptied_or_replaced():
    ds, filled = filled_dataset()
    assert len(filled) > 550  # nearly the whole table is exercised
    original, _ = filled_dataset()
    report = Deidentifier(b"k" * 32).deidentify(ds)
    for tag, basic in filled.items():
        if tag in (0x00100010, 0x00100020):  # Z allows a dummy: the keyed pseudonym
            assert "RG" in str(ds[tag].value) and "SECRET" not in str(ds[tag].value)
        elif basic == "X":
            assert tag not in ds, f"{tag:08X} should be removed"
        elif basic in ("Z", "X/Z"):
            assert tag in ds and ds[tag].is_empty, f"{tag:08X} should be empty"
        elif basic == "U":
            assert str(ds[tag].value).startswith("2.25."), f"{tag:08X} UID not replaced"
        else:  # D and the D-containing choices: present, identifying value gone
            assert tag in ds and ds[tag].value != original[tag].value or ds[tag].VR == "SQ"
    for tag in (0x60003000, 0x60004000, 0x00290010, 0x00291001):
        assert tag not in ds
    assert _leaks(encode_dataset(ds)) == []
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert report.removed > 300 and report.uids > 20


def test_covers_dicom_anonymizer_table_and_leaks_nothing_it_catches():
    """dicom-anonymizer implements Table E.1-1 too: our table covers all of its attributes,
    and on the same filled file everything it removes we remove; it leaves identifiers nested
    in sequences the profile keeps, we do not."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as theirs
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions

    their_tags = {(g << 16) | e for g, e, *_ in theirs.ALL_TAGS}
    assert their_tags - set(profile_table()) == set()

    ds, filled = filled_dataset()
    (ours, _), (other, _) = filled_dataset(), filled_dataset()
    Deidentifier(b"k" * 32).deidentify(ours)
    anonymize_dataset(other, base_rules_gen=lambda: initialize_actions("dicomfields_2026c"))

    def survived(result: Dataset) -> set[int]:
        return {t for t in filled if t in result and not result[t].is_empty
                and result[t].value == ds[t].value and ds[t].VR != "SQ"}

    assert survived(ours) == set()  # (dicom-anonymizer leaves none at top level either)
    assert _leaks(encode_dataset(ours)) == []
    secret = "SECRET^NESTEDOPERATOR"
    assert other.AnatomicRegionSequence[0].OperatorsName == secret  # theirs keeps it ...
    assert ours.AnatomicRegionSequence[0].OperatorsName != secret  # ... ours replaces it
    assert "SECRET" in encode_dataset(other).decode("latin-1")
    assert ours.AnatomicRegionSequence[0].CodeValue == "T-D3000"  # and keeps the anatomy


def test_pseudonyms_and_uids_are_keyed_and_consistent():
    a, b = read_dataset(NIH_DX), read_dataset(NIH_DX)
    study = str(a.StudyInstanceUID)
    Deidentifier(b"same-key-123456789").deidentify(a)
    Deidentifier(b"same-key-123456789").deidentify(b)
    assert a.PatientID == b.PatientID and a.StudyInstanceUID == b.StudyInstanceUID
    assert a.StudyInstanceUID != study and len(str(a.StudyInstanceUID)) <= 64
    c = read_dataset(NIH_DX)
    Deidentifier(b"another-key-987654321").deidentify(c)
    assert c.PatientID != a.PatientID and c.StudyInstanceUID != a.StudyInstanceUID


def test_options_retain_and_clean():
    src = read_dataset(NIH_DX)
    src.StudyDate, src.DeviceSerialNumber = "20200314", "SN-42"
    src.StudyDescription = f"Chest for {src.PatientName} id {src.PatientID} tel 0161 496 0000"
    kept = _copy(src)
    Deidentifier(b"k" * 32, DeidOptions.parse(
        "retain-dates,retain-uids,retain-device,clean-descriptors")).deidentify(kept)
    assert kept.StudyDate == "20200314" and kept.StudyInstanceUID == src.StudyInstanceUID
    assert kept.DeviceSerialNumber == "SN-42"
    assert str(src.PatientID) not in kept.StudyDescription
    assert "0161" not in kept.StudyDescription and kept.StudyDescription.startswith("Chest")
    assert kept.LongitudinalTemporalInformationModified == "UNMODIFIED"
    codes = {i.CodeValue for i in kept.DeidentificationMethodCodeSequence}
    assert {"113100", "113106", "113110", "113109", "113105"} <= codes

    first, later = _copy(src), _copy(src)
    later.StudyDate = "20200414"  # a follow-up study 31 days later
    tool = Deidentifier(b"k" * 32, DeidOptions.parse("modified-dates"))
    tool.deidentify(first)
    tool.deidentify(later)
    import datetime as dt

    d1, d2 = (dt.datetime.strptime(x.StudyDate, "%Y%m%d") for x in (first, later))
    assert first.StudyDate != "20200314" and (d2 - d1).days == 31
    assert first.LongitudinalTemporalInformationModified == "MODIFIED"


@pytest.mark.parametrize("text", ["retain-everything", "retain-dates,modified-dates",
                                  "clean-graphics"])
def test_bad_options_are_clear_errors(text):
    with pytest.raises(DeidError):
        DeidOptions.parse(text)


def test_burned_in_text_warning_and_region_blanking():
    ds = read_dataset(NIH_DX)
    ds.BurnedInAnnotation = "YES"
    assert any("Burned In" in w for w in Deidentifier(b"k" * 32).deidentify(ds).warnings)
    ds = read_dataset(NIH_DX)
    ds.BurnedInAnnotation = "YES"
    before = ds.pixel_array.copy()
    report = Deidentifier(b"k" * 32, blank_regions=[(10, 20, 100, 30)]).deidentify(ds)
    after = ds.pixel_array
    assert report.pixels_cleaned and not report.warnings
    assert (after[20:50, 10:110] == before.min()).all()
    mask = np.ones_like(before, bool)
    mask[20:50, 10:110] = False
    assert (after[mask] == before[mask]).all()
    assert ds.BurnedInAnnotation == "NO"
    assert "113101" in {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}


def _dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return {line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error") and "invalid data values" not in line}


@pytest.mark.parametrize("src", [NIH_DX, RG1_J2K], ids=["nih_dx", "rg1_j2k"])
def test_dciodvfy_finds_no_new_errors(src, tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not found: run scripts/install.sh (dicom3tools)")
    out, _ = deidentify_file(src, tmp_path, Deidentifier(b"k" * 32))
    assert _dciodvfy_errors(out) - _dciodvfy_errors(src) == set()


def test_resigned_output_verifies_with_radguard_and_dcmsign(pki, dcmsign, tmp_path):
    from radguard.provenance.trust import TrustStore

    out, _ = deidentify_file(RG1_J2K, tmp_path, Deidentifier(b"k" * 32), signer=pki.signer)
    report = verify_file(out, TrustStore.from_paths([pki.ca_cert_path]))
    assert report.ok, report
    assert run_dcmsign("--verify", "+cf", pki.ca_cert_path, "+rc", out).returncode == 0


def test_cli_deid_pseudonym_key_and_bad_input(tmp_path, pki):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    runner = CliRunner()
    key = tmp_path / "pseudo.key"
    args = ["deid", str(NIH_DX), str(junk), "-o", str(tmp_path / "out"), "--pseudonym-key",
            str(key), "--key", str(pki.key_path), "--cert", str(pki.cert_path),
            "--audit-log", str(tmp_path / "audit.jsonl")]
    result = runner.invoke(main, args)
    assert result.exit_code == 1, result.output  # the junk file failed, and says so
    assert "FAILED" in result.output and "junk.dcm" in result.output
    assert key.stat().st_mode & 0o777 == 0o600
    outputs = list((tmp_path / "out").glob("*.dcm"))
    assert len(outputs) == 1
    again = runner.invoke(main, args[:4] + [str(tmp_path / "out2")] + args[5:])
    assert again.exit_code == 1
    first, second = read_dataset(outputs[0]), read_dataset(
        next((tmp_path / "out2").glob("*.dcm")))
    assert first.PatientID == second.PatientID  # the key file links the two runs
    bad = runner.invoke(main, ["deid", str(NIH_DX), "-o", str(tmp_path / "o3"),
                               "--options", "retain-everything"])
    assert bad.exit_code == 2 and "unknown de-identification option" in bad.output
    assert not (tmp_path / "o3").exists()


# -- issue 27: blanking compressed images, and one bad file in a batch -----------------------

PYLIBJPEG = RG1_J2K.parent


def _rle_copy(src: Path, dst: Path) -> Path:
    from pydicom.uid import RLELossless

    ds = read_dataset(src)
    ds.compress(RLELossless, ds.pixel_array, generate_instance_uid=False)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.mark.parametrize(("name", "expected"), [
    ("RG2_JLSL.dcm", "1.2.840.10008.1.2.4.80"),   # JPEG-LS lossless: re-encoded as it was
    ("RG1_JLSN.dcm", "1.2.840.10008.1.2.4.81"),   # JPEG-LS near-lossless, NEAR=0 this time
    ("RG3_J2KR.dcm", "1.2.840.10008.1.2.4.90"),   # JPEG 2000 lossless
    ("RG1_J2KI.dcm", "1.2.840.10008.1.2.1"),      # JPEG 2000 (lossy): no lossless encoder
    ("RG2_JPLL.dcm", "1.2.840.10008.1.2.1"),      # JPEG lossless: no encoder in pydicom
    ("rle-mono", "1.2.840.10008.1.2.5"),          # RLE, made from an uncompressed MR
    ("rle-rgb", "1.2.840.10008.1.2.5"),           # RLE, 16-bit RGB
])
def test_blank_and_resign_compressed(name, expected, pki, tmp_path):
    from radguard.provenance.trust import TrustStore
    from tests.conftest import MR_NATIVE

    if name == "rle-mono":
        src = _rle_copy(MR_NATIVE, tmp_path / "mr-rle.dcm")
    elif name == "rle-rgb":
        src = _rle_copy(DICOM_DIR / "pydicom-data-SC_rgb_16bit.dcm", tmp_path / "rgb-rle.dcm")
    else:
        src = PYLIBJPEG / name
    before = read_dataset(src).pixel_array
    region = (5, 7, 60, 20)
    out, report = deidentify_file(src, tmp_path / "out", Deidentifier(
        b"k" * 32, blank_regions=[region]), signer=pki.signer)
    assert report.pixels_cleaned and len(report.notes) == 1
    assert ("losslessly" in report.notes[0]) == (expected != "1.2.840.10008.1.2.1")
    ds = read_dataset(out)
    assert ds.file_meta.TransferSyntaxUID == expected
    after = ds.pixel_array
    x, y, w, h = region
    assert (after[y:y + h, x:x + w] == before.min()).all()
    mask = np.ones(before.shape[:2], bool)
    mask[y:y + h, x:x + w] = False
    assert (after[mask] == before[mask]).all()  # nothing else changed: lossless
    assert verify_file(out, TrustStore.from_paths([pki.ca_cert_path])).ok
    assert list((tmp_path / "out").iterdir()) == [out]  # no temporary files left


def test_cli_deid_batch_goes_on_after_bad_files(tmp_path, pki, monkeypatch):
    """Good files are all written, each bad one gets one line, exit 1 at the end; a
    batch where every file fails exits 2. Nothing half-written is left."""
    import radguard.governance.deid as deid_module

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    runner = CliRunner()
    out = tmp_path / "out"
    common = ["-o", str(out), "--blank", "0,0,64,16", "--key", str(pki.key_path),
              "--cert", str(pki.cert_path), "--audit-log", str(tmp_path / "audit.jsonl")]
    good = [PYLIBJPEG / "RG2_JLSL.dcm", PYLIBJPEG / "RG2_JPLL.dcm", NIH_DX]
    corrupt = PYLIBJPEG / "RG2_JPLY.dcm"  # a known-corrupt lossy JPEG
    result = runner.invoke(main, ["deid", str(good[0]), str(corrupt), str(junk),
                                  *map(str, good[1:]), *common])
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2
    assert failed[0].startswith(f"FAILED {corrupt}: cannot decode pixel data")
    assert failed[1].startswith(f"FAILED {junk}: not a DICOM")
    assert "note: blanked pixels written uncompressed" in result.output
    assert "3 of 5 de-identified" in result.output
    assert len(sorted(out.glob("*.dcm"))) == 3 and len(list(out.iterdir())) == 3
    # the same instance twice (a copy under another name): one output, and it says so
    copy_ = tmp_path / "copy.dcm"
    shutil.copy(good[0], copy_)
    twice = runner.invoke(main, ["deid", str(good[0]), str(copy_), *common[:1],
                                 str(tmp_path / "out3"), *common[2:]])
    assert twice.exit_code == 0, twice.output
    assert f"note: same SOP Instance as {good[0]}: one output" in twice.output

    # an unexpected error in one file (not bad input) is reported for that file only
    real = deid_module.Deidentifier.deidentify

    def flaky(self, ds):
        if ds.get("Modality") == "DX":
            raise ValueError("boom")
        return real(self, ds)

    monkeypatch.setattr(deid_module.Deidentifier, "deidentify", flaky)
    second = runner.invoke(main, ["deid", str(NIH_DX), str(good[0]), *common[:1],
                                  str(tmp_path / "out2"), *common[2:]])
    assert second.exit_code == 1, second.output
    assert f"FAILED {NIH_DX}: internal error (ValueError: boom)" in second.output
    assert len(list((tmp_path / "out2").iterdir())) == 1

    every = runner.invoke(main, ["deid", str(junk), str(corrupt), *common])
    assert every.exit_code == 2 and every.output.count("FAILED") == 2
