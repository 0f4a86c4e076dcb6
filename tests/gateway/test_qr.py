"""Query/Retrieve and Storage Commitment on the DICOM port, with real peers: dcmtk's
findscu, movescu, getscu and storescp, a real Orthanc (as destination and as SCU), and
pynetdicom as the Storage Commitment SCU."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radguard.gateway import Gateway, GatewayConfig
from radguard.gateway.dimse import DicomServer
from radguard.gateway.store import Store
from tests.conftest import MR_NATIVE, NIH_DX, RG2_JLS, _free_port, copy_dicom, dcmtk_tool

COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
STUDY_FIND, STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2"


# -- helpers -------------------------------------------------------------------------------------

def _study(folder: Path, patient: str) -> dict[str, Path]:
    """Three instances of one study: 8-bit DX (implicit VR), MR (explicit VR), CR in
    JPEG-LS (only a peer that takes JPEG-LS gets it as stored)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    common = {"StudyInstanceUID": study, "PatientID": patient, "PatientName": "QR^Test"}
    return {"dx": copy_dicom(NIH_DX, folder / "dx.dcm", **common),
            "mr": copy_dicom(MR_NATIVE, folder / "mr.dcm", **common),
            "jls": copy_dicom(RG2_JLS, folder / "jls.dcm", **common)}


def _run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)


def _storescu(port: int, *paths: Path, aet: str = "MODALITY") -> None:
    """Store with dcmtk's storescu, each file in its own transfer syntax."""
    options = {"1.2.840.10008.1.2.4.80": ("-xt",), "1.2.840.10008.1.2": ("-xi",)}
    for syntax in {_syntax(p) for p in paths}:
        group = [p for p in paths if _syntax(p) == syntax]
        if group:
            result = _run(dcmtk_tool("storescu"), *options.get(syntax, ()), "-aet", aet,
                          "-aec", "RADGUARD", "127.0.0.1", port, *group)
            assert result.returncode == 0, result.stderr


def _syntax(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


CALLERS = ["FINDER@127.0.0.1", "MOVER@127.0.0.0/8", "GETTER", "VIEWER", "ADMIN_WS"]


@pytest.fixture
def gateway(tmp_path):
    """A whole gateway (checks, store, the DICOM port) with these [dicom] settings."""
    started = []

    def start(**dicom: object) -> Gateway:
        # the querying AEs of these tests (nobody may query by default)
        dicom.setdefault("query_callers", [*CALLERS, *dicom.pop("more_callers", [])])
        settings = {f"dicom_{k}": v for k, v in dicom.items()}
        config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                               **settings).validate()
        gw = Gateway(config)
        gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def stored(gateway, tmp_path):
    """A gateway holding one checked study; returns (gateway, files)."""

    def make(**dicom: object) -> tuple[Gateway, dict[str, Path]]:
        gw = gateway(**dicom)
        files = _study(tmp_path / "in", "QR-" + generate_uid()[-8:])
        _storescu(gw.dicom.port, *files.values())
        assert gw.wait_idle(180)
        states = {i.sop_uid: i.state for i in gw.store.instances()}
        assert set(states.values()) == {"done"}, states
        return gw, files

    return make


