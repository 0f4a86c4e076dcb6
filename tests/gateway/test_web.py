"""The HTTP side over real sockets: auth on every route, STOW in, QIDO/WADO out, the UI,
quarantine decisions, hostile requests, the bulk-read alarm."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from pydicom.uid import generate_uid

from radguard.dicom.io import read_dataset, write_dataset
from radguard.dicom.web import DicomWebClient, split_multipart
from radguard.gateway import Gateway, GatewayConfig
from radguard.gateway.auth import Users
from tests.conftest import NIH_DX
from tests.gateway.conftest import PASSWORD, web_gateway


@pytest.fixture
def gateway(tmp_path, pki):
    gw = web_gateway(tmp_path / "data", trust=[str(pki.ca_cert_path)])
    yield gw
    gw.stop()


def _call(gw, method: str, path: str, token: str | None = None, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes, httpx.Headers]:
    """One request with httpx (redirects not followed)."""
    head = dict(headers or {})
    if token:
        head["Authorization"] = f"Bearer {token}"
    resp = httpx.request(method, f"http://127.0.0.1:{gw.http_port}{path}", content=body,
                         headers=head, timeout=60, trust_env=False)
    return resp.status_code, resp.content, resp.headers


def _raw_get(gw, path: str, token: str) -> tuple[int, bytes]:
    """A GET whose path is sent byte for byte (httpx would resolve ``..`` first)."""
    sock = socket.create_connection(("127.0.0.1", gw.http_port), timeout=60)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    finally:
        sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _instance(tmp_path, name: str, **changes) -> bytes:
    ds = read_dataset(NIH_DX)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_dataset(ds, tmp_path / name)
    return (tmp_path / name).read_bytes()


ROUTES = [("GET", "/"), ("GET", "/quarantine"), ("GET", "/audit"),
          ("GET", "/dicom-web/studies"), ("GET", "/dicom-web/instances"),
          ("GET", "/dicom-web/studies/1.2.3"), ("GET", "/dicom-web/studies/1.2/series"),
          ("GET", "/dicom-web/studies/1.2/series/1.3/instances"),
          ("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4"),
          ("POST", "/dicom-web/studies"), ("GET", "/studies/1.2.3"),
          ("GET", "/instances/1/image.png"), ("POST", "/quarantine/1/release"),
          ("GET", "/calibration"), ("POST", "/logout")]


def test_every_route_needs_a_token_and_the_right_role(gateway):
    for method, path in ROUTES:
        status, _, headers = _call(gateway, method, path, body=b"" if method == "POST" else None)
        assert status == 401, (method, path, status)
        assert "Bearer" in headers.get("www-authenticate", "")
        status, _, _ = _call(gateway, method, path, token="not-a-token",
                             body=b"" if method == "POST" else None)
        assert status == 401, (method, path)
    wrong = {"/": "tech", "/audit": "rad", "/dicom-web/studies": "aud", "/calibration": "tech",
             "/quarantine/1/release": "rad"}
    for path, who in wrong.items():
        method = "POST" if "release" in path else "GET"
        status, _, _ = _call(gateway, method, path, gateway.tokens[who],
                             body=b"note=x" if method == "POST" else None)
        assert status == 403, (path, who, status)
    status, _, _ = _call(gateway, "POST", "/dicom-web/studies", gateway.tokens["rad"],
                         body=b"x", headers={"Content-Type": "multipart/related; boundary=b"})
    assert status == 403  # radiologists read, they do not send


def test_login_and_token_endpoint(gateway):
    body = json.dumps({"user": "rad", "password": PASSWORD}).encode()
    status, data, _ = _call(gateway, "POST", "/auth/token", body=body)
    assert status == 200 and json.loads(data)["token"]
    status, _, _ = _call(gateway, "POST", "/auth/token",
                         body=json.dumps({"user": "rad", "password": "wrong-password"}).encode())
    assert status == 401
    status, _, headers = _call(gateway, "POST", "/login",
                               body=f"user=rad&password={PASSWORD.replace(' ', '+')}".encode(),
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303 and "radguard_session=" in headers.get("set-cookie", "")
    assert "HttpOnly" in headers["set-cookie"]
    status, _, headers = _call(gateway, "GET", "/", headers={"Accept": "text/html"})
    assert status == 303 and headers["location"] == "/login"  # browsers go to the login page
    actions = [e.action for e in gateway.audit_log.entries()]
    assert "auth.failed" in actions and "auth.login" in actions


def test_stow_qido_wado_and_the_worklist(gateway, tmp_path):
    client = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",
                            token=gateway.tokens["tech"])
    good = _instance(tmp_path, "a.dcm")
    synthetic = _instance(tmp_path, "b.dcm", SyntheticData="YES")
    answer = json.loads(client.store([good, synthetic]))
    assert len(answer["00081199"]["Value"]) == 2
    assert gateway.wait_idle(60)
    reader = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",
                            token=gateway.tokens["rad"])
    refs = list(reader.search_instances())
    assert len(refs) == 1  # the synthetic one was refused into the clinical store
    assert reader.retrieve(refs[0]) == good
    status, data, headers = _call(gateway, "GET", f"/dicom-web/studies/{refs[0].study}",
                                  gateway.tokens["rad"])
    assert status == 200 and len(split_multipart(data, headers["content-type"])) == 1
    status, page, _ = _call(gateway, "GET", "/", gateway.tokens["rad"])
    assert status == 200 and b'id="worklist"' in page and refs[0].study.encode() in page
    # unsigned, from a source nobody calibrated: on the worklist, not judged, not accused
    assert b'class="badge unverified" data-verdict="unverifiable"' in page
    status, png, _ = _call(gateway, "GET", "/instances/1/image.png", gateway.tokens["rad"])
    assert status == 200 and png[:4] == b"\x89PNG"
    status, page, _ = _call(gateway, "GET", "/quarantine", gateway.tokens["boss"])
    assert status == 200 and b"rejected" in page


def test_quarantine_release_is_recorded_with_who_and_why(gateway, tmp_path, pki):
    from radguard.provenance.sign import sign_file

    src = tmp_path / "s.dcm"
    src.write_bytes(_instance(tmp_path, "u.dcm"))
    sign_file(src, tmp_path / "signed.dcm", pki.signer)
    ds = read_dataset(tmp_path / "signed.dcm")
    ds.PatientName = "Someone^Else"
    write_dataset(ds, tmp_path / "tampered.dcm")
    client = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",
                            token=gateway.tokens["tech"])
    client.store([(tmp_path / "tampered.dcm").read_bytes()])
    assert gateway.wait_idle(60)
    row = gateway.store.instances("state='quarantined'")[0]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, _ = _call(gateway, "POST", f"/quarantine/{row.id}/release",
                         gateway.tokens["boss"], body=b"note=", headers=form)
    assert status == 400  # a decision needs a reason
    status, _, _ = _call(gateway, "POST", f"/quarantine/{row.id}/release",
                         gateway.tokens["boss"], body=b"note=checked+with+the+modality",
                         headers=form)
    assert status == 303
    released = gateway.store.get(row.id)
    assert released.state == "done" and released.decided_by == "boss"
    assert released.decision_note == "checked with the modality"
    entry = [e for e in gateway.audit_log.entries() if e.action == "quarantine.release"][0]
    assert entry.actor == "boss" and entry.details["note"] == "checked with the modality"
    status, _, _ = _call(gateway, "POST", f"/quarantine/{row.id}/release",
                         gateway.tokens["boss"], body=b"note=again", headers=form)
    assert status == 409  # no longer in quarantine


@pytest.mark.parametrize("body,ctype", [
    (b"garbage", "multipart/related; boundary=x"),
    (b"--x\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--x--",
     "multipart/related; boundary=x"),
    (b"{}", "application/json"),
    (b"--x\r\nContent-Type: text/plain\r\n\r\nhello\r\n--x--", "multipart/related; boundary=x"),
])
def test_malformed_stow_is_refused_and_stores_nothing(gateway, body, ctype):
    status, _, _ = _call(gateway, "POST", "/dicom-web/studies", gateway.tokens["tech"],
                         body=body, headers={"Content-Type": ctype})
    assert status in (400, 409)
    assert gateway.store.instances() == []


def test_path_traversal_and_huge_bodies(gateway, monkeypatch):
    for path in ("/dicom-web/studies/..%2F..%2Fetc%2Fpasswd",
                 "/dicom-web/studies/1.2/series/..%2F..%2Fradguard.db/instances",
                 "/instances/..%2Fradguard.db/image.png", "/static/../../radguard.db",
                 "/dicom-web/studies/1.2.3;DROP TABLE instances"):
        status, data = _raw_get(gateway, path.replace(" ", "%20"), gateway.tokens["rad"])
        assert status in (400, 404, 422), (path, status)
        assert b"SQLite" not in data
    # a declared body larger than the limit is refused before it is read
    sock = socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10)
    sock.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + gateway.tokens["tech"].encode() + b"\r\nContent-Type: multipart/related; "
                 b"boundary=x\r\nContent-Length: 99999999999\r\n\r\n")
    reply = sock.recv(200)
    sock.close()
    assert b" 413 " in reply
    assert gateway.store.instances() == []


def test_bulk_reads_raise_an_alarm(tmp_path):
    gw = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                               bulk_read_limit=2))
    users = Users(gw.store)
    users.add("tech", "technologist", PASSWORD)
    users.add("rad", "radiologist", PASSWORD)
    gw.start()
    try:
        root = f"http://127.0.0.1:{gw.http_port}/dicom-web/"
        DicomWebClient(root, token=users.issue_token("tech")).store(
            [_instance(tmp_path, "a.dcm")])
        assert gw.wait_idle(60)
        reader = DicomWebClient(root, token=users.issue_token("rad"))
        ref = next(iter(reader.search_instances()))
        for _ in range(5):
            reader.retrieve(ref)
    finally:
        gw.stop()
    alarms = [e for e in gw.audit_log.entries() if e.action == "alarm.bulk_read"]
    assert len(alarms) == 1 and alarms[0].target == "rad"  # once per window
    assert len([e for e in gw.audit_log.entries() if e.action == "http.access"]) >= 7


def test_calibration_page_lists_each_source_and_its_known_real_images(gateway, tmp_path,
                                                                     pki):
    from radguard.provenance.sign import sign_file

    (tmp_path / "plain.dcm").write_bytes(_instance(tmp_path, "plain.dcm"))
    sign_file(tmp_path / "plain.dcm", tmp_path / "signed.dcm", pki.signer)
    client = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",
                            token=gateway.tokens["tech"])
    client.store([(tmp_path / "signed.dcm").read_bytes()])
    assert gateway.wait_idle(60)
    status, page, _ = _call(gateway, "GET", "/calibration", gateway.tokens["rad"])
    assert status == 200 and b'id="calibration"' in page
    rows = [line for line in page.decode().splitlines() if 'data-source="stow:tech/DX"' in line]
    assert len(rows) == 2  # one per detector
    assert "not calibrated" in rows[0] and "<td>1</td>" in rows[0]
    assert "not judged" in rows[0]


def test_health_answers_a_load_balancer_without_a_login(gateway):
    """GET /health (issue 29): no token needed, 200 while the gateway takes images, 503 with
    the reason while it cannot (here: the store cannot be written), nothing cached."""
    status, body, headers = _call(gateway, "GET", "/health")
    assert status == 200 and headers["cache-control"] == "no-store"
    assert json.loads(body) == {"status": "ready", "gateway": gateway.gateway_id}
    gateway.store.health.failed(OSError(28, "No space left on device"))
    status, body, _ = _call(gateway, "GET", "/health")
    answer = json.loads(body)
    assert status == 503 and answer["status"] == "unavailable"
    assert answer["problem"] == "the store cannot be written"  # no details without a login
    gateway.store.health.worked()
    assert _call(gateway, "GET", "/health")[0] == 200


# -- issue 27: pages for browsers, JSON for programs; the study page as a radiologist reads it

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def _main(page: bytes) -> str:
    """The page's <main> (what a person reads)."""
    text = page.decode()
    return text[text.index("<main>"):text.index("</main>")]


