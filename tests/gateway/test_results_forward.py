"""The running gateway writes its AI results to the PACS ([results]): a real gateway, storescu
in front and a real Orthanc behind. A scored DX image that goes through arrives with its
TID 1500 SR, secondary-capture overlay and saliency SEG in its study; a set that cannot be
built adds nothing; with write = false nothing is added; a failed forward is retried."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import urllib.request

import pydicom
import pytest
from pydicom.uid import generate_uid

from radguard.dicom.io import read_dataset, write_dataset
from radguard.errors import RadguardError
from radguard.gateway import Gateway, GatewayConfig
from radguard.gateway.config import ConfigError, load_config
from radguard.gateway.pipeline import RESULTS_SOURCE, ForwardError
from tests.conftest import NIH_DX, dcmtk_tool

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def image(tmp_path):
    """NIH_DX (a DX chest radiograph) as a new image of a study of its own."""
    ds = read_dataset(NIH_DX)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientOrientation = ""  # present but empty: the known SC / SEG failure
    path = tmp_path / "image.dcm"
    write_dataset(ds, path)
    return path


def _gateway(tmp_path, orthanc, *, check_processes: int = 0, **results) -> Gateway:
    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           forward_dimse=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                           triage={"DX": "chest"}, check_processes=check_processes,
                           **{f"results_{k}": v for k, v in results.items()})
    return Gateway(config.validate())


def _ran(tmp_path, orthanc, image, **settings):
    """A gateway that received ``image``, checked it and stopped."""
    gateway = _gateway(tmp_path, orthanc, **settings)
    gateway.start()
    try:
        _send(gateway, image)
    finally:
        gateway.stop()
    return gateway


def _send(gateway: Gateway, path) -> None:
    result = subprocess.run([dcmtk_tool("storescu"), "-aet", "DX_ROOM3", "-aec", "RADGUARD",
                             "127.0.0.1", str(gateway.dicom.port), str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert gateway.wait_idle(180)


def _orthanc(orthanc, path: str, body: bytes | None = None):
    token = base64.b64encode(f"{orthanc.user}:{orthanc.password}".encode()).decode()
    req = urllib.request.Request(f"{orthanc.url}{path}", data=body,
                                 headers={"Authorization": f"Basic {token}"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as resp:
        data = resp.read()
    return data if path.endswith("/file") else json.loads(data)


def _study_in_orthanc(orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The instances Orthanc holds of the study, by SOP Instance UID (REST
    /studies/{id}/instances)."""
    found = [r for r in _orthanc(orthanc, "/tools/lookup", study_uid.encode())
             if r["Type"] == "Study"]
    if not found:
        return {}
    instances = _orthanc(orthanc, f"/studies/{found[0]['ID']}/instances")
    datasets = [pydicom.dcmread(io.BytesIO(_orthanc(orthanc, f"/instances/{i['ID']}/file")))
                for i in instances]
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def _items(seq):
    for item in seq:
        yield item
        yield from _items(getattr(item, "ContentSequence", []))


def _dciodvfy_errors(path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy not found: run scripts/install.sh (apt-get install dicom3tools)")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("check_processes", [0, 1])
def test_image_and_its_results_arrive_in_the_same_study(tmp_path, image, orthanc,
                                                        check_processes):
    """In-process checks, or a check process (the results are built in the gateway process
    from the triage result the check process sent back)."""
    source = read_dataset(image)
    gateway = _ran(tmp_path, orthanc, image, write=True, check_processes=check_processes)
    rows = gateway.store.instances()
    image_row = next(r for r in rows if r.sop_uid == source.SOPInstanceUID)
    assert image_row.state == "done" and image_row.forwarded == "dimse:ORTHANC"
    results = image_row.detail["results"]
    assert set(results) == {"sr", "overlay_dicom", "seg", "notes"}, results
    made = [r for r in rows if r.source == RESULTS_SOURCE]
    assert {r.sop_uid for r in made} == {results["sr"], results["overlay_dicom"],
                                         results["seg"]}
    # stored as radguard's own, not checked, forwarded; served with the study (DICOMweb)
    assert all(r.state == "done" and r.forwarded == "dimse:ORTHANC" and r.trust == "radguard"
               and r.calling_ae == "RADGUARD" and "scan" not in r.detail for r in made)
    served = gateway.store.clinical_instances("study_uid=?", (str(source.StudyInstanceUID),))
    assert {r.sop_uid for r in served} == {source.SOPInstanceUID, *(r.sop_uid for r in made)}
    for row in made:
        assert _dciodvfy_errors(gateway.store.file(row)) == [], row.sop_class
    # in Orthanc: the image and its three results, one study
    study = _study_in_orthanc(orthanc, str(source.StudyInstanceUID))
    assert set(study) == {source.SOPInstanceUID, results["sr"], results["overlay_dicom"],
                          results["seg"]}
    sr, sc, seg = (study[results[k]] for k in ("sr", "overlay_dicom", "seg"))
    assert (sr.SOPClassUID, sc.SOPClassUID, seg.SOPClassUID) == (SR_CLASS, SC_CLASS, SEG_CLASS)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    referenced = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in _items(sr.ContentSequence) if item.ValueType == "IMAGE"}
    assert referenced == {source.SOPInstanceUID}
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]\
        .ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.PatientOrientation == "" and seg.PatientOrientation == ""  # unknown, not made up


