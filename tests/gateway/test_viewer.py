"""The OHIF Viewer served by the gateway (gateway/viewer.py): only files of its dist, the SPA's
client routes, the generated app-config.js, the relaxed CSP under /viewer/ only, sign-in on
every file; the study page that frames it with radguard's verdict beside it; and, in headless
Chromium, OHIF rendering a DX, a CT and a JPEG 2000 CR from the gateway's own DICOMweb."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from radguard.gateway import Gateway, GatewayConfig
from radguard.gateway.auth import Users
from radguard.gateway.httpguard import CSP, VIEWER_CSP, VIEWER_WORKER_CSP
from radguard.gateway.viewer import app_config, index_html
from tests.conftest import DICOM_DIR, NIH_DX
from tests.gateway.conftest import PASSWORD, chromium, web_gateway

BUNDLE = "app.bundle.0123456789abcdef.js"
# the parts of OHIF's shipped index.html that matter: built for the site root, with inline
# scripts
SHIPPED_INDEX = (
    '<!doctype html><html lang="en"><head><meta charset="UTF-8">'
    '<meta name="msapplication-TileImage" content="/assets/mstile-144x144.png">'
    '<script>console.time("scriptToView"),window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json">'
    '<script rel="preload" as="script" src="/app-config.js"></script>'
    '<title>OHIF Viewer</title>'
    '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
    f'<script defer src="/{BUNDLE}"></script><link href="/app.bundle.css" rel="stylesheet">'
    '</head><body><div id="root"></div></body></html>')


def _fake_dist(folder):
    """A small stand-in for OHIF's dist/ (the real one is 200 MB), a secret beside it."""
    dist = folder / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(SHIPPED_INDEX)
    (dist / BUNDLE).write_text('__webpack_require__.p = "/";\nconsole.log("ohif");\n')
    (dist / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm\1\0\0\0")
    (dist / "app-config.js").write_text("window.config = {shipped: true};")
    (dist / "app.bundle.css").write_text("@font-face{src:url(/a34f9d1faa5f3315.woff2)}")
    (dist / "manifest.json").write_text("{}")
    (dist / "assets" / "logo.svg").write_text("<svg/>")
    (dist / ".htpasswd").write_text("hidden")
    (folder / "secret.txt").write_text("SECRET-OUTSIDE-THE-DIST")
    (dist / "link.txt").symlink_to(folder / "secret.txt")
    return dist


def _gateway(tmp_path, dist):
    return web_gateway(tmp_path / "data", viewer_ohif_dist=str(dist))


@pytest.fixture
def gateway(tmp_path):
    gw = _gateway(tmp_path, _fake_dist(tmp_path))
    yield gw
    gw.stop()


def _get(gw, path: str, token: str | None = None, **headers: str) -> httpx.Response:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(f"http://127.0.0.1:{gw.http_port}{path}", headers=headers, timeout=60,
                     trust_env=False)


def _raw_get(gw, path: str, token: str) -> tuple[int, bytes]:
    """A GET whose path is sent byte for byte (httpx would resolve ``..`` first)."""
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=60) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _stow(gw, *paths) -> None:
    boundary = "viewer-test-boundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + p.read_bytes() + b"\r\n" for p in paths) + f"--{boundary}--\r\n".encode()
    resp = httpx.post(f"http://127.0.0.1:{gw.http_port}/dicom-web/studies", content=body,
                      headers={"Authorization": f"Bearer {gw.tokens['tech']}",
                               "Content-Type": f'multipart/related; type="application/dicom"; '
                                               f"boundary={boundary}"},
                      timeout=120, trust_env=False)
    assert resp.status_code == 200, resp.text
    assert gw.wait_idle(120)


def test_viewer_needs_a_signed_in_radiologist(gateway):
    resp = _get(gateway, "/viewer/", Accept="text/html")  # a browser: sent to sign in
    assert resp.status_code == 303 and resp.headers["location"] == "/login"
    assert _get(gateway, f"/viewer/{BUNDLE}").status_code == 401  # a script: 401
    for name in ("tech", "aud"):
        assert _get(gateway, "/viewer/", gateway.tokens[name]).status_code == 403
        assert _get(gateway, f"/viewer/{BUNDLE}", gateway.tokens[name]).status_code == 403
    assert _get(gateway, "/viewer/", "not-a-token").status_code == 401
    for name in ("rad", "boss"):
        assert _get(gateway, "/viewer/", gateway.tokens[name]).status_code == 200
    # opening the viewer is audited; each of its files is not
    for _ in range(3):
        _get(gateway, f"/viewer/{BUNDLE}", gateway.tokens["rad"])
    actions = [e.action for e in gateway.audit_log.entries() if e.actor == "rad"]
    assert actions.count("viewer.open") == 1 and "http.access" not in actions


