"""The dashboard in a real browser, against real agent subprocesses.

What a user sees at http://AGENT/: the agent and its members with their resource
vectors, jobs newest first with their states, a job's timeline and result, a
cancel that stops a running job, and a clear line when the agent goes away. The
page must run under its own Content Security Policy with no console error.
"""

import base64
import functools
import http.server
import json
import threading

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from agents import WASM, start_cluster, stop_all, wait_for, wasm_spec
from browser import console_errors

pytestmark = pytest.mark.cluster


def rows(driver, table):
    return {tr.get_attribute(f"data-{'job-id' if table == 'jobs' else 'node'}"): tr
            for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")}


def job_states(driver):
    return {k: tr.get_attribute("data-state") for k, tr in rows(driver, "jobs").items()}


def test_the_page_is_served_with_a_strict_policy_and_the_root_leads_to_it(tmp_path):
    [agent] = start_cluster(tmp_path, ["solo"])
    try:
        root = httpx.get(agent.url + "/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        for name, kind in (("", "text/html"), ("app.js", "text/javascript"), ("style.css", "text/css")):
            r = httpx.get(f"{agent.url}/ui/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
            assert "default-src 'none'; script-src 'self'" in r.headers["content-security-policy"]
            assert r.headers["x-content-type-options"] == "nosniff"
        missing = httpx.get(agent.url + "/ui/secrets.txt")
        assert missing.status_code == 404 and "open /ui/" in missing.json()["error"]["message"]
    finally:
        stop_all([agent])


def test_a_user_watches_jobs_and_members_opens_a_job_cancels_one_and_sees_the_agent_go(tmp_path, browser):
    agents = start_cluster(tmp_path, ["d1", "d2"])
    d1, d2 = agents
    try:
        with d1.client() as http:
            def submit(name, **extra):
                return http.post("/v1/jobs", json=wasm_spec(name, **extra)).json()["id"]

            ok, bad = submit("hello.wasm"), submit("exit3.wasm")
            logits = submit("mlp.wasm", input=base64.b64encode((WASM / "mlp.in.bin").read_bytes()).decode())
            for j in (ok, bad, logits):
                http.get(f"/v1/jobs/{j}", params={"wait": 30})
            sleeper = submit("sleep.wasm")

        browser.get(d1.url + "/")
        assert browser.current_url.endswith("/ui/")
        wait_for(lambda: job_states(browser).get(sleeper) == "running"
                 and job_states(browser).get(ok) == "succeeded" and job_states(browser).get(bad) == "failed",
                 what="the jobs table")
        order = list(rows(browser, "jobs"))
        assert order.index(sleeper) < order.index(bad) < order.index(ok)  # newest first
        assert browser.find_element(By.ID, "node").text.startswith("node d1")
        assert browser.find_element(By.ID, "health").text == "accepting jobs"

        members = wait_for(lambda: len(rows(browser, "peers")) == 2 and rows(browser, "peers"), what="members")
        assert {n: tr.get_attribute("data-state") for n, tr in members.items()} == {"d1": "alive", "d2": "alive"}
        assert "(this agent)" in members["d1"].text
        link = members["d2"].find_element(By.TAG_NAME, "a")
        assert link.get_attribute("href") == f"http://127.0.0.1:{d2.api_port}/ui/"
        assert browser.find_element(By.ID, "sum-members").text == "2"
        counts = {li.get_attribute("data-state"): li.find_element(By.TAG_NAME, "b").text
                  for li in browser.find_elements(By.CSS_SELECTOR, "#sum-jobs li")}
        assert counts["failed"] == "1" and counts["running"] == "1"

        Select(browser.find_element(By.ID, "state-filter")).select_by_value("failed")
        wait_for(lambda: list(job_states(browser)) == [bad], what="the failed filter")

        rows(browser, "jobs")[bad].click()
        wait_for(lambda: browser.find_element(By.ID, "detail").is_displayed(), what="the job detail")
        timeline = [tr.get_attribute("data-state")
                    for tr in browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")]
        assert timeline == ["submitted", "queued", "placed", "running", "failed"]
        assert "exit 3" in browser.find_element(By.ID, "detail-fields").text
        assert not browser.find_element(By.ID, "detail-cancel").is_displayed()

        Select(browser.find_element(By.ID, "state-filter")).select_by_value("")
        wait_for(lambda: sleeper in rows(browser, "jobs"), what="the unfiltered table")
        rows(browser, "jobs")[sleeper].click()
        wait_for(lambda: browser.find_element(By.ID, "detail-id").text == sleeper, what="the sleeper's detail")
        browser.find_element(By.ID, "detail-cancel").click()
        browser.switch_to.alert.accept()
        wait_for(lambda: browser.find_element(By.ID, "detail-state").text == "cancelled", what="the cancel")
        with d1.client() as http:
            assert http.get(f"/v1/jobs/{sleeper}").json()["state"] == "cancelled"

        browser.get(f"{d1.url}/ui/#{logits}")  # a job linked by its id
        wait_for(lambda: browser.find_element(By.ID, "detail-id").text == logits, what="the linked job")
        wait_for(lambda: browser.find_element(By.ID, "detail-stdout").text.startswith("[binary output"),
                 what="the logits shown as binary output")

        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        assert console_errors(browser) == []  # no script error, no load refused by the CSP

        d1.stop()
        wait_for(lambda: "cannot reach the agent" in browser.find_element(By.ID, "banner").text,
                 what="the banner for a stopped agent")
        assert browser.find_element(By.ID, "health").text == "unreachable"  # not its last "accepting jobs"
    finally:
        stop_all(agents)


def test_a_page_of_another_site_cannot_submit_through_the_users_browser(tmp_path, browser):
    """The browser sends a no-cors POST with a text/plain body without asking the
    agent first; the agent must refuse it by its Origin. The other site here is a
    plain web server on another loopback port (Chromium itself blocks public pages
    from reaching loopback, but not a page on a local or intranet address)."""
    [agent] = start_cluster(tmp_path, ["target"])
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "index.html").write_text("<title>another site</title>")
    site = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site_dir)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        body = json.dumps(wasm_spec("hello.wasm"))
        browser.get(f"http://127.0.0.1:{site.server_address[1]}/")
        sent = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'},"
            " body: arguments[1]}).then(() => done('sent'), (e) => done('error: ' + e));",
            agent.url + "/v1/jobs", body)
        assert sent == "sent"  # the request left the browser; its answer is opaque to the page
        with agent.client() as client:
            assert client.get("/v1/jobs").json()["jobs"] == []
            # The same request from a client (no Origin) is taken: it is the page that is refused.
            assert client.post("/v1/jobs", content=body, headers={"content-type": "text/plain"}).status_code == 202
    finally:
        site.shutdown()
        stop_all([agent])


def test_a_page_in_a_hidden_tab_asks_the_agent_nothing_and_catches_up_when_shown(tmp_path, browser):
    """Dashboards get left open in background tabs: each would otherwise ask the
    agent five questions every 2 s for as long as the browser runs."""
    import time

    [agent] = start_cluster(tmp_path, ["solo"])
    try:
        browser.get(agent.url + "/ui/")
        wait_for(lambda: browser.find_element(By.ID, "updated").text.startswith("updated"), what="a first refresh")
        browser.execute_script("""
            window.asked = [];
            const realFetch = window.fetch;
            window.fetch = (...args) => { window.asked.push(document.visibilityState); return realFetch(...args); };
        """)
        page = browser.current_window_handle
        browser.switch_to.new_window("tab")
        browser.get("about:blank")
        time.sleep(5)  # two refresh periods and more
        browser.switch_to.window(page)
        asked = wait_for(lambda: browser.execute_script("return window.asked.slice()") or None,
                         what="a refresh once shown")
        assert "hidden" not in asked
        assert "visible" in asked
        assert console_errors(browser) == []
    finally:
        stop_all([agent])


def test_a_host_that_cannot_run_a_runtime_shows_as_impaired_on_its_page_and_its_peers(tmp_path, browser):
    """d2 lacks bubblewrap: its process job runs on d1, and both pages say d2 is impaired."""
    import shutil

    bin_dir = tmp_path / "d2-bin"
    bin_dir.mkdir()
    d1, d2 = start_cluster(tmp_path, ["d1", "d2"], "--host-cooldown-s", "600",
                           per_agent_env={"d2": {"PATH": str(bin_dir)}})
    try:
        with d2.client() as http:
            job = http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/echo", "hi"]}).json()["id"]
            assert http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()["executor"] == "d1"
        browser.get(d2.url + "/ui/")
        health = browser.find_element(By.ID, "health")
        wait_for(lambda: health.text == "accepting jobs · process impaired", what="d2's own health line")
        assert "process: 1 in a row failed here (last: process jobs need bubblewrap" in health.get_attribute("title")
        browser.get(d1.url + "/ui/")
        wait_for(lambda: rows(browser, "peers").get("d2") is not None
                 and rows(browser, "peers")["d2"].get_attribute("data-state") == "impaired", what="d2 impaired on d1")
        pill = rows(browser, "peers")["d2"].find_element(By.CSS_SELECTOR, ".pill")
        assert pill.text == "impaired"
        assert pill.get_attribute("title") == "process jobs kept failing there; peers send it none"
        assert rows(browser, "peers")["d1"].get_attribute("data-state") == "alive"
        assert browser.find_element(By.ID, "health").text == "accepting jobs"
        assert console_errors(browser) == []
    finally:
        stop_all([d1, d2])


def test_a_running_process_jobs_output_shows_in_its_detail_as_it_is_written(tmp_path, browser):
    [agent] = start_cluster(tmp_path, ["solo"])
    try:
        with agent.client() as http:
            job = http.post("/v1/jobs", json={"runtime": "process", "command": [
                "/bin/sh", "-c", "echo epoch 1 loss 0.9; echo warming up >&2; sleep 3; echo epoch 2 loss 0.5; sleep 60"]
            }).json()["id"]
            assert http.get(f"/v1/jobs/{job}/output", params={"wait": 30}).content == b"epoch 1 loss 0.9\n"
        browser.get(f"{agent.url}/ui/#{job}")
        stdout = browser.find_element(By.ID, "detail-stdout")
        wait_for(lambda: browser.find_element(By.ID, "detail-state").text == "running", what="the running job")
        # The state shows first; the output so far comes with the next request.
        wait_for(lambda: stdout.text.startswith("epoch 1 loss 0.9"), what="the output so far")
        assert browser.find_element(By.ID, "detail-stderr").text == "warming up"
        # The page's refresh brings what the job writes next.
        wait_for(lambda: stdout.text == "epoch 1 loss 0.9\nepoch 2 loss 0.5", what="the next line")
        assert console_errors(browser) == []
        with agent.client() as http:
            http.delete(f"/v1/jobs/{job}")
    finally:
        stop_all([agent])


def test_a_jobs_detail_says_where_the_rest_of_a_cut_output_is_or_that_it_was_not_kept(tmp_path, browser):
    """The record holds 64 KiB of each stream: the rest of a longer one is at /result
    or /output; what the job's own stdout_bytes or stderr_bytes cut is nowhere."""
    [agent] = start_cluster(tmp_path, ["solo"])
    long_output = ["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' o; head -c 70000 /dev/zero | tr '\\0' e >&2"]
    capped = {"stdout_bytes": 100, "stderr_bytes": 100}  # the job dies of SIGPIPE at the cap: output_limit
    try:
        with agent.client() as http:
            ends = {}
            for limits in ({}, capped):
                job = http.post("/v1/jobs", json={"runtime": "process", "command": long_output, "limits": limits})
                done = http.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 30}).json()
                ends[done["id"]] = done["state"]
        long_job, capped_job = ends
        texts = {}
        for job, state in ends.items():
            browser.get(f"{agent.url}/ui/#{job}")
            wait_for(lambda: browser.find_element(By.ID, "detail-state").text == state, what="the ended job")
            texts[job] = [browser.find_element(By.ID, f"detail-{s}").text.splitlines()[-1] for s in ("stdout", "stderr")]
        assert texts[long_job] == ["[cut here: output (raw) has the rest]",
                                   f"[cut here: p2psched logs --stderr {long_job} has the rest]"]
        assert texts[capped_job] == ["[cut here: the job's stdout_bytes limit kept only this much]",
                                     "[cut here: the job's stderr_bytes limit kept only this much]"]
        assert console_errors(browser) == []
    finally:
        stop_all([agent])


