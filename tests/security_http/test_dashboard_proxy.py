"""`p2psched dashboard`: the dashboard of an agent that answers only signed requests,
served locally by a proxy that signs its reads and cancels as one tenant."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from selenium.webdriver.common.by import By

import agents
from agents import ROOT, free_port, new_agent, wait_for
from browser import console_errors

pytestmark = pytest.mark.cluster


def submit(agent, module, who, keys):
    p = agents.cli("submit", module, "--wait", "--json", "--tenant", who, "--key", keys / f"{who}.key", agent=agent)
    return json.loads(p.stdout)["id"]


def start_proxy(agent, port, *identity):
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2psched", "dashboard", "--agent", agent.url, "--listen", f"127.0.0.1:{port}",
         *map(str, identity)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ui/").status_code == 200:
                return proc
        except httpx.HTTPError:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
    raise AssertionError("the dashboard proxy did not start")


def test_a_tenant_sees_its_own_jobs_through_the_proxy_and_the_agent_page_says_how(tmp_path, tenants, browser):
    reg, keys = tenants
    agent = new_agent(tmp_path, "secure", "--tenants", str(reg)).start()
    port = free_port()
    proxy = None
    try:
        mine = [submit(agent, "examples/wasm/hello.wasm", "alice", keys),
                submit(agent, "examples/wasm/exit3.wasm", "alice", keys)]
        theirs = submit(agent, "examples/wasm/hello.wasm", "bob", keys)

        # The agent's own page cannot sign: it says what to run instead.
        browser.get(agent.url + "/ui/")
        wait_for(lambda: "p2psched dashboard --agent URL --tenant NAME --key FILE"
                 in browser.find_element(By.ID, "banner").text, what="the signed-requests banner")
        browser.get("about:blank")  # stop its refreshes, whose 401s would reach the log after this
        assert {e["message"].split(" - ")[-1] for e in console_errors(browser)} == {
            "Failed to load resource: the server responded with a status of 401 ()"}  # and reading drains the log

        refused = agents.cli("dashboard", "--agent", agent.url, "--listen", f"127.0.0.1:{port}")
        assert refused.returncode == 3 and b"give --tenant NAME --key FILE" in refused.stderr

        proxy = start_proxy(agent, port, "--tenant", "alice", "--key", keys / "alice.key")
        browser.get(f"http://127.0.0.1:{port}/ui/")
        shown = wait_for(lambda: {tr.get_attribute("data-job-id"): tr.get_attribute("data-state")
                                  for tr in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")} or None,
                         what="alice's jobs")
        assert shown == {mine[0]: "succeeded", mine[1]: "failed"} and theirs not in shown
        counts = {li.get_attribute("data-state"): li.find_element(By.TAG_NAME, "b").text
                  for li in browser.find_elements(By.CSS_SELECTOR, "#sum-jobs li")}
        assert counts["succeeded"] == "1" and counts["failed"] == "1"  # alice's, not bob's
        assert browser.find_element(By.ID, "banner").get_attribute("hidden") is not None
        assert console_errors(browser) == []
        # A link to bob's job shows, in its place, what a job that does not exist shows; the page goes on.
        browser.get(f"http://127.0.0.1:{port}/ui/#{theirs}")
        detail = browser.find_element(By.ID, "detail")
        wait_for(lambda: "no job" in detail.text, what="bob's job refused in its place")
        assert browser.find_element(By.ID, "detail-state").text == "not found"
        wait_for(lambda: browser.find_element(By.ID, "updated").text.startswith("updated"), what="a refresh")
        assert not browser.find_element(By.ID, "banner").is_displayed()
        console_errors(browser)  # drains the log of that one 404

        base = f"http://127.0.0.1:{port}"
        # A sweep's cancel passes, signed as alice: it reaches alice's jobs only.
        r = httpx.post(base + "/v1/jobs:cancel", json={"ids": [mine[0], theirs]})
        assert r.status_code == 207, r.text
        assert [item["error"]["status"] for item in r.json()["results"]] == [409, 404]  # ended; not hers
        # ... but not from a page of another site, nor as a form a page could send unasked.
        cross = httpx.post(base + "/v1/jobs:cancel", json={"ids": [mine[0]]}, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403 and cross.json()["error"]["reason"] == "cross_site_request"
        form = httpx.post(base + "/v1/jobs:cancel", content=b'{"ids": ["x"]}', headers={"content-type": "text/plain"})
        assert form.status_code == 415
        own = httpx.post(base + "/v1/jobs:cancel", json={"ids": ["nope"]}, headers={"Origin": f"http://127.0.0.1:{port}"})
        assert own.status_code == 207 and own.json()["results"][0]["error"]["status"] == 404
        # Only the page's reads and job cancels pass; nothing else is signed for the browser.
        assert httpx.post(base + "/v1/jobs", json={}).status_code == 405
        assert httpx.post(base + "/v1/drain").status_code == 405
        assert httpx.delete(base + "/v1/peers").status_code == 405
        # A page of another site that rebinds its name to 127.0.0.1 is refused.
        evil = httpx.get(base + "/v1/jobs", headers={"Host": f"evil.example:{port}"})
        assert evil.status_code == 403 and evil.json()["error"]["reason"] == "wrong_host"
        assert httpx.get(base + "/ui/", headers={"Host": f"evil.example:{port}"}).status_code == 403
        missing = httpx.get(base + "/ui/secrets.txt")  # as the agent answers it, not a 500
        assert missing.status_code == 404 and missing.json()["error"]["reason"] == "no_such_route"
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        agent.stop()
