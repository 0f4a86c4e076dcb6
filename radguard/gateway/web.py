"""The gateway's HTTP side (FastAPI): DICOMweb (PS3.18) and the web UI, all behind tokens.

Every route needs a bearer token (``Authorization: Bearer ...``) or the session cookie the
login page sets, except the login itself (``GET/POST /login``, ``POST /auth/token``), the
style sheet and ``GET /health`` (readiness: status, gateway id, what is wrong): without one
the answer is 401, with the wrong role 403. Every request that
reaches a route, and failed logins (bounded, see :class:`~radguard.gateway.ratelimit.Throttle`),
are written to the audit log; retrieving more than ``bulk_read_limit`` instances within ten
minutes raises a bulk-read alarm there ("monitoring for unusual bulk downloads").

DICOMweb: STOW-RS ``POST /dicom-web/studies``; QIDO-RS ``GET /dicom-web/studies``,
``.../studies/{study}/series``, ``.../series/{series}/instances``, ``/dicom-web/instances``;
WADO-RS and WADO-URI (retrieve, metadata, frames, rendered, ``/wado``) are in
:mod:`radguard.gateway.wado`. Only instances that
passed the pipeline (state ``done``) are visible: quarantined ones are not clinical data.

Hardening (issue 21), with the pieces in :mod:`radguard.gateway.httpguard`:

* Pages are Jinja2 templates with autoescaping and double-quoted attributes, so a UID or
  patient name from an unauthenticated C-STORE is text, never markup; no page has a script,
  and the Content-Security-Policy forbids scripts and inline styles anyway.
* A request that changes something with the session cookie must come from the gateway's own
  origin (``Origin``/``Referer``) and carry the session's CSRF token (form field ``csrf`` or
  header ``X-CSRF-Token``); bearer-token calls (scripts, DICOMweb clients) send no cookie and
  are not subject to it.
* Bodies are limited before they are read (forms and logins 8 KiB, STOW-RS
  ``stow_max_mb``); a STOW-RS body is parsed as it arrives and each part spooled to a file
  in the data folder, never held whole in memory, and closed when its boundary is reached
  (one open part file per request, at most ``STOW_MAX_PARTS`` parts).
* Logins back off per user name from one address, per user name overall and per address
  (429 + Retry-After; :class:`~radguard.gateway.httpguard.LoginGuard`), and at most
  ``PASSWORD_CHECKS`` scrypt checks run at once, so a login flood can neither guess on nor
  take the CPU.
* A store or audit log that cannot be read or written (full disk, database down) gives 503
  with a short message - for a browser a page with the gateway's problem as its banner:
  failing closed (no access goes unaudited) must not leave the UI blank; ids beyond 64 bits
  give 404 - never a 500 with a traceback.
* Errors are pages (``error.html``, autoescaped; a failed sign-in is the login page again
  with the reason) for a browser on the UI, and JSON for programs: DICOMweb, WADO-URI,
  ``/auth/token`` and ``/health`` answer as they always did (issue 27).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.exceptions import HTTPException as StarletteHTTPException

from radguard.dicom.uids import uid_problem
from radguard.dicom.web import DicomWebError, MultipartParser, Part
from radguard.errors import RadguardError
from radguard.gateway.auth import AuthError, User, Users, may_see_quarantine
from radguard.gateway.dimse import header_of
from radguard.gateway.httpguard import (
    BodyTimeout,
    BodyTooLarge,
    GuardMiddleware,
    Lockout,
    LoginGuard,
    retry_after,
)
from radguard.gateway.oidc import NoRole
from radguard.gateway.query import Level, QueryError, from_qido, search, to_json
from radguard.gateway.ratelimit import Throttle, peer_key
from radguard.gateway.store import Instance, PoolBusy, Store, StoreError
from radguard.gateway.studyview import ai_result, brief, checks, forensic_map_matters
from radguard.governance.auditlog import AuditLogError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from radguard.gateway.service import Gateway

__all__ = ["FORM_MAX", "STOW_MAX_PARTS", "create_app"]

log = logging.getLogger("radguard.gateway")

COOKIE = "radguard_session"
CSRF_FIELD = "csrf"
_STOW_PATH = re.compile(r"/dicom-web/studies(/[0-9.]{1,64})?")
FORM_MAX = 8 << 10  # a login, a token request, a quarantine decision: a few hundred bytes
PASSWORD_CHECKS = 2  # scrypt checks at once (16 MB and ~0.1 s of a core each)
MAX_ROW_ID = (1 << 63) - 1  # ids are 64-bit in SQLite and PostgreSQL
# parts in one STOW-RS request: a large CT series fits (about 1,000 slices in the 512 MiB
# body), and as only one part file is open at a time, the open-file limit is not what
# bounds it
STOW_MAX_PARTS = 5_000
RETRY_SECONDS = 30  # Retry-After of a 503: the workers probe a failing store every 1-30 s
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TEMPLATES = Path(__file__).parent / "templates"
_BAD_TRUST = ("signature invalid", "signature untrusted", "signature weak", "watermark changed",
              "unknown")


def _uid(value: str) -> str:
    """A UID from a path, admitted as at the door (:func:`radguard.dicom.uids.uid_problem`)."""
    problem = uid_problem(value, "the UID in the path")
    if problem is not None:
        raise HTTPException(400, problem)
    return value


def _row_id(value: int) -> int:
    """A path's row id; anything no row can have (negative, beyond 64 bits) is not found."""
    if not 0 < value <= MAX_ROW_ID:
        raise HTTPException(404, "no such instance")
    return value


