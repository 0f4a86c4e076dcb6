"""QIDO-RS / C-FIND matching on the store's index (PS3.4 C.2.2.2, PS3.18 10.6): single
value, wildcard, case-insensitive person names, date and time ranges, UID lists,
ModalitiesInStudy, paging, includefield, what is refused (400), who sees quarantine; and
the QIDO routes and STOW-RS answers over HTTP."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radguard.dicom.io import read_dataset
from radguard.gateway.dimse import header_of
from radguard.gateway.query import (
    Level,
    QueryError,
    find_datasets,
    from_identifier,
    from_qido,
    instances_for,
    search,
    to_json,
)
from radguard.gateway.store import Store
from tests.conftest import NIH_DX, copy_dicom
from tests.gateway.conftest import web_gateway


def _object(**attrs: object) -> bytes:
    """A small valid Part 10 CR-like instance with the given attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = attrs.pop("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = attrs.pop("study", None) or generate_uid()
    ds.SeriesInstanceUID = attrs.pop("series", None) or generate_uid()
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.SamplesPerPixel, ds.PixelRepresentation = 7, 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(64))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


S1, S2, S3 = generate_uid(), generate_uid(), generate_uid()
SE1 = generate_uid()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request, tmp_path_factory):
    if request.param == "sqlite":
        store = Store(tmp_path_factory.mktemp("query"))
    else:  # the same SQL on the second backend (LIKE ... ESCAPE, GROUP BY paging, IN lists)
        store = Store(tmp_path_factory.mktemp("query"), request.getfixturevalue("postgres_url"))
        store.execute("DELETE FROM instances")
    objects = [
        _object(study=S1, series=SE1, PatientName="Doe^John", PatientID="P1",
                StudyDate="20200105", StudyTime="0930", Modality="CT", AccessionNumber="A1",
                ReferringPhysicianName="House^Gregory", StudyDescription="CHEST",
                SeriesNumber=1, InstanceNumber=1),
        _object(study=S1, series=SE1, PatientName="Doe^John", PatientID="P1",
                StudyDate="20200105", StudyTime="0930", Modality="CT", AccessionNumber="A1",
                SeriesNumber=1, InstanceNumber=2),
        _object(study=S1, PatientName="Doe^John", PatientID="P1", StudyDate="20200105",
                StudyTime="0930", Modality="MR", AccessionNumber="A1", SeriesNumber=2),
        _object(study=S2, PatientName="Müller^Jürgen", PatientID="P2", StudyDate="20221231",
                StudyTime="153000.5", Modality="DX", SpecificCharacterSet="ISO_IR 192",
                AccessionNumber="A_2%", PatientAge="045Y", BodyPartExamined="CHEST"),
        _object(study=S3, PatientName="DOE^JANE", PatientID="P3", StudyDate="19991231",
                StudyTime="2300", Modality="US"),
    ]
    for data in objects:
        store.ingest(data, header_of(data), source="test")
    store.execute("UPDATE instances SET state='done'")
    held = _object(PatientName="Held^Back", PatientID="P9", StudyDate="20200105",
                   Modality="CR")
    store.execute("UPDATE instances SET state='quarantined' WHERE id=?",
                  (store.ingest(held, header_of(held), source="test"),))
    refused = _object(PatientName="Refused^Fake", PatientID="P8", Modality="CR")
    store.execute("UPDATE instances SET state='rejected' WHERE id=?",
                  (store.ingest(refused, header_of(refused), source="test"),))
    yield store
    store.close()


def _ids(store: Store, level: Level, *params: tuple[str, str], key: str = "PatientID",
         **kw: object) -> list[str]:
    return [m[key] for m in search(store, from_qido(level, params, **kw))]