def test_static_files_spa_fallback_and_no_traversal(gateway):
    rad = gateway.tokens["rad"]
    resp = _get(gateway, "/viewer", rad)
    assert resp.status_code == 307 and resp.headers["location"] == "/viewer/"

    page = _get(gateway, "/viewer/", rad)
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    html = page.text
    assert '<head><base href="/viewer/">' in html
    assert 'src="/viewer/app-config.js"' in html and f'src="/viewer/{BUNDLE}"' in html
    assert 'href="/viewer/app.bundle.css"' in html and 'content="/viewer/assets/' in html
    assert "<script>" not in html and "PUBLIC_URL" not in html  # no inline script
    # OHIF's client routes get its page; a missing file does not
    spa = _get(gateway, "/viewer/viewer?StudyInstanceUIDs=1.2.3", rad)
    assert spa.status_code == 200 and spa.text == html
    assert _get(gateway, "/viewer/viewer/dicomweb", rad).text == html
    assert _get(gateway, "/viewer/no-such-chunk.js", rad).status_code == 404

    bundle = _get(gateway, f"/viewer/{BUNDLE}", rad)
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert bundle.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert '__webpack_require__.p = "/viewer/";' in bundle.text  # chunks load from /viewer/
    css = _get(gateway, "/viewer/app.bundle.css", rad)  # its font is under /viewer/ too
    assert css.text == "@font-face{src:url(/viewer/a34f9d1faa5f3315.woff2)}"
    assert css.headers["content-type"].startswith("text/css")
    wasm = _get(gateway, "/viewer/0ddf166f7a343eda.wasm", rad)
    assert wasm.headers["content-type"] == "application/wasm"
    assert wasm.content == b"\0asm\1\0\0\0"
    assert _get(gateway, "/viewer/manifest.json", rad).headers["content-type"] == \
        "application/json"
    svg = _get(gateway, "/viewer/assets/logo.svg", rad)
    assert svg.headers["content-type"] == "image/svg+xml" and svg.headers["cache-control"] == \
        "no-cache"

    for path in ("/viewer/../secret.txt", "/viewer/%2e%2e/secret.txt",
                 "/viewer/..%2fsecret.txt", "/viewer/assets/..%2f..%2fsecret.txt",
                 "/viewer/assets/%2e%2e/%2e%2e/secret.txt", "/viewer/%2fetc%2fpasswd",
                 "/viewer//etc/passwd", "/viewer/link.txt", "/viewer/.htpasswd",
                 "/viewer/assets/..%5c..%5csecret.txt", "/viewer/index.html%00.js"):
        status, body = _raw_get(gateway, path, rad)
        assert b"SECRET" not in body and b"root:" not in body and b"hidden" not in body, path
        assert status in (303, 400, 404), (path, status)


def test_app_config_points_at_the_gateway(gateway):
    resp = _get(gateway, "/viewer/app-config.js", gateway.tokens["rad"])
    assert resp.headers["content-type"].startswith("text/javascript")
    assert "shipped: true" not in resp.text and resp.text == app_config()
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: the viewer needs npm (and node) to be installed")
    origin = "https://gateway.example:8443"
    script = ("const window = {location: {origin: " + json.dumps(origin) + "}};\n"
              + resp.text + "\nconsole.log(JSON.stringify("
              "{url: window.PUBLIC_URL, config: window.config}));")
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60,
                         check=True).stdout.splitlines()[-1]
    evaluated = json.loads(out)
    config = evaluated["config"]
    assert evaluated["url"] == "/viewer/" and config["routerBasename"] == "/viewer"
    (source,) = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert config["defaultDataSourceName"] == source["sourceName"]
    c = source["configuration"]
    assert c["qidoRoot"] == c["wadoRoot"] == origin + "/dicom-web"
    assert c["wadoUriRoot"] == origin + "/wado"
    assert c["qidoSupportsIncludeField"] is True and c["staticWado"] is False
    assert c["imageRendering"] == c["thumbnailRendering"] == "wadors"
    assert c["enableStudyLazyLoad"] and c["supportsWildcard"]
    assert c["supportsFuzzyMatching"] is False and c["omitQuotationForMultipartRequest"]
    # the session cookie goes with every same-origin request: no token in the page
    assert gateway.tokens["rad"] not in resp.text and "Authorization" not in resp.text
    assert "headers" not in c and "requestOptions" not in c


def test_index_html_for_a_sub_path():
    html = index_html(SHIPPED_INDEX, "/ohif")
    assert html.startswith('<!doctype html><html lang="en"><head><base href="/ohif/">')
    assert 'src="/ohif/app-config.js"' in html and "<script>" not in html


