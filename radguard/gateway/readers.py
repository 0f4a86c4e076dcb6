"""Reader studies read in the gateway's browser UI, and deepfake-awareness training rounds
(issue 26 items 1 and 3). Everything is server-rendered: pages carry no script (the site's
Content-Security-Policy forbids them), so time on case is the server's time between serving
a case and receiving its rating, and window/level changes are preset buttons that re-render
the image on the server; both are recorded with the reading.

Admin (role ``admin``):

* ``GET /reader-studies`` the studies with each reader's progress; ``GET
  /reader-studies/new`` the design form; ``POST /reader-studies`` creates one from
  instances held in the gateway (a truth per listed instance, or ``case,truth`` lines naming
  SOP Instance or Study UIDs) and/or a folder of images under the configured image root
  (``[readers] image_root``).
* ``GET /reader-studies/{id}`` progress per reader and, once every reading is in, the MRMC
  analysis (:func:`radguard.evaluation.mrmc.analyze`); ``.../ratings.csv`` the ratings as
  the MRMC CSV (arms as modalities); ``.../analysis.json`` the analysis as JSON.

Readers (role ``radiologist``, assigned to the study):

* ``GET /reading`` their studies and progress; ``GET /reading/{id}`` their next case (or
  the wash-out wait); ``GET /reading/{id}/{session}/{n}`` case n of their own session order,
  only while it is their next one; ``.../image.png`` its picture at the reading's current
  window; ``POST .../window`` a window/level preset; ``POST .../rate`` the rating.
  The URLs carry per-reader case positions only, never UIDs; no page shows patient data,
  file names, truth or anyone else's ratings.

Awareness (radiologists): ``GET /awareness``, ``POST /awareness/rounds``, ``GET
/awareness/{round}``, ``.../{n}/image.png``, ``POST .../{n}/answer``, ``GET
.../{n}/feedback`` and ``.../{n}/heat.png``. The pool's root is ``[readers] awareness_pool``
(or an ``awareness_pool`` attribute of the configuration): folders named ``synthetic-*`` are
generators, folders named ``cxr-*`` or ``real-*`` real radiographs.

Tables: migration 7 of :mod:`radguard.gateway.store`.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import random
import secrets
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response

from radguard.errors import RadguardError
from radguard.gateway.auth import User

if TYPE_CHECKING:
    from radguard.gateway.web import _Web

__all__ = ["PRESETS", "SEED_FIGURES", "add_reader_routes", "wilson"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
POOL_SUFFIXES = (".png", ".jpg", ".jpeg")
SCALES = ("confidence", "probability")
MAX_CASES = 500
TRUTH_FILE = "truth.csv"  # a folder's case list when the form gives none
VIEW = 768  # pixels: the longest side a reader's image is shown at
# window/level presets on the displayed 8-bit image (centre, width); steps change the current
PRESETS: dict[str, tuple[float, float]] = {
    "default": (127.5, 255.0), "lung": (80.0, 180.0), "bone": (180.0, 150.0),
    "soft tissue": (128.0, 128.0)}
STEPS = ("narrower", "wider", "darker", "brighter")
# the published figures a personal awareness score is set beside
SEED_FIGURES = (("radiologists", 0.75), ("GPT-4o", 0.85))


def wilson(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion (0, 1 for no answers)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _root(web: _Web, attribute: str) -> Path | None:
    """A configured folder ([readers] image_root or awareness_pool), resolved; None: unset."""
    value = getattr(web.gateway.config, attribute)
    return Path(value).resolve() if value else None


def _inside(root: Path | None, relative: str) -> Path:
    """``relative`` under ``root``, resolved (links followed); 400 for anything outside."""
    if root is None:
        raise HTTPException(400, "no image folder root is configured on this gateway")
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        raise HTTPException(400, "give a folder relative to the configured root")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise HTTPException(400, "that folder is outside the configured root")
    return path


def _pos_int(value: int, limit: int = 1 << 31) -> int:
    if not 0 < value < limit:
        raise HTTPException(404, "no such case")
    return value


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


async def _fields(request: Request) -> dict[str, list[str]]:
    """The urlencoded form with every value of repeated fields (the body is bounded by the
    gateway's middleware)."""
    try:
        return urllib.parse.parse_qs((await request.body()).decode("utf-8"),
                                     keep_blank_values=True)
    except UnicodeDecodeError as exc:
        raise HTTPException(400, "form is not UTF-8") from exc


def _one(fields: dict[str, list[str]], name: str, default: str = "") -> str:
    return (fields.get(name) or [default])[0].strip()


_TRUTHS = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0, "diseased": 1,
           "abnormal": 1, "positive": 1, "normal": 0, "negative": 0}


def _truth_lines(text: str) -> list[tuple[str, int]]:
    """``case,truth`` lines (a header line is skipped); 400 for a line that is not."""
    out: list[tuple[str, int]] = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise HTTPException(400, f"case list line {number}: expected case,truth")
        case, truth = row[0].strip(), row[1].strip().lower()
        if truth not in _TRUTHS:
            if number == 1 and not out:
                continue  # a header line
            raise HTTPException(400, f"case list line {number}: truth must be 0 or 1")
        out.append((case, _TRUTHS[truth]))
    return out


# -- pictures ------------------------------------------------------------------------------------