@pytest.mark.parametrize(("params", "expected"), [
    ((), ["P1", "P2", "P3"]),
    ((("PatientID", "P2"),), ["P2"]),
    ((("00100020", "P2"),), ["P2"]),  # attribute by tag
    ((("PatientID", "P*"),), ["P1", "P2", "P3"]),
    ((("PatientID", "P?"),), ["P1", "P2", "P3"]),
    ((("PatientID", "p1"),), []),  # LO is case-sensitive
    ((("PatientID", "p*"),), []),  # wildcards too (SQLite's LIKE is not, by default)
    ((("PatientName", "doe*"),), ["P1", "P3"]),  # PN is not
    ((("PatientName", "DOE^J?HN"),), ["P1"]),
    ((("PatientName", "müller^jürgen"),), ["P2"]),  # beyond ASCII too
    ((("PatientName", "*"),), ["P1", "P2", "P3"]),  # universal
    ((("StudyDate", "20200105"),), ["P1"]),
    ((("StudyDate", "20200101-20221231"),), ["P1", "P2"]),
    ((("StudyDate", "-20200105"),), ["P1", "P3"]),
    ((("StudyDate", "20210101-"),), ["P2"]),
    ((("StudyTime", "0900-1000"),), ["P1"]),
    ((("StudyTime", "1530-"),), ["P2", "P3"]),
    ((("StudyTime", "-0930"),), ["P1"]),
    ((("AccessionNumber", "A_2%"),), ["P2"]),  # SQL wildcards are plain characters
    ((("AccessionNumber", "A?"),), ["P1"]),
    ((("ModalitiesInStudy", "MR"),), ["P1"]),
    ((("ModalitiesInStudy", "MR\\US"),), ["P1", "P3"]),
    ((("ModalitiesInStudy", "DX,US"),), ["P2", "P3"]),
    ((("ReferringPhysicianName", "house*"),), ["P1"]),
    ((("StudyInstanceUID", f"{S1},{S3}"),), ["P1", "P3"]),
    ((("StudyInstanceUID", f"{S2}\\{S3}"),), ["P2", "P3"]),
    ((("limit", "2"),), ["P1", "P2"]),
    ((("limit", "2"), ("offset", "2")), ["P3"]),
    ((("offset", "5"),), []),
])
def test_study_matching(store, params, expected):
    assert _ids(store, Level.STUDY, *params) == expected