def test_a_user_finds_a_sweeps_jobs_by_their_labels(tmp_path, browser):
    [agent] = start_cluster(tmp_path, ["labels"])
    try:
        with agent.client() as http:
            specs = [wasm_spec("hello.wasm", labels={"sweep": "lr", "n": str(n)}) for n in range(3)]
            specs.append(wasm_spec("hello.wasm", labels={"sweep": "wd"}))
            ids = [r["job"]["id"] for r in http.post("/v1/jobs:batch", json={"jobs": specs}).json()["results"]]
            http.post("/v1/jobs:wait", json={"ids": ids, "wait": 30})
        browser.get(agent.url + "/ui/")
        wait_for(lambda: set(rows(browser, "jobs")) == set(ids), what="every job listed")

        box = browser.find_element(By.ID, "label-filter")
        box.send_keys("sweep=lr\n")
        wait_for(lambda: set(rows(browser, "jobs")) == set(ids[:3]), what="the sweep's jobs only")
        box.send_keys(" n=1\n")
        wait_for(lambda: set(rows(browser, "jobs")) == {ids[1]}, what="one label and another")
        assert not browser.find_element(By.ID, "banner").is_displayed()
        rows(browser, "jobs")[ids[1]].click()
        wait_for(lambda: "sweep=lr n=1" in browser.find_element(By.ID, "detail-fields").text, what="its labels")

        box.clear()
        box.send_keys("sweep\n")  # not KEY=VALUE: the agent's own message shows
        wait_for(lambda: "must be KEY=VALUE" in browser.find_element(By.ID, "banner").text, what="the error")
        box.clear()
        box.send_keys("\n")
        wait_for(lambda: set(rows(browser, "jobs")) == set(ids) and not browser.find_element(By.ID, "banner")
                 .is_displayed(), what="the whole list again")
        # Only the refused listing's 400 is logged.
        assert [e for e in console_errors(browser) if "status of 400" not in e["message"]] == []
    finally:
        stop_all([agent])


