"""`p2psched batch FILE`: submit the jobs of a spec file, and with --wait see how each ended.

The file's shapes and keys are described in p2psched/jobs/spec_file.py and
examples/jobs/README.md. The jobs go in order through ``POST /v1/jobs:batch``,
``--chunk`` at a time. A job the agent refuses for now (its queue is full) is sent
again after the Retry-After the agent gives, for as long as the agent keeps taking
jobs, so a file larger than the queue drains into it; a job refused for good (an
invalid spec, a denied tenant) is reported and the rest go on.

Exit status: 0 when every job was accepted (with --wait: and succeeded); 1 with
--wait when a job did not succeed; 2 for a file or usage error, before anything is
sent; 3 when the agent refused a job or answered an error.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from p2psched.cli.client import (
    FINAL_STATES, RETRY_S, Api, _parse_pairs, _print_json, _summary, agent_option, fail, how_it_ended, json_option,
)
from p2psched.cli.numbers import FiniteFloat
from p2psched.jobs.spec_file import Batch, Job, SpecFileError, load

#: A request's body stays under this, well inside the agent's max_request_bytes (96 MiB).
MAX_REQUEST_BYTES = 32 * 1024 * 1024
#: The longest one request for job states waits: jobs that have ended are shown by then.
POLL_S = 10.0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("spec_file", type=click.Path(path_type=Path, dir_okay=False))
@agent_option
@click.option("--tenant", help="Tenant name: every job is submitted and signed as it (with --key).")
@click.option("--key", type=click.Path(path_type=Path), help="Tenant private key file.")
@click.option("--id-prefix", help="Give each job without an id PREFIX-N (N its place in the file, from 1), so that "
              "running the file again submits nothing twice.")
@click.option("--label", "labels", multiple=True,
              help="Add the label KEY=VALUE to every job (repeatable; over the file's value for the key), so that "
              "`p2psched jobs --label` and `p2psched cancel --label` find this run's jobs.")
@click.option("--wait", is_flag=True, help="Wait for every job to end; print how each ended.")
@click.option("--timeout", type=FiniteFloat(min=0), default=3600.0, show_default=True,
              help="Longest --wait, seconds, in all.")
@click.option("--chunk", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="Jobs per request.")
@click.option("--retry-s", type=FiniteFloat(min=0), default=RETRY_S, show_default=True,
              help="How long to keep sending jobs the agent refuses for now (a full queue) while it accepts none.")
@click.option("--dry-run", is_flag=True, help="Check the file and say what would be sent; send nothing.")
@json_option
def batch(spec_file: Path, agent_url: str, tenant: str | None, key: Path | None, id_prefix: str | None,
          labels: tuple[str, ...], wait: bool, timeout: float, chunk: int, retry_s: float, dry_run: bool,
          as_json: bool) -> None:
    """Submit the jobs of SPEC_FILE (YAML, JSON or JSON Lines): one spec, a list of specs,
    or {defaults: ..., jobs: [...]}. See examples/jobs/."""
    if bool(tenant) != bool(key):
        fail("--tenant and --key go together: name the tenant and its private key file", 2)
    try:
        work = load(spec_file, id_prefix=id_prefix, labels=_parse_pairs(labels, "--label"))
    except SpecFileError as e:
        fail(str(e), 2)
    if dry_run:
        size = sum(len(m) for m in work.modules.values())
        click.echo(f"{spec_file}: {len(work.jobs)} valid job(s), {len(work.modules)} module file(s) "
                   f"({size} bytes); nothing sent (--dry-run)")
        return
    sign = _signer(tenant, key)
    api = Api(agent_url, tenant=tenant, key=key, retry_s=retry_s)
    how = ("`p2psched cancel " + " ".join(f"--label {pair}" for pair in labels) + "` stops them" if labels else
           "give the next run --label KEY=VALUE to cancel its jobs at once with `p2psched cancel --label`")
    try:
        accepted, refused = _submit(api, work, sign, chunk=chunk, retry_s=retry_s)
    except KeyboardInterrupt:
        fail(f"stopped submitting; the jobs the agent accepted go on ({how})", 130)

    _say_refused(spec_file, refused)
    if not wait:
        if as_json:
            _print_json({"jobs": [rec for _, rec, _ in accepted],
                         "refused": [{"index": job.index, "error": err} for job, err in refused]})
        else:
            for _, rec, created in accepted:
                click.echo(f"{rec['id']}  {rec['state']}" + ("" if created else "  (submitted before)"))
        again = sum(1 for *_, created in accepted if not created)
        click.echo(f"p2psched: {len(accepted)} job(s) accepted" + (f" ({again} submitted before)" if again else "")
                   + (f", {len(refused)} refused" if refused else ""), err=True)
        sys.exit(3 if refused else 0)

    deadline = time.monotonic() + timeout
    show = None if as_json else (lambda rec: click.echo(_summary(rec)))
    try:
        finals = _wait_all(api, [rec for _, rec, _ in accepted], deadline, chunk, show)
    except KeyboardInterrupt:
        fail(f"stopped waiting; the {len(accepted)} job(s) go on at the agent ({how})", 130)
    if as_json:
        _print_json({"jobs": finals, "refused": [{"index": job.index, "error": err} for job, err in refused]})
    counts = Counter(rec["state"] for rec in finals)
    click.echo(f"p2psched: {len(finals)} job(s): " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
               + (f"; {len(refused)} refused" if refused else ""), err=True)
    for rec in finals:
        if rec["state"] == "succeeded":
            continue
        why = (rec.get("result") or {}).get("reason") or rec.get("wait_reason")
        if rec["state"] in FINAL_STATES or (why or "").startswith("cannot read it"):
            click.echo(f"p2psched: {how_it_ended(rec)}", err=True)
        else:
            click.echo(f"p2psched: job {rec['id']} is still {rec['state']}" + (f" ({why})" if why else "")
                       + f" when --timeout {timeout:g}s ran out; it goes on at the agent ({how})", err=True)
    if refused:
        sys.exit(3)
    if any(rec["state"] != "succeeded" for rec in finals):
        sys.exit(1)


def _signer(tenant: str | None, key: Path | None) -> Any:
    """spec -> the body that submits it: as it is, or signed as ``tenant``."""
    if not (tenant and key):
        return lambda spec: spec
    from p2psched.security.client import sign_submission
    from p2psched.security.keys import load_private_key

    try:
        private = load_private_key(key)  # once, not once a job
    except (OSError, ValueError) as e:
        fail(f"cannot use --key {key}: {e}", 2)

    def sign(spec: dict[str, Any]) -> dict[str, Any]:
        return sign_submission({**spec, "tenant": tenant}, tenant, private)

    return sign


def _submit(api: Api, work: Batch, sign: Any, *, chunk: int, retry_s: float,
            ) -> tuple[list[tuple[Job, dict[str, Any], bool]], list[tuple[Job, dict[str, Any]]]]:
    """Send every job of ``work`` in order. Returns (job, record, created) for each
    accepted and (job, error) for each refused."""
    accepted: list[tuple[Job, dict[str, Any], bool]] = []
    refused: list[tuple[Job, dict[str, Any]]] = []
    pending = deque(work.jobs)
    progress = time.monotonic()  # when the agent last took a job
    while pending:
        group: list[Job] = []
        size = 0
        while pending and len(group) < chunk:
            grown = size + work.size(pending[0])
            if group and grown > MAX_REQUEST_BYTES:
                break
            group.append(pending.popleft())
            size = grown
        body = {"jobs": [sign(spec) for spec in work.request_body(group)]}
        results = api.json("POST", "/v1/jobs:batch", json=body)["results"]
        later: list[Job] = []
        waits: list[float] = []
        for job, item in zip(group, results, strict=True):
            if "job" in item:
                accepted.append((job, item["job"], item.get("status") == 202))
                progress = time.monotonic()
                continue
            err = item.get("error") or {}
            if err.get("status") in (429, 503) and isinstance(err.get("retry_after"), (int, float)):
                later.append(job)
                waits.append(float(err["retry_after"]))
            else:
                refused.append((job, err))
        if later:
            wait = min(max(waits), 10.0)  # an estimate made early in a burst can run long
            if time.monotonic() - progress >= retry_s:
                for job in later + list(pending):
                    refused.append((job, {"status": 429, "reason": "queue_full", "message":
                                          f"the agent took no job for {retry_s:g}s (--retry-s); submit the rest "
                                          "later, or to another agent"}))
                break
            click.echo(f"p2psched: the agent is refusing jobs for now ({_reason(results)}); sending "
                       f"{len(later) + len(pending)} more in {wait:g}s", err=True)
            time.sleep(wait)
            pending.extendleft(reversed(later))
    refused.sort(key=lambda r: r[0].index)
    return accepted, refused


def _wait_all(api: Api, submitted: list[dict[str, Any]], deadline: float, chunk: int,
              on_ended: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """The records of the ``submitted`` jobs, in order, once each has ended or
    ``deadline`` passed: ``chunk`` ids a request, each request a long-poll of up to
    POLL_S. ``on_ended(record)`` is called in order as soon as a job and every job
    before it have ended, so that a long run shows its results as they come."""
    ids = [rec["id"] for rec in submitted]
    latest = dict(zip(ids, submitted))
    settled: set[str] = set()
    shown = 0
    pending = deque(ids)
    while pending:
        left = deadline - time.monotonic()
        group = [pending.popleft() for _ in range(min(chunk, len(pending)))]
        body = {"ids": group, "wait": round(max(0.0, min(left, POLL_S)), 3)}
        results = api.json("POST", "/v1/jobs:wait", json=body)["results"]
        unfinished = []
        for job_id, item in zip(group, results, strict=True):
            if "job" in item:
                latest[job_id] = item["job"]
                if item["job"]["state"] not in FINAL_STATES:
                    unfinished.append(job_id)
                    continue
            else:  # gone from the agent (kept for job_retention_h) or no longer ours to read
                err = item.get("error") or {}
                latest[job_id] = {**latest[job_id], "wait_reason": f"cannot read it: {err.get('message')}"}
            settled.add(job_id)
        while on_ended and shown < len(ids) and ids[shown] in settled:
            on_ended(latest[ids[shown]])
            shown += 1
        if left <= 0:
            break
        pending.extendleft(reversed(unfinished))
    if on_ended:
        for job_id in ids[shown:]:  # did not end within the deadline
            on_ended(latest[job_id])
    return [latest[job_id] for job_id in ids]


def _reason(results: list[dict[str, Any]]) -> str:
    for item in results:
        err = item.get("error")
        if err and err.get("status") in (429, 503):
            return str(err.get("reason"))
    return "busy"


def _say_refused(spec_file: Path, refused: list[tuple[Job, dict[str, Any]]]) -> None:
    """One line per distinct refusal, naming the first few jobs it refused."""
    groups: dict[tuple[Any, Any, Any], list[Job]] = {}
    for job, err in refused:
        groups.setdefault((err.get("status"), err.get("reason"), err.get("message")), []).append(job)
    for (status, reason, message), jobs in groups.items():
        named = ", ".join(job.where for job in jobs[:3]) + (f" and {len(jobs) - 3} more" if len(jobs) > 3 else "")
        click.echo(f"p2psched: {spec_file}: {named} refused: {status} {reason}: {message}", err=True)