def test_a_set_that_cannot_be_built_adds_nothing(tmp_path, image, orthanc, monkeypatch):
    import radguard.dicom.results as dicom_results

    def cannot(*_args, **_kwargs):
        raise RadguardError("cannot build the saliency segmentation (forced)")

    monkeypatch.setattr(dicom_results, "saliency_segmentation", cannot)  # the last object
    source = read_dataset(image)
    gateway = _ran(tmp_path, orthanc, image, write=True)
    rows = gateway.store.instances()
    assert [r.sop_uid for r in rows] == [source.SOPInstanceUID]
    assert rows[0].state == "done" and rows[0].forwarded == "dimse:ORTHANC"  # the image goes on
    assert rows[0].detail["results"].startswith("not written: ") and \
        "forced" in rows[0].detail["results"]
    assert len(list((tmp_path / "data" / "objects").glob("*/*"))) == 1  # no file left either
    assert set(_study_in_orthanc(orthanc, str(source.StudyInstanceUID))) == \
        {source.SOPInstanceUID}


def test_write_false_adds_nothing(tmp_path, image, orthanc):
    source = read_dataset(image)
    gateway = _ran(tmp_path, orthanc, image, write=False)
    rows = gateway.store.instances()
    assert [r.sop_uid for r in rows] == [source.SOPInstanceUID]
    assert rows[0].state == "done" and rows[0].ai_suspicion is not None  # scored all the same
    assert "results" not in rows[0].detail
    assert set(_study_in_orthanc(orthanc, str(source.StudyInstanceUID))) == \
        {source.SOPInstanceUID}


def test_a_failed_forward_of_a_result_is_retried(tmp_path, image, orthanc):
    source = read_dataset(image)
    gateway = _gateway(tmp_path, orthanc, write=True)
    forwarder = gateway.pipeline.forwarders[0]
    real, failed = forwarder.send, []

    def first_sr_fails(path):
        if not failed and pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == SR_CLASS:
            failed.append(path)
            raise ForwardError("the PACS is unreachable (test)")
        return real(path)

    forwarder.send = first_sr_fails
    gateway.start()
    try:
        _send(gateway, image)
    finally:
        gateway.stop()
    assert failed
    made = [r for r in gateway.store.instances() if r.source == RESULTS_SOURCE]
    assert len(made) == 3 and all(r.state == "done" and r.forwarded for r in made)
    assert len(_study_in_orthanc(orthanc, str(source.StudyInstanceUID))) == 4


def test_a_store_failure_inside_a_set_retries_the_image_and_completes_the_set(
        tmp_path, image, orthanc):
    """The disk fills after the SR is stored: the image goes back to the queue, its set is
    built again with the same UIDs, and the study ends with one SR, SC and SEG."""
    import errno

    source = read_dataset(image)
    gateway = _gateway(tmp_path, orthanc, write=True)
    real, calls = gateway.store.ingest, []

    def full_at_the_second_result(data, header, **kwargs):
        if kwargs.get("source") == RESULTS_SOURCE:
            calls.append(header["sop_uid"])
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(data, header, **kwargs)

    gateway.store.ingest = full_at_the_second_result
    gateway.start()
    try:
        _send(gateway, image)
    finally:
        gateway.stop()
    assert len(calls) == 5  # SR, SC (full); SR again (the same UID), SC, SEG
    assert calls[0] == calls[2] and calls[1] == calls[3]
    rows = gateway.store.instances()
    served = {r.sop_uid for r in gateway.store.clinical_instances()}
    made = [r for r in rows if r.source == RESULTS_SOURCE]
    assert {r.sop_uid for r in made} == set(calls) and len(served) == 4
    assert all(r.state in ("done", "rejected") for r in made)
    assert len(_study_in_orthanc(orthanc, str(source.StudyInstanceUID))) == 4


def test_results_forward_false_keeps_them_in_radguard(tmp_path, image, orthanc):
    source = read_dataset(image)
    gateway = _ran(tmp_path, orthanc, image, write=True, forward=False)
    made = [r for r in gateway.store.instances() if r.source == RESULTS_SOURCE]
    assert len(made) == 3 and all(r.state == "done" and r.forwarded is None for r in made)
    assert set(_study_in_orthanc(orthanc, str(source.StudyInstanceUID))) == \
        {source.SOPInstanceUID}


def test_results_section_of_the_configuration(tmp_path):
    toml = tmp_path / "radguard.toml"
    toml.write_text('triage = { DX = "chest" }\n[results]\nwrite = true\nforward = false\n')
    config = load_config(toml)
    assert config.results_write is True and config.results_forward is False
    assert GatewayConfig().validate().results_write is False  # opt-in
    toml.write_text("[results]\nwrite = true\n")
    with pytest.raises(ConfigError, match="needs a triage model"):
        load_config(toml)
    toml.write_text('triage = { DX = "chest" }\n[results]\nwrite = "yes"\n')
    with pytest.raises(ConfigError, match="results.write 'yes': true or false"):
        load_config(toml)
    toml.write_text("[results]\nsign = true\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(toml)