def _png(pixels: Any) -> bytes:  # noqa: ANN401
    from PIL import Image

    picture = Image.fromarray(pixels)
    picture.thumbnail((VIEW, VIEW))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def _grey_file(path: Path) -> Any:  # noqa: ANN401
    """An 8-bit display frame of a raster or DICOM file."""
    import numpy as np

    if path.suffix.lower() == ".dcm":
        from radguard.dicom.io import read_dataset
        from radguard.dicom.limits import decode_scope
        from radguard.images import display_frame

        with decode_scope():
            return display_frame(read_dataset(path))
    from PIL import Image

    with Image.open(path) as img:
        img.thumbnail((2048, 2048))
        return np.asarray(img.convert("L"))


def _windowed(pixels: Any, centre: float, width: float) -> Any:  # noqa: ANN401
    import numpy as np

    low = centre - width / 2
    out = (pixels.astype(np.float64) - low) / max(width, 1.0) * 255.0
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _heat_png(grey: Any, heatmap: Any) -> bytes:  # noqa: ANN401
    import numpy as np
    from PIL import Image

    from radguard.gateway.wado import tint

    heat = np.asarray(Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
                      .resize((grey.shape[1], grey.shape[0])))
    return _png(tint(grey, heat))


# -- the store -------------------------------------------------------------------------------------