def test_a_user_cancels_a_sweep_by_its_labels(tmp_path, browser):
    [agent] = start_cluster(tmp_path, ["sweeper"], "--cpus", "1")
    try:
        loop = {"limits": {"wall_ms": 120_000}}
        with agent.client() as http:
            specs = [wasm_spec("loop.wasm", labels={"sweep": "lr", "n": str(n)}, **loop) for n in range(3)]
            specs.append(wasm_spec("hello.wasm", labels={"sweep": "wd"}))  # waits behind the loop
            ids = [r["job"]["id"] for r in http.post("/v1/jobs:batch", json={"jobs": specs}).json()["results"]]
            wait_for(lambda: http.get(f"/v1/jobs/{ids[0]}").json()["state"] == "running", what="the first running")
        browser.get(agent.url + "/ui/")
        wait_for(lambda: set(rows(browser, "jobs")) == set(ids), what="every job listed")
        button = browser.find_element(By.ID, "label-cancel")
        assert not button.is_displayed()  # no labels, no sweep to cancel

        browser.find_element(By.ID, "label-filter").send_keys("sweep=lr\n")
        wait_for(lambda: set(rows(browser, "jobs")) == set(ids[:3]), what="the sweep's jobs only")
        wait_for(button.is_displayed, what="the sweep's cancel button")
        button.click()
        assert "Cancel every unfinished job labelled sweep=lr?" in browser.switch_to.alert.text
        browser.switch_to.alert.accept()
        wait_for(lambda: browser.find_element(By.ID, "label-cancel-done").text == "3 cancelled", what="the count")
        wait_for(lambda: set(job_states(browser).values()) == {"cancelled"}, what="the sweep shown cancelled")
        with agent.client() as http:
            # The other sweep's job ran in the slot the cancelled loop freed.
            assert http.get(f"/v1/jobs/{ids[3]}", params={"wait": 30}).json()["state"] == "succeeded"
        assert not browser.find_element(By.ID, "banner").is_displayed()
        assert console_errors(browser) == []
    finally:
        stop_all([agent])