def _trust_css(trust: str | None) -> str:
    trust = trust or "pending"
    return "bad" if trust in _BAD_TRUST else trust if trust in ("signed", "watermarked") \
        else "unsigned"


_env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=True,
                   undefined=StrictUndefined)
_env.globals["trust_css"] = _trust_css
_env.filters["brief"] = brief  # a long reason cut at a word, for a table cell


class _BulkReads:
    """Instances retrieved per user in a sliding ten-minute window, counted in the store's
    database (tables ``bulk_reads``, ``bulk_alarms``): gateways sharing one database count
    together, on its clock, and the alarm is raised once per window by one of them."""

    window = 600.0  # seconds
    purge_every = 60.0  # seconds between deleting counts that left the window

    def __init__(self, store: Store, limit: int) -> None:
        self.store, self.limit = store, limit
        self._purged = -1e9  # time.monotonic() of this process's last purge
        self._purge_lock = threading.Lock()

    def add(self, user: str, count: int) -> bool:
        """Record ``count`` retrievals; True when this crosses the limit (once per window,
        across gateways). A database that cannot count lets the read through (logged): the
        alarm is monitoring, and the read itself was authorised and is audited."""
        try:
            alarmed, now = self._add(user, count)
        except StoreError as exc:
            log.error("bulk-read count of %s not kept, read allowed uncounted: %s", user, exc)
            return False
        try:
            self._purge(now)
        except StoreError as exc:
            log.error("old bulk-read counts not deleted (next try in a minute): %s", exc)
        return alarmed

    def _add(self, user: str, count: int) -> tuple[bool, float]:
        """(whether this gateway raises the alarm, the database's time)."""
        with self.store.transaction(durable=False):
            # one user's counts take turns across gateways (SQLite: the write lock already)
            self.store.backend.lock_uid(self.store.execute, "bulk-read:" + user)
            now = self.store.now()
            self.store.execute("INSERT INTO bulk_reads (name, at, count) VALUES (?, ?, ?)",
                               (user, now, count))
            total = self.store.execute("SELECT COALESCE(SUM(count), 0) FROM bulk_reads "
                                       "WHERE name = ? AND at > ?",
                                       (user, now - self.window)).fetchone()[0]
            # only the gateway whose upsert claims the window raises the alarm
            alarmed = total > self.limit and self.store.execute(
                "INSERT INTO bulk_alarms (name, at) VALUES (?, ?) ON CONFLICT (name) DO "
                "UPDATE SET at = excluded.at WHERE bulk_alarms.at <= ? RETURNING name",
                (user, now, now - self.window)).fetchone() is not None
        return alarmed, now

    def _purge(self, now: float) -> None:
        """Delete counts and alarms older than the window, once a minute per gateway."""
        with self._purge_lock:
            if time.monotonic() - self._purged < self.purge_every:
                return
            self._purged = time.monotonic()
        with self.store.transaction(durable=False):
            self.store.execute("DELETE FROM bulk_reads WHERE at <= ?", (now - self.window,))
            self.store.execute("DELETE FROM bulk_alarms WHERE at <= ?", (now - self.window,))


