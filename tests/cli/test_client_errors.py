"""The client commands' errors, against a real agent (or a real web server that is not
one): each names what was wrong and what to do, with the documented exit status and
never a Python traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psutil
import pytest

from agents import ROOT, WASM, AgentProcess, cli, new_agent, wait_for, wasm_spec

pytestmark = pytest.mark.cluster

#: An address where nothing listens: a command that sent a request there would exit 3.
NOWHERE = "http://127.0.0.1:9"
ID_RULE = "ids are 1-128 characters of letters, digits and . _ : - that start with a letter or digit"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    # Slots enough that the sleeping jobs these tests leave running never queue another.
    a = new_agent(tmp_path_factory.mktemp("client-errors"), "ce", "--cpus", "32").start()
    try:
        yield a
    finally:
        a.stop()


def no_traceback(p: subprocess.CompletedProcess[bytes]) -> str:
    err = p.stderr.decode()
    assert "Traceback" not in err and "Traceback" not in p.stdout.decode(), err
    return err


def job_count(agent: AgentProcess) -> int:
    with agent.client() as http:
        return sum(http.get("/v1/jobs:counts").json()["counts"].values())


def running_sleep(agent: AgentProcess, **extra: Any) -> str:
    with agent.client() as http:
        job_id = str(http.post("/v1/jobs", json=wasm_spec("sleep.wasm", **extra)).json()["id"])
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "running", what=f"{job_id} to run")
    return job_id


def state_of(agent: AgentProcess, job_id: str) -> str:
    with agent.client() as http:
        return str(http.get(f"/v1/jobs/{job_id}").json()["state"])


def cancel(agent: AgentProcess, job_id: str) -> None:
    with agent.client() as http:
        http.delete(f"/v1/jobs/{job_id}")


# -- 1. numbers: finite, and >= 0 where a time ------------------------------------------

HELLO = str(WASM / "hello.wasm")


@pytest.mark.parametrize(("args", "flag", "says"), [
    (("submit", HELLO, "--cpu", "nan"), "--cpu", "'nan' is not a finite number"),
    (("submit", "--process", "--cpu", "inf", "--", "/bin/true"), "--cpu", "'inf' is not a finite number"),
    (("submit", HELLO, "--wait", "--timeout", "nan"), "--timeout", "'nan' is not a finite number"),
    (("submit", HELLO, "--wait", "--timeout", "-1"), "--timeout", "not in the range x>=0"),
    (("submit", HELLO, "--retry-s", "-inf"), "--retry-s", "'-inf' is not a finite number"),
    (("batch", "examples/jobs/guests.yaml", "--wait", "--timeout", "1e999"), "--timeout", "is not a finite number"),
    (("batch", "examples/jobs/guests.yaml", "--wait", "--timeout", "-1"), "--timeout", "not in the range x>=0"),
    (("batch", "examples/jobs/guests.yaml", "--retry-s", "nan"), "--retry-s", "'nan' is not a finite number"),
    (("status", "j1", "--wait", "-5"), "--wait", "not in the range x>=0"),
    (("status", "j1", "--wait", "nan"), "--wait", "'nan' is not a finite number"),
    (("result", "j1", "--wait", "inf"), "--wait", "'inf' is not a finite number"),
])
def test_a_number_that_is_not_finite_or_a_negative_time_is_a_usage_error_naming_the_flag(agent, args, flag, says):
    before = job_count(agent)
    p = cli(*args, agent=agent)
    err = no_traceback(p)
    assert p.returncode == 2, err
    assert f"'{flag}'" in err and says in err, err
    assert job_count(agent) == before  # nothing was sent


def test_waits_longer_than_the_agents_longest_long_poll_are_made_of_several(agent):
    job_id = running_sleep(agent, limits={"wall_ms": 1500})
    with agent.client() as http:  # the agent alone serves at most 300 s a request
        assert http.get(f"/v1/jobs/{job_id}", params={"wait": "1000"}).status_code == 400
    start = time.monotonic()
    p = cli("status", job_id, "--wait", "1000", agent=agent)
    no_traceback(p)
    assert p.returncode == 0 and f"{job_id}  timed_out" in p.stdout.decode(), p.stderr
    assert time.monotonic() - start < 60
    p = cli("result", job_id, "--wait", "1e9", agent=agent)
    assert p.returncode == 0, no_traceback(p)
    hello = cli("submit", HELLO, agent=agent, check=True).stdout.decode().strip()
    p = cli("result", hello, "--wait", "400", agent=agent)
    assert p.returncode == 0 and p.stdout == b"hello from p2psched\n", no_traceback(p)


# -- 2. the agent's URL -------------------------------------------------------------------

@pytest.mark.parametrize(("url", "says"), [
    ("http://[::1", "'http://[::1' is not a URL (Invalid port: ':1'): use http://HOST:PORT"),
    ("notaurl", "'notaurl' is not a URL: use http://HOST:PORT (add http://)"),
    ("127.0.0.1:18800", "'127.0.0.1:18800' is not a URL: use http://HOST:PORT (add http://)"),
    ("ftp://127.0.0.1:7700", "'ftp://127.0.0.1:7700' is not an http:// URL: use http://HOST:PORT (the agent's API "
                              "speaks HTTP)"),
    ("http://", "'http://' names no host: use http://HOST:PORT"),
])
@pytest.mark.parametrize("args", [("submit", HELLO), ("batch", "examples/jobs/guests.yaml"), ("peers",),
                                  ("status", "j1"), ("jobs",)])
def test_an_agent_url_that_is_not_one_is_a_usage_error(url, says, args):
    p = cli(*args, "--agent", url)
    err = no_traceback(p)
    assert p.returncode == 2, err
    assert err.strip() == f"p2psched: --agent (or $P2PSCHED_URL) {says}", err


def test_a_bad_url_in_the_environment_is_named_the_same_way():
    p = subprocess.run([sys.executable, "-m", "p2psched", "peers"], capture_output=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "P2PSCHED_URL": "localhost:7700"})
    err = no_traceback(p)
    assert p.returncode == 2 and "$P2PSCHED_URL) 'localhost:7700' is not a URL" in err and "add http://" in err


def test_https_to_the_agent_says_its_api_speaks_plain_http(agent):
    p = cli("peers", "--agent", agent.url.replace("http://", "https://"))
    err = no_traceback(p)
    assert p.returncode == 3, err
    assert "the agent's API speaks plain HTTP: use http://HOST:PORT" in err, err
    assert "is `p2psched agent` running there?" not in err


# -- 3. job ids -----------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "bad"), [
    (("status", ""), ""), (("status", "?x"), "?x"), (("status", "../peers"), "../peers"),
    (("status", "a b?c#d"), "a b?c#d"), (("cancel", ""), ""), (("cancel", "ok-1", "../x"), "../x"),
    (("result", "../../etc"), "../../etc"), (("logs", "-f", "a/b"), "a/b"), (("submit", HELLO, "--id", "../x"), "../x"),
    (("status", "x" * 129), "x" * 129),
])
def test_a_job_id_that_is_not_one_is_refused_before_any_request(args, bad):
    p = cli(*args, "--agent", NOWHERE)  # a request sent would exit 3: cannot reach the agent
    err = no_traceback(p)
    assert p.returncode == 2, err
    assert err.strip() == f"p2psched: {bad!r} is not a job id: {ID_RULE}", err


def test_a_valid_id_still_reaches_the_agent(agent):
    p = cli("status", "no-such.job:1", agent=agent)
    err = no_traceback(p)
    assert p.returncode == 3 and "404: no job 'no-such.job:1'" in err, err


# -- 4. answers that are not an agent's --------------------------------------------------------

PAGE = b"<!DOCTYPE HTML><html><head><title>It works</title></head><body><h1>It works!</h1></body></html>\n"


class _WebPage(BaseHTTPRequestHandler):
    """A plain web server: 200 and a page under /site/, 404 and a page elsewhere."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200 if self.path.startswith("/site/") else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WebPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("args", "path", "what"), [
    (("peers",), "/v1/peers", "JSON"), (("cluster",), "/v1/cluster", "JSON"), (("jobs",), "/v1/jobs", "JSON"),
    (("jobs", "--counts"), "/v1/jobs:counts", "JSON"), (("status", "j1"), "/v1/jobs/j1", "JSON"),
    (("cancel", "j1"), "/v1/jobs/j1", "JSON"), (("submit", HELLO), "/v1/jobs", "JSON"),
    (("drain",), "/v1/drain", "JSON"), (("result", "j1"), "/v1/jobs/j1/result", "answer"),
    (("logs", "j1"), "/v1/jobs/j1/output", "answer"),
    (("batch", "examples/jobs/guests.yaml"), "/v1/jobs:batch", "JSON"),
])
@pytest.mark.parametrize("status", [200, 404])
def test_a_web_server_that_is_not_an_agent_is_named_not_dumped(web_server, args, path, what, status):
    base = web_server + ("/site" if status == 200 else "")
    p = cli(*args, "--agent", base)
    err = no_traceback(p)
    assert p.returncode == 3, err
    what = what if status == 200 else "JSON"  # an error answer: the agent's are JSON
    assert err.strip() == (f"p2psched: {base}{path} answered HTTP {status} (text/html), not a p2psched agent's "
                           f"{what}; is --agent (or $P2PSCHED_URL) an agent's API address?"), err
    assert b"DOCTYPE" not in p.stdout + p.stderr and b"It works" not in p.stdout + p.stderr


