"""The commissioning page in a real headless Chromium, driven by Selenium: upload, ask, see the answers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.harness.documents import pages, pdf_of
from tests.http.test_http import TOKEN, _daemon, _jpeg

pytestmark = pytest.mark.slow


def test_upload_ask_and_see_the_answers(tmp_path: Path, test_model_dir: Path, browser: webdriver.Chrome) -> None:
    d, client = _daemon(tmp_path, test_model_dir)
    image = tmp_path / "sample.jpg"
    image.write_bytes(_jpeg(3))
    d.start()
    wait = WebDriverWait(browser, 60)
    try:
        d.wait_notify("READY=1")
        browser.get(client.base + "/")
        # The API wants the token: the page asks for it.
        token_box = wait.until(expected_conditions.visibility_of_element_located((By.ID, "token")))
        token_box.send_keys(TOKEN)
        browser.find_element(By.ID, "save-token").click()
        wait.until(lambda b: len(Select(b.find_element(By.ID, "rule")).options) == 2)
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "healthy"))

        # A typed question first (the page starts with one yes/no row), then the rule.
        browser.find_element(By.ID, "image").send_keys(str(image))
        browser.find_element(By.ID, "ask").click()
        row = wait.until(expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#answers tr[data-question='q1']")))
        assert row.find_element(By.CSS_SELECTOR, ".value").text in ("true", "false")

        Select(browser.find_element(By.ID, "rule")).select_by_value("cam")
        browser.find_element(By.ID, "ask").click()
        wait.until(expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#answers tr[data-question='label']")))
        defect = browser.find_element(By.CSS_SELECTOR, "#answers tr[data-question='defect']")
        cells = [c.text for c in defect.find_elements(By.TAG_NAME, "td")]
        assert cells[1] == "yes_no"
        assert 0.5 <= float(cells[3]) <= 1.0, "the confidence of the answer given"
        assert 0.0 <= float(cells[4]) <= 1.0, "P(yes)"
        assert "total" in browser.find_element(By.ID, "timings").text
        # The latest results list shows both asks.
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results tr")) >= 2)

        shot = Path(os.environ.get("EDGEVL_TEST_ARTIFACTS", tmp_path)) / "commissioning-page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000

        # A folder image's result, clicked in the latest results: its answers beside its archived image.
        (d.inbox / "from-line.jpg").write_bytes(_jpeg(6))
        folder_record = d.wait_records(1)[0]
        row = wait.until(expected_conditions.element_to_be_clickable(
            (By.CSS_SELECTOR, f"#results tr[data-job='{folder_record['job_id']}']")))
        row.click()
        evidence = wait.until(expected_conditions.presence_of_element_located((By.ID, "evidence")))
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", evidence))
        assert browser.execute_script("return arguments[0].naturalWidth", evidence) == 160
        assert browser.find_element(By.CSS_SELECTOR, "#answers tr[data-question='defect']")

        # A corrupt upload shows the error, not a stale answer.
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(_jpeg(4)[:300])
        browser.find_element(By.ID, "image").send_keys(str(bad))
        browser.find_element(By.ID, "ask").click()
        error = wait.until(expected_conditions.presence_of_element_located((By.ID, "answer-error")))
        assert error.text.startswith("image_unreadable")

        # A PDF upload: the answers page by page.
        scan = tmp_path / "scan.pdf"
        scan.write_bytes(pdf_of(pages(2, size=(100, 140))))  # under the test's max_upload
        browser.find_element(By.ID, "image").send_keys(str(scan))
        browser.find_element(By.ID, "ask").click()
        wait.until(expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#answers tr[data-page='2'][data-question='label']")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#answers tbody tr")
        assert [(r.get_attribute("data-page"), r.get_attribute("data-question")) for r in rows] == [
            ("1", "defect"), ("1", "label"), ("2", "defect"), ("2", "label")]
        assert [c.text for c in rows[2].find_elements(By.TAG_NAME, "td")][:3] == ["2", "defect", "yes_no"]
    finally:
        assert d.stop() == 0
