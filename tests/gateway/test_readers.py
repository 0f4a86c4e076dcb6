"""Reader studies and deepfake-awareness rounds in the browser UI, over real sockets (httpx
against a running gateway): design, counterbalanced crossover reading in randomised order,
the MRMC analysis, blinding and isolation of readers, resume after a restart, hostile
input, and an awareness round with feedback, a Wilson CI and a held-out generator."""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse

import httpx
import pytest
from pydicom.uid import generate_uid

from radguard.dicom.io import read_dataset, write_dataset
from radguard.dicom.web import DicomWebClient
from radguard.gateway.auth import Users
from radguard.gateway.readers import wilson
from tests.conftest import NIH_DX, SHARED
from tests.gateway.conftest import PASSWORD, web_gateway

PATIENT = "Secretname^Patricia"
PATIENT_ID = "PID-7781234"


def client(gw, token: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=120,
                        trust_env=False,
                        headers={"Authorization": f"Bearer {token}"} if token else {})


def form(pairs: list[tuple[str, str]] | dict[str, str]) -> dict[str, object]:
    return {"content": urllib.parse.urlencode(pairs),
            "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


def start(data, monkeypatch, images, pool=None, db_url=None, **settings):
    settings["readers_image_root"] = str(images)
    if pool is not None:
        settings["readers_awareness_pool"] = str(pool)
    gw = web_gateway(data, **({"db_url": db_url} if db_url else {}), **settings)
    Users(gw.store).add("rad2", "radiologist", PASSWORD)
    gw.tokens["rad2"] = Users(gw.store).issue_token("rad2")
    return gw


def held_instances(gw, tmp_path, count: int) -> list:
    """``count`` DX instances of one patient, stored and checked (clinical)."""
    blobs = []
    for n in range(count):
        ds = read_dataset(NIH_DX)
        ds.PatientName, ds.PatientID = PATIENT, PATIENT_ID
        ds.StudyInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        write_dataset(ds, tmp_path / f"i{n}.dcm")
        blobs.append((tmp_path / f"i{n}.dcm").read_bytes())
    DicomWebClient(f"http://127.0.0.1:{gw.http_port}/dicom-web/",
                   token=gw.tokens["tech"]).store(blobs)
    assert gw.wait_idle(120)
    rows = gw.store.clinical_instances()
    assert len(rows) == count
    return rows


def image_folder(tmp_path):
    """Three real chest radiographs in a folder under the image root."""
    root = tmp_path / "images"
    (root / "set1").mkdir(parents=True)
    sources = sorted((SHARED / "cxr-kermany" / "images").glob("*.jpg"))[:3]
    for src in sources:
        shutil.copy(src, root / "set1" / src.name)
    (tmp_path / "outside.png").write_bytes(sources[0].read_bytes())
    return root, [s.name for s in sources]


def create_study(gw, rows, files, *, washout="0", readers=("rad", "rad2"), name="Pneumonia"):
    """Three held instances (truth 1, 0, 1) and three files (truth 0, 1, 0)."""
    pairs = [("name", name), ("arm_a", "unaided"), ("arm_b", "AI-aided"), ("aided_b", "1"),
             ("scale", "confidence"), ("washout_days", washout), ("folder", "set1"),
             ("case_list", "case,truth\n" + "\n".join(f"{f},{t}" for f, t in
                                                      zip(files, (0, 1, 0), strict=True))),
             (f"truth_{rows[0].id}", "1"), (f"truth_{rows[1].id}", "0"),
             (f"truth_{rows[2].id}", "1"), *[("reader", r) for r in readers]]
    with client(gw, gw.tokens["boss"]) as admin:
        resp = admin.post("/reader-studies", **form(pairs))
    assert resp.status_code == 303, resp.text
    return int(resp.headers["location"].rsplit("/", 1)[1])


def truth_of(gw, sid: int, reader: str, sess: int, pos: int) -> int:
    return gw.store.execute(
        "SELECT c.truth FROM reader_readings r JOIN reader_cases c ON c.study_id=r.study_id "
        "AND c.num=r.case_num WHERE r.study_id=? AND r.reader=? AND r.sess=? AND r.pos=?",
        (sid, reader, sess, pos)).fetchone()[0]


def read_cases(gw, sid: int, reader: str, count: int, pages: list[str], *, skill: int
               ) -> None:
    """Read ``count`` cases as ``reader`` (bearer token), collecting every page and answer
    body the reader got; ratings follow the truth except for the ``skill``-th case."""
    with client(gw, gw.tokens[reader]) as c:
        for n in range(count):
            resp = c.get(f"/reading/{sid}")
            assert resp.status_code == 303, resp.text
            where = resp.headers["location"]
            _, _, _, sess, pos = where.split("/")
            page = c.get(where)
            assert page.status_code == 200
            pages.append(page.text)
            assert re.search(rf"Case {pos} of 6", page.text)
            image = c.get(where + "/image.png?v=0")
            assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
            if 'alt="AI saliency map"' in page.text:  # the overlay differs from the image
                overlay = c.get(where + "/image.png?heat=true")
                assert overlay.status_code == 200 and overlay.content[:4] == b"\x89PNG"
                assert overlay.content != image.content
            if n == 0:  # one window/level change, recorded with the reading
                assert c.post(where + "/window", **form({"preset": "lung"})).status_code == 303
                lung = c.get(where + "/image.png?v=1").content
                assert lung != image.content
            truth = truth_of(gw, sid, reader, int(sess), int(pos))
            diseased = truth if n != skill else 1 - truth
            confidence = 2 + (n % 3)
            resp = c.post(where + "/rate", **form({"diseased": str(diseased),
                                                   "confidence": str(confidence)}))
            assert resp.status_code == 303, resp.text
            pages.append(resp.text)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """None (the embedded SQLite) or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return None
    from tests.governance.pgdb import fresh_database

    return fresh_database(request.getfixturevalue("postgres_url"))


def test_two_readers_read_a_two_arm_crossover_study(tmp_path, monkeypatch, db_url):
    images, files = image_folder(tmp_path)
    gw = start(tmp_path / "data", monkeypatch, images, db_url=db_url)
    try:
        rows = held_instances(gw, tmp_path, 3)
        uids = {r.sop_uid for r in rows} | {r.study_uid for r in rows}
        with client(gw, gw.tokens["boss"]) as admin:
            page = admin.get("/reader-studies/new")
            assert page.status_code == 200 and PATIENT in page.text  # the admin chooses
            # a folder outside the root is refused, and so is a case leaving the folder
            for bad in ({"folder": "../"}, {"folder": "/etc"},
                        {"folder": "set1", "case_list": "../../outside.png,1"}):
                resp = admin.post("/reader-studies", **form({
                    "name": "x", "arm_a": "a", "arm_b": "b", "reader": "rad", **bad}))
                assert resp.status_code == 400, (bad, resp.text)
        assert gw.store.execute("SELECT COUNT(*) FROM reader_studies").fetchone()[0] == 0
        sid = create_study(gw, rows, files)
        created = [e for e in gw.audit_log.entries() if e.action == "reader_study.create"]
        assert len(created) == 1 and created[0].actor == "boss"
        assert created[0].details["cases"] == 6 and created[0].details["readers"] == [
            "rad", "rad2"]

        # counterbalanced crossover, and a stored random order per reader and session
        arms = dict(gw.store.execute("SELECT reader, arm FROM reader_sessions WHERE "
                                     "study_id=? AND sess=1", (sid,)).fetchall())
        assert arms == {"rad": "unaided", "rad2": "AI-aided"}
        orders = {(r, s): json.loads(o) for r, s, o in gw.store.execute(
            "SELECT reader, sess, case_order FROM reader_sessions WHERE study_id=?",
            (sid,)).fetchall()}
        assert all(sorted(o) == [1, 2, 3, 4, 5, 6] for o in orders.values())
        assert orders[("rad", 1)] != orders[("rad2", 1)]
        assert len({tuple(o) for o in orders.values()}) >= 3

        pages: list[str] = []
        read_cases(gw, sid, "rad", 6, pages, skill=1)  # session 1 ...
        read_cases(gw, sid, "rad", 2, pages, skill=9)  # ... and 2 of session 2 (wash-out 0)
        with client(gw, gw.tokens["boss"]) as admin:
            page = admin.get(f"/reader-studies/{sid}")
            assert "8 of 6" not in page.text and "AI-aided: 2 of 6" in page.text
            assert admin.get(f"/reader-studies/{sid}/analysis.json").status_code == 409

        # hostile input: nothing of it is recorded
        rated = "SELECT COUNT(*) FROM reader_readings WHERE rated_at IS NOT NULL"
        before = gw.store.execute(rated).fetchone()[0]
        with client(gw, gw.tokens["rad"]) as c:
            where = c.get(f"/reading/{sid}").headers["location"]
            assert where == f"/reading/{sid}/2/3"
            c.get(where)
            for bad in ({"diseased": "1", "confidence": "7"},
                        {"diseased": "1", "confidence": "0"},
                        {"diseased": "2", "confidence": "3"},
                        {"diseased": "1", "confidence": "nan"},
                        {"diseased": "1"}):
                resp = c.post(where + "/rate", **form(bad))
                assert resp.status_code == 400 and "error" in resp.json(), bad
            for path in (f"/reading/{sid}/2/7", f"/reading/{sid}/2/0", f"/reading/{sid}/3/1",
                         f"/reading/{sid}/2/99999999999999999999"):
                assert c.get(path).status_code in (404, 422), path
                resp = c.post(path + "/rate", **form({"diseased": "1", "confidence": "3"}))
                assert resp.status_code in (404, 422), path
            # a case that is not the reader's next one (read already, or later)
            for path in (f"/reading/{sid}/2/1", f"/reading/{sid}/2/5", f"/reading/{sid}/1/3"):
                assert c.get(path).status_code == 409
                assert c.post(path + "/rate", **form({"diseased": "1", "confidence": "3"})
                              ).status_code == 409
        with client(gw) as browser:  # a signed-in browser session without the CSRF token
            resp = browser.post("/login", **form({"user": "rad", "password": PASSWORD}))
            assert resp.status_code == 303
            resp = browser.post(where + "/rate", **form({"diseased": "1", "confidence": "3"}))
            assert resp.status_code == 403 and "CSRF" in resp.text
            page = browser.get(where)
            token = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text).group(1)
            assert browser.post(where + "/rate", **form({"diseased": "1", "confidence": "9",
                                                         "csrf": token})).status_code == 400
        assert gw.store.execute(rated).fetchone()[0] == before
        assert len([e for e in gw.audit_log.entries()
                    if e.action == "reader_study.rating"]) == before == 8
    finally:
        gw.stop()

    # a restart: the reader resumes where they were, nothing lost
    gw = start(tmp_path / "data", monkeypatch, images, db_url=db_url)
    try:
        with client(gw, gw.tokens["rad"]) as c:
            assert c.get(f"/reading/{sid}").headers["location"] == f"/reading/{sid}/2/3"
            home = c.get("/reading")
            assert "session 1: 6 of 6; session 2: 2 of 6" in home.text
        read_cases(gw, sid, "rad", 4, pages, skill=2)
        with client(gw, gw.tokens["rad"]) as c:
            assert "read every case" in c.get(f"/reading/{sid}").text
        read_cases(gw, sid, "rad2", 12, pages, skill=4)
        spent = gw.store.execute("SELECT seconds, served_at, rated_at, wl_changes FROM "
                                 "reader_readings WHERE study_id=?", (sid,)).fetchall()
        assert len(spent) == 24 and all(s >= 0 and r >= v for s, v, r, _ in spent)
        changes = [json.loads(w) for *_, w in spent if w != "[]"]
        assert len(changes) == 4 and all(c[0]["preset"] == "lung" for c in changes)

        # the admin's export and analysis
        with client(gw, gw.tokens["boss"]) as admin:
            csv_text = admin.get(f"/reader-studies/{sid}/ratings.csv").text
            lines = csv_text.strip().splitlines()
            assert lines[0] == "reader,modality,case,truth,rating" and len(lines) == 25
            assert {ln.split(",")[1] for ln in lines[1:]} == {"unaided", "AI-aided"}
            analysis = admin.get(f"/reader-studies/{sid}/analysis.json").json()
            assert {"fom", "difference", "ci95", "p", "readers"} <= set(analysis)
            assert set(analysis["fom"]) == {"unaided", "AI-aided"}
            assert set(analysis["readers"]) == {"rad", "rad2"}
            page = admin.get(f"/reader-studies/{sid}").text
            assert 'id="analysis"' in page and "difference" in page
        # the analysis is the one of radguard.evaluation.mrmc on the exported CSV
        from radguard.evaluation.mrmc import _clean, analyze, read_ratings

        (tmp_path / "r.csv").write_text(csv_text)
        expected = _clean(analyze(read_ratings(tmp_path / "r.csv")).to_dict())
        assert analysis["fom"] == pytest.approx(expected["fom"])
        assert analysis["difference"] == pytest.approx(expected["difference"])

        # what a reader can reach: no truth, no one else's ratings, no patient identifiers
        sid2 = create_study(gw, gw.store.clinical_instances(), files, readers=("rad",),
                            name="Other")
        with client(gw, gw.tokens["rad2"]) as c:
            for path in (f"/reader-studies/{sid}", f"/reader-studies/{sid}/ratings.csv",
                         f"/reader-studies/{sid}/analysis.json", "/reader-studies",
                         "/reader-studies/new"):
                assert c.get(path).status_code == 403, path
            for path in (f"/reading/{sid2}", f"/reading/{sid2}/1/1",
                         f"/reading/{sid2}/1/1/image.png", f"/reading/{sid + 99}"):
                assert c.get(path).status_code == 404, path
            assert c.post(f"/reading/{sid2}/1/1/rate", **form(
                {"diseased": "1", "confidence": "3"})).status_code == 404
            pages.append(c.get("/reading").text)
            pages.append(c.get(f"/reading/{sid}").text)
        with client(gw, gw.tokens["rad"]) as c:
            pages.append(c.get("/reading").text)
            where = c.get(f"/reading/{sid2}").headers["location"]
            pages.append(c.get(where).text)
        secrets_ = {PATIENT, PATIENT_ID, "Secretname", *uids, *files,
                    *(f.rsplit(".", 1)[0] for f in files), "truth", "set1"}
        for page in pages:
            assert "<script" not in page and "style=" not in page  # the CSP allows neither
            for secret in secrets_:
                assert secret not in page, secret
        assert len([e for e in gw.audit_log.entries()
                    if e.action == "reader_study.rating"]) == 24
    finally:
        gw.stop()


def test_a_study_needs_sound_design(tmp_path, monkeypatch):
    images, files = image_folder(tmp_path)
    gw = start(tmp_path / "data", monkeypatch, images)
    try:
        base = {"name": "x", "arm_a": "a", "arm_b": "b", "reader": "rad", "folder": "set1",
                "case_list": "\n".join(f"{f},{t}" for f, t in zip(files, (0, 1, 0),
                                                                  strict=True))}
        with client(gw, gw.tokens["boss"]) as admin:
            for change in ({"reader": "tech"}, {"arm_b": "a"}, {"washout_days": "-1"},
                           {"scale": "stars"}, {"case_list": "nosuch.png,1"},
                           {"case_list": files[0] + ",maybe"}, {}):  # {}: one diseased case
                resp = admin.post("/reader-studies", **form({**base, **change}))
                assert resp.status_code == 400, (change, resp.text)
        with client(gw, gw.tokens["rad"]) as reader:
            assert reader.post("/reader-studies", **form(base)).status_code == 403
        assert gw.store.execute("SELECT COUNT(*) FROM reader_studies").fetchone()[0] == 0
        # a folder may bring its own case list (truth.csv), which the 8 KiB form cannot
        set2 = images / "set2"
        set2.mkdir()
        for n in range(4):
            shutil.copy(images / "set1" / files[n % 3], set2 / f"c{n}.jpg")
        (set2 / "truth.csv").write_text("case,truth\nc0.jpg,1\nc1.jpg,0\nc2.jpg,1\nc3.jpg,0\n")
        with client(gw, gw.tokens["boss"]) as admin:
            resp = admin.post("/reader-studies", **form({**base, "folder": "set2",
                                                         "case_list": ""}))
            assert resp.status_code == 303, resp.text
        assert gw.store.execute("SELECT label, truth FROM reader_cases ORDER BY num"
                                ).fetchall() == [("c0.jpg", 1), ("c1.jpg", 0), ("c2.jpg", 1),
                                                 ("c3.jpg", 0)]
    finally:
        gw.stop()


def test_wash_out_keeps_the_second_session_closed(tmp_path, monkeypatch):
    images, files = image_folder(tmp_path)
    gw = start(tmp_path / "data", monkeypatch, images, triage={"DX": "chest"})
    try:
        rows = held_instances(gw, tmp_path, 3)
        sid = create_study(gw, rows, files, washout="2")
        pages: list[str] = []
        read_cases(gw, sid, "rad2", 6, pages, skill=0)  # rad2 starts with arm B (aided)
        # the aided arm: the triage model's score and its saliency map over the image
        aided = [p for p in pages if 'alt="AI saliency map"' in p]
        assert aided and all(re.search(r"AI score: 0\.\d+", p) for p in aided)
        with client(gw, gw.tokens["rad2"]) as c:
            resp = c.get(f"/reading/{sid}")
            assert resp.status_code == 200 and 'id="washout"' in resp.text
            assert c.get(f"/reading/{sid}/2/1").status_code == 409
            assert c.post(f"/reading/{sid}/2/1/rate", **form(
                {"diseased": "1", "confidence": "3"})).status_code == 409
        finished = gw.store.execute(
            "SELECT finished_at FROM reader_sessions WHERE study_id=? AND reader=? AND "
            "sess=1", (sid, "rad2")).fetchone()[0]
        # two days later (the database's clock is what counts): session 2 opens
        gw.store.execute("UPDATE reader_sessions SET finished_at=? WHERE study_id=? AND "
                         "reader=? AND sess=1", (finished - 2 * 86400 - 1, sid, "rad2"))
        with client(gw, gw.tokens["rad2"]) as c:
            assert c.get(f"/reading/{sid}").headers["location"] == f"/reading/{sid}/2/1"
    finally:
        gw.stop()


READER_ROUTES = [("GET", "/reader-studies"), ("GET", "/reader-studies/new"),
                 ("POST", "/reader-studies"), ("GET", "/reader-studies/1"),
                 ("GET", "/reader-studies/1/ratings.csv"),
                 ("GET", "/reader-studies/1/analysis.json"), ("GET", "/reading"),
                 ("GET", "/reading/1"), ("GET", "/reading/1/1/1"),
                 ("GET", "/reading/1/1/1/image.png"), ("POST", "/reading/1/1/1/window"),
                 ("POST", "/reading/1/1/1/rate"), ("GET", "/awareness"),
                 ("POST", "/awareness/rounds"), ("GET", "/awareness/1"),
                 ("GET", "/awareness/1/1/image.png"), ("POST", "/awareness/1/1/answer"),
                 ("GET", "/awareness/1/1/feedback"), ("GET", "/awareness/1/1/heat.png")]


def test_every_reader_route_needs_a_login_and_the_right_role(tmp_path, monkeypatch):
    gw = start(tmp_path / "data", monkeypatch, tmp_path)
    try:
        with client(gw) as anonymous:
            for method, path in READER_ROUTES:
                assert anonymous.request(method, path).status_code == 401, path
        for name in ("tech", "aud"):
            with client(gw, gw.tokens[name]) as c:
                for method, path in READER_ROUTES:
                    assert c.request(method, path).status_code == 403, (name, path)
        with client(gw, gw.tokens["rad"]) as c:
            for method, path in READER_ROUTES:
                expected = 403 if path.startswith("/reader-studies") else (200, 303, 404, 409)
                status = c.request(method, path).status_code
                assert status == expected if isinstance(expected, int) else \
                    status in expected, (path, status)
    finally:
        gw.stop()


def test_wilson_interval():
    low, high = wilson(3, 4)
    assert (round(low, 4), round(high, 4)) == (0.3006, 0.9544)  # Wilson 1927, z = 1.96
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(10, 10)
    assert high == pytest.approx(1.0) and round(low, 4) == 0.7225


def awareness_pool(tmp_path):
    pool = tmp_path / "pool"
    picks = {"cxr-kermany": sorted((SHARED / "cxr-kermany" / "images").glob("*.jpg"))[:4],
             "synthetic-gan-cxr": sorted((SHARED / "synthetic-gan-cxr" / "images")
                                         .glob("pggan*.png"))[:2],
             "synthetic-dcgan64": sorted((SHARED / "synthetic-dcgan64").glob("*.png"))[:2],
             "mammo-mias": sorted((SHARED / "mammo-mias").rglob("*.png"))[:1]}  # not used
    for folder, files in picks.items():
        (pool / folder).mkdir(parents=True)
        for f in files:
            shutil.copy(f, pool / folder / f.name)
    return pool, {f.name for files in picks.values() for f in files}


def test_awareness_rounds(tmp_path, monkeypatch, db_url):
    pool, names = awareness_pool(tmp_path)
    gw = start(tmp_path / "data", monkeypatch, tmp_path, pool, db_url=db_url,
               readers_awareness_items=4)
    try:
        with client(gw, gw.tokens["rad"]) as c:
            resp = c.post("/awareness/rounds", content=b"")
            assert resp.status_code == 303
            rid = int(resp.headers["location"].rsplit("/", 1)[1])
            items = gw.store.execute("SELECT pos, synthetic, source FROM awareness_items "
                                     "WHERE round_id=? ORDER BY pos", (rid,)).fetchall()
            assert len(items) == 4 and sum(s for _, s, _ in items) == 2
            generator = gw.store.execute("SELECT generator FROM awareness_rounds WHERE id=?",
                                         (rid,)).fetchone()[0]
            assert {src for _, s, src in items if s} == {generator}
            assert {src for _, s, src in items if not s} == {"cxr-kermany"}
            for pos, synthetic, _ in items:
                page = c.get(f"/awareness/{rid}").text
                assert f"Image {pos} of 4" in page
                for secret in (*names, generator, "synthetic-", "cxr-"):
                    assert secret not in page  # the source is told after the answer only
                assert c.get(f"/awareness/{rid}/{pos}/image.png").content[:4] == b"\x89PNG"
                if pos < 4:  # a later image is not served before its turn
                    assert c.get(f"/awareness/{rid}/{pos + 1}/image.png").status_code == 409
                assert c.post(f"/awareness/{rid}/{pos}/answer", **form(
                    {"answer": "synthetic", "confidence": "6"})).status_code == 400
                right = "synthetic" if synthetic else "real"
                wrong = "real" if synthetic else "synthetic"
                said = wrong if pos == 2 else right  # 3 of 4 right
                resp = c.post(f"/awareness/{rid}/{pos}/answer",
                              **form({"answer": said, "confidence": "4"}))
                assert resp.status_code == 303
                feedback = c.get(resp.headers["location"]).text
                assert ("right" if said == right else "wrong") in feedback.split("</h1>")[0]
                reasons = re.findall(r"<li>([^<]+)</li>", feedback.split('id="reasons"')[1]
                                     .split("</ul>")[0])
                assert reasons, feedback
                if synthetic:
                    assert "What gives it away" in feedback
                    heat = c.get(f"/awareness/{rid}/{pos}/heat.png")
                    assert heat.status_code == 200 and heat.content[:4] == b"\x89PNG"
                assert c.post(f"/awareness/{rid}/{pos}/answer", **form(
                    {"answer": said, "confidence": "4"})).status_code == 409
            summary = c.get(f"/awareness/{rid}").text
            assert 'data-correct="3" data-total="4"' in summary
            assert "30.1-95.4%" in summary and "75%" in summary and "85%" in summary
            # the next round holds out the generator already seen
            second = c.post("/awareness/rounds", content=b"").headers["location"]
            rid2 = int(second.rsplit("/", 1)[1])
            other = gw.store.execute("SELECT generator FROM awareness_rounds WHERE id=?",
                                     (rid2,)).fetchone()[0]
            assert other != generator and other.startswith("synthetic-")
        with client(gw, gw.tokens["rad2"]) as c:  # someone else's round is not there
            for path in (f"/awareness/{rid}", f"/awareness/{rid}/1/feedback",
                         f"/awareness/{rid}/1/image.png", f"/awareness/{rid}/1/heat.png"):
                assert c.get(path).status_code == 404, path
            assert c.post(f"/awareness/{rid2}/1/answer", **form(
                {"answer": "real", "confidence": "3"})).status_code == 404
        entries = [e for e in gw.audit_log.entries() if e.action == "awareness.round"]
        assert len(entries) == 1 and entries[0].actor == "rad"
        assert entries[0].details["score"] == 0.75
        assert entries[0].details["ci95"] == [0.3006, 0.9544]
        assert entries[0].details["generator"] == generator
    finally:
        gw.stop()