def test_a_wrong_password_shows_the_login_page_again(gateway):
    form = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
    status, page, headers = _call(gateway, "POST", "/login", headers=form,
                                  body=b"user=%3Cscript%3Erad&password=wrong")
    assert status == 401 and headers["content-type"].startswith("text/html")
    main = _main(page)
    assert 'role="alert">wrong user name or password</p>' in main
    assert 'value="&lt;script&gt;rad"' in main and "<script>" not in page.decode()
    assert '"error"' not in main and 'type="password"' in main
    # a form that is not UTF-8: the login page with the reason, not JSON
    status, page, _ = _call(gateway, "POST", "/login", headers=form,
                            body=b"user=rad&password=\xff")
    assert status == 400 and "form is not UTF-8" in _main(page)
    # a program asking for a token keeps its JSON
    status, data, _ = _call(gateway, "POST", "/auth/token",
                            headers={"Accept": "application/json"},
                            body=json.dumps({"user": "rad", "password": "x"}).encode())
    assert status == 401 and json.loads(data) == {"error": "wrong user name or password"}


def test_errors_are_pages_for_browsers_and_json_for_programs(gateway):
    rad = {"Authorization": f"Bearer {gateway.tokens['rad']}"}
    cases = [("/studies/1.2.3", 404, "no such study", {"error": "no such study"}),
             ("/audit", 403, "role radiologist may not do this",
              {"error": "role radiologist may not do this"}),
             ("/no-such-page", 404, "there is no such page", {"detail": "Not Found"}),
             ("/instances/abc/image.png", 422, "invalid request: path.instance_id", None),
             ("/instances/99/saliency.png", 404, "no such instance",
              {"error": "no such instance"})]
    for path, code, words, answer in cases:
        status, page, headers = _call(gateway, "GET", path, headers={**BROWSER, **rad})
        assert status == code and headers["content-type"].startswith("text/html"), path
        main = _main(page)
        assert f'data-status="{code}"' in main and words in main, path
        assert "{" not in main and "Traceback" not in main
        for accept in ({}, {"Accept": "application/json"}, {"Accept": "*/*"}):
            status, data, headers = _call(gateway, "GET", path, headers={**accept, **rad})
            assert status == code and headers["content-type"] == "application/json", path
            if answer is not None:
                assert json.loads(data) == answer
    # DICOMweb and WADO-URI answer JSON even to a browser, exactly as before
    for path in ("/dicom-web/studies/1.2.3", "/dicom-web/no-such", "/wado?requestType=x"):
        status, data, headers = _call(gateway, "GET", path, headers={**BROWSER, **rad})
        assert headers["content-type"] == "application/json", path
        json.loads(data)
    # not signed in: a browser is still sent to the login page
    status, _, headers = _call(gateway, "GET", "/studies/1.2.3", headers=BROWSER)
    assert status == 303 and headers["location"] == "/login"


