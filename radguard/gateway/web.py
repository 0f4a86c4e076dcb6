"""The gateway's HTTP side (FastAPI): DICOMweb (PS3.18) and the web UI, all behind tokens.

Every route needs a bearer token (``Authorization: Bearer ...``) or the session cookie the
login page sets, except the login itself (``GET/POST /login``, ``POST /auth/token``): without
one the answer is 401, with the wrong role 403. Every request that reaches a route, and every
failed login, is written to the audit log; retrieving more than ``bulk_read_limit``
instances within ten minutes raises a bulk-read alarm there ("monitoring for unusual bulk
downloads").

DICOMweb: STOW-RS ``POST /dicom-web/studies``; QIDO-RS ``GET /dicom-web/studies``,
``.../studies/{study}/series``, ``.../series/{series}/instances``, ``/dicom-web/instances``;
WADO-RS ``GET /dicom-web/studies/{study}`` and ``.../instances/{sop}``. Only instances that
passed the pipeline (state ``done``) are visible: quarantined ones are not clinical data.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections import defaultdict, deque
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from radguard.errors import RadguardError
from radguard.gateway.auth import AuthError, User, Users
from radguard.gateway.dimse import header_of
from radguard.gateway.oidc import NoRole
from radguard.gateway.store import Instance

__all__ = ["MAX_BODY", "create_app"]

MAX_BODY = 512 << 20  # one STOW request; larger bodies get 413
COOKIE = "radguard_session"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
CLINICAL = "state='done'"


def _uid(value: str) -> str:
    if len(value) > 64 or not _UID.match(value):
        raise HTTPException(400, "not a DICOM UID")
    return value


class _BulkReads:
    """Instances retrieved per user in a sliding ten-minute window."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.events: dict[str, deque[float]] = defaultdict(deque)
        self.alarmed: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, user: str, count: int) -> bool:
        """Record ``count`` retrievals; True when this crosses the limit (once per window)."""
        now = time.monotonic()
        with self.lock:
            q = self.events[user]
            q.extend([now] * count)
            while q and q[0] < now - 600:
                q.popleft()
            if len(q) > self.limit and now - self.alarmed.get(user, -1e9) > 600:
                self.alarmed[user] = now
                return True
        return False