def test_study_answers_count_series_and_instances_and_list_modalities(store):
    query = from_qido(Level.STUDY, [("PatientID", "P1")])
    (match,) = search(store, query)
    assert match["NumberOfStudyRelatedSeries"] == 2
    assert match["NumberOfStudyRelatedInstances"] == 3
    assert match["ModalitiesInStudy"] == ["CT", "MR"]
    body = to_json(match, query, "https://pacs.example/dicom-web")
    assert body["00201206"] == {"vr": "IS", "Value": [2]}
    assert body["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert body["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert body["00081190"]["Value"] == [f"https://pacs.example/dicom-web/studies/{S1}"]
    assert body["00100030"] == {"vr": "DA"}  # required, empty: present without a value
    assert Dataset.from_json(body).StudyInstanceUID == S1


def test_series_and_instance_levels(store):
    assert _ids(store, Level.SERIES, ("Modality", "CT"), key="SeriesInstanceUID") == [SE1]
    assert len(_ids(store, Level.SERIES, scope={"StudyInstanceUID": S1},
                    key="SeriesInstanceUID")) == 2
    series = search(store, from_qido(Level.SERIES, [], scope={"StudyInstanceUID": S1}))
    assert [s["NumberOfSeriesRelatedInstances"] for s in series] == [2, 1]
    numbers = _ids(store, Level.IMAGE, scope={"StudyInstanceUID": S1,
                                              "SeriesInstanceUID": SE1},
                   key="InstanceNumber")
    assert numbers == ["1", "2"]
    assert _ids(store, Level.IMAGE, ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")) == []
    query = from_qido(Level.IMAGE, [("InstanceNumber", "2"),
                                    ("includefield", "PhotometricInterpretation")])
    (match,) = search(store, query)
    body = to_json(match, query, "http://x/dicom-web")
    assert body["00280004"]["Value"] == ["MONOCHROME2"]  # read from the file
    assert body["00280010"]["Value"] == [8] and body["00080018"]["Value"]
    assert body["00081190"]["Value"][0].endswith(f"/instances/{match['SOPInstanceUID']}")


def test_includefield_all_and_unsupported_keys_are_said(store):
    query = from_qido(Level.STUDY, [("includefield", "all"), ("fuzzymatching", "true"),
                                    ("InstitutionName", "X")])
    assert "StudyDescription" in query.returns
    assert any("fuzzymatching" in w for w in query.warnings)
    assert any("InstitutionName" in w for w in query.warnings)  # ignored, and said
    # all: what the index holds, and the level's other attributes from one instance's file
    query = from_qido(Level.STUDY, [("PatientID", "P2"), ("includefield", "all")])
    (body,) = [to_json(m, query) for m in search(store, query)]
    assert body["00101010"] == {"vr": "AS", "Value": ["045Y"]}  # Patient's Age
    assert "00180015" not in body  # Body Part Examined is a series attribute
    query = from_qido(Level.SERIES, [("PatientID", "P2"), ("includefield", "all")])
    (body,) = [to_json(m, query) for m in search(store, query)]
    assert body["00180015"]["Value"] == ["CHEST"]


def test_limits_of_a_query(store, monkeypatch):
    import radguard.gateway.query as query_module

    query = from_qido(Level.STUDY, [("limit", "999999999")])
    assert query.limit == query_module.MAX_RESULTS and "lowered" in query.warnings[0]
    from_qido(Level.STUDY, [("StudyInstanceUID", ",".join(["1.2.3"] * 1000))])
    with pytest.raises(QueryError):  # a UID list of more than a thousand
        from_qido(Level.STUDY, [("StudyInstanceUID", ",".join(["1.2.3"] * 1001))])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for number in range(1, 120):  # 119 private keys, each of which would come back
        identifier.add_new(0x00091000 + number, "LO", "")
    with pytest.raises(QueryError):
        from_identifier(identifier, "study")
    monkeypatch.setattr(query_module, "MAX_RESULTS", 2)  # C-FIND: no paging, no cut
    everything = Dataset()
    everything.QueryRetrieveLevel = "STUDY"
    everything.StudyInstanceUID = ""
    with pytest.raises(query_module.TooManyMatches):
        find_datasets(store, everything, "study")
    assert len(search(store, from_qido(Level.STUDY, []))) == 2  # QIDO: said in a Warning


@pytest.mark.parametrize("params", [
    [("foo", "1")], [("StudyDate", "2020")], [("StudyDate", "20200101-2021")],
    [("StudyTime", "25:00")], [("limit", "x")], [("limit", "0")], [("offset", "-1")],
    [("SOPInstanceUID", "1.2")], [("StudyInstanceUID", "1.2.abc")],
    [("includefield", "NoSuchKeyword")], [("fuzzymatching", "maybe")],
])
def test_what_cannot_be_understood_is_refused_not_answered_with_everything(params):
    with pytest.raises(QueryError):
        from_qido(Level.STUDY, params)


def test_quarantine_is_seen_only_by_those_who_decide_and_rejected_by_nobody(store):
    assert "P9" not in _ids(store, Level.STUDY)
    assert "P9" in _ids(store, Level.STUDY, quarantine=True)
    assert "P8" not in _ids(store, Level.STUDY, quarantine=True)
    # a quarantined copy of a clinical instance (a conflicting duplicate) is not served
    # beside it, even to an admin: one object per SOP Instance UID
    first = store.instances("patient_id='P3'")[0]
    ds = read_dataset(store.file(first))
    ds.ImageComments = "a copy with other bytes"  # same SOP Instance UID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    copy = store.ingest(data, header_of(data), source="test")
    store.execute("UPDATE instances SET state='quarantined' WHERE id=?", (copy,))
    try:
        sops = _ids(store, Level.IMAGE, ("PatientID", "P3"), key="SOPInstanceUID",
                    quarantine=True)
        assert sops == [first.sop_uid]
    finally:
        store.execute("DELETE FROM instances WHERE id=?", (copy,))


def test_c_find_identifiers(store):
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "doe*"
    identifier.StudyInstanceUID = ""
    identifier.ModalitiesInStudy = ""
    identifier.InstitutionName = ""  # not indexed: comes back empty
    found = find_datasets(store, identifier, "study")
    assert [d.StudyInstanceUID for d in found] == [S1, S3]
    assert found[0].ModalitiesInStudy == ["CT", "MR"]
    assert "InstitutionName" in found[0] and not found[0].InstitutionName
    assert found[0].QueryRetrieveLevel == "STUDY"
    patient = Dataset()
    patient.QueryRetrieveLevel = "PATIENT"
    patient.PatientID = "P1"
    patient.NumberOfPatientRelatedStudies = None
    patient.NumberOfPatientRelatedInstances = None
    (one,) = find_datasets(store, patient, "patient")
    assert one.NumberOfPatientRelatedStudies == 1 and one.NumberOfPatientRelatedInstances == 3
    with pytest.raises(QueryError):
        find_datasets(store, patient, "study")  # no PATIENT level in Study Root
    wrong = Dataset()
    wrong.QueryRetrieveLevel = "STUDY"
    wrong.SOPInstanceUID = ""
    with pytest.raises(QueryError):
        from_identifier(wrong, "study")
    move = Dataset()
    move.QueryRetrieveLevel = "SERIES"
    move.StudyInstanceUID = S1
    move.SeriesInstanceUID = SE1
    assert len(instances_for(store, move, "study")) == 2
    with pytest.warns(UserWarning):  # pydicom says it is no UID; the query says why
        move.SeriesInstanceUID = "*"
    with pytest.raises(QueryError):
        instances_for(store, move, "study")


@pytest.mark.parametrize("implicit", [True, False])
def test_c_find_answers_are_encoded_as_pydicom_encodes_them(store, implicit):
    """The fast C-FIND encoder writes the bytes pydicom (through pynetdicom) writes for the
    same answer: person names beyond ASCII, numbers, empty keys, RetrieveAETitle."""
    from pynetdicom.dsutils import encode

    from radguard.gateway.query import to_bytes, to_dataset

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime",
                    "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "RetrieveAETitle",
                    "InstitutionName", "ReferringPhysicianName"):
        setattr(identifier, keyword, None)
    query = from_identifier(identifier, "study")
    matches = search(store, query)
    assert any(m["PatientName"].startswith("Müller") for m in matches)
    for match in matches:
        assert to_bytes(match, query, implicit=implicit, retrieve_ae="RADGUARD") == encode(
            to_dataset(match, query, retrieve_ae="RADGUARD"), implicit, True)


def test_rows_stored_before_the_index_are_indexed_at_start(tmp_path):
    from radguard.gateway.service import _index_header

    store = Store(tmp_path)
    data = _object(PatientName="Old^Row", PatientID="P7", AccessionNumber="OLD",
                   Modality="CR")
    store.ingest(data, header_of(data), source="test")
    store.execute("UPDATE instances SET state='done', accession=NULL, index_version=NULL, "
                  "patient_name_fold=NULL")
    assert _ids(store, Level.STUDY, ("AccessionNumber", "OLD")) == []
    assert store.backfill_index(_index_header) == 1
    assert _ids(store, Level.STUDY, ("AccessionNumber", "OLD"), ("PatientName", "old*")) \
        == ["P7"]
    assert store.backfill_index(_index_header) == 0
    store.close()


# -- over HTTP ----------------------------------------------------------------------------------

def _get(gw, path: str, who: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{gw.http_port}{path}", timeout=60, trust_env=False,
                     headers={"Authorization": f"Bearer {gw.tokens[who]}"})


def _stow(gw, parts: list[bytes], path: str = "/dicom-web/studies") -> httpx.Response:
    boundary = "radguard-test-boundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return httpx.post(f"http://127.0.0.1:{gw.http_port}{path}", content=body, timeout=60,
                      trust_env=False, headers={"Authorization": f"Bearer {gw.tokens['tech']}",
                                                "Content-Type": ctype})