def test_study_page_reads_like_a_report(tmp_path, pki):
    """The AI result as probability, suspicion, operating point, model and version; the
    triage model's saliency map beside the image (the reader studies' overlay); the
    forensic evidence map only for an image not judged authentic; "not scored" with the
    reason; no None anywhere."""
    from radguard.provenance.sign import sign_file

    gw = web_gateway(tmp_path / "data", trust=[str(pki.ca_cert_path)],
                     triage={"DX": "chest"})
    try:
        study = generate_uid()
        plain = _instance(tmp_path, "plain.dcm", StudyInstanceUID=study)
        synthetic = _instance(tmp_path, "synthetic.dcm", StudyInstanceUID=study,
                              SyntheticData="YES")
        sign_file(tmp_path / "plain.dcm", tmp_path / "signed.dcm", pki.signer)
        ds = read_dataset(tmp_path / "signed.dcm")
        ds.PatientName = "Someone^Else"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        write_dataset(ds, tmp_path / "tampered.dcm")
        DicomWebClient(f"http://127.0.0.1:{gw.http_port}/dicom-web/",
                       token=gw.tokens["tech"]).store(
            [plain, synthetic, (tmp_path / "tampered.dcm").read_bytes()])
        assert gw.wait_idle(120)
        rows = {r.sop_uid: r for r in gw.store.instances()}
        status, page, _ = _call(gw, "GET", f"/studies/{study}", gw.tokens["rad"])
        assert status == 200
        text = page.decode()
        assert "None" not in text and "synthetic score None" not in text
        assert '"probability"' not in text and "{&#34;" not in text  # no JSON blob
        sections = {s.split('data-sop="')[1].split('"')[0]: s
                    for s in text.split('<section class="instance"')[1:]}
        scored = next(r for r in rows.values() if r.ai_probability is not None
                      and r.verdict != "tampered")
        section = sections[scored.sop_uid]
        assert f"suspicion {scored.ai_suspicion}/10" in section
        assert f"probability {scored.ai_probability:.2f}" in section
        assert "high-sensitivity operating point: probability \u2265 0.32" in section
        assert "chest 1.0-cxr-nih" in section  # model and version
        assert f'src="/instances/{scored.id}/saliency.png"' in section
        assert '<details class="saliency" open>' in section  # beside the image, folds away
        assert "forensic evidence map" not in section  # authentic or not judged
        tampered = next(r for r in rows.values() if r.verdict == "tampered")
        assert f'src="/instances/{tampered.id}/image.png?heat=true"' in \
            sections[tampered.sop_uid]
        assert "judged tampered" in sections[tampered.sop_uid]
        rejected = next(r for r in rows.values() if r.state == "rejected")
        assert "not scored</span> the image was rejected before the AI read it" in \
            sections[rejected.sop_uid]
        assert "saliency.png" not in sections[rejected.sop_uid]
        # the overlay is the triage model's saliency map, drawn by the reader studies' code
        status, png, headers = _call(gw, "GET", f"/instances/{scored.id}/saliency.png",
                                     gw.tokens["rad"])
        assert status == 200 and png[:4] == b"\x89PNG"
        status, _, _ = _call(gw, "GET", f"/instances/{rejected.id}/saliency.png",
                             gw.tokens["rad"])
        assert status == 404
        views = [e for e in gw.audit_log.entries() if e.action == "image.view"]
        assert any(e.details.get("saliency") for e in views)
    finally:
        gw.stop()


def test_quarantine_why_is_cut_at_a_word_with_the_whole_reason_in_a_tooltip(gateway,
                                                                            tmp_path):
    reason = ("the image cannot be checked (unreadable pixel data) because the "
              "transfer syntax says JPEG 2000 and the stream ends early")
    client = DicomWebClient(f"http://127.0.0.1:{gateway.http_port}/dicom-web/",
                            token=gateway.tokens["tech"])
    client.store([_instance(tmp_path, "q.dcm", SyntheticData="YES")])
    assert gateway.wait_idle(60)
    row = gateway.store.instances("state='rejected'")[0]
    with gateway.store.transaction():
        gateway.store.execute("UPDATE instances SET details=? WHERE id=?",
                              (json.dumps({**row.detail, "reasons": [reason]}), row.id))
    status, page, _ = _call(gateway, "GET", "/quarantine", gateway.tokens["boss"])
    cell = page.decode().split('<td class="why"')[1].split("</td>")[0]
    assert f'title="{reason}"' in cell
    shown = cell.split(">", 1)[1]
    assert shown.endswith("\u2026") and len(shown) <= 100
    assert reason.startswith(shown[:-1]) and reason[len(shown) - 1] == " "  # a whole word
