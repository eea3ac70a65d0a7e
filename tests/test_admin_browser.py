"""The dashboard in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
installed by .ci/run) driven by Selenium against the real node process.

It logs in through the form, creates a key and sees it in the list, disables one and deletes
another (accepting the page's confirmation dialog: the inline script runs under the CSP nonce),
pages the transactions, and takes screenshots in light and dark mode (saved in the test's tmp
dir; `ROUTSTR_SCREENSHOT_DIR` copies them elsewhere for a look). Then: the forms' post →
redirect → get (a reload, back + submit again and a double click change nothing more, the new
key is shown once), and the keys table measured at 1400 × 900 and 390 × 844 (no sideways
scrolling, every row's Actions inside the window).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from routstr.db import Database
from routstr.keys import hash_key
from routstr.ledger import Ledger
from tests.support.node import NodeProcess
from tests.support.upstream import ScriptedUpstream

ADMIN = "browser-admin-token-42"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 10.0


def api(node: NodeProcess, method: str, path: str, body: Any = None) -> Any:
    status, _, raw = node.request(method, path, body, {"Authorization": f"Bearer {ADMIN}"})
    assert status < 300, (status, raw)
    return json.loads(raw)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, css: str) -> Any:
    """The element, once the page shows it (a page still navigating may answer a command with
    an error, e.g. its frame detached: that is waited out too)."""
    return WebDriverWait(driver, WAIT_S, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def rows(driver: WebDriver, table: str) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")


def screenshot(driver: WebDriver, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 6000))
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    extra = os.environ.get("ROUTSTR_SCREENSHOT_DIR")
    if extra:
        shutil.copy(path, Path(extra) / path.name)


def test_dashboard_in_headless_chromium(node_factory: Any, browser: WebDriver,
                                        tmp_path: Path) -> None:
    with ScriptedUpstream() as upstream:
        node = node_factory("--admin-token", ADMIN, "--upstream-base-url", upstream.url,
                            "--name", "Pi behind Tor")
        # Some history: 13 funded keys (two log rows each), requests settled in earlier hours.
        keys = [api(node, "POST", "/admin/api/keys", {"balance_msats": 1_000_000 * (i + 1)})
                for i in range(13)]
        db = Database(node.database)
        ledger = Ledger(db)
        now = int(time.time())
        for ago in (1, 3, 3, 7, 12):
            r = ledger.reserve(keys[0]["key"]["id"], 50_000, request_id=f"h{ago}", ttl_s=60,
                               now=now - ago * 3600)
            ledger.settle(r.id, 20_000 + ago * 1000, now=now - ago * 3600)
        empty = api(node, "POST", "/admin/api/keys", {"balance_msats": 0})
        total_rows = api(node, "GET", "/admin/api/transactions?limit=1")["total"]
        assert total_rows > 25

        # Log in: a wrong token first, then the right one.
        browser.get(node.url + "/admin/")
        assert "admin login" in browser.title
        browser.find_element(By.NAME, "token").send_keys("not-the-token")
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        assert "Invalid admin token" in wait_for(browser, ".banner.error").text
        browser.find_element(By.NAME, "token").send_keys(ADMIN)
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait_for(browser, "#overview")  # absent from the login page
        assert browser.find_element(By.CSS_SELECTOR, "header h1").text == "Pi behind Tor"
        cookie = browser.get_cookie("routstr_admin")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar")) == 24

        # Create a key with 21 sats; it is shown once and appears in the list.
        field = browser.find_element(By.NAME, "balance_sats")
        field.clear()
        field.send_keys("21")
        browser.find_element(By.XPATH, "//button[text()='Create key']").click()
        secret = wait_for(browser, "#secret-value").text
        assert secret.startswith("sk-") and len(secret) == 35
        copy = browser.find_element(By.CSS_SELECTOR, "button[data-copy]")
        assert copy.is_displayed()  # un-hidden by the inline script: the CSP nonce works
        listed = [r.text for r in rows(browser, "keys-table")]
        assert any(f"sk-…{secret[-4:]}" in text and "21" in text for text in listed)
        acct = ledger.get_account(hash_key(secret))
        assert acct is not None and acct.balance_msats == 21_000

        # Disable it from its row; delete the empty key through the confirmation dialog.
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-key-id="{acct.id}"]')
        row.find_element(By.XPATH, ".//button[text()='Disable']").click()
        WebDriverWait(browser, WAIT_S).until(expected_conditions.staleness_of(row))
        row = wait_for(browser, f'tr[data-key-id="{acct.id}"]')
        assert "disabled" in row.text and "key disabled" in browser.page_source.lower()
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-key-id="{empty["key"]["id"]}"]')
        row.find_element(By.XPATH, ".//button[text()='Delete']").click()
        alert = WebDriverWait(browser, WAIT_S).until(expected_conditions.alert_is_present())
        assert "can never be used again" in alert.text
        alert.accept()
        WebDriverWait(browser, WAIT_S).until(expected_conditions.staleness_of(row))
        assert "Key deleted." in wait_for(browser, ".banner.notice").text
        assert not browser.find_elements(By.CSS_SELECTOR,
                                         f'tr[data-key-id="{empty["key"]["id"]}"]')

        # Page the transactions: 25 newest, then the older ones, then back.
        browser.get(node.url + "/admin/#transactions")
        first_page = rows(browser, "tx-table")
        assert len(first_page) == 25
        first_ids = [int(r.find_element(By.CSS_SELECTOR, "td").text) for r in first_page]
        browser.find_element(By.CSS_SELECTOR, "#transactions a[rel=next]").click()
        WebDriverWait(browser, WAIT_S).until(expected_conditions.staleness_of(first_page[0]))
        wait_for(browser, "#transactions a[rel=prev]")
        assert "to=25" in browser.current_url
        second_ids = [int(r.find_element(By.CSS_SELECTOR, "td").text)
                      for r in rows(browser, "tx-table")]
        total_now = api(node, "GET", "/admin/api/transactions?limit=1")["total"]
        assert len(second_ids) == min(25, total_now - 25)
        assert max(second_ids) < min(first_ids) and not set(first_ids) & set(second_ids)
        older_rows = rows(browser, "tx-table")
        browser.find_element(By.CSS_SELECTOR, "#transactions a[rel=prev]").click()
        WebDriverWait(browser, WAIT_S).until(expected_conditions.staleness_of(older_rows[0]))
        wait_for(browser, "#transactions a[rel=next]")
        assert [int(r.find_element(By.CSS_SELECTOR, "td").text)
                for r in rows(browser, "tx-table")][0] == max(first_ids)

        # Filter to one key's settlements.
        browser.get(node.url + f"/admin/?tk=%23{keys[0]['key']['id']}&tkind=settle#transactions")
        kinds = {r.find_elements(By.CSS_SELECTOR, "td")[2].text for r in rows(browser, "tx-table")}
        assert kinds == {"settle"} and len(rows(browser, "tx-table")) == 5

        # Screenshots, light and dark; the colours follow prefers-color-scheme.
        browser.get(node.url + "/admin/")
        wait_for(browser, "#overview")
        light_bg = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        screenshot(browser, tmp_path / "dashboard-light.png")
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark_bg = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert light_bg != dark_bg
        screenshot(browser, tmp_path / "dashboard-dark.png")

        # No request for anything outside the node, no CSP violation, no script error.
        problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
                    and "the server responded with a status of 401" not in e["message"]]
        assert problems == []
        urls = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(u.startswith(node.url) for u in urls), urls
        assert ledger.check_invariant()["accounts"] == 15
        db.close()



def log_in(driver: WebDriver, node: NodeProcess) -> None:
    driver.get(node.url + "/admin/")
    driver.find_element(By.NAME, "token").send_keys(ADMIN)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(driver, "#overview")


def nonce_of(driver: WebDriver, form_css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f"{form_css} input[name=nonce]")
               .get_attribute("value"))


def resubmit(driver: WebDriver, form_css: str, nonce: str, button: Any) -> None:
    """Submit a page's form again with the nonce it was first submitted with. Chromium's back
    button restores the page with its form values (the old nonce included); should it ever
    fetch the page afresh, the old nonce is put back, as a stale tab would still have it."""
    if nonce_of(driver, form_css) != nonce:
        driver.execute_script("arguments[0].value = arguments[1]", driver.find_element(
            By.CSS_SELECTOR, f"{form_css} input[name=nonce]"), nonce)
    button().click()


def test_forms_post_redirect_get(node_factory: Any, browser: WebDriver) -> None:
    """Create a key, grant to it: reload, and back + submit the same form again, change
    nothing more (one key, one grant) and show the new key once; a double click creates one."""
    node = node_factory("--admin-token", ADMIN)
    log_in(browser, node)
    create = "form[action='/admin/keys']"
    nonce = nonce_of(browser, create)
    field = browser.find_element(By.NAME, "balance_sats")
    field.clear()
    field.send_keys("10")
    browser.find_element(By.XPATH, "//button[text()='Create key']").click()
    secret = wait_for(browser, "#secret-value").text
    assert secret.startswith("sk-") and secret not in browser.current_url
    assert "done=key_created" in browser.current_url and "flash=" in browser.current_url
    assert api(node, "GET", "/admin/api/keys")["total"] == 1

    # Reload: the browser GETs the page again; nothing is posted, the key is not shown again.
    browser.refresh()
    wait_for(browser, "#flash-gone")
    assert not browser.find_elements(By.ID, "secret-value")
    assert "Key created." in browser.find_element(By.CSS_SELECTOR, ".banner.notice").text
    # Back, and "Create key" again on the page the form was submitted from: refused.
    browser.back()
    wait_for(browser, create)
    resubmit(browser, create, nonce,
             lambda: browser.find_element(By.XPATH, "//button[text()='Create key']"))
    assert "already submitted" in wait_for(browser, "#again").text
    assert not browser.find_elements(By.ID, "secret-value")
    keys = api(node, "GET", "/admin/api/keys")
    assert keys["total"] == 1 and keys["data"][0]["hint"] == secret[-4:]
    key_id = keys["data"][0]["id"]
    assert keys["data"][0]["balance_msats"] == 10_000

    # Grant 5 sats from the key's row; reload; back and grant again with the same form.
    grant = f'tr[data-key-id="{key_id}"] form:has(input[name=action][value=grant])'
    browser.get(node.url + "/admin/#keys")
    row = wait_for(browser, f'tr[data-key-id="{key_id}"]')
    grant_nonce = nonce_of(browser, grant)
    row.find_element(By.XPATH, ".//summary[text()='Grant']").click()
    row.find_element(By.NAME, "amount_sats").send_keys("5")
    row.find_element(By.XPATH, ".//button[text()='Grant']").click()
    WebDriverWait(browser, WAIT_S).until(expected_conditions.staleness_of(row))
    assert "Balance granted." in wait_for(browser, ".banner.notice").text
    browser.refresh()
    wait_for(browser, "#overview")
    browser.back()
    row = wait_for(browser, f'tr[data-key-id="{key_id}"]')

    def grant_button() -> Any:
        if not row.find_element(By.NAME, "amount_sats").is_displayed():
            row.find_element(By.XPATH, ".//summary[text()='Grant']").click()
        amount = row.find_element(By.NAME, "amount_sats")
        if not amount.get_attribute("value"):
            amount.send_keys("5")
        return row.find_element(By.XPATH, ".//button[text()='Grant']")

    resubmit(browser, grant, grant_nonce, grant_button)
    assert "already submitted" in wait_for(browser, "#again").text
    doc = api(node, "GET", f"/admin/api/keys/{key_id}")
    assert doc["balance_msats"] == 15_000 and doc["granted_msats"] == 15_000

    # A double click on "Create key" creates one key and shows it.
    browser.get(node.url + "/admin/")
    button = wait_for(browser, f"{create} button")
    browser.execute_script("var b = arguments[0]; b.click(); setTimeout(function () {"
                           " b.click(); }, 30);", button)
    second = wait_for(browser, "#secret-value").text
    assert second.startswith("sk-") and second != secret
    assert api(node, "GET", "/admin/api/keys")["total"] == 2


KEYS_ON_PAGE = 17  # with the parent and its two children: a full page of 20
LAYOUT_JS = """
const vw = window.innerWidth, out = {vw: vw, doc: document.documentElement.scrollWidth};
const wrap = document.querySelector('#keys-table').closest('.scroll') || document.body;
out.wrap = [wrap.scrollWidth, wrap.clientWidth];
out.cells = [...document.querySelectorAll('#keys-table tbody tr td.actions')].map(td => {
  const r = td.getBoundingClientRect();
  const inner = [...td.querySelectorAll('button, summary, a, input, select')]
    .filter(e => e.offsetParent !== null).map(e => e.getBoundingClientRect().right);
  return [r.left, r.right, Math.max(r.right, ...inner)];
});
return out;
"""


def check_fits(driver: WebDriver, what: str) -> None:
    got = driver.execute_script(LAYOUT_JS)
    vw = got["vw"]
    assert got["doc"] <= vw, (what, got["doc"], vw)
    assert got["wrap"][0] <= got["wrap"][1], (what, "the keys table scrolls sideways", got["wrap"])
    assert got["cells"], what
    for left, right, inner in got["cells"]:
        assert 0 <= left and right <= vw and inner <= vw, (what, left, right, inner, vw)


def test_keys_table_fits_desktop_and_phone(node_factory: Any, browser: WebDriver) -> None:
    """The Actions column is whole at 1400 px, and at phone width nothing scrolls sideways
    (the rows become cards), light and dark, with a row's Limits and Grant forms open."""
    node = node_factory("--admin-token", ADMIN)
    for i in range(KEYS_ON_PAGE):  # wide values: big balances, limits with resets and dates
        api(node, "POST", "/admin/api/keys", {
            "balance_msats": 123_456_789_012 + i, "balance_limit_msats": 98_765_432_109,
            "balance_limit_reset": "monthly", "validity_date": 4_102_444_800})
    parent = api(node, "POST", "/admin/api/keys", {"balance_msats": 5_000_000})
    status, _, _ = node.request("POST", "/v1/balance/child-key", {"count": 2},
                                {"Authorization": f"Bearer {parent['api_key']}"})
    assert status == 200
    log_in(browser, node)
    sizes = (("desktop", 1400, 900, False), ("phone", 390, 844, True))
    for scheme in ("light", "dark"):
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": scheme}]})
        for name, width, height, mobile in sizes:
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
            browser.get(node.url + "/admin/#keys")
            wait_for(browser, "#keys-table")
            assert browser.execute_script("return window.innerWidth") == width
            check_fits(browser, f"{name} {scheme}")
            row = browser.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr")[0]
            for summary in ("Limits", "Grant"):
                row.find_element(By.XPATH, f".//summary[text()='{summary}']").click()
            check_fits(browser, f"{name} {scheme}, forms open")
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
