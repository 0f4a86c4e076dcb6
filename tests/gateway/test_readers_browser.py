"""A reader study in headless Chromium (Debian chromium + chromedriver, driven by Selenium):
an admin designs a two-arm study in the browser, two radiologists read it in their own random
order across two sessions (wash-out 0), the analysis appears on the admin's page; a reader's
browser shows no truth, no one else's ratings and no patient identifiers."""

from __future__ import annotations

import pytest

from tests.gateway.conftest import PASSWORD, chromium
from tests.gateway.test_readers import (
    PATIENT,
    PATIENT_ID,
    held_instances,
    image_folder,
    start,
    truth_of,
)


@pytest.fixture
def browser(tmp_path):
    b = chromium(tmp_path / "chrome", "--disable-gpu")
    yield b
    b.quit()


def go(browser, element) -> None:
    """Click what submits a form or follows a link, and wait for the next page."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    old = browser.find_element(By.TAG_NAME, "html")
    element.click()

    def replaced(driver) -> bool:
        try:
            old.is_enabled()  # raises once the page it belonged to is gone
        except WebDriverException:  # stale, or (mid-navigation) no longer in the document
            return driver.execute_script("return document.readyState") == "complete"
        return False

    WebDriverWait(browser, 60, ignored_exceptions=(WebDriverException,)).until(replaced)


def sign_in(browser, base: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(base + "/login")
    browser.find_element(By.NAME, "user").send_keys(name)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    go(browser, browser.find_element(By.TAG_NAME, "button"))
    browser.find_element(By.LINK_TEXT, "Reading")  # the header of a signed-in page


def sign_out(browser, base: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(base + "/reading")  # a page with the header

    go(browser, browser.find_element(By.XPATH, "//header//button[text()='Sign out']"))
    assert browser.current_url.endswith("/login")


def test_reader_study_in_a_real_browser(tmp_path, monkeypatch, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    images, files = image_folder(tmp_path)
    gw = start(tmp_path / "data", monkeypatch, images)
    try:
        rows = held_instances(gw, tmp_path, 3)
        base = f"http://127.0.0.1:{gw.http_port}"

        sign_in(browser, base, "boss")
        go(browser, browser.find_element(By.LINK_TEXT, "Reader studies"))
        go(browser, browser.find_element(By.ID, "new-study"))
        browser.find_element(By.NAME, "name").send_keys("Pneumonia, browser")
        washout = browser.find_element(By.NAME, "washout_days")
        washout.clear()
        washout.send_keys("0")
        for reader in ("rad", "rad2"):
            browser.find_element(By.CSS_SELECTOR, f'input[name="reader"][value="{reader}"]'
                                 ).click()
        browser.find_element(By.NAME, "folder").send_keys("set1")
        browser.find_element(By.NAME, "case_list").send_keys(
            "\n".join(f"{f},{t}" for f, t in zip(files, (0, 1, 0), strict=True)))
        for row, truth in zip(rows, ("1", "0", "1"), strict=True):
            Select(browser.find_element(By.NAME, f"truth_{row.id}")).select_by_value(truth)
        go(browser, browser.find_element(By.ID, "create"))
        assert "/reader-studies/" in browser.current_url
        sid = int(browser.current_url.rsplit("/", 1)[1])
        assert "Not yet: 0 of 24 readings done" in browser.find_element(
            By.ID, "analysis-pending").text
        sign_out(browser, base)

        secrets = {PATIENT, PATIENT_ID, *(r.sop_uid for r in rows),
                   *(r.study_uid for r in rows), *files, "truth", "set1"}
        orders = {}
        for reader in ("rad", "rad2"):
            sign_in(browser, base, reader)
            go(browser, browser.find_element(By.LINK_TEXT, "Reading"))
            go(browser, browser.find_element(By.CSS_SELECTOR, "a.continue"))
            seen = []
            for n in range(12):
                sess, pos = (int(x) for x in browser.current_url.split("/")[-2:])
                title = browser.find_element(By.TAG_NAME, "h1").text
                assert title == f"Case {pos} of 6"
                page = browser.page_source
                assert all(s not in page for s in secrets)
                width = browser.execute_script(
                    "return document.querySelector('img.view').naturalWidth")
                assert width > 100  # the image was rendered
                if n == 0:
                    go(browser, browser.find_element(
                        By.XPATH, "//form[@id='window']//button[@value='bone']"))
                    assert "180 / 150" in browser.page_source
                seen.append(gw.store.execute(
                    "SELECT case_num FROM reader_readings WHERE study_id=? AND reader=? AND "
                    "sess=? AND pos=?", (sid, reader, sess, pos)).fetchone()[0])
                truth = truth_of(gw, sid, reader, sess, pos)
                answer = truth if n not in (2, 9) else 1 - truth
                browser.find_element(By.CSS_SELECTOR,
                                     f'input[name="diseased"][value="{answer}"]').click()
                browser.find_element(By.CSS_SELECTOR,
                                     f'input[name="confidence"][value="{2 + n % 4}"]').click()
                go(browser, browser.find_element(By.ID, "submit-rating"))
            assert "read every case" in browser.page_source
            orders[reader] = seen
            # nothing of the study's truth or other readers' ratings is reachable
            for path in (f"/reader-studies/{sid}", f"/reader-studies/{sid}/ratings.csv",
                         f"/reader-studies/{sid}/analysis.json"):
                browser.get(base + path)
                assert "may not do this" in browser.page_source
                assert "rating" not in browser.page_source.replace("reader-studies", "")
            sign_out(browser, base)
        assert orders["rad"] != orders["rad2"]
        assert sorted(orders["rad"][:6]) == sorted(orders["rad"][6:]) == [1, 2, 3, 4, 5, 6]

        sign_in(browser, base, "boss")
        browser.get(f"{base}/reader-studies/{sid}")
        table = browser.find_element(By.ID, "analysis").text
        assert "unaided" in table and "AI-aided" in table and "difference" in table
        states = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#progress .state")]
        assert states == ["done", "done"]
    finally:
        gw.stop()
    ratings = [e for e in gw.audit_log.entries() if e.action == "reader_study.rating"]
    assert len(ratings) == 24 and {e.actor for e in ratings} == {"rad", "rad2"}
