"""Stored XSS and CSRF in a real browser (headless Chromium, issue 21 item 3 and the CSRF
note): DICOM values carrying markup are written straight into the store's rows (as instances
received before the door validated UIDs would be); an admin browses every page, and no
script runs, nothing reaches the attacker's listener, and a quarantined instance stays in
quarantine - also when another local site posts a release form with the admin's cookie."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from tests.gateway.test_browser import browser  # noqa: F401 - the Chromium fixture
from tests.security.test_http import PASSWORD, insert_instance, running


class _Listener(http.server.BaseHTTPRequestHandler):
    """The attacker's server: records every request; ``/attack`` is a page whose form
    posts a quarantine release to the gateway as soon as it loads."""

    hits: list[str] = []
    attack = b""

    def do_GET(self) -> None:  # http.server's naming
        type(self).hits.append(self.path)
        body = self.attack if self.path == "/attack" else b"x"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def listener() -> Iterator[tuple[int, type[_Listener]]]:
    handler = type("Listener", (_Listener,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port, handler
    server.shutdown()
    server.server_close()


def _settle(driver) -> None:
    """Give error handlers and injected scripts time to run."""
    driver.execute_script("return Promise.all(Array.from(document.images).map("
                          "i => i.complete ? 1 : new Promise(r => i.onload = i.onerror = r)))")
    time.sleep(0.5)


def test_stored_markup_never_runs_in_the_admins_browser(tmp_path, browser, listener):  # noqa: F811
    from selenium.webdriver.common.by import By

    port, hits = listener
    spy = f"http://127.0.0.1:{port}"
    with running(tmp_path) as gw:
        held = insert_instance(gw.store, state="quarantined", sop_uid="1.2.826.1.1",
                               study_uid="1.2.826.1", patient_name=f"<img src={spy}/name>",
                               reasons=[f"<img src=x onerror=fetch('{spy}/reason')>"])
        # breaks out of a single-quoted attribute, then releases the quarantined instance
        release = (f"1'><form id=f method=post action=/quarantine/{held}/release><input "
                   f"name=note value=xss></form><img src=x onerror=f.submit()>")
        insert_instance(gw.store, sop_uid="1.2.826.2.1", study_uid=release)
        title = "1'><img src=x onerror=document.title='pwned'><x y='"
        insert_instance(gw.store, sop_uid=f'"><script>window.pwned=1;fetch("{spy}/sop")'
                        f"</script>{title}", study_uid="1.2.826.3",
                        patient_name=f'"><script>fetch("{spy}/pn")</script>')
        insert_instance(gw.store, sop_uid="1.2.826.4.1",
                        study_uid=f"\"><img src=x onerror=window.pwned=2;fetch('{spy}/st')>",
                        modality=f"<script>fetch('{spy}/modality')</script>")
        gw.audit_log.append("instance.quarantined", f"<img src=x onerror=fetch('{spy}/audit')>",
                            {})
        base = f"http://127.0.0.1:{gw.http_port}"
        browser.get(base + "/login")
        browser.find_element(By.NAME, "user").send_keys("boss")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.TAG_NAME, "button").click()
        for path, heading in (("/", "Worklist"), ("/studies/1.2.826.3", "Study"),
                              ("/quarantine", "Quarantine"), ("/audit", "Audit log"), ("/", "")):
            browser.get(base + path)
            _settle(browser)
            assert browser.execute_script("return document.title").endswith(" - radguard"), path
            assert browser.execute_script("return window.pwned === undefined"), path
            assert browser.find_element(By.TAG_NAME, "h1").text.startswith(heading)
        browser.get(base + "/")
        header = browser.find_element(By.TAG_NAME, "header")  # the style sheet loads under CSP
        assert header.value_of_css_property("background-color") == "rgba(17, 34, 51, 1)"
        rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tr.study")
        assert sorted(r.get_attribute("data-study") for r in rows) == sorted(
            [release, "1.2.826.3", f"\"><img src=x onerror=window.pwned=2;fetch('{spy}/st')>"])
        browser.get(base + "/quarantine")
        names = [r.find_elements(By.TAG_NAME, "td")[0].text
                 for r in browser.find_elements(By.CSS_SELECTOR, "#quarantine tr[data-id]")]
        assert names == [f"<img src={spy}/name>"]  # shown as the text it is
        assert gw.store.get(held).state == "quarantined"
    assert hits.hits == []
    assert not [e for e in gw.audit_log.entries() if e.action == "quarantine.release"]


def test_a_cross_origin_form_cannot_release_with_the_admins_cookie(tmp_path, browser,  # noqa: F811
                                                                  listener):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port, handler = listener
    with running(tmp_path) as gw:
        held = insert_instance(gw.store, state="quarantined", sop_uid="1.2.826.9.1",
                               study_uid="1.2.826.9")
        base = f"http://127.0.0.1:{gw.http_port}"
        # another port on the same host: another origin but the same site, so even a
        # SameSite=Strict cookie goes along with this form
        handler.attack = (f"<html><body><form id=f method=post action={base}/quarantine/{held}"
                          "/release><input name=note value=csrf></form><script>"
                          "document.getElementById('f').submit()</script></body></html>"
                          ).encode()
        browser.get(base + "/login")
        browser.find_element(By.NAME, "user").send_keys("boss")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.TAG_NAME, "button").click()
        WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.ID, "worklist")))
        browser.get(f"http://127.0.0.1:{port}/attack")
        WebDriverWait(browser, 30).until(lambda d: d.current_url.startswith(base))
        _settle(browser)
        assert "cross-site request refused" in browser.page_source
        assert gw.store.get(held).state == "quarantined"
        # the admin's own form on the gateway's page still works
        browser.get(base + "/quarantine")
        form = browser.find_element(By.CSS_SELECTOR, f"form[action='/quarantine/{held}/release']")
        form.find_element(By.NAME, "note").send_keys("checked with the modality")
        form.find_element(By.TAG_NAME, "button").click()
        WebDriverWait(browser, 30).until(lambda d: d.current_url == base + "/quarantine")
        assert gw.store.get(held).state == "done"
    refused = [e for e in gw.audit_log.entries() if e.action == "http.csrf_refused"]
    assert refused and refused[0].actor == "boss"