class _Studies:
    """Reader-study rows (migration 7), read and written through the gateway's store."""

    def __init__(self, web: _Web) -> None:
        self.web, self.store = web, web.store

    def study(self, sid: int) -> dict[str, Any] | None:
        row = self.store.execute("SELECT id, name, created_by, created_at, arms, scale, "
                                 "washout_days, seed FROM reader_studies WHERE id=?",
                                 (sid,)).fetchone()
        if row is None:
            return None
        keys = ("id", "name", "created_by", "created_at", "arms", "scale", "washout_days",
                "seed")
        study = dict(zip(keys, row, strict=True))
        study["arms"] = json.loads(study["arms"])
        study["cases"] = self.store.execute("SELECT COUNT(*) FROM reader_cases WHERE "
                                            "study_id=?", (sid,)).fetchone()[0]
        return study

    def studies(self) -> list[dict[str, Any]]:
        ids = [r[0] for r in self.store.execute("SELECT id FROM reader_studies ORDER BY id "
                                                "DESC").fetchall()]
        return [s for s in (self.study(i) for i in ids) if s]

    def radiologists(self) -> list[str]:
        return [r[0] for r in self.store.execute("SELECT name FROM users WHERE role="
                                                 "'radiologist' ORDER BY name").fetchall()]

    def create(self, *, name: str, arms: list[dict[str, Any]], scale: str,
               washout_days: float, seed: str, cases: list[dict[str, Any]],
               readers: list[str], by: str) -> int:
        """A study with its cases, and per reader two sessions (counterbalanced arms, each
        in its own seeded random order) with a reading row per case."""
        with self.store.transaction():
            sid = self.store.execute(
                "INSERT INTO reader_studies (name, created_by, created_at, arms, scale, "
                "washout_days, seed) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (name, by, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 json.dumps(arms), scale, washout_days, seed)).fetchone()[0]
            for num, case in enumerate(cases, 1):
                self.store.execute("INSERT INTO reader_cases (study_id, num, label, truth, "
                                   "instance_id, path) VALUES (?, ?, ?, ?, ?, ?)",
                                   (sid, num, case["label"], case["truth"],
                                    case.get("instance_id"), case.get("path")))
            for index, reader in enumerate(readers):
                # counterbalanced crossover: every other reader starts with the second arm
                order = [0, 1] if index % 2 == 0 else [1, 0]
                for sess, arm_index in enumerate(order, 1):
                    numbers = list(range(1, len(cases) + 1))
                    random.Random(f"{seed}:{reader}:{sess}").shuffle(numbers)
                    arm = arms[arm_index]["name"]
                    self.store.execute("INSERT INTO reader_sessions (study_id, reader, sess, "
                                       "arm, case_order) VALUES (?, ?, ?, ?, ?)",
                                       (sid, reader, sess, arm, json.dumps(numbers)))
                    for pos, num in enumerate(numbers, 1):
                        self.store.execute(
                            "INSERT INTO reader_readings (study_id, reader, sess, pos, "
                            "case_num, arm, wl_center, wl_width, wl_changes) VALUES "
                            "(?, ?, ?, ?, ?, ?, ?, ?, '[]')",
                            (sid, reader, sess, pos, num, arm, *PRESETS["default"]))
        return int(sid)

    def sessions(self, sid: int, reader: str) -> list[dict[str, Any]]:
        rows = self.store.execute(
            "SELECT s.sess, s.arm, s.started_at, s.finished_at, "
            "(SELECT COUNT(*) FROM reader_readings r WHERE r.study_id=s.study_id AND "
            "r.reader=s.reader AND r.sess=s.sess AND r.rated_at IS NOT NULL), "
            "(SELECT COUNT(*) FROM reader_readings r WHERE r.study_id=s.study_id AND "
            "r.reader=s.reader AND r.sess=s.sess) FROM reader_sessions s "
            "WHERE s.study_id=? AND s.reader=? ORDER BY s.sess", (sid, reader)).fetchall()
        return [dict(zip(("sess", "arm", "started_at", "finished_at", "done", "total"), r,
                         strict=True)) for r in rows]

    def readers(self, sid: int) -> list[str]:
        return [r[0] for r in self.store.execute(
            "SELECT DISTINCT reader FROM reader_sessions WHERE study_id=? ORDER BY reader",
            (sid,)).fetchall()]

    def assignments(self, reader: str) -> list[int]:
        return [r[0] for r in self.store.execute(
            "SELECT DISTINCT study_id FROM reader_sessions WHERE reader=? ORDER BY study_id",
            (reader,)).fetchall()]

    def where(self, study: dict[str, Any], reader: str) -> dict[str, Any]:
        """Where ``reader`` is: ``reading`` (session, next position), ``washout`` (until)
        or ``done``."""
        sessions = self.sessions(study["id"], reader)
        if not sessions:
            raise HTTPException(404, "no such study")
        previous: dict[str, Any] | None = None
        for s in sessions:
            if s["done"] < s["total"]:
                if previous is not None:
                    until = (previous["finished_at"] or 0) + study["washout_days"] * 86400
                    if self.store.now() < until:
                        return {"state": "washout", "until": until, "sessions": sessions}
                pos = self.store.execute(
                    "SELECT MIN(pos) FROM reader_readings WHERE study_id=? AND reader=? AND "
                    "sess=? AND rated_at IS NULL", (study["id"], reader, s["sess"])
                ).fetchone()[0]
                return {"state": "reading", "sess": s["sess"], "pos": int(pos),
                        "session": s, "sessions": sessions}
            previous = s
        return {"state": "done", "sessions": sessions}

    def reading(self, sid: int, reader: str, sess: int, pos: int) -> dict[str, Any] | None:
        row = self.store.execute(
            "SELECT case_num, arm, served_at, rated_at, wl_center, wl_width, wl_changes FROM "
            "reader_readings WHERE study_id=? AND reader=? AND sess=? AND pos=?",
            (sid, reader, sess, pos)).fetchone()
        if row is None:
            return None
        return dict(zip(("case_num", "arm", "served_at", "rated_at", "wl_center", "wl_width",
                         "wl_changes"), row, strict=True))

    def case(self, sid: int, num: int) -> dict[str, Any]:
        row = self.store.execute("SELECT label, truth, instance_id, path FROM reader_cases "
                                 "WHERE study_id=? AND num=?", (sid, num)).fetchone()
        return dict(zip(("label", "truth", "instance_id", "path"), row, strict=True))

    def ratings(self, sid: int) -> list[dict[str, str]]:
        """The MRMC rows (reader, modality, case, truth, rating) of the rated readings."""
        rows = self.store.execute(
            "SELECT r.reader, r.arm, c.num, c.label, c.truth, r.rating FROM reader_readings r "
            "JOIN reader_cases c ON c.study_id=r.study_id AND c.num=r.case_num WHERE "
            "r.study_id=? AND r.rated_at IS NOT NULL ORDER BY r.reader, r.arm, c.num",
            (sid,)).fetchall()
        return [{"reader": r[0], "modality": r[1], "case": f"{r[2]}:{r[3]}",
                 "truth": str(int(r[4])), "rating": repr(float(r[5]))} for r in rows]


# -- routes --------------------------------------------------------------------------------------

def add_reader_routes(app: FastAPI, web: _Web) -> None:
    """Register the reader-study, reading and awareness routes."""
    studies = _Studies(web)
    _add_admin_routes(app, web, studies)
    _add_reading_routes(app, web, studies)
    _add_awareness_routes(app, web)


def _study_or_404(studies: _Studies, sid: int) -> dict[str, Any]:
    study = studies.study(_pos_int(sid))
    if study is None:
        raise HTTPException(404, "no such study")
    return study


def _add_admin_routes(app: FastAPI, web: _Web, studies: _Studies) -> None:
    store = web.store

    @app.get("/reader-studies")
    def list_studies(request: Request, user: User = Depends(web.role())) -> Response:
        rows = []
        for s in studies.studies():
            readers = studies.readers(s["id"])
            done = sum(x["done"] for r in readers for x in studies.sessions(s["id"], r))
            rows.append({**s, "readers": readers, "done": done,
                         "total": s["cases"] * 2 * len(readers)})
        return web.page("reader_studies.html", request, user, "Reader studies", rows=rows)

    @app.get("/reader-studies/new")
    def new_study(request: Request, user: User = Depends(web.role())) -> Response:
        instances = store.clinical_instances(order="id DESC")[:200]
        return web.page("reader_new.html", request, user, "New reader study",
                        instances=instances, radiologists=studies.radiologists(),
                        root=str(_root(web, "readers_image_root")
                                 or ""), scales=SCALES)

    @app.post("/reader-studies")
    async def create_study(request: Request, user: User = Depends(web.role())) -> Response:
        fields = await _fields(request)
        sid, summary = await run_in_threadpool(_create, web, studies, fields, user)
        web.audit("reader_study.create", f"reader-study:{sid}", summary, user.name)
        return RedirectResponse(f"/reader-studies/{sid}", status_code=303)

    @app.get("/reader-studies/{sid}")
    def show_study(sid: int, request: Request, user: User = Depends(web.role())) -> Response:
        study = _study_or_404(studies, sid)
        progress = [{"reader": r, "where": studies.where(study, r)}
                    for r in studies.readers(study["id"])]
        analysis, problem = _analysis(studies, study)
        return web.page("reader_study.html", request, user, f"Reader study: {study['name']}",
                        study=study, progress=progress, analysis=analysis,
                        analysis_problem=problem, iso=_iso)

    @app.get("/reader-studies/{sid}/ratings.csv")
    def ratings_csv(sid: int, user: User = Depends(web.role())) -> Response:
        study = _study_or_404(studies, sid)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, ["reader", "modality", "case", "truth", "rating"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(studies.ratings(study["id"]))
        web.audit("reader_study.export", f"reader-study:{study['id']}", {}, user.name)
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="reader-study-{study["id"]}.csv"',
            "Cache-Control": "no-store"})

    @app.get("/reader-studies/{sid}/analysis.json")
    def analysis_json(sid: int, user: User = Depends(web.role())) -> Response:
        study = _study_or_404(studies, sid)
        analysis, problem = _analysis(studies, study)
        if analysis is None:
            raise HTTPException(409, problem or "not complete")
        return JSONResponse(analysis, headers={"Cache-Control": "no-store"})