def test_declared_gpu_slots_are_marked_declared_and_a_node_without_gpus_is_not(tmp_path, browser):
    """GPUs from --gpus are virtual: the page must not let them pass for hardware, on
    the node's row (as its peers see it too) and in the cluster's totals."""
    gpu, plain = start_cluster(tmp_path, ["gpu", "plain"], per_agent={"gpu": ["--gpus", "2xH100-80GB"]})
    try:
        for page in (gpu, plain):
            browser.get(page.url + "/ui/")
            headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#peers thead th")]
            column = headers.index("GPU free / total")

            def gpu_cells():
                found = rows(browser, "peers")
                if set(found) != {"gpu", "plain"}:
                    return None
                return {n: tr.find_elements(By.TAG_NAME, "td")[column] for n, tr in found.items()}

            total = browser.find_element(By.ID, "sum-gpu")
            cells = wait_for(lambda: (c := gpu_cells()) and c["gpu"].text == total.text == "2 / 2 whole (declared)"
                             and c, what=f"gpu's slots marked declared on {page.node_id}'s page")
            [mark] = cells["gpu"].find_elements(By.CSS_SELECTOR, ".declared")
            assert mark.text == "(declared)" and "Declared with --gpus, not discovered" in mark.get_attribute("title")
            assert cells["plain"].text == "none" and cells["plain"].find_elements(By.CSS_SELECTOR, ".declared") == []
            assert "--gpus" in total.find_element(By.CSS_SELECTOR, ".declared").get_attribute("title")
            assert console_errors(browser) == []
        # No agent here has discovered GPUs (no NVML): the page's own function draws
        # a discovered node, and totals of declared slots beside discovered ones.
        shown = browser.execute_script("""
            const discovered = {labels: {"gpu.source": "nvml", "gpu.declared": "false"},
                                vector: {gpu_total: {whole: 1}}};
            return [gpuSlots({whole: 1}, {whole: 1}, declaredOf(discovered)).textContent,
                    gpuSlots({whole: 1, "1g.10gb": 0}, {whole: 3, "1g.10gb": 7}, {whole: 2}).textContent,
                    gpuSlots({whole: 1, "1g.10gb": 0}, {whole: 3, "1g.10gb": 7}, {"1g.10gb": 7}).textContent];
        """)
        assert shown == ["1 / 1 whole", "1 / 3 whole (2 declared), 0 / 7 1g.10gb",
                         "1 / 3 whole, 0 / 7 1g.10gb (declared)"]
    finally:
        stop_all([gpu, plain])