def test_csp_is_relaxed_under_viewer_only(gateway, tmp_path):
    rad = gateway.tokens["rad"]
    _stow(gateway, NIH_DX)
    study = gateway.store.instances()[0].study_uid
    for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2", "/viewer/manifest.json",
                 "/viewer/0ddf166f7a343eda.wasm", f"/viewer/{BUNDLE}", "/viewer/app-config.js",
                 "/viewer/nope.js"):
        h = _get(gateway, path, rad).headers
        # a script's own policy counts only when it runs as a web worker (the decoders)
        expected = VIEWER_WORKER_CSP if path.endswith(".js") else VIEWER_CSP
        assert h["content-security-policy"] == expected, path
        assert h["x-frame-options"] == "SAMEORIGIN" and h["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'self'" in VIEWER_CSP and "'unsafe-eval'" not in VIEWER_CSP
    for policy in (VIEWER_CSP, VIEWER_WORKER_CSP):
        assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
        assert "connect-src 'self' data: blob:;" in policy and "object-src 'none'" in policy
    for path in ("/", "/login", f"/studies/{study}", "/quarantine", "/dicom-web/studies",
                 "/viewerx", "/static/viewer.css"):
        h = _get(gateway, path, rad).headers
        assert h["content-security-policy"] == CSP, path
        assert h["x-frame-options"] == "DENY"
    h = _get(gateway, f"/studies/{study}/viewer", rad).headers  # the page that frames it
    assert h["content-security-policy"] == CSP + "; frame-src 'self'"
    assert h["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in CSP


def test_study_page_frames_the_viewer_beside_the_verdict(gateway):
    rad = gateway.tokens["rad"]
    _stow(gateway, NIH_DX)
    (row,) = gateway.store.instances()
    worklist = _get(gateway, "/", rad).text
    assert f'href="/studies/{row.study_uid}/viewer">Open in viewer</a>' in worklist
    assert f'id="open-viewer" href="/studies/{row.study_uid}/viewer"' in \
        _get(gateway, f"/studies/{row.study_uid}", rad).text
    page = _get(gateway, f"/studies/{row.study_uid}/viewer", rad)
    assert page.status_code == 200
    assert f'<iframe id="ohif" title="OHIF Viewer" src="/viewer/viewer?StudyInstanceUIDs=' \
           f'{row.study_uid}"></iframe>' in page.text
    assert f'data-sop="{row.sop_uid}" data-state="{row.state}"' in page.text
    assert f'data-trust="{row.trust}"' in page.text and "AI</dt>" in page.text
    assert _get(gateway, "/static/viewer.css").headers["content-type"].startswith("text/css")
    assert _get(gateway, f"/studies/{row.study_uid}/viewer", gateway.tokens["tech"]
                ).status_code == 403
    assert _get(gateway, "/studies/1.2.3/viewer", rad).status_code == 404
    assert _get(gateway, "/studies/x..y/viewer", rad).status_code == 400


def test_without_the_viewer_the_pages_say_so(tmp_path):
    gw = _gateway(tmp_path, tmp_path / "no-such-dist")
    try:
        rad = gw.tokens["rad"]
        _stow(gw, NIH_DX)
        study = gw.store.instances()[0].study_uid
        worklist = _get(gw, "/", rad).text
        assert "viewer not installed" in worklist and "Open in viewer" not in worklist
        assert "viewer not installed" in _get(gw, f"/studies/{study}", rad).text
        for path in (f"/studies/{study}/viewer", "/viewer/", "/viewer/app-config.js"):
            resp = _get(gw, path, rad)
            assert resp.status_code == 404 and 'id="viewer-missing"' in resp.text, path
    finally:
        gw.stop()


# -- the acceptance test: OHIF in headless Chromium ---------------------------------------------

@pytest.fixture
def browser(tmp_path):
    # WebGL without a GPU: SwiftShader (cornerstone falls back to CPU rendering without it)
    b = chromium(tmp_path / "chrome", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--window-size=1600,1000", log_network=True)
    yield b
    b.quit()


# the viewport's canvas: share of pixels that are not black, and the grey-level spread
_CANVAS_STATS = """
const canvases = Array.from(document.querySelectorAll('canvas.cornerstone-canvas'))
  .filter(c => c.width > 64 && c.height > 64);
if (!canvases.length) return null;
const c = canvases[0];
const ctx = c.getContext('2d');
if (!ctx) return {webgl: true, width: c.width, height: c.height};
const d = ctx.getImageData(0, 0, c.width, c.height).data;
let lit = 0, lo = 255, hi = 0;
for (let i = 0; i < d.length; i += 16) {
  const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
  if (v > 8) lit++;
  lo = Math.min(lo, v); hi = Math.max(hi, v);
}
return {width: c.width, height: c.height, lit: lit / (d.length / 16), spread: hi - lo};
"""


def _network(browser) -> list[str]:
    """The requests the page made and their answers, from Chromium's performance log."""
    seen: dict[str, str] = {}
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            seen[params["requestId"]] = f"{params['request']['method']} " \
                                        f"{params['request']['url'][:200]} -> (no answer)"
        elif msg["method"] == "Network.responseReceived":
            r = params["response"]
            seen[params["requestId"]] = f"GET {r['url'][:200]} -> {r['status']} " \
                                        f"{r.get('mimeType', '')}"
        elif msg["method"] == "Network.loadingFailed":
            seen[params["requestId"]] = seen.get(params["requestId"], "?") + \
                f" FAILED {params.get('errorText', '')}"
    return list(seen.values())


def _rendered(browser, timeout: float) -> dict | None:
    """Wait for the viewport to show a picture (in the framed OHIF): its canvas stats."""
    from PIL import Image

    deadline = time.monotonic() + timeout
    stats = None
    while time.monotonic() < deadline:
        stats = browser.execute_script(_CANVAS_STATS)
        if stats and stats.get("webgl"):  # a WebGL canvas: judge a screenshot of it
            import io

            from selenium.webdriver.common.by import By

            canvas = browser.find_element(By.CSS_SELECTOR, "canvas.cornerstone-canvas")
            grey = Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("L")
            px = list(grey.getdata())
            stats = {**stats, "lit": sum(v > 8 for v in px) / len(px),
                     "spread": max(px) - min(px)}
        if stats and stats["lit"] > 0.02 and stats["spread"] > 40:
            return stats
        time.sleep(2)
    return stats


def test_ohif_renders_studies_from_the_worklist(tmp_path, browser):
    """The acceptance test: sign in, open a DX, a CT and a JPEG 2000 CR from the worklist's
    viewer links, and OHIF (framed beside the verdict) draws each one's pixels."""
    from pydicom.data import get_testdata_file
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           check_processes=0)
    if not (config.viewer_dist() / "index.html").is_file():
        pytest.fail(f"OHIF not installed at {config.viewer_dist()}: run scripts/install.sh "
                    "--dev")
    gw = Gateway(config)
    users = Users(gw.store)
    users.add("rad", "radiologist", PASSWORD)
    users.add("tech", "technologist", PASSWORD)
    gw.tokens = {"tech": users.issue_token("tech")}
    gw.start()
    log = tmp_path / "ohif-network.txt"
    try:
        files = {"DX": NIH_DX, "CT": get_testdata_file("CT_small.dcm"),
                 "CR": DICOM_DIR / "pydicom-data-RG3_J2KI.dcm"}  # JPEG 2000, 1760 x 1760
        from pathlib import Path

        _stow(gw, *(Path(p) for p in files.values()))
        studies = {r.modality: r.study_uid for r in gw.store.clinical_instances()}
        assert set(studies) == set(files), studies
        base = f"http://127.0.0.1:{gw.http_port}"
        browser.get(base + "/login")
        browser.find_element(By.NAME, "user").send_keys("rad")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.TAG_NAME, "button").click()
        WebDriverWait(browser, 30).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#worklist tr.study")))
        failures = []
        for modality, uid in studies.items():
            browser.get(base + "/")
            row = browser.find_element(By.CSS_SELECTOR, f'#worklist tr[data-study="{uid}"]')
            row.find_element(By.CSS_SELECTOR, "a.open-viewer").click()
            WebDriverWait(browser, 30).until(
                ec.frame_to_be_available_and_switch_to_it((By.ID, "ohif")))
            stats = _rendered(browser, 150)
            browser.save_screenshot(str(tmp_path / f"ohif-{modality}.png"))
            browser.switch_to.default_content()
            verdicts = browser.find_elements(By.CSS_SELECTOR, "#verdicts section.instance")
            assert len(verdicts) == 1 and verdicts[0].get_attribute("data-state") == "done"
            browser.save_screenshot(str(tmp_path / f"page-{modality}.png"))
            if not stats or stats["lit"] <= 0.02 or stats["spread"] <= 40:
                failures.append(f"{modality}: {stats}")
        network = _network(browser)
        console = [e["message"][:300] for e in browser.get_log("browser")]
        log.write_text("\n".join(network + ["", "console:"] + console))
        assert not failures, (f"OHIF drew nothing for {failures}; its requests "
                              f"(also in {log}):\n" + "\n".join(
                                  n for n in network if "/viewer/" not in n or "-> 2" not in n
                              ) + "\nconsole:\n" + "\n".join(console[-30:]))
    finally:
        gw.stop()