def _analysis(studies: _Studies, study: dict[str, Any]
              ) -> tuple[dict[str, Any] | None, str | None]:
    """The MRMC summary once every reading is in (else None and why)."""
    from radguard.evaluation.mrmc import ReaderStudyError, _clean, analyze, study_from_rows

    readers = studies.readers(study["id"])
    expected = study["cases"] * 2 * len(readers)
    rows = studies.ratings(study["id"])
    if len(rows) < expected:
        return None, f"{len(rows)} of {expected} readings done"
    try:
        result = analyze(study_from_rows(rows, f"reader study {study['id']}"))
    except ReaderStudyError as exc:
        return None, str(exc)
    return _clean(result.to_dict()), None  # type: ignore[return-value]


def _create(web: _Web, studies: _Studies, fields: dict[str, list[str]], user: User
            ) -> tuple[int, dict[str, Any]]:
    name = _one(fields, "name")[:120]
    if not name:
        raise HTTPException(400, "give the study a name")
    arms = []
    for key in ("a", "b"):
        arm = _one(fields, f"arm_{key}")[:40]
        if not arm:
            raise HTTPException(400, "name both arms")
        arms.append({"name": arm, "aided": _one(fields, f"aided_{key}") == "1"})
    if arms[0]["name"] == arms[1]["name"]:
        raise HTTPException(400, "the two arms need different names")
    scale = _one(fields, "scale", "confidence")
    if scale not in SCALES:
        raise HTTPException(400, f"scale is one of {', '.join(SCALES)}")
    try:
        washout = float(_one(fields, "washout_days", "0") or 0)
    except ValueError as exc:
        raise HTTPException(400, "wash-out is a number of days") from exc
    if not 0 <= washout <= 365:
        raise HTTPException(400, "wash-out is 0-365 days")
    seed = _one(fields, "seed")[:64] or secrets.token_hex(8)
    radiologists = set(studies.radiologists())
    readers = sorted(set(fields.get("reader", [])))
    if not readers:
        raise HTTPException(400, "choose at least one reader")
    if not set(readers) <= radiologists:
        raise HTTPException(400, "readers must be users with the radiologist role")
    cases = _cases(web, fields)
    if not cases:
        raise HTTPException(400, "no cases: give a truth for instances, a case list, or a "
                                 "folder with its case list")
    if len(cases) > MAX_CASES:
        raise HTTPException(400, f"at most {MAX_CASES} cases")
    labels = [c["label"] for c in cases]
    if len(set(labels)) != len(labels):
        raise HTTPException(400, "a case appears twice")
    positives = sum(c["truth"] for c in cases)
    if positives < 2 or len(cases) - positives < 2:
        raise HTTPException(400, "the analysis needs at least two diseased and two "
                                 "non-diseased cases")
    sid = studies.create(name=name, arms=arms, scale=scale, washout_days=washout, seed=seed,
                         cases=cases, readers=readers, by=user.name)
    return sid, {"name": name, "arms": [a["name"] for a in arms], "readers": readers,
                 "cases": len(cases), "positives": positives, "scale": scale,
                 "washout_days": washout}