def csrf_token(session: str) -> str:
    """The CSRF token of a session: derived from the session token (which the page's
    origin alone can read, as an HttpOnly cookie), so nothing needs storing."""
    return hmac.new(session.encode(), b"radguard-csrf", hashlib.sha256).hexdigest()[:32]


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _credentials(request: Request) -> tuple[str, bool]:
    """(token, came from the session cookie)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), False
    return request.cookies.get(COOKIE, ""), True


class _Web:
    """What the routes share: the gateway's store and users, auditing, authentication,
    login backoff, page rendering."""

    def __init__(self, gateway: Gateway, bulk_read_limit: int) -> None:
        config = gateway.config
        self.gateway, self.store, self.oidc = gateway, gateway.store, gateway.oidc
        self.users = Users(gateway.store)
        self.bulk = _BulkReads(gateway.store, bulk_read_limit)
        self.logins = LoginGuard(
            config.login_max_failures, config.login_max_failures_per_client,
            config.login_backoff_seconds, config.login_backoff_max_seconds,
            max_failures_all_clients=config.login_max_failures_all_clients,
            ipv6_prefix=config.ipv6_peer_prefix)
        self.password_checks = anyio.CapacityLimiter(PASSWORD_CHECKS)
        self.throttle = Throttle()
        self.spool = Path(gateway.store.root) / "http-spool"
        shutil.rmtree(self.spool, ignore_errors=True)  # uploads a crash interrupted
        self.spool.mkdir(parents=True, exist_ok=True)

    # -- audit --------------------------------------------------------------------------------
    def audit(self, action: str, target: str, details: dict[str, Any], actor: str) -> None:
        self.gateway.audit_log.append(action, target, details, actor=actor)

    def audit_bounded(self, key: str, action: str, target: str, details: dict[str, Any],
                      actor: str = "anonymous") -> None:
        """An audit entry for an event an attacker can repeat at will: the first per key,
        then one a minute carrying how many were held back."""
        write, held = self.throttle.allow(key)
        if write:
            self.audit(action, target, {**details, **({"held_back": held} if held else {})},
                       actor)

    # -- authentication -----------------------------------------------------------------------
    def authenticate(self, token: str, request: Request) -> User:
        """The token's user (radguard's own token, or the identity provider's JWT)."""
        try:
            if self.oidc is not None and token.count(".") == 2:  # a JWT: radguard's are not
                user = self.oidc.user(token)
            else:
                user = self.users.user_for_token(token)
        except NoRole as exc:
            self.audit("auth.no_role", _client(request), {"why": str(exc)[:200]}, "anonymous")
            raise HTTPException(403, str(exc)) from exc
        except AuthError as exc:
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
        self.audit("http.access", f"{request.method} {request.url.path}",
                   {"via": user.via} if user.via != "radguard" else {}, user.name)
        return user

    async def current_user(self, request: Request) -> User:
        """FastAPI dependency: the caller, or 401; cookie requests that change something must
        pass the same-origin and CSRF checks."""
        token, from_cookie = _credentials(request)
        if not token:
            raise HTTPException(401, "authentication required",
                                headers={"WWW-Authenticate": "Bearer"})
        user = await run_in_threadpool(self.authenticate, token, request)
        if from_cookie and request.method not in SAFE_METHODS:
            await self._check_csrf(request, token, user)
        return user

    def role(self, *allowed: str) -> Callable[[User], User]:
        """FastAPI dependency: the caller, if admin or one of ``allowed`` (else 403)."""
        def check(user: User = Depends(self.current_user)) -> User:
            if user.role != "admin" and user.role not in allowed:
                raise HTTPException(403, f"role {user.role} may not do this")
            return user
        return check

    async def _check_csrf(self, request: Request, session: str, user: User) -> None:
        why = _foreign_origin(request)
        if why is None:
            sent = request.headers.get("x-csrf-token", "")
            if not sent and request.headers.get("content-type", "").startswith(
                    "application/x-www-form-urlencoded"):
                sent = (await self.form(request)).get(CSRF_FIELD, "")
            if not hmac.compare_digest(sent.encode(), csrf_token(session).encode()):
                why = "missing or wrong CSRF token"
        if why is not None:
            await run_in_threadpool(self.audit_bounded, f"csrf:{user.name}", "http.csrf_refused",
                                    f"{request.method} {request.url.path}",
                                    {"why": why, "client": _client(request)}, user.name)
            raise HTTPException(403, f"cross-site request refused ({why})")

    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        """An urlencoded form (the body is already limited to FORM_MAX by the middleware)."""
        try:
            fields = urllib.parse.parse_qs((await request.body()).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise HTTPException(400, "form is not UTF-8") from exc
        return {k: v[0] for k, v in fields.items() if v}

    # -- logins -------------------------------------------------------------------------------
    async def login(self, name: str, password: str, request: Request) -> str:
        """A new session token for the right password, unless the name or the address is
        waiting out failed attempts (429: checked before any password work, so a locked
        name is refused even with its right password)."""
        client = _client(request)
        if _foreign_origin(request):
            raise HTTPException(403, "cross-site login refused")
        self._refuse_if_locked(name, client)
        try:
            user, lockouts = await anyio.to_thread.run_sync(
                self._check_password, name, password, client, limiter=self.password_checks)
        except _Locked:
            self._refuse_if_locked(name, client)
            raise HTTPException(429, "too many failed logins") from None
        if user is None:
            await run_in_threadpool(self._audit_failure, name, client, lockouts)
            raise HTTPException(401, "wrong user name or password",
                                headers={"WWW-Authenticate": "Bearer"})

        def session() -> str:
            self.audit("auth.login", user.name, {"client": client}, user.name)
            return self.users.issue_token(user.name)
        return await run_in_threadpool(session)

    def _refuse_if_locked(self, name: str, client: str) -> None:
        wait, reason = self.logins.wait(name, client)
        if wait > 0:
            self.audit_bounded(f"locked:{peer_key(client)}", "auth.refused_locked", name[:64],
                               {"client": client, "locked": reason.value if reason else ""})
            raise HTTPException(429, f"too many failed logins: try again in "
                                f"{retry_after(wait)} s", headers={"Retry-After":
                                                                   retry_after(wait)})

    def _check_password(self, name: str, password: str, client: str
                        ) -> tuple[User | None, list[Lockout]]:
        """Runs with a password-check slot: the wait is checked again here, as other
        attempts may have failed while this one queued for the slot."""
        if self.logins.wait(name, client)[0] > 0:
            raise _Locked
        try:
            user = self.users.check_password(name, password)
        except AuthError:
            return None, self.logins.failed(name, client)
        self.logins.succeeded(name, client)
        return user, []

    def _audit_failure(self, name: str, client: str, lockouts: list[Lockout]) -> None:
        self.audit_bounded(f"failed:{peer_key(client)}", "auth.failed", name[:64],
                           {"client": client})
        for lock in lockouts:
            # %r: the name is the client's choice; no control characters reach the log
            log.warning("logins for %s %r wait %.0f s after %d failures", lock.reason.value,
                        lock.who, lock.seconds, lock.failures)
            target = f"{lock.reason.value}:{lock.who}"
            self.audit_bounded(f"lockout:{target}", "auth.lockout", target,
                               {"failures": lock.failures, "seconds": round(lock.seconds, 1),
                                "client": client})

    # -- pages --------------------------------------------------------------------------------
    def page(self, template: str, request: Request, user: User | None, title: str,
             status: int = 200, headers: dict[str, str] | None = None,
             problem: str | None = None, **context: Any) -> HTMLResponse:  # noqa: ANN401
        """A rendered template (autoescaped) with the CSRF token of the caller's session and
        the gateway's current problem (else ``problem``), if any, as a banner."""
        token, from_cookie = _credentials(request)
        html = _env.get_template(template).render(
            title=title, user=user, csrf=csrf_token(token) if token and from_cookie else "",
            problem=self.gateway.problem or problem, **context)
        return HTMLResponse(html, status_code=status,
                            headers={"Cache-Control": "no-store", **(headers or {})})


class _Locked(Exception):
    """A login attempt that became locked out while it queued for a password check."""


def _foreign_origin(request: Request) -> str | None:
    """Why the request comes from another origin than the gateway's own, or None. Browsers
    send ``Origin`` with every POST; ``Referer`` is the fallback; clients that send
    neither (scripts) are not browsers."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is None and request.headers.get("referer"):
        parts = urllib.parse.urlsplit(request.headers["referer"])
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin is not None and origin != own:
        return f"origin {origin[:100]} is not {own[:100]}"
    return None


def create_app(gateway: Gateway, *, bulk_read_limit: int = 500) -> FastAPI:
    """The FastAPI application for one running :class:`~radguard.gateway.Gateway`."""
    app = FastAPI(title="radguard gateway", docs_url=None, redoc_url=None, openapi_url=None)
    web = _Web(gateway, bulk_read_limit)
    _add_error_handlers(app, web)
    _add_login_routes(app, web)
    _add_dicomweb_routes(app, web)
    from radguard.gateway.wado import add_wado_routes  # imports nothing of this module

    add_wado_routes(app, web)
    _add_ui_routes(app, web)
    from radguard.gateway.viewer import add_viewer_routes  # imports this module
    add_viewer_routes(app, web)
    from radguard.gateway.readers import add_reader_routes  # imports this module
    add_reader_routes(app, web)
    stow_max = int(gateway.config.stow_max_mb) << 20

    def body_limit(method: str, path: str) -> int:
        """STOW-RS (``/studies`` and ``/studies/{uid}``) may send big bodies; nothing else."""
        return stow_max if method == "POST" and _STOW_PATH.fullmatch(path.rstrip("/")) \
            else FORM_MAX

    app.add_middleware(GuardMiddleware, limit_for=body_limit, small_limit=FORM_MAX,
                       small_seconds=float(gateway.config.http_header_seconds))
    return app


# -- errors ----------------------------------------------------------------------------------------

UNAVAILABLE = ("the gateway cannot read or write its store or audit log right now (full disk "
               "or database down)")


def _from_browser(request: Request) -> bool:
    """A browser's page request (it asks for HTML), which gets pages rather than JSON."""
    return "text/html" in request.headers.get("accept", "")


# machine interfaces: their errors stay JSON (DICOMweb clients, scripts, load balancers)
_MACHINE_PATHS = ("/dicom-web", "/wado", "/auth/", "/health")
_ERROR_TITLES = {400: "Request not understood", 403: "Not allowed", 404: "Not found",
                 405: "Not possible here", 406: "Not available in that form",
                 408: "Request too slow", 409: "Not possible now", 413: "Request too large",
                 422: "Cannot be shown", 429: "Too many attempts",
                 500: "Something went wrong"}


def _wants_page(request: Request) -> bool:
    """Whether an error answers with an HTML page: a browser (it accepts text/html before
    any JSON) asking for a UI page; DICOMweb, WADO-URI, the token endpoint and /health keep
    their JSON."""
    accept = request.headers.get("accept", "").lower()
    html = accept.find("text/html")
    if html < 0 or request.url.path.startswith(_MACHINE_PATHS):
        return False
    json_at = accept.find("json")
    return json_at < 0 or html < json_at


def _add_error_handlers(app: FastAPI, web: _Web) -> None:
    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def page(request: Request, status: int, message: str,
                   headers: dict[str, str] | None = None, *, read_form: bool = True
                   ) -> Response:
        """An error as a page (autoescaped): the login page again, with the message, for a
        sign-in that failed; else an error page saying what went wrong."""
        if request.url.path == "/login":
            form: dict[str, str] = {}
            if read_form and request.method == "POST":
                try:
                    form = await web.form(request)
                except Exception:  # noqa: BLE001 - an unreadable form: an empty name
                    form = {}
            return web.page("login.html", request, None, "Sign in", status, headers,
                            message=message, name=form.get("user", "")[:64])
        title = _ERROR_TITLES.get(status) or (
            "Something went wrong" if status >= 500 else "Not possible")
        return web.page("error.html", request, None, title, status, headers,
                        message=message, code=status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        html = _from_browser(request)
        if html and request.url.path == "/login" and exc.status_code in (401, 403, 429):
            return await page(request, exc.status_code, str(exc.detail),
                              getattr(exc, "headers", None))
        if html and exc.status_code == 401:
            return RedirectResponse("/login", status_code=303)
        if _wants_page(request):
            return await page(request, exc.status_code, str(exc.detail),
                              getattr(exc, "headers", None))
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException) -> Response:
        """No such route or method (raised by the router, not by radguard): a page for a
        browser, else FastAPI's own answer as before."""
        if _wants_page(request):
            message = {404: "there is no such page", 405: "this page does not take that "
                       "request"}.get(exc.status_code, str(exc.detail))
            return await page(request, exc.status_code, message, getattr(exc, "headers", None),
                              read_form=False)
        return await http_exception_handler(request, exc)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> Response:
        if _wants_page(request):
            return await page(request, 413, str(exc), read_form=False)
        return error(413, str(exc))

    @app.exception_handler(BodyTimeout)
    async def _too_slow(request: Request, exc: BodyTimeout) -> Response:
        if _wants_page(request):
            return await page(request, 408, str(exc), read_form=False)
        return error(408, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"invalid request: {where} {first.get('msg', '')}".strip()
        if _wants_page(request):
            return await page(request, 422, message)
        return error(422, message)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        """A failure nobody foresaw: logged with its traceback by the server; the client
        gets no details - for a browser a page saying so."""
        if _wants_page(request):
            try:
                return await page(request, 500, "the gateway could not answer this request; "
                                  "the details are in its log", read_form=False)
            except Exception:  # noqa: BLE001 - the page itself failed: the plain answer
                log.exception("the error page could not be rendered")
        return PlainTextResponse("Internal Server Error", status_code=500)

    async def _unavailable(request: Request, exc: Exception) -> Response:
        # a full disk, a database that is down: the client may retry later; the details
        # (paths, database messages) go to the server's log, not to the client
        log.error("HTTP request failed on the store: %s", exc)
        headers = {"Retry-After": str(RETRY_SECONDS)}
        if _from_browser(request):  # fail closed, but say why on a page with the banner
            return web.page("unavailable.html", request, None, "Gateway unavailable", 503,
                            headers, problem=UNAVAILABLE, retry=RETRY_SECONDS)
        return error(503, f"{UNAVAILABLE}; try again later", headers)

    for kind in (StoreError, AuditLogError, OSError):
        app.add_exception_handler(kind, _unavailable)


# -- login -----------------------------------------------------------------------------------------

def _add_login_routes(app: FastAPI, web: _Web) -> None:
    @app.post("/auth/token")
    async def auth_token(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body() or b"{}")
            name, password = str(body["user"]), str(body["password"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HTTPException(400, 'send {"user": ..., "password": ...}') from exc
        return JSONResponse({"token": await web.login(name, password, request),
                             "token_type": "bearer"})

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> HTMLResponse:
        return web.page("login.html", request, None, "Sign in", message="", name="")

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await web.form(request)
        token = await web.login(form.get("user", ""), form.get("password", ""), request)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout")
    async def logout(request: Request, user: User = Depends(web.current_user)) -> Response:
        token, from_cookie = _credentials(request)
        if token and from_cookie:
            await run_in_threadpool(web.users.revoke, token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/health")
    def health() -> JSONResponse:
        """Readiness for a load balancer or supervisor (no login): 200 when this gateway
        takes new images - its database answers now, its store writes, intake is open -
        else 503 with what is wrong."""
        gateway = web.gateway
        store = gateway.store
        # what is wrong, in general words: no server names or addresses without a login
        problem = ("the store cannot be written" if store.health.problem else
                   "intake paused (disk below its reserve)" if store.intake.problem else None)
        if problem is None:
            try:
                store.ping()
            except PoolBusy:
                pass  # busy, not down: a load balancer should keep sending
            except StoreError:
                problem = "the database does not answer"
        body: dict[str, Any] = {"status": "ready" if problem is None else "unavailable",
                                "gateway": gateway.gateway_id}
        if problem is not None:
            body["problem"] = problem[:300]
        return JSONResponse(body, status_code=200 if problem is None else 503,
                            headers={"Cache-Control": "no-store"})

    @app.get("/static/radguard.css")
    def style() -> Response:
        return Response((_TEMPLATES / "static" / "radguard.css").read_bytes(),
                        media_type="text/css", headers={"Cache-Control": "max-age=3600"})


# -- DICOMweb --------------------------------------------------------------------------------------

def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _add_dicomweb_routes(app: FastAPI, web: _Web) -> None:
    store = web.store

    async def stow(request: Request, user: User, study: str | None) -> Response:
        """STOW-RS (PS3.18 10.5): each part checked and stored on its own; the answer lists
        what was stored (with its RetrieveURL) and what failed, with its SOP Instance UID
        where it could be read and a Failure Reason code; the reasons in words go in a
        299 Warning header (Failure / Warning Reason are US codes, no text)."""
        folder = Path(await run_in_threadpool(tempfile.mkdtemp, "", "stow-", str(web.spool)))
        try:
            parts = await _spool_multipart(request, folder)
            if not parts:
                raise HTTPException(400, "no instances in the request")
            stored, failed = await run_in_threadpool(_store_parts, web, parts, user, study)
        finally:
            await run_in_threadpool(shutil.rmtree, folder, True)
        await run_in_threadpool(web.audit, "stow", user.name,
                                {"stored": len(stored), "failed": len(failed)}, user.name)
        base = str(request.base_url).rstrip("/") + "/dicom-web"
        answer: dict[str, Any] = {}
        if study:
            answer["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
        if stored:
            answer["00081199"] = {"vr": "SQ", "Value": [
                {"00081150": _ui(h["sop_class"]), "00081155": _ui(h["sop_uid"]),
                 "00081190": {"vr": "UR", "Value": [
                     f"{base}/studies/{h['study_uid']}/series/{h['series_uid']}"
                     f"/instances/{h['sop_uid']}"]}} for h in stored]}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": [
                {**({"00081150": _ui(f.sop_class)} if f.sop_class else {}),
                 **({"00081155": _ui(f.sop_uid)} if f.sop_uid else {}),
                 "00081197": {"vr": "US", "Value": [f.code]}} for f in failed]}
        code = 200 if not failed else 202 if stored else 409
        headers = {"Warning": "; ".join(
            f'299 radguard "part {f.part}: {_header_text(f.why)}"' for f in failed[:20])
        } if failed else None
        return Response(json.dumps(answer), status_code=code, headers=headers,
                        media_type="application/dicom+json")

    @app.post("/dicom-web/studies")
    async def stow_any(request: Request,
                       user: User = Depends(web.role("technologist"))) -> Response:
        return await stow(request, user, None)

    @app.post("/dicom-web/studies/{study}")
    async def stow_study(study: str, request: Request,
                         user: User = Depends(web.role("technologist"))) -> Response:
        return await stow(request, user, _uid(study))

    def qido(request: Request, user: User, level: Level, **scope: str) -> Response:
        """QIDO-RS (PS3.18 10.6) at ``level``, within the path's UIDs: 400 for what
        cannot be understood, a 299 Warning for what was accepted but not used, 406 for
        a client that accepts no JSON (the XML answer is not offered)."""
        accept = request.headers.get("accept", "").lower()
        if accept and not any(t in accept for t in ("json", "*/*", "application/*")):
            raise HTTPException(406, "QIDO-RS answers application/dicom+json only")
        try:
            query = from_qido(level, request.query_params.multi_items(),
                              scope={k: v for k, v in scope.items() if v},
                              quarantine=may_see_quarantine(user))
        except QueryError as exc:
            raise HTTPException(400, str(exc)) from exc
        matches = search(store, query)
        base = str(request.base_url).rstrip("/") + "/dicom-web"
        body = json.dumps([to_json(m, query, base) for m in matches])
        headers = {"Warning": "; ".join(f'299 radguard "{w}"' for w in query.warnings)
                   } if query.warnings else None
        # PS3.18: no match is 200 with an empty array (204 is allowed, and breaks clients)
        return Response(body, media_type="application/dicom+json", headers=headers)

    @app.get("/dicom-web/studies")
    def qido_studies(request: Request,
                     user: User = Depends(web.role("radiologist"))) -> Response:
        return qido(request, user, Level.STUDY)

    @app.get("/dicom-web/series")
    def qido_all_series(request: Request,
                        user: User = Depends(web.role("radiologist"))) -> Response:
        return qido(request, user, Level.SERIES)

    @app.get("/dicom-web/studies/{study}/series")
    def qido_series(study: str, request: Request,
                    user: User = Depends(web.role("radiologist"))) -> Response:
        return qido(request, user, Level.SERIES, StudyInstanceUID=_uid(study))

    @app.get("/dicom-web/instances")
    def qido_all_instances(request: Request,
                           user: User = Depends(web.role("radiologist"))) -> Response:
        return qido(request, user, Level.IMAGE)

    @app.get("/dicom-web/studies/{study}/instances")
    def qido_study_instances(study: str, request: Request,
                             user: User = Depends(web.role("radiologist"))) -> Response:
        return qido(request, user, Level.IMAGE, StudyInstanceUID=_uid(study))

    @app.get("/dicom-web/studies/{study}/series/{series}/instances")
    def qido_instances(study: str, series: str, request: Request,
                       user: User = Depends(web.role("radiologist"))) -> Response:
        return qido(request, user, Level.IMAGE, StudyInstanceUID=_uid(study),
                    SeriesInstanceUID=_uid(series))


async def _spool_multipart(request: Request, folder: Path) -> list[Part]:
    """Parse a STOW-RS body as it arrives, each part into its own file in ``folder``, closed
    when the part's boundary is reached (a 1,000-slice series must not hold 1,000 open
    files); the parser works on 1 MiB batches in a thread, so the event loop never waits for
    the disk."""
    files: list[BinaryIO] = []

    def open_part(_headers: dict[str, str]) -> BinaryIO:
        files.append(open(folder / f"part-{len(files):05d}", "xb"))
        return files[-1]

    try:
        parser = MultipartParser(request.headers.get("content-type", ""), open_part,
                                 close_part=lambda part: part.sink.close(),
                                 max_parts=STOW_MAX_PARTS)
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= 1 << 20:
                batch, pending = pending, bytearray()
                await run_in_threadpool(parser.feed, batch)
        await run_in_threadpool(parser.feed, pending)
        return parser.finish()
    except DicomWebError as exc:
        raise HTTPException(400, str(exc)) from exc
    finally:
        if files:
            files[-1].close()  # a body that ended inside a part (the others are closed)


@dataclass(frozen=True)
class _Failed:
    """A STOW part that was not stored: its place, Failure Reason code and why."""

    part: int
    code: int
    why: str
    sop_class: str = ""
    sop_uid: str = ""


def _header_text(text: str) -> str:
    """Text for a Warning header: ASCII, no quotes or control characters, bounded."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)[:200]


def _peek_uids(path: Path) -> tuple[str, str]:
    """The SOP Class and Instance UIDs of a part that was refused, where they can be read
    at all (a failed item names its instance when it can); never raises."""
    import io
    import warnings

    from pydicom import dcmread

    from radguard.dicom.uids import uid_problem

    try:  # the head only: a 10 MB part of garbage must not be parsed element by element
        with path.open("rb") as fh:
            head = fh.read(64 << 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(io.BytesIO(head), force=True, stop_before_pixels=True)
            meta = ds.get("file_meta") or {}
            uids = (str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")
                        or ""),
                    str(ds.get("SOPInstanceUID", "")
                        or meta.get("MediaStorageSOPInstanceUID", "") or ""))
    except Exception:  # noqa: BLE001 - a part that cannot be read names nothing
        return "", ""
    return tuple(u if not uid_problem(u, "UID") else "" for u in uids)  # type: ignore[return-value]


def _store_parts(web: _Web, parts: list[Part], user: User, study: str | None = None
                 ) -> tuple[list[dict[str, str]], list[_Failed]]:
    """Check and store each spooled part: (headers of the stored, the failed) - 0xC000
    for what cannot be understood, 0xA900 for an instance of another study than the
    request's ``POST /studies/{study}``, 0xA700 when the store cannot take it. A stored
    part's file is moved into the store (same filesystem: a rename)."""
    stored: list[dict[str, str]] = []
    failed: list[_Failed] = []
    decode = web.gateway.config.validate_compressed_pixels
    for number, part in enumerate(parts, 1):
        ctype = part.headers.get("content-type", "application/dicom").split(";")[0].strip()
        if ctype.lower() != "application/dicom":
            failed.append(_Failed(number, 0xC000, f"unsupported part type {ctype[:60]}"))
            continue
        spooled = Path(part.sink.name)  # parsed and stored from the file, never read whole
        try:
            header = header_of(spooled, "STOW part", decode_compressed=decode)
        except RadguardError as exc:
            failed.append(_Failed(number, 0xC000, str(exc), *_peek_uids(spooled)))
            continue
        uids = (header["sop_class"], header["sop_uid"])
        if study is not None and header["study_uid"] != study:
            failed.append(_Failed(number, 0xA900, f"instance of study {header['study_uid']}, "
                                                  f"not of {study}", *uids))
            continue
        try:
            web.store.ingest(spooled, header, source="stow", calling_ae=f"stow:{user.name}")
        except (StoreError, OSError) as exc:
            log.error("STOW part %s not stored: %s", header["sop_uid"], exc)
            failed.append(_Failed(number, 0xA700, "out of resources: the gateway cannot "
                                                  "store it now", *uids))
            continue
        except RadguardError as exc:
            failed.append(_Failed(number, 0xC000, str(exc), *uids))
            continue
        web.gateway.wake_up()
        stored.append(header)
    return stored, failed


# -- UI --------------------------------------------------------------------------------------------

def _open_episodes(web: _Web) -> list[dict[str, object]]:
    """The drift monitor's open episodes (what the worklist shows above the studies); none
    when there is no monitor or its database cannot be read just now."""
    monitor = getattr(getattr(web.gateway, "pipeline", None), "monitor", None)
    if monitor is None:
        return []
    try:
        return monitor.episodes(10, open_only=True)
    except RadguardError:
        return []


def _add_ui_routes(app: FastAPI, web: _Web) -> None:
    store = web.store

    @app.get("/", response_class=HTMLResponse)
    def worklist(request: Request, user: User = Depends(web.role("radiologist"))) -> Response:
        alarms = web.gateway.audit_log.recent(5, ("monitoring.alarm",
                                                  "monitoring.episode_closed",
                                                  "alarm.bulk_read"))
        counts = store.counts()  # "being checked": queued + processing, forwarding included
        counts["processing"] = counts.get("processing", 0) + counts.pop("forwarding", 0)
        return web.page("worklist.html", request, user, "Worklist", rows=_worklist_rows(store),
                        counts=counts, alarms=alarms, episodes=_open_episodes(web))

    @app.get("/studies/{study}", response_class=HTMLResponse)
    def study_view(study: str, request: Request,
                   user: User = Depends(web.role("radiologist"))) -> Response:
        rows = store.instances("study_uid=?", (_uid(study),))
        if not rows:
            raise HTTPException(404, "no such study")
        models = web.gateway.pipeline.models
        items = [{"row": r, "ai": ai_result(r, models), "checks": checks(r),
                  "forensic_map": forensic_map_matters(r)} for r in rows]
        return web.page("study.html", request, user, f"Study {rows[0].patient_name}", rows=rows,
                        items=items)

    @app.get("/instances/{instance_id}/saliency.png")
    def saliency(instance_id: int,
                 user: User = Depends(web.role("radiologist"))) -> Response:
        """The triage model's saliency map over the image it scored (the aided reading
        arm's overlay, :func:`radguard.gateway.readers._saliency_png`); 404 unless the
        model that scored the image is the one loaded now and draws such maps."""
        from radguard.gateway.readers import _saliency_png

        row = store.get(_row_id(instance_id))
        if row is None:
            raise HTTPException(404, "no such instance")
        if not ai_result(row, web.gateway.pipeline.models).saliency:
            raise HTTPException(404, "no saliency map for this image")
        try:
            png = _saliency_png(web, row)
        except RadguardError as exc:
            raise HTTPException(422, "this image cannot be shown") from exc
        web.audit("image.view", row.sop_uid, {"saliency": True}, user.name)
        return Response(png, media_type="image/png")

    @app.get("/instances/{instance_id}/image.png")
    def image(instance_id: int, heat: bool = False,
              user: User = Depends(web.role("radiologist"))) -> Response:
        row = store.get(_row_id(instance_id))
        if row is None:
            raise HTTPException(404, "no such instance")
        try:
            png = _render(store.file(row), heat)
        except RadguardError as exc:
            raise HTTPException(422, str(exc)) from exc
        web.audit("image.view", row.sop_uid, {"heat": heat}, user.name)
        return Response(png, media_type="image/png")

    @app.get("/quarantine", response_class=HTMLResponse)
    def quarantine(request: Request, user: User = Depends(web.role("radiologist"))) -> Response:
        rows = store.instances("state IN ('quarantined','rejected')", order="id DESC")
        return web.page("quarantine.html", request, user, "Quarantine", rows=rows,
                        may_decide=user.role == "admin")

    @app.post("/quarantine/{instance_id}/{action}")
    async def decide(instance_id: int, action: str, request: Request,
                     user: User = Depends(web.role())) -> Response:
        if action not in ("release", "reject"):
            raise HTTPException(404, "unknown action")
        note = (await web.form(request)).get("note", "").strip()[:500]
        if not note:
            raise HTTPException(400, "say why (a note is required)")
        await run_in_threadpool(_decide, web, _row_id(instance_id), action, note, user)
        return RedirectResponse("/quarantine", status_code=303)

    @app.get("/calibration", response_class=HTMLResponse)
    def calibration_view(request: Request,
                         user: User = Depends(web.role("radiologist"))) -> Response:
        """Per-source calibration of the content detectors: which sources can be judged,
        on how many known-real images, at what thresholds."""
        book = web.gateway.pipeline.calibration
        points = [book.point(s) for s in sorted(book.counts())] if book is not None else []
        policy = web.gateway.pipeline.calibration_policy
        return web.page("calibration.html", request, user, "Calibration", points=points,
                        target=policy.target, full=policy.full, first=policy.first)

    @app.get("/audit", response_class=HTMLResponse)
    def audit_view(request: Request, user: User = Depends(web.role("auditor"))) -> Response:
        report = web.gateway.audit_log.verify()
        chain = "intact" if report.intact else "TAMPERED: " + "; ".join(report.problems[:3])
        return web.page("audit.html", request, user, "Audit log", chain=chain,
                        entries=web.gateway.audit_log.recent(200)[::-1])


def _decide(web: _Web, instance_id: int, action: str, note: str, user: User) -> None:
    """An admin's release or rejection, recorded with who and why; a release is forwarded."""
    try:
        row = web.store.decide(instance_id, "done" if action == "release" else "rejected",
                               user.name, note)
    except StoreError as exc:
        if web.store.get(instance_id) is None:
            raise HTTPException(404, "no such instance") from exc
        raise HTTPException(409, str(exc)) from exc
    web.audit(f"quarantine.{action}", row.sop_uid, {"note": note}, user.name)
    if action == "release":
        try:
            forwarded = web.gateway.pipeline.forward(row)
            if forwarded:
                web.store.set_forwarded(row.id, forwarded)
        except RadguardError as exc:
            web.audit("forward.failed", row.sop_uid, {"error": str(exc)[:200]}, user.name)


def _worklist_rows(store: Store) -> list[dict[str, Any]]:
    """One row per study in reading order (radguard.triage.worklist rules)."""
    from radguard.triage.worklist import Study, order_worklist

    groups: dict[str, list[Instance]] = defaultdict(list)
    for r in store.clinical_instances():
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


def _render(path: Path, heat: bool) -> bytes:
    """The PNG the study view shows (optionally with the synthetic-evidence heat map)."""
    from radguard.dicom.io import read_dataset
    from radguard.dicom.limits import decode_scope

    with decode_scope():  # the decoded frame counts against the decode budget while held
        return _render_scoped(read_dataset(path), heat)


def _render_scoped(ds: Dataset, heat: bool) -> bytes:
    import io

    from PIL import Image

    from radguard.gateway.wado import Render, render, render_pixels, tint
    from radguard.images import display_frame

    if not heat:  # true colour, the object's VOI: the same rendering as WADO-RS rendered
        return render(ds, Render("image/png", viewport=(768, 768), shrink_only=True))
    import numpy as np

    from radguard.forensics.synthetic import load_detector

    grey = display_frame(ds)  # what the detector judges
    result = load_detector().analyse(grey)
    heatmap = np.asarray(Image.fromarray(result.heatmap.astype(np.float32), mode="F")
                         .resize((grey.shape[1], grey.shape[0])))
    picture = Image.fromarray(tint(render_pixels(ds), heatmap))
    picture.thumbnail((768, 768))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()

