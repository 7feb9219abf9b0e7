"""`p2psched submit` against a full agent: it retries after Retry-After until the
queue has room (or --retry-s runs out), as a client of a busy service should."""

import re
import subprocess
import sys
import time

import pytest

from agents import ROOT, cli, new_agent, wasm_spec

pytestmark = pytest.mark.cluster


def test_submit_waits_out_a_full_queue_and_gives_up_after_retry_s(tmp_path):
    agent = new_agent(tmp_path, "busy", "--cpus", "1", "--queue-limit", "1").start()
    try:
        with agent.client() as http:
            running = http.post("/v1/jobs", json=wasm_spec("sleep.wasm")).json()["id"]
            queued = http.post("/v1/jobs", json=wasm_spec("sleep.wasm")).json()["id"]
            full = http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
            assert full.status_code == 429 and full.headers["retry-after"]

            refused = cli("submit", "examples/wasm/hello.wasm", "--retry-s", "0", agent=agent)
            assert refused.returncode == 3 and b"429" in refused.stderr and b"retrying" not in refused.stderr

            waiting = subprocess.Popen(
                [sys.executable, "-m", "p2psched", "submit", "examples/wasm/hello.wasm", "--wait",
                 "--agent", agent.url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(2.5)  # it meets the full queue and retries
            assert waiting.poll() is None
            for job in (queued, running):  # room in the queue, then a free CPU
                http.delete(f"/v1/jobs/{job}")
            out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert out == b"hello from p2psched\n"
        # The delay is the agent's Retry-After: 1 s at first, more once the running
        # job has run a second with none ended (a loaded host), at most 60.
        assert re.search(rb"p2psched: 429 queue_full; retrying in ([1-9]|[1-5][0-9]|60)s \(for up to 30s in all\)",
                         err), err
    finally:
        agent.stop()


def test_retrying_lasts_the_whole_retry_s_when_the_next_wait_would_pass_it(tmp_path):
    # An answer that always says "full, ask again in 4 s" (a stand-in for an agent whose
    # queue stays full, to fix the waits). With --retry-s 6 the client gave up after the
    # first wait, at 4 s, with 2 of the 6 s unused.
    import http.server
    import json
    import threading

    asked = []

    class Full(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            asked.append(self.path)
            self.rfile.read(int(self.headers["content-length"]))
            body = json.dumps({"error": {"reason": "queue_full", "message": "the queue is full"}}).encode()
            self.send_response(429)
            self.send_header("retry-after", "4")
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Full)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "p2psched", "submit", "examples/wasm/hello.wasm", "--retry-s", "6",
             "--agent", f"http://127.0.0.1:{server.server_address[1]}"],
            cwd=ROOT, capture_output=True, timeout=60)
    finally:
        server.shutdown()
    assert p.returncode == 3 and b"429: the queue is full" in p.stderr, p.stderr
    waits = [float(w) for w in re.findall(rb"retrying in ([0-9.]+)s \(for up to 6s in all\)", p.stderr)]
    assert waits[0] == 4 and len(waits) == 2 and 1 < waits[1] < 2.1, p.stderr  # the rest of the 6 s
    assert len(asked) == 3
