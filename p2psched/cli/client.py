"""The client commands: submit, status, jobs, cancel, result, peers, cluster, drain.

They speak only the HTTP API, so everything they do a user can do with curl.
An answer of 429 or 503 with Retry-After (a full queue, a rate limit, an agent
still joining) is retried after that delay for up to 30 s (``submit --retry-s``).
Exit status: 0 on success; 1 when the job did not succeed (reason on stderr);
2 for usage errors; 3 when the agent cannot be reached or answers an error;
130 when Ctrl-C stopped the command (a job it was waiting for goes on).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import math
import os
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from p2psched.cli.numbers import FiniteFloat
from p2psched.jobs.ids import JOB_ID_RE, JOB_ID_RULE

DEFAULT_URL = "http://127.0.0.1:7700"
agent_option = click.option(
    "--agent", "agent_url", default=lambda: os.environ.get("P2PSCHED_URL", DEFAULT_URL),
    show_default="$P2PSCHED_URL or " + DEFAULT_URL, help="Agent API URL (http://HOST:PORT).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the JSON record.")


def api_options(f: Any) -> Any:
    """--agent, plus --tenant/--key to sign the request where the agent has a tenant registry."""

    @functools.wraps(f)
    def wrapper(*args: Any, agent_url: str, identity_tenant: str | None, identity_key: Path | None,
                **kw: Any) -> Any:
        api = Api(agent_url, tenant=identity_tenant, key=identity_key)
        try:
            return f(*args, api=api, **kw)
        except KeyboardInterrupt:
            fail("stopped (Ctrl-C); what the agent was already asked to do goes on there", 130)

    wrapper = click.option("--key", "identity_key", type=click.Path(path_type=Path),
                           help="Tenant private key file; signs the request.")(wrapper)
    wrapper = click.option("--tenant", "identity_tenant", help="Tenant name (with --key).")(wrapper)
    return agent_option(wrapper)


def fail(message: str, code: int = 3) -> NoReturn:
    click.echo(f"p2psched: {message}", err=True)
    sys.exit(code)


def check_job_id(job_id: str) -> str:
    """``job_id`` if it is a job id; else exit 2 saying what an id is (before any request)."""
    if not JOB_ID_RE.fullmatch(job_id):
        fail(f"{job_id!r} is not a job id: ids are {JOB_ID_RULE}", 2)
    return job_id


def _job_id_arg(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """click callback: check a job id argument or option (one, several, or none given)."""
    if isinstance(value, tuple):
        return tuple(check_job_id(v) for v in value)
    return None if value is None else check_job_id(value)


def agent_base_url(url: str) -> str:
    """The agent API base URL ``url`` (from --agent or $P2PSCHED_URL), checked once: it
    must parse and be http(s)://HOST[:PORT]; else exit 2 saying how to write it."""
    where = f"--agent (or $P2PSCHED_URL) {url!r}"
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        fail(f"{where} is not a URL ({e}): use http://HOST:PORT", 2)
    if "://" not in url or not parsed.scheme:
        fail(f"{where} is not a URL: use http://HOST:PORT (add http://)", 2)
    if parsed.scheme not in ("http", "https"):
        fail(f"{where} is not an http:// URL: use http://HOST:PORT (the agent's API speaks HTTP)", 2)
    if not parsed.host:
        fail(f"{where} names no host: use http://HOST:PORT", 2)
    if port is not None and not 1 <= port <= 65535:
        fail(f"{where} has port {port}, outside 1-65535: use http://HOST:PORT", 2)
    if parsed.query or parsed.fragment:
        fail(f"{where} has a query or fragment: use http://HOST:PORT", 2)
    return url.rstrip("/")


def tenant_auth(tenant: str | None, key: Path | None) -> httpx.Auth | None:
    """The signer for --tenant/--key (None for neither); exits 2 on a bad pair or key."""
    if tenant and key:
        from p2psched.security.client import RequestSigner

        try:
            return RequestSigner(tenant, key).auth
        except (OSError, ValueError) as e:
            fail(f"cannot use --key {key}: {e}", 2)
    if tenant or key:
        fail("--tenant and --key go together: name the tenant and its private key file", 2)
    return None