def test_stow_to_a_study_takes_a_real_image(gateway, tmp_path):
    """POST /studies/{uid} has STOW's body limit, not a form's 8 KiB."""
    data = copy_dicom(NIH_DX, tmp_path / "x.dcm")
    study = str(read_dataset(data).StudyInstanceUID)
    answer = _stow(gateway, [data.read_bytes()], f"/dicom-web/studies/{study}")
    assert len(data.read_bytes()) > 100_000 and answer.status_code == 200, answer.text


def test_qido_and_stow_over_http(gateway):
    study = generate_uid()
    good = [_object(study=study, PatientID="H1", Modality="CT", PatientName="Http^One"),
            _object(study=study, PatientID="H1", Modality="CT", PatientName="Http^One")]
    other = _object(PatientID="H2", Modality="CT")
    broken = _object(PatientID="H3")[:-40]  # truncated pixel data
    answer = _stow(gateway, [*good, other, broken], f"/dicom-web/studies/{study}")
    assert answer.status_code == 202
    body = answer.json()
    assert body["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{study}")
    stored = body["00081199"]["Value"]
    assert len(stored) == 2 and all("/instances/" in s["00081190"]["Value"][0] for s in stored)
    failed = body["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0xA900], [0xC000]]
    assert all(f["00081155"]["Value"][0] for f in failed)  # each names its instance
    assert "00081196" not in json.dumps(failed)  # no text where a US code belongs
    assert "part 3" in answer.headers["warning"] and "part 4" in answer.headers["warning"]
    assert gateway.wait_idle(60)
    studies = _get(gateway, "/dicom-web/studies?PatientID=H1", "rad")
    assert studies.status_code == 200 and len(studies.json()) == 1
    assert studies.headers["cache-control"] == "no-store"  # patient data is not cached
    assert _get(gateway, "/dicom-web/studies?PatientID=nobody", "rad").json() == []
    series = _get(gateway, f"/dicom-web/studies/{study}/series", "rad").json()
    assert len(series) == 2 and series[0]["00080060"]["Value"] == ["CT"]
    instances = _get(gateway, f"/dicom-web/studies/{study}/instances", "rad").json()
    assert len(instances) == 2
    assert len(_get(gateway, "/dicom-web/series?Modality=CT&PatientID=H1", "rad").json()) == 2
    assert len(_get(gateway, "/dicom-web/instances?PatientID=H1&limit=1", "rad").json()) == 1
    refused = _get(gateway, "/dicom-web/studies?PatientNmae=H1", "rad")
    assert refused.status_code == 400 and "PatientNmae" in refused.text
    warned = _get(gateway, "/dicom-web/studies?PatientID=H1&fuzzymatching=true", "rad")
    assert warned.status_code == 200 and warned.headers["warning"].startswith("299 ")
    assert _get(gateway, "/dicom-web/studies/1.2.x/series", "rad").status_code == 400
    xml_only = httpx.get(f"http://127.0.0.1:{gateway.http_port}/dicom-web/studies",
                         timeout=60, trust_env=False,
                         headers={"Authorization": f"Bearer {gateway.tokens['rad']}",
                                  "Accept": "application/dicom+xml"})
    assert xml_only.status_code == 406
    # an admin, who decides about quarantine, sees quarantined instances; others do not
    held = gateway.store.instances("patient_id='H1'")[0]
    gateway.store.execute("UPDATE instances SET state='quarantined' WHERE id=?", (held.id,))
    assert len(_get(gateway, "/dicom-web/instances?PatientID=H1", "rad").json()) == 1
    assert len(_get(gateway, "/dicom-web/instances?PatientID=H1", "boss").json()) == 2


@pytest.fixture
def gateway(tmp_path, pki):
    gw = web_gateway(tmp_path / "data", trust=[str(pki.ca_cert_path)])
    yield gw
    gw.stop()
