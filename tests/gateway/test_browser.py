"""The web UI in headless Chromium (Debian chromium + chromedriver, driven by Selenium): sign
in, the worklist shows the demo studies in priority order with their badges and the drift
monitor's alarms, a study view shows its images, the quarantine view lists what was held
back."""

from __future__ import annotations

import datetime as dt

import pytest

from radguard.gateway import Gateway
from radguard.gateway.auth import Users
from radguard.gateway.demo import prepare_images, send_batch
from radguard.gateway.web import _worklist_rows
from tests.gateway.conftest import chromium

PASSWORD = "a demo admin password"


@pytest.fixture
def browser(tmp_path):
    b = chromium(tmp_path / "chrome", "--disable-gpu")
    yield b
    b.quit()


def test_worklist_in_a_real_browser(tmp_path, browser):
    from selenium.webdriver.common.by import By

    hospital = prepare_images(tmp_path / "demo", lambda _: None)
    # every layer on, checks on the gateway's own threads (the demo test covers check
    # processes)
    config = hospital.config(tmp_path / "data", dicom_port=0, http_port=0, check_processes=0)
    gateway = Gateway(config)
    gateway.start()
    try:
        Users(gateway.store).add("admin", "admin", PASSWORD)
        send_batch(gateway, hospital, lambda _: None)
        assert gateway.wait_idle(300)
        expected = [item["study"].uid for item in _worklist_rows(gateway.store)]
        assert len(expected) == 13
        base = f"http://127.0.0.1:{gateway.http_port}"

        browser.get(base + "/")  # not signed in: sent to the login page
        assert browser.current_url.endswith("/login")
        browser.find_element(By.NAME, "user").send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.TAG_NAME, "button").click()
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#worklist tr.study")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tr.study")
        assert [r.get_attribute("data-study") for r in rows] == expected
        suspicions = [r.find_elements(By.TAG_NAME, "td")[5].text for r in rows]
        assert all("/10" in s for s in suspicions)
        levels = [int(s.split("/")[0]) for s in suspicions]
        assert levels == sorted(levels, reverse=True) or any(
            float(s.split("(")[1].rstrip(")")) >= 0.9 for s in suspicions)
        badges = [r.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-trust")
                  for r in rows]
        assert badges == ["signed"] * 13
        # one alarm per episode: the new scanner's (opened and closed at once) and drift's
        alarms = [a.text for a in browser.find_elements(By.CSS_SELECTOR,
                                                        "li.alarm:not(.episode)")]
        assert any("monitoring.alarm PAED_DX/" in a for a in alarms)
        assert all(" PAED_DX/" in a for a in alarms)

        rows[0].find_element(By.TAG_NAME, "a").click()
        WebDriverWait(browser, 30).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "img.view")))
        images = browser.find_elements(By.CSS_SELECTOR, "img.view")
        # a signed, authentic image: itself and, beside it, the triage model's saliency
        # map (no forensic evidence map: nothing to show there)
        assert [i.get_attribute("alt") for i in images] == ["image", "AI saliency map"]
        browser.execute_script("return Promise.all(Array.from(document.images).map("
                               "i => i.complete ? 1 : new Promise(r => i.onload = i.onerror = r)))")
        widths = [browser.execute_script("return arguments[0].naturalWidth", i) for i in images]
        assert all(w > 100 for w in widths), widths  # image and saliency map rendered
        body = browser.find_element(By.TAG_NAME, "main").text
        assert "None" not in body and "suspicion " in body and "operating point" in body
        assert images[1].is_displayed()
        browser.find_element(By.CSS_SELECTOR, "details.saliency summary").click()
        assert not images[1].is_displayed()  # the overlay folds away (no script needed)

        browser.get(base + "/quarantine")
        states = [r.find_elements(By.TAG_NAME, "td")[1].text
                  for r in browser.find_elements(By.CSS_SELECTOR, "#quarantine tr[data-id]")]
        assert sorted(states) == ["quarantined"] * 3 + ["rejected"]
        browser.save_screenshot(str(tmp_path / "quarantine.png"))
    finally:
        gateway.stop()
    views = [e for e in gateway.audit_log.entries() if e.action == "image.view"]
    assert len(views) == 2 and views[0].actor == "admin"
    assert sorted(bool(v.details.get("saliency")) for v in views) == [False, True]
    assert dt.datetime.fromisoformat(views[0].ts)