# -- 5, 7. --timeout -------------------------------------------------------------------------

def test_follow_stops_when_timeout_runs_out_and_says_the_job_goes_on(agent):
    start = time.monotonic()
    p = cli("submit", str(WASM / "sleep.wasm"), "-f", "--timeout", "2", "--id", "follow-timeout", agent=agent)
    took = time.monotonic() - start
    err = no_traceback(p)
    try:
        assert p.returncode == 1, err
        assert took < 30, took  # it used to wait 60 s more for the job to end
        assert err.strip() == ("p2psched: job follow-timeout is still running when --timeout 2s ran out; it goes on "
                               "at the agent: `p2psched status follow-timeout` shows it, `p2psched cancel "
                               "follow-timeout` stops it"), err
        assert state_of(agent, "follow-timeout") == "running"
    finally:
        cancel(agent, "follow-timeout")


def test_wait_says_the_job_is_still_running_when_timeout_runs_out(agent):
    p = cli("submit", str(WASM / "sleep.wasm"), "--wait", "--timeout", "1", "--id", "wait-timeout", agent=agent)
    err = no_traceback(p)
    try:
        assert p.returncode == 1, err
        assert "job wait-timeout is still running when --timeout 1s ran out; it goes on at the agent" in err, err
        assert "`p2psched status wait-timeout` shows it, `p2psched cancel wait-timeout` stops it" in err
        assert "did not finish in time" not in err
        assert state_of(agent, "wait-timeout") == "running"
    finally:
        cancel(agent, "wait-timeout")