def create_app(gateway: Any, *, bulk_read_limit: int = 500) -> Any:  # noqa: ANN401
    """The FastAPI application for one running :class:`~radguard.gateway.Gateway`."""
    app = FastAPI(title="radguard gateway", docs_url=None, redoc_url=None, openapi_url=None)
    users = Users(gateway.store)
    store = gateway.store
    bulk = _BulkReads(bulk_read_limit)
    oidc = gateway.oidc  # the identity provider's tokens, when [oidc] is configured

    def audit(action: str, target: str, details: dict[str, Any], actor: str) -> None:
        gateway.audit_log.append(action, target, details, actor=actor)

    def current_user(request: Request) -> User:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else \
            request.cookies.get(COOKIE, "")
        if not token:
            raise HTTPException(401, "authentication required",
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            if oidc is not None and token.count(".") == 2:  # a JWT: radguard's are not
                user = oidc.user(token)
            else:
                user = users.user_for_token(token)
        except NoRole as exc:
            audit("auth.no_role", _client(request), {"why": str(exc)[:200]}, "anonymous")
            raise HTTPException(403, str(exc)) from exc
        except AuthError as exc:
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
        audit("http.access", f"{request.method} {request.url.path}",
              {"via": user.via} if user.via != "radguard" else {}, user.name)
        return user

    def role(*allowed: str) -> Any:  # noqa: ANN401
        def check(user: User = Depends(current_user)) -> User:
            if user.role != "admin" and user.role not in allowed:
                raise HTTPException(403, f"role {user.role} may not do this")
            return user
        return check

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if "text/html" in request.headers.get("accept", "") and exc.status_code == 401:
            return RedirectResponse("/login", status_code=303)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    # -- login --------------------------------------------------------------------------------
    async def _form(request: Request) -> dict[str, str]:
        body = await request.body()
        if len(body) > 4096:
            raise HTTPException(413, "form too large")
        try:
            fields = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=False)
        except UnicodeDecodeError as exc:
            raise HTTPException(400, "form is not UTF-8") from exc
        return {k: v[0] for k, v in fields.items() if v}

    def _login(name: str, password: str, request: Request) -> str:
        try:
            user = users.check_password(name, password)
        except AuthError as exc:
            audit("auth.failed", name[:64], {"client": _client(request)}, "anonymous")
            raise HTTPException(401, "wrong user name or password",
                                headers={"WWW-Authenticate": "Bearer"}) from exc
        audit("auth.login", user.name, {"client": _client(request)}, user.name)
        return users.issue_token(user.name)

    @app.post("/auth/token")
    async def auth_token(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body() or b"{}")
            name, password = str(body["user"]), str(body["password"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HTTPException(400, 'send {"user": ..., "password": ...}') from exc
        return JSONResponse({"token": _login(name, password, request),
                             "token_type": "bearer"})

    @app.get("/login", response_class=HTMLResponse)
    def login_page() -> str:
        return _page("Sign in", "<form method='post' action='/login' class='login'>"
                     "<label>User <input name='user' autocomplete='username'></label>"
                     "<label>Password <input name='password' type='password' "
                     "autocomplete='current-password'></label><button>Sign in</button></form>")

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        token = _login(form.get("user", ""), form.get("password", ""), request)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout")
    def logout(request: Request, user: User = Depends(current_user)) -> Response:
        token = request.cookies.get(COOKIE)
        if token:
            users.revoke(token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    # -- DICOMweb -----------------------------------------------------------------------------
    @app.post("/dicom-web/studies")
    async def stow(request: Request, user: User = Depends(role("technologist"))) -> Response:
        from radguard.dicom.web import DicomWebError, split_multipart

        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            raise HTTPException(413, f"request larger than {MAX_BODY} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_BODY:
                raise HTTPException(413, f"request larger than {MAX_BODY} bytes")
        try:
            parts = split_multipart(bytes(body), request.headers.get("content-type", ""))
        except DicomWebError as exc:
            raise HTTPException(400, str(exc)) from exc
        if not parts:
            raise HTTPException(400, "no instances in the request")
        stored, failed = [], []
        for headers, content in parts:
            ctype = headers.get("content-type", "application/dicom").split(";")[0].strip()
            if ctype.lower() != "application/dicom":
                failed.append(("", f"unsupported part type {ctype}"))
                continue
            try:
                header = header_of(content, "STOW part", decode_compressed=gateway.config
                                   .validate_compressed_pixels)
                store.ingest(content, header, source="stow", calling_ae=f"stow:{user.name}")
            except (RadguardError, OSError) as exc:
                failed.append(("", str(exc)[:200]))
                continue
            gateway._wake_up(0)
            stored.append(header)
        audit("stow", user.name, {"stored": len(stored), "failed": len(failed)}, user.name)
        answer: dict[str, Any] = {}
        if stored:
            answer["00081199"] = {"vr": "SQ", "Value": [
                {"00081150": {"vr": "UI", "Value": [h["sop_class"]]},
                 "00081155": {"vr": "UI", "Value": [h["sop_uid"]]}} for h in stored]}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": [
                {"00081197": {"vr": "US", "Value": [0xC000]},
                 "00081196": {"vr": "LO", "Value": [why]}} for _, why in failed]}
        code = 200 if not failed else 202 if stored else 409
        return Response(json.dumps(answer), status_code=code, media_type="application/dicom+json")

    def _qido(rows: list[dict[str, Any]]) -> Response:
        return Response(json.dumps(rows), media_type="application/dicom+json")

    @app.get("/dicom-web/studies")
    def qido_studies(user: User = Depends(role("radiologist"))) -> Response:
        return _qido([_study_json(s) for s in _studies(store)])

    @app.get("/dicom-web/studies/{study}/series")
    def qido_series(study: str, user: User = Depends(role("radiologist"))) -> Response:
        rows = store.instances(f"{CLINICAL} AND study_uid=?", (_uid(study),))
        series = {r.series_uid: r for r in rows}
        return _qido([{"0020000D": _ui(r.study_uid), "0020000E": _ui(r.series_uid),
                       "00080060": {"vr": "CS", "Value": [r.modality]}}
                      for r in series.values()])

    @app.get("/dicom-web/studies/{study}/series/{series}/instances")
    def qido_instances(study: str, series: str,
                       user: User = Depends(role("radiologist"))) -> Response:
        rows = store.instances(f"{CLINICAL} AND study_uid=? AND series_uid=?",
                               (_uid(study), _uid(series)))
        return _qido([_instance_json(r) for r in rows])

    @app.get("/dicom-web/instances")
    def qido_all_instances(limit: int = 1000, offset: int = 0,
                           user: User = Depends(role("radiologist"))) -> Response:
        limit, offset = max(1, min(limit, 5000)), max(0, offset)
        rows = store.instances(CLINICAL, order=f"id LIMIT {limit} OFFSET {offset}")
        return _qido([_instance_json(r) for r in rows])

    def _wado(rows: list[Instance], user: User, target: str) -> Response:
        if not rows:
            raise HTTPException(404, "no such study or instance")
        if bulk.add(user.name, len(rows)):
            audit("alarm.bulk_read", user.name, {"limit_per_10_min": bulk.limit,
                                                 "last": target}, "radguard-gateway")
        boundary = "radguard-" + secrets.token_hex(12)
        buf = io.BytesIO()
        for r in rows:
            buf.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            buf.write(store.file(r).read_bytes())
            buf.write(b"\r\n")
        buf.write(f"--{boundary}--\r\n".encode())
        return Response(buf.getvalue(), media_type=f'multipart/related; '
                        f'type="application/dicom"; boundary={boundary}')

    @app.get("/dicom-web/studies/{study}")
    def wado_study(study: str, user: User = Depends(role("radiologist"))) -> Response:
        return _wado(store.instances(f"{CLINICAL} AND study_uid=?", (_uid(study),)), user,
                     study)

    @app.get("/dicom-web/studies/{study}/series/{series}/instances/{sop}")
    def wado_instance(study: str, series: str, sop: str,
                      user: User = Depends(role("radiologist"))) -> Response:
        rows = store.instances(f"{CLINICAL} AND study_uid=? AND series_uid=? AND sop_uid=?",
                               (_uid(study), _uid(series), _uid(sop)))
        return _wado(rows[-1:], user, sop)

    # -- UI -----------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def worklist(user: User = Depends(role("radiologist"))) -> str:
        return _page("Worklist", _worklist_html(store, gateway), user)

    @app.get("/studies/{study}", response_class=HTMLResponse)
    def study_view(study: str, user: User = Depends(role("radiologist"))) -> str:
        rows = store.instances("study_uid=?", (_uid(study),))
        if not rows:
            raise HTTPException(404, "no such study")
        return _page(f"Study {rows[0].patient_name}", _study_html(rows), user)

    @app.get("/instances/{instance_id}/image.png")
    def image(instance_id: int, heat: bool = False,
              user: User = Depends(role("radiologist"))) -> Response:
        row = store.get(instance_id)
        if row is None:
            raise HTTPException(404, "no such instance")
        try:
            png = _render(store.file(row), heat)
        except RadguardError as exc:
            raise HTTPException(422, str(exc)) from exc
        audit("image.view", row.sop_uid, {"heat": heat}, user.name)
        return Response(png, media_type="image/png")

    @app.get("/quarantine", response_class=HTMLResponse)
    def quarantine(user: User = Depends(role("radiologist"))) -> str:
        rows = store.instances("state IN ('quarantined','rejected')", order="id DESC")
        return _page("Quarantine", _quarantine_html(rows, user), user)

    @app.post("/quarantine/{instance_id}/{action}")
    async def decide(instance_id: int, action: str, request: Request,
                     user: User = Depends(role())) -> Response:
        if action not in ("release", "reject"):
            raise HTTPException(404, "unknown action")
        form = await _form(request)
        note = form.get("note", "").strip()[:500]
        if not note:
            raise HTTPException(400, "say why (a note is required)")
        try:
            row = store.decide(instance_id, "done" if action == "release" else "rejected",
                               user.name, note)
        except RadguardError as exc:
            raise HTTPException(409, str(exc)) from exc
        audit(f"quarantine.{action}", row.sop_uid, {"note": note}, user.name)
        if action == "release":
            try:
                forwarded = gateway.pipeline.forward(row)
                if forwarded:
                    store.set_forwarded(row.id, forwarded)
            except RadguardError as exc:
                audit("forward.failed", row.sop_uid, {"error": str(exc)[:200]}, user.name)
        return RedirectResponse("/quarantine", status_code=303)

    @app.get("/audit", response_class=HTMLResponse)
    def audit_view(user: User = Depends(role("auditor"))) -> str:
        rows = gateway.audit_log.recent(200)[::-1]
        body = "".join(f"<tr><td>{e.seq}</td><td>{html.escape(e.ts)}</td><td>"
                       f"{html.escape(e.actor)}</td><td>{html.escape(e.action)}</td><td>"
                       f"{html.escape(e.target)}</td></tr>" for e in rows)
        report = gateway.audit_log.verify()
        state = "intact" if report.intact else "TAMPERED: " + "; ".join(report.problems[:3])
        return _page("Audit log", f"<p>Chain: {html.escape(state)}</p><table><tr><th>#</th>"
                     f"<th>time</th><th>who</th><th>action</th><th>target</th></tr>{body}"
                     "</table>", user)

    return app


def _client(request: Any) -> str:  # noqa: ANN401
    return request.client.host if request.client else ""


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _studies(store: Any) -> list[dict[str, Any]]:  # noqa: ANN401
    out: dict[str, dict[str, Any]] = {}
    for r in store.instances(CLINICAL):
        s = out.setdefault(r.study_uid, {"uid": r.study_uid, "patient_id": r.patient_id,
                                         "patient_name": r.patient_name, "date": r.study_date,
                                         "modalities": set(), "count": 0})
        s["modalities"].add(r.modality)
        s["count"] += 1
    return list(out.values())


def _study_json(s: dict[str, Any]) -> dict[str, Any]:
    return {"0020000D": _ui(s["uid"]),
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": s["patient_name"]}]},
            "00100020": {"vr": "LO", "Value": [s["patient_id"]]},
            "00080020": {"vr": "DA", "Value": [s["date"]]} if s["date"] else {"vr": "DA"},
            "00080061": {"vr": "CS", "Value": sorted(m for m in s["modalities"] if m)},
            "00201208": {"vr": "IS", "Value": [s["count"]]}}


def _instance_json(r: Instance) -> dict[str, Any]:
    return {"0020000D": _ui(r.study_uid), "0020000E": _ui(r.series_uid),
            "00080018": _ui(r.sop_uid), "00080016": _ui(r.sop_class),
            "00080060": {"vr": "CS", "Value": [r.modality]}}


# -- HTML ------------------------------------------------------------------------------------------

_CSS = ("body{font-family:system-ui,sans-serif;margin:0}header{background:#123;color:#fff;"
        "padding:.6em 1em;display:flex;gap:1.5em;align-items:center}header a{color:#cde}"
        "main{padding:1em}table{border-collapse:collapse;width:100%}td,th{border-bottom:1px "
        "solid #ddd;padding:.35em .5em;text-align:left}.badge{padding:.1em .5em;border-radius:"
        ".6em;font-size:.85em}.signed,.watermarked{background:#cfc}.unsigned{background:#eee}"
        ".bad{background:#fcc}.suspicious{background:#ffd9a0}form.login{display:grid;gap:.6em;"
        "max-width:20em}img.view{max-width:48%;margin-right:1%}")


def _page(title: str, body: str, user: User | None = None) -> str:
    nav = ""
    if user is not None:
        nav = ("<a href='/'>Worklist</a><a href='/quarantine'>Quarantine</a>"
               "<a href='/audit'>Audit log</a>"
               f"<span>{html.escape(user.name)} ({html.escape(user.role)})</span>"
               "<form method='post' action='/logout'><button>Sign out</button></form>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)} - "
            f"radguard</title><style>{_CSS}</style></head><body><header><b>radguard</b>{nav}"
            f"</header><main><h1>{html.escape(title)}</h1>{body}</main></body></html>")


_BAD_TRUST = ("signature invalid", "signature untrusted", "watermark changed", "unknown")


def _badge(trust: str | None, verdict: str | None) -> str:
    trust = trust or "pending"
    css = "bad" if trust in _BAD_TRUST else trust if trust in ("signed", "watermarked") \
        else "unsigned"
    extra = ""
    if verdict and verdict not in ("authentic",):
        extra = f" <span class='badge {'suspicious' if verdict == 'suspicious' else 'bad'}'>" \
                f"{html.escape(verdict)}</span>"
    return f"<span class='badge {css}' data-trust='{html.escape(trust)}'>" \
           f"{html.escape(trust)}</span>{extra}"


def _worklist_rows(store: Any) -> list[dict[str, Any]]:  # noqa: ANN401
    """One row per study in reading order (radguard.triage.worklist rules)."""
    from radguard.triage.worklist import Study, order_worklist

    groups: dict[str, list[Instance]] = defaultdict(list)
    for r in store.instances("state='done'"):
        groups[r.study_uid].append(r)
    studies, info = [], {}
    for uid, rows in groups.items():
        scored = [r for r in rows if r.ai_probability is not None]
        best = max(scored, key=lambda r: r.ai_probability) if scored else None
        arrived = dt.datetime.fromisoformat(min(r.received_at for r in rows))
        studies.append(Study(uid, arrived, best.ai_probability if best else 0.0,
                             best.ai_suspicion if best and best.ai_suspicion else 1))
        worst = next((r for r in rows if r.trust in _BAD_TRUST), None) or \
            next((r for r in rows if r.trust == "unsigned"), rows[0])
        info[uid] = {"rows": rows, "scored": best is not None, "worst": worst}
    ordered = order_worklist(studies, dt.datetime.now(dt.UTC))
    return [{"study": s, **info[s.uid]} for s in ordered]


def _worklist_html(store: Any, gateway: Any) -> str:  # noqa: ANN401
    rows = []
    for n, item in enumerate(_worklist_rows(store), 1):
        s, first, worst = item["study"], item["rows"][0], item["worst"]
        ai = (f"{s.suspicion}/10 ({s.probability:.2f})" if item["scored"]
              else "<span class='unsigned badge'>not scored</span>")
        rows.append(f"<tr class='study' data-study='{s.uid}' data-rank='{n}'><td>{n}</td>"
                    f"<td><a href='/studies/{s.uid}'>{html.escape(first.patient_name)}</a></td>"
                    f"<td>{html.escape(first.modality)}</td><td>{len(item['rows'])}</td>"
                    f"<td>{_badge(worst.trust, worst.verdict)}</td><td>{ai}</td>"
                    f"<td>{html.escape(first.received_at[:19])}</td></tr>")
    counts = store.counts()
    alarms = gateway.audit_log.recent(5, ("monitoring.alarm", "alarm.bulk_read"))
    alarm_html = "".join(f"<li class='alarm'>{html.escape(e.ts[:19])} {html.escape(e.action)}"
                         f" {html.escape(e.target)}</li>" for e in alarms)
    return (f"<p>{counts.get('done', 0)} instances cleared, {counts.get('quarantined', 0)} in "
            f"<a href='/quarantine'>quarantine</a>, {counts.get('rejected', 0)} rejected, "
            f"{counts.get('queued', 0) + counts.get('processing', 0)} being checked.</p>"
            + (f"<h2>Alarms</h2><ul>{alarm_html}</ul>" if alarm_html else "")
            + "<table id='worklist'><tr><th>#</th><th>patient</th><th>modality</th>"
            "<th>images</th><th>trust</th><th>AI suspicion</th><th>received</th></tr>"
            + "".join(rows) + "</table>")


def _study_html(rows: list[Instance]) -> str:
    parts = []
    for r in rows:
        d = r.detail
        scan = d.get("scan", {})
        reasons = "".join(f"<li>{html.escape(str(x))}</li>" for x in d.get("reasons", []))
        parts.append(
            f"<section class='instance' data-sop='{r.sop_uid}'><h2>{html.escape(r.modality)} "
            f"{_badge(r.trust, r.verdict)} <small>{html.escape(r.state)}</small></h2>"
            f"<figure><img class='view' alt='image' src='/instances/{r.id}/image.png'>"
            f"<img class='view' alt='heat map' src='/instances/{r.id}/image.png?heat=true'>"
            "<figcaption>left: the image as windowed for display; right: where the "
            "synthetic-image detector found its evidence (red)</figcaption></figure>"
            f"<table><tr><th>signature</th><td>{html.escape(str(scan.get('signature')))}</td>"
            f"</tr><tr><th>watermark</th><td>{html.escape(str(scan.get('watermark')))}</td></tr>"
            f"<tr><th>forensics</th><td>{html.escape(str(r.verdict))}, synthetic score "
            f"{html.escape(str(scan.get('synthetic_score')))}</td></tr><tr><th>AI</th><td>"
            f"{html.escape(json.dumps(d.get('triage')))}</td></tr></table>"
            f"<ul>{reasons}</ul></section>")
    return "".join(parts)


def _quarantine_html(rows: list[Instance], user: User) -> str:
    out = []
    for r in rows:
        reasons = "; ".join(r.detail.get("reasons", [])[:2])
        action = ""
        if r.state == "quarantined" and user.role == "admin":
            action = "".join(
                f"<form method='post' action='/quarantine/{r.id}/{a}'><input name='note' "
                f"placeholder='why' required><button>{a}</button></form>"
                for a in ("release", "reject"))
        decided = f"{html.escape(r.decided_by or '')} {html.escape(r.decision_note or '')}"
        out.append(f"<tr data-id='{r.id}'><td>{html.escape(r.patient_name)}</td><td>"
                   f"{html.escape(r.state)}</td><td>{_badge(r.trust, r.verdict)}</td><td>"
                   f"{html.escape(reasons)}</td><td>{decided}</td><td>{action}</td></tr>")
    return ("<table id='quarantine'><tr><th>patient</th><th>state</th><th>trust</th>"
            "<th>why</th><th>decided</th><th></th></tr>" + "".join(out) + "</table>")


def _render(path: Any, heat: bool) -> bytes:  # noqa: ANN401
    from PIL import Image

    from radguard.dicom.io import read_dataset
    from radguard.images import blend_heat, display_frame

    ds = read_dataset(path)
    grey = display_frame(ds)
    if heat:
        from radguard.forensics.synthetic import load_detector

        result = load_detector().analyse(grey)
        import numpy as np

        heatmap = np.asarray(Image.fromarray(result.heatmap.astype(np.float32), mode="F")
                             .resize((grey.shape[1], grey.shape[0])))
        picture = Image.fromarray(blend_heat(grey, heatmap))
    else:
        picture = Image.fromarray(grey)
    picture.thumbnail((768, 768))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()