def _cases(web: _Web, fields: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The study's cases from the form: instances with a truth, ``case,truth`` lines naming
    instances (SOP Instance UID, or Study UID: its first instance) or files in the folder."""
    store = web.store
    cases: list[dict[str, Any]] = []
    for key, values in fields.items():
        if key.startswith("truth_") and values and values[0] in ("0", "1"):
            try:
                instance_id = int(key[6:])
            except ValueError as exc:
                raise HTTPException(400, f"bad field {key[:40]}") from exc
            rows = store.clinical_instances("id=?", (instance_id,))
            if not rows:
                raise HTTPException(400, f"instance {instance_id} is not held")
            cases.append({"label": rows[0].sop_uid, "truth": int(values[0]),
                          "instance_id": instance_id})
    lines = _truth_lines(_one(fields, "case_list"))
    folder_field = _one(fields, "folder")
    root = _root(web, "readers_image_root")
    folder = _inside(root, folder_field) if folder_field else None
    if folder is not None and not folder.is_dir():
        raise HTTPException(400, "no such folder under the configured root")
    if folder is not None and not lines and (folder / TRUTH_FILE).is_file():
        # a long case list: the form is limited to 8 KiB, a file in the folder is not
        lines = _truth_lines((folder / TRUTH_FILE).read_text(encoding="utf-8")[:1 << 20])
    for case, truth in lines:
        if folder is not None:
            path = _inside(folder, case)
            if not path.is_relative_to(folder):  # also outside the root: refused above
                raise HTTPException(400, f"case {case[:80]} is outside the folder")
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                assert root is not None
                cases.append({"label": case, "truth": truth,
                              "path": str(path.relative_to(root))})
                continue
        rows = store.clinical_instances("sop_uid=?", (case,)) or \
            store.clinical_instances("study_uid=?", (case,))
        if not rows:
            raise HTTPException(400, f"case {case[:80]}: no such image in the folder or "
                                     "instance held")
        cases.append({"label": rows[0].sop_uid, "truth": truth, "instance_id": rows[0].id})
    return cases


def _add_reading_routes(app: FastAPI, web: _Web, studies: _Studies) -> None:
    store = web.store

    def mine(sid: int, user: User) -> dict[str, Any]:
        """The study, if ``user`` reads it (404 otherwise: not even its existence)."""
        study = studies.study(_pos_int(sid))
        if study is None or sid not in studies.assignments(user.name):
            raise HTTPException(404, "no such study")
        return study

    def current(sid: int, sess: int, pos: int, user: User
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(study, where the reader is, the reading) for the reader's own next case only."""
        study = mine(sid, user)
        if not 0 < pos <= study["cases"] or sess not in (1, 2):
            raise HTTPException(404, "no such case")
        where = studies.where(study, user.name)
        if where["state"] != "reading" or (where["sess"], where["pos"]) != (sess, pos):
            raise HTTPException(409, "that is not your next case")
        reading = studies.reading(study["id"], user.name, sess, pos)
        assert reading is not None
        return study, where, reading

    @app.get("/reading")
    def my_studies(request: Request,
                   user: User = Depends(web.role("radiologist"))) -> Response:
        rows = []
        for sid in studies.assignments(user.name):
            study = studies.study(sid)
            if study is not None:
                rows.append({"id": sid, "name": study["name"],
                             "where": studies.where(study, user.name)})
        return web.page("reader_home.html", request, user, "My reading", rows=rows, iso=_iso)

    @app.get("/reading/{sid}")
    def next_case(sid: int, request: Request,
                  user: User = Depends(web.role("radiologist"))) -> Response:
        study = mine(sid, user)
        where = studies.where(study, user.name)
        if where["state"] == "reading":
            return RedirectResponse(f"/reading/{study['id']}/{where['sess']}/{where['pos']}",
                                    status_code=303)
        return web.page("reader_wait.html", request, user, study["name"], study=study,
                        where=where, iso=_iso)

    @app.get("/reading/{sid}/{sess}/{pos}")
    def show_case(sid: int, sess: int, pos: int, request: Request,
                  user: User = Depends(web.role("radiologist"))) -> Response:
        study, where, reading = current(sid, sess, pos, user)
        now = store.now()
        with store.transaction():
            store.execute("UPDATE reader_readings SET served_at=? WHERE study_id=? AND "
                          "reader=? AND sess=? AND pos=? AND served_at IS NULL",
                          (now, study["id"], user.name, sess, pos))
            store.execute("UPDATE reader_sessions SET started_at=? WHERE study_id=? AND "
                          "reader=? AND sess=? AND started_at IS NULL",
                          (now, study["id"], user.name, sess))
        arm = next(a for a in study["arms"] if a["name"] == reading["arm"])
        ai = None
        heat = False
        if arm["aided"]:
            case = studies.case(study["id"], reading["case_num"])
            if case["instance_id"] is not None:
                row = store.get(case["instance_id"])
                if row is not None and row.ai_probability is not None:
                    ai = round(row.ai_probability, 3)
                # the triage model's saliency, where the gateway has a model for it
                heat = row is not None and str(row.modality).upper() in \
                    web.gateway.pipeline.models
        changes = json.loads(reading["wl_changes"])
        return web.page("reader_case.html", request, user,
                        f"Case {pos} of {study['cases']}", study=study, sess=sess, pos=pos,
                        arm=arm, ai=ai, heat=heat, scale=study["scale"],
                        base=f"/reading/{study['id']}/{sess}/{pos}", version=len(changes),
                        presets=list(PRESETS), steps=STEPS,
                        window=(round(reading["wl_center"]), round(reading["wl_width"])),
                        done=where["session"]["done"])

    @app.get("/reading/{sid}/{sess}/{pos}/image.png")
    def case_image(sid: int, sess: int, pos: int, heat: bool = False,
                   user: User = Depends(web.role("radiologist"))) -> Response:
        study, _where, reading = current(sid, sess, pos, user)
        case = studies.case(study["id"], reading["case_num"])
        arm = next(a for a in study["arms"] if a["name"] == reading["arm"])
        if heat and not (arm["aided"] and case["instance_id"] is not None):
            raise HTTPException(404, "no saliency map in this arm")
        try:
            png = _case_png(web, case, reading["wl_center"], reading["wl_width"], heat)
        except RadguardError as exc:
            raise HTTPException(422, "this image cannot be shown") from exc
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/reading/{sid}/{sess}/{pos}/window")
    async def change_window(sid: int, sess: int, pos: int, request: Request,
                            user: User = Depends(web.role("radiologist"))) -> Response:
        fields = await _fields(request)
        preset = _one(fields, "preset")

        def change() -> None:
            study, _where, reading = current(sid, sess, pos, user)  # before the form: 404
            if preset not in PRESETS and preset not in STEPS:
                raise HTTPException(400, "unknown window/level preset")
            centre, width = reading["wl_center"], reading["wl_width"]
            if preset in PRESETS:
                centre, width = PRESETS[preset]
            elif preset in ("narrower", "wider"):
                width = min(1024.0, max(16.0, width * (0.7 if preset == "narrower" else
                                                       1 / 0.7)))
            else:
                centre = min(255.0, max(0.0, centre + (16 if preset == "darker" else -16)))
            with store.transaction():
                now = store.now()
                changes = json.loads(reading["wl_changes"])
                changes.append({"preset": preset, "center": round(centre, 1),
                                "width": round(width, 1),
                                "after_s": round(now - (reading["served_at"] or now), 2)})
                store.execute("UPDATE reader_readings SET wl_center=?, wl_width=?, "
                              "wl_changes=? WHERE study_id=? AND reader=? AND sess=? AND "
                              "pos=? AND rated_at IS NULL",
                              (centre, width, json.dumps(changes), study["id"], user.name,
                               sess, pos))
        await run_in_threadpool(change)
        return RedirectResponse(f"/reading/{sid}/{sess}/{pos}", status_code=303)

    @app.post("/reading/{sid}/{sess}/{pos}/rate")
    async def rate(sid: int, sess: int, pos: int, request: Request,
                   user: User = Depends(web.role("radiologist"))) -> Response:
        fields = await _fields(request)
        details = await run_in_threadpool(_rate, web, studies, current, fields, sid, sess,
                                          pos, user)
        web.audit("reader_study.rating", f"reader-study:{sid}", details, user.name)
        return RedirectResponse(f"/reading/{sid}", status_code=303)


def _rate(web: _Web, studies: _Studies, current: Any, fields: dict[str, list[str]],  # noqa: ANN401
          sid: int, sess: int, pos: int, user: User) -> dict[str, Any]:
    """Check and record one rating; the details audited."""
    store = web.store
    study, where, reading = current(sid, sess, pos, user)
    diseased = _one(fields, "diseased")
    if diseased not in ("0", "1"):
        raise HTTPException(400, "say whether the case is diseased (diseased=1) or not (0)")
    try:
        value = float(_one(fields, "confidence" if study["scale"] == "confidence" else
                           "probability"))
    except ValueError as exc:
        raise HTTPException(400, "the rating is missing or not a number") from exc
    if study["scale"] == "confidence":
        if value not in (1, 2, 3, 4, 5):
            raise HTTPException(400, "confidence is 1, 2, 3, 4 or 5")
        # one ordinal scale for the ROC analysis: 1 (sure not diseased) .. 10 (sure diseased)
        rating = 5 + value if diseased == "1" else 6 - value
    else:
        if not 0 <= value <= 100 or not math.isfinite(value):
            raise HTTPException(400, "the probability is 0-100")
        rating = value
    if reading["served_at"] is None:
        raise HTTPException(409, "this case was not shown yet")
    with store.transaction():
        now = store.now()
        seconds = max(0.0, now - reading["served_at"])
        updated = store.execute(
            "UPDATE reader_readings SET rated_at=?, diseased=?, confidence=?, rating=?, "
            "seconds=? WHERE study_id=? AND reader=? AND sess=? AND pos=? AND rated_at IS "
            "NULL RETURNING pos", (now, int(diseased), value, rating, seconds, study["id"],
                                   user.name, sess, pos)).fetchone()
        if updated is None:
            raise HTTPException(409, "this case was already rated")
        left = store.execute("SELECT COUNT(*) FROM reader_readings WHERE study_id=? AND "
                             "reader=? AND sess=? AND rated_at IS NULL",
                             (study["id"], user.name, sess)).fetchone()[0]
        if left == 0:
            store.execute("UPDATE reader_sessions SET finished_at=? WHERE study_id=? AND "
                          "reader=? AND sess=?", (now, study["id"], user.name, sess))
    return {"session": sess, "position": pos, "case": reading["case_num"],
            "arm": reading["arm"], "diseased": int(diseased), "score": value,
            "rating": rating, "seconds": round(seconds, 2),
            "window_changes": len(json.loads(reading["wl_changes"])),
            "session_done": where["session"]["done"] + 1}


def _saliency_png(web: _Web, row: Any) -> bytes:  # noqa: ANN401
    """The aided arm's overlay: where the gateway's triage model for the instance's
    modality finds its evidence (its saliency map) on the image it scored - not the
    forensic evidence map, which answers another question. 404 without such a model."""
    import io

    import numpy as np
    from PIL import Image

    from radguard.dicom.io import read_dataset
    from radguard.dicom.limits import decode_scope
    from radguard.gateway.wado import render_pixels, tint
    from radguard.images import display_frame

    model = web.gateway.pipeline.models.get(str(row.modality).upper())
    if model is None:
        raise HTTPException(404, "no triage model for this modality: no saliency map")
    with decode_scope():
        ds = read_dataset(web.store.file(row))
        grey = display_frame(ds)  # what the model scored (radguard.forensics.scan)
        try:
            saliency = np.asarray(model.saliency(grey), dtype=np.float32)
        except RadguardError as exc:
            raise HTTPException(404, f"no saliency map: {exc}") from exc
        heat = np.asarray(Image.fromarray(saliency, mode="F")
                          .resize((grey.shape[1], grey.shape[0])))
        picture = Image.fromarray(tint(render_pixels(ds), heat))
    picture.thumbnail((VIEW, VIEW))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def _case_png(web: _Web, case: dict[str, Any], centre: float, width: float,
              heat: bool) -> bytes:
    store = web.store
    if case["instance_id"] is not None:
        row = store.get(case["instance_id"])
        if row is None:
            raise RadguardError("instance gone")
        if heat:
            return _saliency_png(web, row)
        from radguard.dicom.io import read_dataset
        from radguard.dicom.limits import decode_scope
        from radguard.gateway.wado import Render, render_pixels

        with decode_scope():
            pixels = render_pixels(read_dataset(store.file(row)), 0,
                                   Render("image/png", viewport=(VIEW, VIEW),
                                          shrink_only=True))
        return _png(_windowed(pixels, centre, width))
    root = _root(web, "readers_image_root")
    path = _inside(root, case["path"])
    if not path.is_file():
        raise RadguardError("image file gone")
    return _png(_windowed(_grey_file(path), centre, width))


# -- awareness -----------------------------------------------------------------------------------

def _pool(root: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(real image paths, {generator: synthetic image paths}), relative to ``root``."""
    real: list[str] = []
    generators: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name
        if not (name.startswith(("synthetic-", "cxr-", "real-"))):
            continue
        skip: set[str] = set()
        labels = folder / "labels.csv"
        if name.startswith("synthetic-") and labels.is_file():
            with labels.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    if (row.get("label") or "").strip().lower() == "real":
                        skip.add(Path(row.get("file") or "").name)
        files = sorted(str(p.relative_to(root)) for p in folder.rglob("*")
                       if p.suffix.lower() in POOL_SUFFIXES and p.is_file()
                       and p.name not in skip)
        if name.startswith("synthetic-"):
            if files:
                generators[name] = files
        else:
            real.extend(files)
    return real, generators


def _feedback(path: Path) -> dict[str, Any]:
    """What the forensics layers say of one pool image: verdict, score, reasons, heat map."""
    from radguard.forensics.scan import scan_file
    from radguard.forensics.synthetic import load_detector

    result = scan_file(path, detector=load_detector())
    reasons = list(result.reasons)
    if result.synthetic is not None:
        reasons += [r for r in result.synthetic.reasons(5) if r not in reasons]
    return {"verdict": result.verdict,
            "score": None if result.synthetic_score is None else
            round(float(result.synthetic_score), 3),
            "reasons": reasons[:8],
            "heatmap": None if result.synthetic is None else
            [[round(float(v), 3) for v in row] for row in result.synthetic.heatmap]}


def _add_awareness_routes(app: FastAPI, web: _Web) -> None:
    store = web.store

    def pool_root() -> Path:
        root = _root(web, "readers_awareness_pool")
        if root is None or not root.is_dir():
            raise HTTPException(409, "no awareness image pool is configured on this gateway")
        return root

    def round_of(rid: int, user: User) -> dict[str, Any]:
        row = store.execute("SELECT id, reader, generator, started_at, finished_at FROM "
                            "awareness_rounds WHERE id=?", (_pos_int(rid),)).fetchone()
        if row is None or row[1] != user.name:
            raise HTTPException(404, "no such round")
        items = store.execute("SELECT pos, path, source, synthetic, answer, confidence, "
                              "feedback FROM awareness_items WHERE round_id=? ORDER BY pos",
                              (rid,)).fetchall()
        keys = ("pos", "path", "source", "synthetic", "answer", "confidence", "feedback")
        return {"id": row[0], "generator": row[2], "started_at": row[3],
                "finished_at": row[4],
                "items": [dict(zip(keys, i, strict=True)) for i in items]}

    def score(items: list[dict[str, Any]]) -> dict[str, Any]:
        answered = [i for i in items if i["answer"] is not None]
        correct = sum(1 for i in answered if i["answer"] == i["synthetic"])
        low, high = wilson(correct, len(answered))
        return {"correct": correct, "total": len(answered),
                "accuracy": correct / len(answered) if answered else None,
                "low": low, "high": high}

    def overall(reader: str) -> dict[str, Any]:
        rows = store.execute("SELECT i.answer, i.synthetic FROM awareness_items i JOIN "
                             "awareness_rounds r ON r.id=i.round_id WHERE r.reader=? AND "
                             "i.answer IS NOT NULL", (reader,)).fetchall()
        return score([{"answer": a, "synthetic": s} for a, s in rows])

    @app.get("/awareness")
    def awareness_home(request: Request,
                       user: User = Depends(web.role("radiologist"))) -> Response:
        rounds = store.execute("SELECT id, generator, finished_at FROM awareness_rounds "
                               "WHERE reader=? ORDER BY id", (user.name,)).fetchall()
        seen = [r[0] for r in store.execute("SELECT generator FROM awareness_seen WHERE "
                                            "reader=? ORDER BY generator",
                                            (user.name,)).fetchall()]
        return web.page("reader_awareness.html", request, user, "Deepfake awareness",
                        rounds=rounds, seen=seen, total=overall(user.name),
                        seeds=SEED_FIGURES)

    @app.post("/awareness/rounds")
    async def start_round(user: User = Depends(web.role("radiologist"))) -> Response:
        rid, generator, count = await run_in_threadpool(_start_round, web, pool_root(), user)
        web.audit("awareness.start", f"awareness-round:{rid}",
                  {"generator": generator, "items": count}, user.name)
        return RedirectResponse(f"/awareness/{rid}", status_code=303)

    @app.get("/awareness/{rid}")
    def show_round(rid: int, request: Request,
                   user: User = Depends(web.role("radiologist"))) -> Response:
        rnd = round_of(rid, user)
        pending = [i for i in rnd["items"] if i["answer"] is None]
        if pending:
            item = pending[0]
            with store.transaction():
                store.execute("UPDATE awareness_items SET served_at=? WHERE round_id=? AND "
                              "pos=? AND served_at IS NULL", (store.now(), rid, item["pos"]))
            return web.page("reader_fake.html", request, user,
                            f"Image {item['pos']} of {len(rnd['items'])}", rnd=rnd,
                            item=item)
        return web.page("reader_awareness_round.html", request, user,
                        f"Round {rnd['id']}: your score", rnd=rnd, score=score(rnd["items"]),
                        total=overall(user.name), seeds=SEED_FIGURES)

    def item_of(rid: int, pos: int, user: User) -> tuple[dict[str, Any], dict[str, Any]]:
        rnd = round_of(rid, user)
        item = next((i for i in rnd["items"] if i["pos"] == pos), None)
        if item is None:
            raise HTTPException(404, "no such image")
        return rnd, item

    @app.get("/awareness/{rid}/{pos}/image.png")
    def fake_image(rid: int, pos: int,
                   user: User = Depends(web.role("radiologist"))) -> Response:
        rnd, item = item_of(rid, pos, user)
        pending = [i["pos"] for i in rnd["items"] if i["answer"] is None]
        if item["answer"] is None and pos != pending[0]:
            raise HTTPException(409, "that is not your next image")
        path = _inside(pool_root(), item["path"])
        return Response(_png(_grey_file(path)), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @app.post("/awareness/{rid}/{pos}/answer")
    async def answer(rid: int, pos: int, request: Request,
                     user: User = Depends(web.role("radiologist"))) -> Response:
        fields = await _fields(request)

        def record() -> dict[str, Any] | None:
            rnd, item = item_of(rid, pos, user)  # before the form: someone else's is 404
            said = _one(fields, "answer")
            if said not in ("real", "synthetic"):
                raise HTTPException(400, "answer real or synthetic")
            try:
                confidence = int(_one(fields, "confidence"))
            except ValueError as exc:
                raise HTTPException(400, "confidence is 1-5") from exc
            if not 1 <= confidence <= 5:
                raise HTTPException(400, "confidence is 1-5")
            pending = [i["pos"] for i in rnd["items"] if i["answer"] is None]
            if not pending or pos != pending[0]:
                raise HTTPException(409, "that is not your next image")
            feedback = _feedback(_inside(pool_root(), item["path"]))
            with store.transaction():
                now = store.now()
                done = store.execute(
                    "UPDATE awareness_items SET answer=?, confidence=?, answered_at=?, "
                    "feedback=? WHERE round_id=? AND pos=? AND answer IS NULL RETURNING pos",
                    (int(said == "synthetic"), confidence, now, json.dumps(feedback), rid,
                     pos)).fetchone()
                if done is None:
                    raise HTTPException(409, "already answered")
                if len(pending) == 1:
                    store.execute("UPDATE awareness_rounds SET finished_at=? WHERE id=?",
                                  (now, rid))
            if len(pending) > 1:
                return None
            final = score(round_of(rid, user)["items"])
            return {"generator": rnd["generator"], "score": final["accuracy"],
                    "correct": final["correct"], "total": final["total"],
                    "ci95": [round(final["low"], 4), round(final["high"], 4)]}
        finished = await run_in_threadpool(record)
        if finished is not None:
            web.audit("awareness.round", f"awareness-round:{rid}", finished, user.name)
        return RedirectResponse(f"/awareness/{rid}/{pos}/feedback", status_code=303)

    @app.get("/awareness/{rid}/{pos}/feedback")
    def feedback(rid: int, pos: int, request: Request,
                 user: User = Depends(web.role("radiologist"))) -> Response:
        rnd, item = item_of(rid, pos, user)
        if item["answer"] is None:
            raise HTTPException(409, "answer first")
        fb = json.loads(item["feedback"] or "{}")
        return web.page("reader_feedback.html", request, user,
                        f"Image {pos} of {len(rnd['items'])}: "
                        f"{'right' if item['answer'] == item['synthetic'] else 'wrong'}",
                        rnd=rnd, item=item, fb=fb, score=score(rnd["items"]),
                        last=pos == len(rnd["items"]))

    @app.get("/awareness/{rid}/{pos}/heat.png")
    def fake_heat(rid: int, pos: int,
                  user: User = Depends(web.role("radiologist"))) -> Response:
        _rnd, item = item_of(rid, pos, user)
        fb = json.loads(item["feedback"] or "{}") if item["answer"] is not None else {}
        if not fb.get("heatmap"):
            raise HTTPException(404, "no heat map")
        grey = _grey_file(_inside(pool_root(), item["path"]))
        return Response(_heat_png(grey, fb["heatmap"]), media_type="image/png",
                        headers={"Cache-Control": "no-store"})


def _start_round(web: _Web, root: Path, user: User) -> tuple[int, str, int]:
    """A round: synthetic images from a generator this reader has not seen (while one
    remains), as many real ones, shuffled; the generator is marked seen."""
    store = web.store
    real, generators = _pool(root)
    if not real or not generators:
        raise HTTPException(409, "the awareness pool needs real and synthetic images")
    seen = {r[0] for r in store.execute("SELECT generator FROM awareness_seen WHERE reader=?",
                                        (user.name,)).fetchall()}
    rng = random.Random(secrets.randbits(64))
    unseen = sorted(set(generators) - seen)
    generator = rng.choice(unseen or sorted(generators))
    size = int(web.gateway.config.readers_awareness_items)
    half = max(1, min(size // 2, len(generators[generator]), len(real)))
    items = [(p, generator, 1) for p in rng.sample(generators[generator], half)] + \
        [(p, Path(p).parts[0], 0) for p in rng.sample(real, half)]
    rng.shuffle(items)
    with store.transaction():
        now = store.now()
        rid = store.execute("INSERT INTO awareness_rounds (reader, generator, started_at) "
                            "VALUES (?, ?, ?) RETURNING id",
                            (user.name, generator, now)).fetchone()[0]
        for pos, (path, source, synthetic) in enumerate(items, 1):
            store.execute("INSERT INTO awareness_items (round_id, pos, path, source, "
                          "synthetic) VALUES (?, ?, ?, ?, ?)",
                          (rid, pos, path, source, synthetic))
        if generator not in seen:
            store.execute("INSERT INTO awareness_seen (reader, generator, round_id) VALUES "
                          "(?, ?, ?)", (user.name, generator, rid))
    return int(rid), generator, len(items)