def test_a_job_that_failed_still_says_how(agent):
    p = cli("submit", str(WASM / "exit3.wasm"), "--wait", agent=agent)
    err = no_traceback(p)
    assert p.returncode == 1 and err.startswith("p2psched: job ") and err.strip().endswith(" failed: exit 3"), err


# -- 6. Ctrl-C -------------------------------------------------------------------------------

def _talking_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds an open connection to ``port`` (a request in flight)."""
    try:
        proc = psutil.Process(pid)
        conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
    except psutil.Error:
        return False
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in conns)


@pytest.mark.parametrize("how", ["submit --wait", "submit -f", "logs -f", "status --wait", "result --wait"])
def test_ctrl_c_stops_waiting_not_the_job_and_says_how_to_see_and_stop_it(agent, how):
    job_id = f"ctrl-c-{how.replace(' ', '').replace('-', '')}"
    if how.startswith("submit"):
        args = ["submit", str(WASM / "sleep.wasm"), "--id", job_id, how.split()[1]]
    else:
        with agent.client() as http:
            http.post("/v1/jobs", json=wasm_spec("sleep.wasm", id=job_id))
        args = [*how.split()[:1], job_id, *how.split()[1:]] + (["600"] if how.endswith("--wait") else [])
    # SIGINT at its default, as from a terminal: a suite started in the background has it ignored.
    proc = subprocess.Popen([sys.executable, "-m", "p2psched", *args, "--agent", agent.url], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: state_of(agent, job_id) == "running", what=f"{job_id} to run")
        wait_for(lambda: _talking_to(proc.pid, agent.api_port), what=f"`p2psched {how}` to wait on the agent")
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err_bytes = proc.communicate(timeout=60)
        err = err_bytes.decode()
        assert "Traceback" not in err and "Aborted" not in err, err
        assert proc.returncode == 130, err
        assert err.strip() == (f"p2psched: stopped waiting; job {job_id} goes on at the agent: `p2psched status "
                               f"{job_id} --agent {agent.url}` shows it, `p2psched cancel {job_id} --agent "
                               f"{agent.url}` stops it"), err
        assert state_of(agent, job_id) == "running"
    finally:
        proc.kill()
        proc.wait()
        cancel(agent, job_id)


# -- 8. jobs --counts --state ----------------------------------------------------------------

def test_counts_with_state_is_a_usage_error(agent):
    p = cli("jobs", "--counts", "--state", "bogus", agent=agent)
    err = no_traceback(p)
    assert p.returncode == 2, err
    assert "--state bogus does not apply to --counts: the counts cover every state" in err, err
    ok = cli("jobs", "--counts", agent=agent)
    assert ok.returncode == 0 and "succeeded" in ok.stdout.decode(), no_traceback(ok)


def test_the_urls_check_is_public_and_returns_the_base(capsys):
    from p2psched.cli.client import agent_base_url

    assert agent_base_url("http://127.0.0.1:7700/") == "http://127.0.0.1:7700"
    assert agent_base_url("https://[::1]:7700") == "https://[::1]:7700"
    with pytest.raises(SystemExit) as exit_:
        agent_base_url("127.0.0.1:7700")
    assert exit_.value.code == 2
    assert "use http://HOST:PORT (add http://)" in capsys.readouterr().err
    assert httpx.URL(agent_base_url("http://h:1")).port == 1


def test_what_agents_peers_and_guests_chose_cannot_drive_the_terminal():
    from p2psched.cli.client import _summary, shown

    rec = {"id": "a:1", "state": "failed", "runtime": "wasm", "executor": "n1",
           "labels": {"team": "x\x1b]0;pwned\x07", "run": "\u202eevil"},
           "result": {"reason": "trap: in f\x1b[2J", "cpu_ms": 1, "peak_mem_bytes": 0}}
    line = _summary(rec)
    assert "\x1b" not in line and "\u202e" not in line and "\x07" not in line
    assert "team=x\\u001b]0;pwned\\u0007" in line and "run=\\u202eevil" in line
    assert shown("plain text, é and 日本") == "plain text, é and 日本"
