"""The dashboard against hostile data: what a job, a tenant or a peer controls (ids,
labels, output, failure reasons, node ids and addresses) and what a link controls
(the page's #fragment) must show as inert text, spoof nothing, break no layout and
never stop the page."""

import httpx
import pytest
from selenium.webdriver.common.by import By

from agents import start_cluster, stop_all, wait_for, wasm_spec
from browser import console_errors

pytestmark = pytest.mark.cluster

XSS = "<img src=x onerror=alert(1)>"
# Every dialog the page opens is recorded, not shown: a script of the data's would open one.
TRAP_DIALOGS = ("window.__dialogs = []; for (const f of ['alert', 'confirm', 'prompt'])"
                " window[f] = (m) => { window.__dialogs.push(String(m)); };")


def updated(driver):
    return driver.find_element(By.ID, "updated").text


def test_a_malformed_link_or_a_missing_job_leaves_the_page_working(tmp_path, browser):
    [agent] = start_cluster(tmp_path, ["links"])
    try:
        with agent.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="linked")).json()["id"]
            http.get(f"/v1/jobs/{job}", params={"wait": 30})

        # A fragment that is not valid percent-encoding (a mangled or hostile link).
        browser.get(agent.url + "/ui/#%E0%A4%A")
        wait_for(lambda: updated(browser).startswith("updated"), what="the page refreshing")
        assert rows_of(browser) == [job]

        browser.get(f"{agent.url}/ui/#{job}")
        wait_for(lambda: browser.find_element(By.ID, "detail-id").text == job, what="the linked job")
        # Another link, to a job this agent does not hold (never, or no longer).
        browser.execute_script("location.hash = 'no-such-job'")
        detail = browser.find_element(By.ID, "detail")
        wait_for(lambda: browser.find_element(By.ID, "detail-id").text == "no-such-job", what="the missing job")
        assert "no job 'no-such-job'" in detail.text
        assert browser.find_element(By.ID, "detail-state").text == "not found"
        assert "hello from p2psched" not in detail.text  # nothing of the job shown before
        assert not browser.find_element(By.ID, "detail-json").is_displayed()
        assert not browser.find_element(By.ID, "detail-cancel").is_displayed()
        # The rest of the page goes on refreshing, without an error.
        before = updated(browser)
        wait_for(lambda: updated(browser) != before, what="a refresh after the missing job", timeout=10)
        assert not browser.find_element(By.ID, "banner").is_displayed()
        browser.find_element(By.ID, "detail-close").click()
        assert not detail.is_displayed()
        errors = [e["message"] for e in console_errors(browser)]
        assert [m for m in errors if "no-such-job - Failed to load resource" not in m] == []
        assert len(errors) <= 1  # the missing job is asked once, not at every refresh
    finally:
        stop_all([agent])


def rows_of(driver):
    return [tr.get_attribute("data-job-id") for tr in driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")]


def test_hostile_job_data_shows_as_text_that_neither_spoofs_nor_breaks_the_layout(tmp_path, browser):
    [agent] = start_cluster(tmp_path, ["hostile"])
    long_id = "L" * 128  # the longest id a client may choose
    try:
        with agent.client() as http:
            specs = [
                wasm_spec("printenv.wasm", id=long_id, env={"K": XSS, "S": "</script><script>alert(2)</script>"},
                          labels={"x": XSS[:256], "after": "intact"}),
                # Its reason echoes the entry asked for: a long one, and markup.
                wasm_spec("noop.wasm", id="bad-entry", entry=XSS + "e" * 100),
            ]
            ids = [r["job"]["id"] for r in http.post("/v1/jobs:batch", json={"jobs": specs}).json()["results"]]
            http.post("/v1/jobs:wait", json={"ids": ids, "wait": 30})
        # The page may write no HTML from strings at all: the browser enforces it.
        policy = httpx.get(agent.url + "/ui/").headers["content-security-policy"]
        assert "require-trusted-types-for 'script'; trusted-types 'none'" in policy
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": TRAP_DIALOGS})
        browser.get(f"{agent.url}/ui/#{long_id}")
        wait_for(lambda: set(rows_of(browser)) == {long_id, "bad-entry"}, what="the jobs")
        wait_for(lambda: "env: K=" in browser.find_element(By.ID, "detail-stdout").text, what="the job's output")

        assert XSS in browser.find_element(By.ID, "detail-stdout").text  # as text
        assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []
        assert browser.execute_script("return window.__dialogs") == []

        # A bidi override in one label reverses nothing of its own or the next: it shows as a mark.
        # The API refuses such labels now; a record stored before, or a peer's, may still hold them.
        refused = httpx.post(agent.url + "/v1/jobs", json=wasm_spec("noop.wasm", labels={"rtl": "\u202ex"}))
        assert refused.status_code == 400 and refused.json()["error"]["fields"][0]["field"] == "labels"
        old = {**httpx.get(f"{agent.url}/v1/jobs/{long_id}").json(),
               "labels": {"rtl": "\u202edesrever", "after": "intact", "zw": "a\u200bb"}}
        labels = browser.execute_script("drawDetail(arguments[0]); return [...document.querySelectorAll("
                                        "'#detail-fields dt')].find((dt) => dt.textContent === 'labels')"
                                        ".nextSibling.textContent", old)
        assert "\u202e" not in labels and "\u200b" not in labels
        assert "after=intact rtl=[U+202E]desrever zw=a[U+200B]b" in labels  # the one after it reads intact

        # The longest id and a long reason fit the table's width; no row grows tall.
        table = browser.execute_script("""
            const t = document.querySelector('#jobs');
            return {width: t.scrollWidth, room: t.parentElement.clientWidth,
                    heights: [...t.tBodies[0].rows].map((tr) => tr.getBoundingClientRect().height)};""")
        assert table["width"] <= table["room"], table
        assert max(table["heights"]) < 120, table

        # A peer's gossiped API address becomes a link only when it is HOST:PORT.
        links = browser.execute_script("""
            const peer = (api) => ({node_id: api, api, state: 'alive', vector: {}, labels: {}});
            drawPeers(['127.0.0.1:7700', '[::1]:7700', 'node-2.example:7700', 'evil.example/phish?x=',
                       '127.0.0.1:7700@evil.example', 'evil.example:80/x', ' javascript:alert(1)//:1'].map(peer));
            return [...document.querySelectorAll('#peers tbody tr')].map((tr) => {
                const a = tr.querySelector('a');
                return a ? a.getAttribute('href') : null; });""")
        assert sorted(filter(None, links)) == ["http://127.0.0.1:7700/ui/", "http://[::1]:7700/ui/",
                                               "http://node-2.example:7700/ui/"]
        assert console_errors(browser) == []
        assert browser.execute_script("return window.__dialogs") == []
    finally:
        stop_all([agent])