#: How long a command keeps retrying an agent that answers 429 or 503 with Retry-After.
RETRY_S = 30.0
#: Jobs one cancel request names (the agent takes up to 10,000).
CANCEL_CHUNK = 1_000
#: The states a job ends in.
FINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out", "rejected")


#: The longest long-poll (?wait=) the agent serves (MAX_WAIT_S in p2psched/api/server.py);
#: longer waits are made of several.
AGENT_MAX_WAIT_S = 300.0


class Api:
    def __init__(self, url: str, *, tenant: str | None = None, key: Path | None = None,
                 retry_s: float = RETRY_S) -> None:
        self.url = agent_base_url(url)
        self.retry_s = retry_s
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(30.0, read=AGENT_MAX_WAIT_S + 30),
                                   auth=tenant_auth(tenant, key))

    def command(self, *words: str) -> str:
        """``p2psched WORDS``, with --agent where this Api's is not the one a plain command uses."""
        plain = os.environ.get("P2PSCHED_URL", DEFAULT_URL).rstrip("/")
        return "p2psched " + " ".join(words) + ("" if self.url == plain else f" --agent {self.url}")

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                resp = self.client.request(method, path, **kw)
            except httpx.HTTPError as e:
                if self.url.startswith("https:") and _is_tls_error(e):
                    fail(f"cannot speak TLS with {self.url}: {e}; the agent's API speaks plain HTTP: use "
                         "http://HOST:PORT (https:// only through a TLS proxy in front of it, with a certificate "
                         "this host trusts)")
                fail(f"cannot reach the agent at {self.url}: {e}; is `p2psched agent` running there? "
                     "(set --agent or $P2PSCHED_URL)")
            except httpx.InvalidURL as e:
                fail(f"cannot ask the agent at {self.url} for {path}: {e}; check --agent (or $P2PSCHED_URL)", 2)
            # A full queue, a rate limit, an agent still joining: the agent took nothing
            # and says when to ask again, so ask again (a refused request binds no nonce).
            wait = _retry_after(resp)
            left = deadline - time.monotonic()
            if wait is None or left <= 0:
                break
            # A wait past the deadline is cut to it, for one last try then: giving up at the
            # first such wait ended a 30 s retry after 15 s, as the agent's waits doubled.
            wait = min(wait, left)
            click.echo(f"p2psched: {resp.status_code} {_error_reason(resp)}; retrying in {wait:.3g}s "
                       f"(for up to {self.retry_s:g}s in all)", err=True)
            time.sleep(wait)
        if resp.status_code >= 400:
            message = _error_message(resp)
            if message is None:
                _not_an_agent(resp)
            fail(f"{resp.status_code}: {message}")
        return resp

    def json(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.request(method, path, **kw)
        try:
            data = resp.json()
        except ValueError:
            _not_an_agent(resp)
        if not isinstance(data, dict):
            _not_an_agent(resp)
        return data

    def output(self, method: str, path: str, header: str, **kw: Any) -> httpx.Response:
        """A request for a job's bytes (result, output): the agent marks its answer with ``header``."""
        resp = self.request(method, path, **kw)
        if header not in resp.headers:
            _not_an_agent(resp, "answer")
        return resp


def _not_an_agent(resp: httpx.Response, what: str = "JSON") -> NoReturn:
    """Exit 3 for an answer no agent gives (a web page, another service), without printing it."""
    kind = resp.headers.get("content-type", "").split(";")[0].strip() or "no content type"
    url = str(resp.url).split("?")[0]
    fail(f"{url} answered HTTP {resp.status_code} ({kind}), not a p2psched agent's {what}; "
         "is --agent (or $P2PSCHED_URL) an agent's API address?")


def _is_tls_error(e: BaseException) -> bool:
    seen: BaseException | None = e
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "[SSL" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry_after(resp: httpx.Response) -> float | None:
    if resp.status_code not in (429, 503):
        return None
    try:
        wait = float(resp.headers.get("retry-after", ""))
    except ValueError:
        return None
    return wait if 0 <= wait <= 60 else None


def _error_message(resp: httpx.Response) -> str | None:
    """The message of the agent's error body; None for an answer that is not one."""
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return None


def _error_reason(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["reason"])
    except (ValueError, KeyError, TypeError):
        return resp.reason_phrase


def shown(text: Any) -> str:
    """A value an agent, a peer or a guest chose, for a terminal: control, bidi and other
    invisible characters as \\u escapes, so that none can move the cursor, retitle the
    window or reorder what is printed around it. (A job's own output, asked for with
    result, logs or submit --wait, is printed as it is.)"""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _summary(rec: dict[str, Any]) -> str:
    res = rec.get("result") or {}
    parts = [f"{rec['id']}  {rec['state']}", f"runtime={rec['runtime']}", f"executor={rec.get('executor')}"]
    if rec.get("labels"):
        parts.append("labels=" + ",".join(f"{k}={v}" for k, v in rec["labels"].items()))
    if rec.get("hops"):
        parts.append(f"hops={rec['hops']} route={'>'.join(rec['route'])} cost={rec['cost']}")
    if res:  # !r: a reason a guest wrote (a trap names its functions) shows as a literal
        parts.append(f"reason={res['reason']!r} cpu_ms={res['cpu_ms']} peak_mem={res['peak_mem_bytes']}")
    if rec.get("wait_reason"):
        parts.append(f"waiting: {rec['wait_reason']}")
    return shown("  ".join(parts))


def _parse_pairs(items: tuple[str, ...], flag: str = "--env") -> dict[str, str]:
    pairs = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            fail(f"{flag} {item!r} must be KEY=VALUE", 2)
        pairs[k] = v
    return pairs


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("module", required=False)  # a str: with --process it is the program, kept as given (./x too)
@click.argument("command", nargs=-1)
@click.option("--process", is_flag=True, help="Run COMMAND in the process sandbox: submit --process -- CMD ARGS...")
@agent_option
@click.option("--id", "job_id", callback=_job_id_arg, help="Job id (idempotency: the same id never runs twice).")
@click.option("--input", "input_file", help="File (or - for stdin) fed to the job's stdin.")
@click.option("--arg", "args", multiple=True, help="Argument for the guest (repeatable).")
@click.option("--env", "env", multiple=True, help="KEY=VALUE for the guest (repeatable).")
@click.option("--entry", default="_start", show_default=True, help="Exported function to call (wasm).")
@click.option("--cpu", type=FiniteFloat(), help="CPU slots [1].")
@click.option("--mem-mb", type=int,
              help="Memory reserved, MiB; the memory limit too unless the spec sets limits.mem_bytes [256].")
@click.option("--gpu", type=int, help="GPU slots [0].")
@click.option("--gpu-type", help="GPU slot type.")
@click.option("--wall-ms", type=int, help="Wall-clock limit, ms [60000].")
@click.option("--cpu-ms", type=int, help="CPU-time limit, ms.")
@click.option("--fuel", type=int, help="WebAssembly fuel limit.")
@click.option("--mem-limit-mb", type=int, help="Hard memory limit, MiB [256].")
@click.option("--stack-bytes", type=int, help="WebAssembly stack limit, bytes [1048576].")
@click.option("--pids", type=int, help="Processes a process job may hold at once [64].")
@click.option("--nofile", type=int, help="Open files a process job may hold [64].")
@click.option("--fsize-bytes", type=int, help="Largest file a process job may write, bytes [67108864].")
@click.option("--scratch-mb", type=int, help="Size of a process job's scratch directory, MiB [64].")
@click.option("--stdout-bytes", type=int, help="stdout kept; the rest is cut and flagged [1048576].")
@click.option("--stderr-bytes", type=int, help="stderr kept; the rest is cut and flagged [262144].")
@click.option("--violation", type=click.Choice(["graceful", "kill"]),
              help="On a limit: kill at once, or graceful: SIGTERM, --grace-ms, then SIGKILL [kill].")
@click.option("--grace-ms", type=int, help="Grace between SIGTERM and SIGKILL with --violation graceful [2000].")
@click.option("--mask", "masks", multiple=True, metavar="PATTERN",
              help="Text or regex scrubbed from stdout and stderr before they are stored (repeatable).")
@click.option("--artifact", "artifacts", multiple=True, metavar="PATH",
              help="File in the job's scratch directory returned with the result (repeatable).")
@click.option("--priority", type=int, help="Priority; higher runs first [0].")
@click.option("--cap", "caps", multiple=True, help="Capability the job needs (network, gpu; repeatable).")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE label (repeatable).")
@click.option("--tenant", help="Tenant name (signs the request with --key).")
@click.option("--key", type=click.Path(path_type=Path), help="Tenant private key file.")
@click.option("--wait", is_flag=True, help="Wait for the job to end; print its output (or record with --json).")
@click.option("--follow", "-f", is_flag=True,
              help="Print the job's output as it writes it, until it ends; exit as --wait does.")
@click.option("--timeout", type=FiniteFloat(min=0), default=3600.0, show_default=True,
              help="Longest --wait or --follow, seconds.")
@click.option("--retry-s", type=FiniteFloat(min=0), default=RETRY_S, show_default=True,
              help="How long to keep retrying when the agent answers 429 or 503 with Retry-After (0: never).")
@json_option
def submit(module: str | None, command: tuple[str, ...], process: bool, agent_url: str, job_id: str | None,
           input_file: str | None, args: tuple[str, ...], env: tuple[str, ...], entry: str, cpu: float | None,
           mem_mb: int | None, gpu: int | None, gpu_type: str | None, wall_ms: int | None, cpu_ms: int | None,
           fuel: int | None, mem_limit_mb: int | None, stack_bytes: int | None, pids: int | None,
           nofile: int | None, fsize_bytes: int | None, scratch_mb: int | None, stdout_bytes: int | None,
           stderr_bytes: int | None, violation: str | None, grace_ms: int | None, masks: tuple[str, ...],
           artifacts: tuple[str, ...], priority: int | None, caps: tuple[str, ...],
           labels: tuple[str, ...], tenant: str | None, key: Path | None, wait: bool, follow: bool, timeout: float,
           retry_s: float, as_json: bool) -> None:
    """Submit MODULE (a .wasm file), or with --process a command: submit --process -- CMD ARGS..."""
    if follow and as_json:
        fail("--follow prints the job's output as it comes; --json prints its record: choose one "
             "(--wait --json prints the final record)", 2)
    spec: dict[str, Any] = {}
    if process:
        argv = ([module] if module is not None else []) + list(command)
        if not argv:
            fail("--process needs a command after --, e.g. p2psched submit --process -- /bin/echo hi", 2)
        spec["runtime"] = "process"
        spec["command"] = argv
    else:
        if module is None:
            fail("give a .wasm MODULE to run, or --process -- CMD ARGS...", 2)
        if command:
            fail(f"unexpected arguments {list(command)}; pass guest arguments with --arg", 2)
        try:
            data = Path(module).read_bytes()
        except OSError as e:
            fail(f"cannot read module {module}: {e.strerror}", 2)
        spec["runtime"] = "wasm"
        spec["module"] = base64.b64encode(data).decode()
        if entry != "_start":
            spec["entry"] = entry
    if job_id:
        spec["id"] = job_id
    if input_file is not None:
        try:
            raw = sys.stdin.buffer.read() if input_file == "-" else Path(input_file).read_bytes()
        except OSError as e:
            fail(f"cannot read --input {input_file}: {e.strerror}", 2)
        spec["input"] = base64.b64encode(raw).decode()
    if args:
        spec["args"] = list(args)
    if env:
        spec["env"] = _parse_pairs(env)
    resources = {k: v for k, v in {"cpu": cpu, "mem_mb": mem_mb, "gpu": gpu, "gpu_type": gpu_type}.items()
                 if v is not None}
    if resources:
        spec["resources"] = resources
    # `is not None`, not truthiness: a 0 the user typed goes to the agent, which refuses it
    # with the allowed range, rather than being dropped for the default.
    limits = {k: v for k, v in {
        "wall_ms": wall_ms, "cpu_ms": cpu_ms, "fuel": fuel,
        "mem_bytes": mem_limit_mb * 1024 * 1024 if mem_limit_mb is not None else None, "stack_bytes": stack_bytes,
        "pids": pids, "nofile": nofile, "fsize_bytes": fsize_bytes, "scratch_mb": scratch_mb,
        "stdout_bytes": stdout_bytes, "stderr_bytes": stderr_bytes, "violation": violation, "grace_ms": grace_ms,
    }.items() if v is not None}
    if limits:
        spec["limits"] = limits
    if masks:
        spec["mask_patterns"] = list(masks)
    if artifacts:
        spec["artifacts"] = list(artifacts)
    if priority is not None:
        spec["priority"] = priority
    if caps:
        spec["capabilities"] = list(caps)
    if labels:
        spec["labels"] = _parse_pairs(labels, "--label")
    if tenant:
        spec["tenant"] = tenant
    api = Api(agent_url, tenant=tenant, key=key, retry_s=retry_s)
    body: dict[str, Any] = spec
    if tenant and key:
        from p2psched.security.client import sign_submission

        body = sign_submission(spec, tenant, key)
    try:
        rec = api.json("POST", "/v1/jobs", json=body)
    except KeyboardInterrupt:
        see = f"`{api.command('status', job_id)}` says" if job_id else f"`{api.command('jobs', '--newest')}` lists it"
        fail(f"stopped (Ctrl-C) before the agent answered; it may have taken the job: {see}", 130)
    deadline = time.monotonic() + timeout  # --timeout counts from the job's acceptance
    if follow:
        with _stop_waiting_on_ctrl_c(api, rec["id"]):
            complete = _follow_output(api, rec["id"], "stdout", follow=True, timeout=timeout)
            # Output complete: the job has ended, and its record says so at once or nearly.
            left = max(0.0, deadline - time.monotonic())
            _exit_for(api, _wait_final(api, rec["id"], max(left, 10.0) if complete else 0.0), timeout)
        return
    if not wait:
        if as_json:
            _print_json(rec)
        else:
            click.echo(rec["id"])
        return
    with _stop_waiting_on_ctrl_c(api, rec["id"]):
        rec = _wait_final(api, rec["id"], max(0.0, deadline - time.monotonic()))
        _report(api, rec, as_json, timeout)


@contextlib.contextmanager
def _stop_waiting_on_ctrl_c(api: Api, job_id: str) -> Iterator[None]:
    """Ctrl-C while waiting for a job stops the waiting, not the job: say so, and how to
    see and stop it, and exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        fail(f"stopped waiting; job {job_id} goes on at the agent: `{api.command('status', job_id)}` shows it, "
             f"`{api.command('cancel', job_id)}` stops it", 130)


def _wait_final(api: Api, job_id: str, timeout: float) -> dict[str, Any]:
    """The job's record once it has ended or ``timeout`` seconds have passed (any
    number: the agent's long-polls of up to 60 s are asked one after another)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        rec = api.json("GET", f"/v1/jobs/{job_id}", params={"wait": f"{max(0.0, min(left, 60.0)):.3f}"})
        if rec["state"] in FINAL_STATES or left <= 0:
            return rec


def _follow_output(api: Api, job_id: str, stream: str, *, follow: bool, timeout: float = math.inf) -> bool:
    """Write ``stream`` of the job to our stdout as the agent serves it: what there is
    now, or with ``follow`` everything until the job ends (or ``timeout`` passes).
    Returns whether the output is complete (the job has ended)."""
    out = sys.stdout.buffer
    offset, attempt, said = 0, 0, set()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        wait = max(0.0, min(30.0, left)) if follow else 0.0
        resp = api.output("GET", f"/v1/jobs/{job_id}/output", "x-output-next",
                          params={"stream": stream, "offset": offset, "wait": f"{wait:.3f}"})
        got = int(resp.headers.get("x-output-attempt", "0") or 0)
        if got > attempt and offset:
            # A job run again (its host or executor failed) writes its output anew.
            click.echo(f"p2psched: job {job_id} runs again (attempt {got}); its {stream} starts over", err=True)
            offset, attempt = 0, got
            continue
        attempt = max(attempt, got)
        note = resp.headers.get("x-output-note")
        if note and note not in said and follow:
            said.add(note)
            click.echo(f"p2psched: {note}", err=True)
        if resp.content:
            out.write(resp.content)
            out.flush()
        try:
            offset = int(resp.headers["x-output-next"])
        except ValueError:
            _not_an_agent(resp, "answer")
        complete = resp.headers.get("x-output-complete") == "true"
        if complete or (not follow and not resp.content) or left <= 0:
            return complete


def _why_not_succeeded(api: Api, rec: dict[str, Any], timeout: float | None = None) -> str:
    """Why the job of ``rec`` did not succeed: how it ended, or that it has not yet
    (``timeout``: the --timeout that ran out) and goes on, and how to see and stop it."""
    job_id = rec["id"]
    if rec["state"] not in FINAL_STATES:
        waiting = f" ({rec['wait_reason']})" if rec.get("wait_reason") else ""
        when = f" when --timeout {timeout:g}s ran out" if timeout is not None else ""
        return (f"job {job_id} is still {rec['state']}{waiting}{when}; it goes on at the agent: "
                f"`{api.command('status', job_id)}` shows it, `{api.command('cancel', job_id)}` stops it")
    return how_it_ended(rec)


def how_it_ended(rec: dict[str, Any]) -> str:
    """``job ID STATE: REASON`` for a job that did not succeed, as submit --wait and
    batch --wait say it."""
    res = rec.get("result") or {}
    timeline = rec.get("timeline") or [{}]
    reason = res.get("reason") or rec.get("wait_reason") or timeline[-1].get("detail") or "no reason recorded"
    # "rejected: needs a node ..." after "rejected" said it twice
    return shown(f"job {rec['id']} {rec['state']}: {reason.removeprefix(rec['state'] + ': ')}")


def _exit_for(api: Api, rec: dict[str, Any], timeout: float | None = None) -> None:
    """Exit 0 if the job succeeded; else say why on stderr and exit 1."""
    if rec["state"] == "succeeded":
        return
    click.echo(f"p2psched: {_why_not_succeeded(api, rec, timeout)}", err=True)
    sys.exit(1)


def _say_where_the_rest_is(rec: dict[str, Any], streams: tuple[str, ...] = ("stdout", "stderr")) -> None:
    """Say on stderr which of ``streams`` the record holds only the first part of, and
    which command writes the whole."""
    res = rec.get("result") or {}
    if "stdout" in streams and res.get("stdout_in_record_truncated"):
        size = res.get("output_bytes")
        click.echo(f"p2psched: the record holds only the first part of job {rec['id']}'s stdout"
                   + (f" ({size} bytes in all)" if size else "")
                   + f"; `p2psched result {rec['id']}` writes all of it", err=True)
    if "stderr" in streams and res.get("stderr_in_record_truncated"):
        click.echo(f"p2psched: the record holds only the first part of job {rec['id']}'s stderr; "
                   f"`p2psched logs --stderr {rec['id']}` writes all of it", err=True)


def _report(api: Api, rec: dict[str, Any], as_json: bool, timeout: float | None = None) -> None:
    ok = rec["state"] == "succeeded"
    if as_json:
        _print_json(rec)
        _say_where_the_rest_is(rec)
    elif rec["state"] in ("succeeded", "failed", "timed_out"):
        out = api.output("GET", f"/v1/jobs/{rec['id']}/result", "x-job-state").content
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
    if not ok:
        res = rec.get("result") or {}
        click.echo(f"p2psched: {_why_not_succeeded(api, rec, timeout)}", err=True)
        if res.get("stderr") and not as_json:
            click.echo(res["stderr"].rstrip(), err=True)
            _say_where_the_rest_is(rec, ("stderr",))
        sys.exit(1)


wait_option = click.option("--wait", "wait_s", type=FiniteFloat(min=0), default=0.0,
                           help="Wait up to this many seconds for it to end.")


@click.command()
@click.argument("job_id", callback=_job_id_arg)
@api_options
@wait_option
@json_option
def status(job_id: str, api: Api, wait_s: float, as_json: bool) -> None:
    """Show one job's record."""
    with _stop_waiting_on_ctrl_c(api, job_id):
        rec = _wait_final(api, job_id, wait_s)
    if as_json:
        _print_json(rec)
        _say_where_the_rest_is(rec)
        return
    click.echo(_summary(rec))
    for t in rec["timeline"]:
        stamp = time.strftime("%H:%M:%S", time.localtime(t["at"])) + f".{int(t['at'] * 1000) % 1000:03d}"
        click.echo(f"  {stamp}  {t['state']:<10} {t['node']:<12} {t['detail']}")


@click.command()
@api_options
@click.option("--state", help="Only jobs in this state.")
@click.option("--of-tenant", "tenant", help="Only this tenant's jobs (an admin sees every tenant's).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="At most this many jobs (pages through the agent's listing, 1,000 a request).")
@click.option("--newest", is_flag=True, help="Newest first (default: oldest first).")
@click.option("--label", "labels", multiple=True, help="Only jobs labelled KEY=VALUE (repeatable: each must match).")
@click.option("--counts", is_flag=True, help="Print how many stored jobs are in each state instead.")
@json_option
def jobs(api: Api, state: str | None, tenant: str | None, limit: int, newest: bool, labels: tuple[str, ...],
         counts: bool, as_json: bool) -> None:
    """List jobs known to an agent, oldest first (or --newest first)."""
    by_label = _label_filter(labels)
    if counts and state:
        fail(f"--state {state} does not apply to --counts: the counts cover every state; drop --state, or list the "
             f"jobs in that state with `p2psched jobs --state {state}`", 2)
    if counts:
        data = api.json("GET", "/v1/jobs:counts", params={**({"tenant": tenant} if tenant else {}), **by_label})
        if as_json:
            _print_json(data)
        else:
            for name, n in data["counts"].items():
                click.echo(f"{name:<10} {n}")
        return
    params: dict[str, Any] = {"order": "newest" if newest else "oldest", **by_label}
    if state:
        params["state"] = state
    if tenant:
        params["tenant"] = tenant
    found, cursor = _listing(api, params, limit)
    if as_json:
        _print_json({"jobs": found, "next_cursor": cursor if len(found) == limit else None})
        return
    for rec in found:
        click.echo(_summary(rec))


def _label_filter(labels: tuple[str, ...]) -> dict[str, list[str]]:
    """--label KEY=VALUE options as the listing's label= query parameters (checked)."""
    return {"label": [f"{k}={v}" for k, v in _parse_pairs(labels, "--label").items()]} if labels else {}


def _listing(api: Api, params: dict[str, Any], limit: float) -> tuple[list[dict[str, Any]], int | None]:
    """Up to ``limit`` jobs of the listing ``params`` asks for, 1,000 a request; and
    the cursor where it stopped."""
    found: list[dict[str, Any]] = []
    cursor = None
    while len(found) < limit:
        page = api.json("GET", "/v1/jobs", params={**params, "limit": int(min(limit - len(found), 1000)),
                                                    **({"cursor": cursor} if cursor is not None else {})})
        found += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return found, cursor


@click.command()
@click.argument("job_ids", metavar="[JOB_ID]...", nargs=-1, callback=_job_id_arg)
@api_options
@click.option("--label", "labels", multiple=True,
              help="Instead of JOB_IDs: every unfinished job labelled KEY=VALUE (repeatable: each must match).")
@json_option
def cancel(job_ids: tuple[str, ...], api: Api, labels: tuple[str, ...], as_json: bool) -> None:
    """Cancel jobs (or every unfinished job with --label); running ones are stopped."""
    if bool(job_ids) == bool(labels):
        fail("name the jobs (JOB_ID...) or their labels (--label KEY=VALUE), not both or neither", 2)
    if len(job_ids) == 1:
        rec = api.json("DELETE", f"/v1/jobs/{job_ids[0]}")
        _print_json(rec) if as_json else click.echo(_summary(rec))
        return
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    if job_ids:
        for start in range(0, len(job_ids), CANCEL_CHUNK):
            results = api.json("POST", "/v1/jobs:cancel", json={"ids": list(job_ids[start:start + CANCEL_CHUNK])})
            for item in results["results"]:
                if "job" in item:
                    records.append(item["job"])
                else:
                    errors.append(f"{item['id']}: {item['error']['message']}")
    else:
        # Jobs that have not started go first, in each request, so that none starts in a
        # slot that a stopped job frees; a round that brings no job not seen before
        # means those left are still stopping.
        by_label = dict(_parse_pairs(labels, "--label"))
        seen: set[str] = set()
        while True:
            answer = api.json("POST", "/v1/jobs:cancel", json={"labels": by_label, "limit": CANCEL_CHUNK})
            fresh = 0
            for item in answer["results"]:
                if "job" not in item:
                    errors.append(f"{item['id']}: {item['error']['message']}")
                elif item["job"]["id"] not in seen:
                    fresh += 1
                    seen.add(item["job"]["id"])
                    records.append(item["job"])
            if not answer["more"] or not fresh:
                break
    if as_json:
        _print_json({"jobs": records, **({"errors": errors} if errors else {})})
    else:
        for rec in records:
            click.echo(_summary(rec))
    cancelled = sum(1 for rec in records if rec["state"] == "cancelled")
    stopping = sum(1 for rec in records if rec["state"] not in FINAL_STATES)
    ended = len(records) - cancelled - stopping
    what = "labelled " + " ".join(labels) if labels else "named"
    click.echo(f"p2psched: {cancelled} unfinished job(s) {what} cancelled"
               + (f"; {ended} ended first" if ended else "")
               + (f"; {stopping} still stopping (see `p2psched jobs --state running`)" if stopping else ""), err=True)
    for line in errors:
        click.echo(f"p2psched: not cancelled: {line}", err=True)
    if errors:
        sys.exit(3)


@click.command()
@click.argument("job_id", callback=_job_id_arg)
@api_options
@wait_option
@click.option("--artifact", metavar="NAME", help="Write this artifact of the job (a file its spec named) instead.")
def result(job_id: str, api: Api, wait_s: float, artifact: str | None) -> None:
    """Write a job's raw output bytes, or one of its artifacts, to stdout."""
    if wait_s > 0:
        with _stop_waiting_on_ctrl_c(api, job_id):
            _wait_final(api, job_id, wait_s)
    params: dict[str, Any] = {"artifact": artifact} if artifact is not None else {}
    resp = api.output("GET", f"/v1/jobs/{job_id}/result", "x-job-state", params=params)
    sys.stdout.buffer.write(resp.content)


@click.command()
@click.argument("job_id", callback=_job_id_arg)
@api_options
@click.option("--follow", "-f", is_flag=True,
              help="Go on printing as the job writes, until it ends; then exit 0 only if it succeeded.")
@click.option("--stderr", "stream", flag_value="stderr", default="stdout", help="The job's stderr, not its stdout.")
def logs(job_id: str, api: Api, follow: bool, stream: str) -> None:
    """Print a job's output so far, while it runs or after; --follow streams it.

    A process job's output is served as it writes it, a wasm job's every 200 ms;
    that of a job with mask_patterns only when it ends (they apply to the whole).
    """
    if not follow:
        _follow_output(api, job_id, stream, follow=False)
        return
    with _stop_waiting_on_ctrl_c(api, job_id):
        complete = _follow_output(api, job_id, stream, follow=True)
        # Output complete: the job has ended, and its record says so at once or nearly.
        _exit_for(api, _wait_final(api, job_id, 10.0 if complete else 0.0))


@click.command()
@api_options
@json_option
def peers(api: Api, as_json: bool) -> None:
    """List cluster members as the agent sees them."""
    data = api.json("GET", "/v1/peers")
    if as_json:
        _print_json(data)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from p2psched.gpu.slots import describe_slots

    def cell(value: Any) -> str:  # what a peer gossips is its own to choose: shown, never markup
        return escape(shown(value))

    table = Table("node", "state", "inc", "age", "gossip", "api", "position", "labels", "cpu free", "mem free MiB",
                  "GPU slots free", "queue", "run")
    for p in data["peers"]:
        v = p["vector"]
        state = p["state"]
        if v.get("impaired"):  # its jobs of these runtimes kept failing there: peers send it none
            state += f" ({', '.join(v['impaired'])} impaired)"
        table.add_row(cell(p["node_id"] + (" *" if p.get("self") else "")), cell(state), str(p["incarnation"]),
                      f"{p['age_s']:.1f}s", cell(p["address"]), cell(p.get("api", "")), cell(p.get("position") or "-"),
                      # the operator's (--label); the gpu.* ones describe the GPU column
                      cell(",".join(f"{k}={v}" for k, v in sorted(p.get("labels", {}).items())
                                    if not k.startswith("gpu.")) or "-"),
                      f"{v['cpu_free']:g}/{v['cpu_total']:g}", f"{v['mem_free_mb']}/{v['mem_total_mb']}",
                      cell(describe_slots(v["gpu_free"], v["gpu_total"], p.get("labels", {})) or "-"),
                      str(v["queue_len"]), str(v["running"]))
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped or redirected: print the table at its natural width rather than
        # wrapping cells at an arbitrary one (COLUMNS still sets a width).
        console = Console(width=100_000)
    console.print(table)


@click.command()
@api_options
def cluster(api: Api) -> None:
    """Members by state, and total and free resources."""
    _print_json(api.json("GET", "/v1/cluster"))


@click.command()
@api_options
def drain(api: Api) -> None:
    """Drain an agent: stop admissions, hand queued jobs to peers, finish running ones, leave."""
    _print_json(api.json("POST", "/v1/drain"))