@pytest.fixture
def storescp(tmp_path):
    """dcmtk's storescp on a free port (extra options), receiving into a folder."""
    procs = []

    def start(*options: str) -> tuple[int, Path]:
        port, folder = _free_port(), tmp_path / f"storescp{len(procs)}"
        folder.mkdir()
        proc = subprocess.Popen([dcmtk_tool("storescp"), *options, "-aet", "STORESCP",
                                 "-od", str(folder), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return port, folder

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _received(folder: Path) -> dict[str, str]:
    """SOP Instance UID -> transfer syntax of the files a storescp/getscu wrote."""
    out = {}
    for path in folder.iterdir():
        ds = dcmread(path, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    return out


# -- C-FIND --------------------------------------------------------------------------------------
def test_findscu_study_and_patient_root(stored, tmp_path):
    gw, files = stored()
    patient = str(dcmread(files["dx"], stop_before_pixels=True).PatientID)
    study = str(dcmread(files["dx"], stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "found"
    out.mkdir()
    result = _run(dcmtk_tool("findscu"), "-S", "-aet", "FINDER", "-aec", "RADGUARD", "-X",
                  "-od", out, "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient}",
                  "-k", "StudyInstanceUID", "127.0.0.1", gw.dicom.port)
    assert result.returncode == 0, result.stderr
    answers = [dcmread(p) for p in sorted(out.iterdir())]
    assert [str(a.StudyInstanceUID) for a in answers] == [study]
    # image level, patient root
    for path in out.iterdir():
        path.unlink()
    result = _run(dcmtk_tool("findscu"), "-P", "-aet", "FINDER", "-aec", "RADGUARD", "-X",
                  "-od", out, "-k", "QueryRetrieveLevel=IMAGE", "-k", f"PatientID={patient}",
                  "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID=*",
                  "-k", "SOPInstanceUID", "127.0.0.1", gw.dicom.port)
    assert result.returncode == 0, result.stderr
    found = {str(dcmread(p).SOPInstanceUID) for p in out.iterdir()}
    assert found == {_uid(p) for p in files.values()}


def test_c_find_refusals_carry_an_error_comment(stored):
    from pynetdicom import AE

    gw, _ = stored(query_callers=["FINDER"])
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(STUDY_FIND)
    assoc = ae.associate("127.0.0.1", gw.dicom.port, ae_title="RADGUARD")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    [(status, _)] = list(assoc.send_c_find(query, STUDY_FIND))
    assert status.Status == 0x0124 and "may not" in status.ErrorComment
    assoc.release()
    ae = AE(ae_title="FINDER")
    ae.add_requested_context(STUDY_FIND)
    assoc = ae.associate("127.0.0.1", gw.dicom.port, ae_title="RADGUARD")
    bad = Dataset()
    bad.QueryRetrieveLevel = "NONSENSE"
    [(status, _)] = list(assoc.send_c_find(bad, STUDY_FIND))
    assert status.Status in (0xA900, 0xC000) and status.ErrorComment
    huge = Dataset()
    huge.QueryRetrieveLevel = "STUDY"
    huge.StudyDescription = "x" * 64
    huge.OtherPatientIDs = ["y" * 64] * 1100  # ~70 KiB: more than an identifier may be
    [(status, _)] = list(assoc.send_c_find(huge, STUDY_FIND))
    assert status.Status == 0xC000 and "64 KiB" in status.ErrorComment
    assoc.release()


# -- C-MOVE --------------------------------------------------------------------------------------
def _movescu(port: int, destination: str, study: str, root: str = "-S"
             ) -> subprocess.CompletedProcess[str]:
    return _run(dcmtk_tool("movescu"), root, "-aet", "MOVER", "-aec", "RADGUARD", "-aem",
                destination, "-k", "QueryRetrieveLevel=STUDY", "-k",
                f"StudyInstanceUID={study}", "127.0.0.1", port)


def test_movescu_to_storescp_in_the_stored_syntax_or_decompressed(stored, storescp):
    plain_port, plain = storescp()  # uncompressed transfer syntaxes only (the default)
    gw, files = stored(destinations={"STORESCP": f"127.0.0.1:{plain_port}"})
    study = str(dcmread(files["dx"], stop_before_pixels=True).StudyInstanceUID)
    result = _movescu(gw.dicom.port, "STORESCP", study)
    assert result.returncode == 0, result.stderr
    got = _received(plain)
    assert got == {_uid(files["dx"]): "1.2.840.10008.1.2",  # as stored
                   _uid(files["mr"]): ExplicitVRLittleEndian,
                   _uid(files["jls"]): ExplicitVRLittleEndian}  # refused JPEG-LS: decoded
    original = dcmread(files["dx"])
    moved = dcmread(next(p for p in plain.iterdir()
                         if dcmread(p, stop_before_pixels=True).SOPInstanceUID ==
                         original.SOPInstanceUID))
    assert moved.PixelData == original.PixelData
    # a destination that takes JPEG-LS gets the stored bytes
    any_port, anything = storescp("+xa")
    gw.config.dicom_destinations["STORESCP"] = f"127.0.0.1:{any_port}"
    assert _movescu(gw.dicom.port, "STORESCP", study, "-P").returncode == 0
    assert _received(anything)[_uid(files["jls"])] == "1.2.840.10008.1.2.4.80"


def test_unknown_move_destination_and_unreachable_destination(stored):
    from pynetdicom import AE

    gw, files = stored(destinations={"NOBODY": f"127.0.0.1:{_free_port()}"})
    study = str(dcmread(files["dx"], stop_before_pixels=True).StudyInstanceUID)
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(STUDY_MOVE)
    assoc = ae.associate("127.0.0.1", gw.dicom.port, ae_title="RADGUARD")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    [(status, _)] = list(assoc.send_c_move(identifier, "ELSEWHERE", STUDY_MOVE))
    assert status.Status == 0xA801 and "ELSEWHERE" in status.ErrorComment
    responses = list(assoc.send_c_move(identifier, "NOBODY", STUDY_MOVE))
    status, failed = responses[-1]
    assert status.Status == 0xA702 and "NOBODY" in status.ErrorComment
    assert status.NumberOfFailedSuboperations == 3
    assert set(failed.FailedSOPInstanceUIDList) == {_uid(p) for p in files.values()}
    assoc.release()


def _orthanc_rest(orthanc, method: str, path: str, body: object = None) -> object:
    token = base64.b64encode(f"{orthanc.user}:{orthanc.password}".encode()).decode()
    data = None if body is None else (body if isinstance(body, bytes)
                                      else json.dumps(body).encode())
    req = urllib.request.Request(f"{orthanc.url}{path}", data=data, method=method,
                                 headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        text = resp.read()
    return json.loads(text) if text else None


def _orthanc_has(orthanc, sop_uid: str) -> bool:
    found = _orthanc_rest(orthanc, "POST", "/tools/find",
                          {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    return bool(found)


def test_movescu_into_orthanc(stored, orthanc):
    gw, files = stored(destinations={orthanc.aet: f"127.0.0.1:{orthanc.dicom_port}"})
    study = str(dcmread(files["dx"], stop_before_pixels=True).StudyInstanceUID)
    result = _movescu(gw.dicom.port, orthanc.aet, study)
    assert result.returncode == 0, result.stderr
    for path in files.values():
        assert _orthanc_has(orthanc, _uid(path))
    assert "dimse.move" in [e.action for e in gw.audit_log.entries()]


def test_orthanc_as_scu_stores_into_and_moves_out_of_radguard(gateway, orthanc, tmp_path):
    gw = gateway(destinations={orthanc.aet: f"127.0.0.1:{orthanc.dicom_port}"},
                 more_callers=[orthanc.aet])
    _orthanc_rest(orthanc, "PUT", "/modalities/rg",
                  {"AET": "RADGUARD", "Host": "127.0.0.1", "Port": gw.dicom.port})
    # Orthanc sends an instance to radguard (C-STORE, Orthanc as SCU)
    sent = copy_dicom(NIH_DX, tmp_path / "from_orthanc.dcm", StudyInstanceUID=generate_uid())
    orthanc_id = _orthanc_rest(orthanc, "POST", "/instances", sent.read_bytes())["ID"]
    _orthanc_rest(orthanc, "POST", "/modalities/rg/store", [orthanc_id])
    assert gw.wait_idle(120)
    [row] = gw.store.instances()
    assert row.sop_uid == _uid(sent) and row.calling_ae == orthanc.aet and row.state == "done"
    # radguard's own study; Orthanc queries radguard (C-FIND) and retrieves it (C-MOVE)
    files = _study(tmp_path / "study", "ORTHANC-QR")
    _storescu(gw.dicom.port, *files.values())
    assert gw.wait_idle(180)
    study = str(dcmread(files["dx"], stop_before_pixels=True).StudyInstanceUID)
    answer = _orthanc_rest(orthanc, "POST", "/modalities/rg/query",
                           {"Level": "Study", "Query": {"StudyInstanceUID": study}})
    content = _orthanc_rest(orthanc, "GET", f"/queries/{answer['ID']}/answers?expand")
    assert len(content) == 1
    _orthanc_rest(orthanc, "POST", f"/queries/{answer['ID']}/retrieve",
                  {"TargetAet": orthanc.aet, "Synchronous": True})
    for path in files.values():
        assert _orthanc_has(orthanc, _uid(path))
    # and the plain move route
    _orthanc_rest(orthanc, "POST", "/modalities/rg/move",
                  {"Level": "Study", "Resources": [{"StudyInstanceUID": study}],
                   "TargetAet": orthanc.aet, "Synchronous": True})


# -- C-GET ---------------------------------------------------------------------------------------
def test_getscu_retrieves_on_the_same_association(stored, tmp_path):
    gw, files = stored()
    study = str(dcmread(files["dx"], stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "got"
    out.mkdir()
    result = _run(dcmtk_tool("getscu"), "-S", "-aet", "GETTER", "-aec", "RADGUARD", "-od",
                  out, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                  "127.0.0.1", gw.dicom.port)
    assert result.returncode == 0, result.stderr
    got = _received(out)
    assert set(got) == {_uid(p) for p in files.values()}
    assert dcmread(out / next(p.name for p in out.iterdir()
                              if _uid(p) == _uid(files["mr"]))).PixelData == \
        dcmread(files["mr"]).PixelData
    # JPEG-LS proposed: the stored bytes as they are
    out2 = tmp_path / "got2"
    out2.mkdir()
    result = _run(dcmtk_tool("getscu"), "-S", "+xt", "-aet", "GETTER", "-aec", "RADGUARD",
                  "-od", out2, "-k", "QueryRetrieveLevel=IMAGE", "-k",
                  f"StudyInstanceUID={study}", "-k", f"SOPInstanceUID={_uid(files['jls'])}",
                  "127.0.0.1", gw.dicom.port)
    assert result.returncode == 0, result.stderr
    assert _received(out2) == {_uid(files["jls"]): "1.2.840.10008.1.2.4.80"}


# -- Storage Commitment --------------------------------------------------------------------------
@pytest.fixture
def door(tmp_path):
    """A DICOM port over a store with no checks running: what is stored stays queued until
    the test decides it (set_state)."""
    servers = []

    def start(**dicom: object) -> tuple[DicomServer, Store]:
        settings = {f"dicom_{k}": v for k, v in dicom.items()}
        config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                               **settings).validate()
        store = Store(tmp_path / "data")
        audits: list[tuple[str, str, dict]] = []
        server = DicomServer(config, store, audit=lambda *a: audits.append(a))
        server.audits = audits
        server.start()
        servers.append(server)
        return server, store

    yield start
    for server in servers:
        server.stop()


def _audited(server: DicomServer, action: str, timeout: float = 15) -> tuple:
    """The one audit entry ``action`` of ``server``, once written."""
    deadline = time.monotonic() + timeout
    while not any(a[0] == action for a in server.audits):
        assert time.monotonic() < deadline, f"no {action} audit entry"
        time.sleep(0.05)
    [entry] = [a for a in server.audits if a[0] == action]
    return entry


def _set_state(store: Store, sop_uid: str, state: str) -> None:
    with store.transaction():
        store.execute("UPDATE instances SET state=? WHERE sop_uid=?", (state, sop_uid))


def _commit_request(*refs: tuple[str, str]) -> Dataset:
    from pydicom.sequence import Sequence

    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for sop_class, uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, uid
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return ds


def _committer(reports: list[Dataset], got: threading.Event):
    from pynetdicom import AE, evt

    def on_report(event):
        reports.append((event.request.EventTypeID, event.event_information))
        got.set()
        return 0x0000, None

    ae = AE(ae_title="COMMITTER")
    ae.add_requested_context(COMMITMENT)
    return ae, [(evt.EVT_N_EVENT_REPORT, on_report)]


def test_storage_commitment_waits_for_the_checks_on_the_same_association(door, tmp_path):
    server, store = door(commitment_timeout=30)
    files = _study(tmp_path / "in", "COMMIT")
    _storescu(server.port, files["dx"], files["mr"])
    dx, mr = (dcmread(files[k], stop_before_pixels=True) for k in ("dx", "mr"))
    reports: list = []
    got = threading.Event()
    ae, handlers = _committer(reports, got)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="RADGUARD", evt_handlers=handlers)
    assert assoc.is_established
    missing = generate_uid()
    request = _commit_request((dx.SOPClassUID, dx.SOPInstanceUID),
                              (mr.SOPClassUID, mr.SOPInstanceUID), (dx.SOPClassUID, missing),
                              (mr.SOPClassUID, dx.SOPInstanceUID))  # wrong class
    status, _ = assoc.send_n_action(request, 1, COMMITMENT, COMMITMENT_INSTANCE)
    assert status.Status == 0x0000
    assert not got.wait(1.5)  # both still queued: no answer yet
    _set_state(store, str(dx.SOPInstanceUID), "done")
    _set_state(store, str(mr.SOPInstanceUID), "quarantined")  # kept too: committed
    assert got.wait(10)
    [(event_type, info)] = reports
    assert event_type == 2 and info.TransactionUID == request.TransactionUID
    assert {str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence} == \
        {str(dx.SOPInstanceUID), str(mr.SOPInstanceUID)}
    failures = {(str(i.ReferencedSOPInstanceUID), int(i.FailureReason))
                for i in info.FailedSOPSequence}
    assert failures == {(missing, 0x0112), (str(dx.SOPInstanceUID), 0x0119)}
    assoc.release()
    # all kept: event type 1; a rejected one is a processing failure
    reports.clear()
    got.clear()
    assoc = ae.associate("127.0.0.1", server.port, ae_title="RADGUARD", evt_handlers=handlers)
    status, _ = assoc.send_n_action(_commit_request((dx.SOPClassUID, dx.SOPInstanceUID)), 1,
                                    COMMITMENT, COMMITMENT_INSTANCE)
    assert got.wait(10) and reports[0][0] == 1
    reports.clear()
    got.clear()
    _set_state(store, str(mr.SOPInstanceUID), "rejected")
    assoc.send_n_action(_commit_request((mr.SOPClassUID, mr.SOPInstanceUID)), 1,
                        COMMITMENT, COMMITMENT_INSTANCE)
    assert got.wait(10)
    [(event_type, info)] = reports
    assert event_type == 2 and int(info.FailedSOPSequence[0].FailureReason) == 0x0110
    assoc.release()


def test_storage_commitment_after_release_goes_to_the_requesters_destination(door, tmp_path):
    from pynetdicom import AE, evt

    reports: list = []
    got = threading.Event()

    def on_report(event):
        reports.append((event.request.EventTypeID, event.event_information,
                        event.assoc.requestor.ae_title))
        got.set()
        return 0x0000, None

    listener = AE(ae_title="COMMITTER")
    listener.add_supported_context(COMMITMENT, scu_role=True, scp_role=True)
    port = _free_port()
    scp = listener.start_server(("127.0.0.1", port), block=False,
                                evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        server, store = door(commitment_timeout=30,
                             destinations={"COMMITTER": f"127.0.0.1:{port}"})
        files = _study(tmp_path / "in", "COMMIT2")
        _storescu(server.port, files["dx"])
        dx = dcmread(files["dx"], stop_before_pixels=True)
        ae = AE(ae_title="COMMITTER")
        ae.add_requested_context(COMMITMENT)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="RADGUARD")
        request = _commit_request((dx.SOPClassUID, dx.SOPInstanceUID))
        status, _ = assoc.send_n_action(request, 1, COMMITMENT, COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        assoc.release()
        _set_state(store, str(dx.SOPInstanceUID), "done")
        assert got.wait(15)
        [(event_type, info, caller)] = reports
        assert event_type == 1 and info.TransactionUID == request.TransactionUID
        assert caller == "RADGUARD"
        entry = _audited(server, "dimse.commitment")
        assert entry[2]["delivered"] == "new association to COMMITTER"
    finally:
        scp.shutdown()


def test_storage_commitment_times_out_and_an_unknown_requester_is_audited(door, tmp_path):
    from pynetdicom import AE

    server, store = door(commitment_timeout=1)
    files = _study(tmp_path / "in", "COMMIT3")
    _storescu(server.port, files["dx"])  # stays queued: never checked in time
    dx = dcmread(files["dx"], stop_before_pixels=True)
    ae = AE(ae_title="SOMEONE")
    ae.add_requested_context(COMMITMENT)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="RADGUARD")
    status, _ = assoc.send_n_action(_commit_request((dx.SOPClassUID, dx.SOPInstanceUID)), 1,
                                    COMMITMENT, COMMITMENT_INSTANCE)
    assert status.Status == 0x0000
    assoc.release()
    entry = _audited(server, "dimse.commitment")
    assert entry[2]["delivered"] == "no" and entry[2]["unchecked"] == 1
    # a bad N-ACTION is refused at once, with a reason
    assoc = ae.associate("127.0.0.1", server.port, ae_title="RADGUARD")
    no_references = Dataset()
    no_references.TransactionUID = generate_uid()
    status, _ = assoc.send_n_action(no_references, 1, COMMITMENT, COMMITMENT_INSTANCE)
    assert status.Status == 0x0120 and "Referenced SOP Sequence" in status.ErrorComment
    status, _ = assoc.send_n_action(_commit_request((dx.SOPClassUID, dx.SOPInstanceUID)), 2,
                                    COMMITMENT, COMMITMENT_INSTANCE)
    assert status.Status == 0x0123 and status.ErrorComment
    assoc.release()


# -- Error Comment on C-STORE refusals -----------------------------------------------------------
def test_c_store_refusals_say_why(door):
    from pynetdicom import AE

    server, _ = door()
    ae = AE(ae_title="FUZZ")
    ds = dcmread(NIH_DX)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="RADGUARD")
    ds.PixelData = ds.PixelData[:1000]
    status = assoc.send_c_store(ds)
    assert status.Status == 0xC000
    comment = str(status.ErrorComment)
    assert comment and len(comment) <= 64 and comment.isascii() and "\\" not in comment
    assert "pixel" in comment.lower() or "malformed" in comment.lower(), comment
    assoc.release()


# -- cancel, roles -------------------------------------------------------------------------------
def test_c_cancel_ends_a_c_find_with_fe00(stored):
    from pynetdicom.dsutils import encode

    from radguard.gateway.acceptor import encode_command, parse_command
    from tests.gateway.test_acceptor import _established, _p_data_pdu, _pdv, _read_pdu

    gw, _ = stored()
    sock = _established(gw.dicom.port, contexts=((1, STUDY_FIND),), calling="FINDER")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    find = encode_command({0x0002: STUDY_FIND, 0x0100: 0x0020, 0x0110: 5, 0x0700: 0,
                           0x0800: 0x0001})
    cancel = encode_command({0x0100: 0x0FFF, 0x0120: 5, 0x0800: 0x0101})
    sock.sendall(_p_data_pdu(_pdv(1, 0x03, find)) +
                 _p_data_pdu(_pdv(1, 0x02, encode(query, False, True))) +
                 _p_data_pdu(_pdv(1, 0x03, cancel)))  # before any answer was read
    statuses = []
    while not statuses or statuses[-1] == 0xFF00:
        kind, body = _read_pdu(sock)
        assert kind == 4
        if body[5] & 0x01:  # a command
            command = parse_command(body[6:])
            statuses.append(int.from_bytes(command[0x0900], "little"))
    assert statuses[-1] == 0xFE00
    sock.close()


def test_quarantined_instances_only_for_quarantine_viewers(stored):
    from pynetdicom import AE

    gw, files = stored(quarantine_viewers=["ADMIN_WS"])
    held = _uid(files["mr"])
    with gw.store.transaction():
        gw.store.execute("UPDATE instances SET state='quarantined' WHERE sop_uid=?", (held,))
    study = str(dcmread(files["dx"], stop_before_pixels=True).StudyInstanceUID)

    def image_uids(calling: str) -> set[str]:
        ae = AE(ae_title=calling)
        ae.add_requested_context(STUDY_FIND)
        assoc = ae.associate("127.0.0.1", gw.dicom.port, ae_title="RADGUARD")
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = ""
        found = {str(ds.SOPInstanceUID) for status, ds in assoc.send_c_find(query, STUDY_FIND)
                 if status and status.Status == 0xFF00}
        assoc.release()
        return found

    everything = {_uid(p) for p in files.values()}
    assert image_uids("VIEWER") == everything - {held}
    assert image_uids("ADMIN_WS") == everything


def test_nobody_queries_unless_listed_and_a_listed_title_must_come_from_its_address(
        gateway, tmp_path):
    """The port is write-only by default (a listed AE title is whatever the peer says: an
    "AE@address" entry binds it to where it must come from)."""
    from pynetdicom import AE

    def status(gw: Gateway, calling: str) -> int:
        ae = AE(ae_title=calling)
        ae.add_requested_context(STUDY_FIND)
        assoc = ae.associate("127.0.0.1", gw.dicom.port, ae_title="RADGUARD")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        [(answer, _)] = list(assoc.send_c_find(query, STUDY_FIND))
        assoc.release()
        return int(answer.Status)

    gw = gateway(query_callers=[])
    assert status(gw, "FINDER") == 0x0124  # nobody by default
    gw.stop()
    gw = gateway(query_callers=["FINDER@10.9.9.9", "LOCAL@127.0.0.0/8"])
    assert status(gw, "FINDER") == 0x0124  # the right title from the wrong address
    assert status(gw, "LOCAL") == 0x0000


def test_a_quarantine_viewer_cannot_move_quarantined_instances_elsewhere(stored, storescp):
    """Looking at a quarantined object is a viewer's; pushing it into another system would
    bypass the release decision."""
    port, folder = storescp()
    gw, files = stored(destinations={"STORESCP": f"127.0.0.1:{port}"},
                       quarantine_viewers=["MOVER"])
    held = _uid(files["mr"])
    with gw.store.transaction():
        gw.store.execute("UPDATE instances SET state='quarantined' WHERE sop_uid=?", (held,))
    study = str(dcmread(files["dx"], stop_before_pixels=True).StudyInstanceUID)
    assert _movescu(gw.dicom.port, "STORESCP", study).returncode == 0
    assert held not in set(_received(folder)) and len(_received(folder)) == 2


def test_a_failed_sub_operation_gives_b000_with_its_uid(stored, storescp):
    from pynetdicom import AE

    port, folder = storescp()
    gw, files = stored(destinations={"STORESCP": f"127.0.0.1:{port}"})
    lost = next(i for i in gw.store.instances() if i.sop_uid == _uid(files["mr"]))
    gw.store.file(lost).unlink()  # the disk lost it: that sub-operation fails
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(STUDY_MOVE)
    assoc = ae.associate("127.0.0.1", gw.dicom.port, ae_title="RADGUARD")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = str(dcmread(files["dx"], stop_before_pixels=True)
                                      .StudyInstanceUID)
    responses = list(assoc.send_c_move(identifier, "STORESCP", STUDY_MOVE))
    assoc.release()
    pending = [s for s, _ in responses if s.Status == 0xFF00]
    assert [int(s.NumberOfRemainingSuboperations) for s in pending] == [2, 1, 0]
    status, failed = responses[-1]
    assert status.Status == 0xB000 and status.ErrorComment
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (2, 1)
    assert list(failed.FailedSOPInstanceUIDList) == [lost.sop_uid] or \
        failed.FailedSOPInstanceUIDList == lost.sop_uid
    assert set(_received(folder)) == {_uid(files["dx"]), _uid(files["jls"])}
