"""``p2psched tenant keygen|add`` and ``p2psched verify``.

Exit status: 0 on success; 1 when verification fails or a file would become invalid;
2 for usage errors; 3 when an agent cannot be reached or answers an error.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import click

from p2psched.jobs.spec import CAPABILITIES


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"p2psched: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def tenant() -> None:
    """Manage tenants and their keys."""


@tenant.command()
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True,
              help="Directory for NAME.key (private, mode 0600) and NAME.pub.")
@click.option("--force", is_flag=True, help="Replace existing NAME.key and NAME.pub.")
def keygen(name: str, out_dir: Path, force: bool) -> None:
    """Create an Ed25519 key pair for tenant NAME: NAME.key (keep it secret) and NAME.pub."""
    from p2psched.security.keys import generate, key_id, public_hex, write_private_key
    from p2psched.security.tenants import TENANT_NAME_RE

    if not TENANT_NAME_RE.match(name):
        _fail(f"tenant name {name!r} must be 1-64 letters, digits, '.', '_' or '-'", 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = generate()
    priv, pub = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not force:
        for p in (priv, pub):
            if p.exists():
                _fail(f"{p} already exists; pass --force to replace it (the old key then stops working once the "
                      "registry drops it), or choose another --out")
    try:
        write_private_key(priv, key, overwrite=force)
    except OSError as e:
        _fail(f"cannot write {priv}: {e}")
    hexkey = public_hex(key)
    pub.write_text(hexkey + "\n")
    click.echo(f"wrote {priv} (private, mode 0600) and {pub}")
    click.echo(f"key id {key_id(hexkey)}; register it with: "
               f"p2psched tenant add {name} --pubkey {pub} --cap wasm --tenants TENANTS.toml")


def _parse_caps(caps: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for item in caps:
        for c in item.split(","):
            c = c.strip()
            if c not in CAPABILITIES:
                _fail(f"--cap {c!r} is not a capability; choose from {', '.join(CAPABILITIES)}", 2)
            if c not in out:
                out.append(c)
    return out


def _parse_labels(items: tuple[str, ...]) -> dict[str, Any]:
    labels: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k or not v:
            _fail(f"--label {item!r} must be KEY=VALUE[,VALUE...] or KEY=*", 2)
        labels[k] = "*" if v == "*" else [x for x in v.split(",") if x]
    return labels


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, so an agent watching it never reads half a file."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@tenant.command()
@click.argument("name")
@click.option("--pubkey", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The tenant's public key file (NAME.pub from 'tenant keygen', or a PEM public key).")
@click.option("--cap", "caps", multiple=True, help=f"Capability ({', '.join(CAPABILITIES)}); repeatable or comma-separated. "
              "Replaces the tenant's capabilities when given.")
@click.option("--tenants", "tenants_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The tenants TOML file (created if missing).")
@click.option("--admin/--no-admin", default=None, help="An admin sees and cancels every tenant's jobs.")
@click.option("--max-priority", type=click.IntRange(0, 1000), help="Highest job priority allowed [100].")
@click.option("--label", "labels", multiple=True, help="Allowed label KEY=V1,V2 or KEY=* (repeatable); none given: any.")
@click.option("--max-jobs", type=click.IntRange(0), help="Quota: unfinished jobs (queued or running), cluster-wide.")
@click.option("--max-queued", type=click.IntRange(0), help="Quota: jobs waiting to start, cluster-wide.")
@click.option("--max-cpu", type=click.FloatRange(0), help="Quota: CPU slots of unfinished jobs.")
@click.option("--max-mem-mb", type=click.IntRange(0), help="Quota: MiB of unfinished jobs.")
@click.option("--max-gpu", type=click.IntRange(0), help="Quota: GPU slots of unfinished jobs, cluster-wide.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Submissions per second [10].")
@click.option("--burst", type=click.IntRange(1), help="Submissions allowed at once [20].")
def add(name: str, pubkey: Path, caps: tuple[str, ...], tenants_file: Path, admin: bool | None,
        max_priority: int | None, labels: tuple[str, ...], max_jobs: int | None, max_queued: int | None,
        max_cpu: float | None, max_mem_mb: int | None, max_gpu: int | None, rate: float | None,
        burst: int | None) -> None:
    """Add tenant NAME with a public key to the tenants file, or add a key to an existing tenant.

    Options given replace the tenant's current values; comments and layout of the
    file are kept. The result is checked as the agent would load it before it is
    written, and written in one rename; send the agent SIGHUP (or wait for it to
    notice the change) to apply it.
    """
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    from p2psched.security.keys import KeyFormatError, key_id, parse_public_key
    from p2psched.security.tenants import TENANT_NAME_RE, RegistryError, TenantRegistry

    if not TENANT_NAME_RE.match(name):
        _fail(f"tenant name {name!r} must be 1-64 letters, digits, '.', '_' or '-'", 2)
    try:
        hexkey = parse_public_key(pubkey.read_text())
    except (KeyFormatError, UnicodeDecodeError) as e:
        _fail(f"{pubkey}: {e}", 2)
    try:
        doc = tomlkit.parse(tenants_file.read_text(encoding="utf-8")) if tenants_file.exists() else tomlkit.document()
    except TOMLKitError as e:
        _fail(f"tenants file {tenants_file}: {e}; fix it before adding tenants")
    if not tenants_file.exists():
        doc.add(tomlkit.comment("p2psched tenants: one [tenants.NAME] table per tenant; see docs/security.md"))
    if "tenants" not in doc:
        doc["tenants"] = tomlkit.table(is_super_table=True)
    tenants = doc["tenants"]
    created = name not in tenants
    if created:
        t = tomlkit.table()
        t["keys"] = tomlkit.array()
        t["capabilities"] = _parse_caps(caps) if caps else ["wasm"]
        tenants[name] = t
    t = tenants[name]
    if "keys" not in t:
        t["keys"] = tomlkit.array()
    if hexkey not in [str(k).lower() for k in t["keys"]]:
        t["keys"].append(hexkey)
    if caps:
        t["capabilities"] = _parse_caps(caps)
    if admin is not None:
        t["admin"] = admin
    if max_priority is not None:
        t["max_priority"] = max_priority
    if labels:
        t["labels"] = _parse_labels(labels)
    for section, values in (
        ("quota", {"concurrent_jobs": max_jobs, "queued_jobs": max_queued, "cpu": max_cpu,
                   "mem_mb": max_mem_mb, "gpu_slots": max_gpu}),
        ("rate", {"per_second": rate, "burst": burst}),
    ):
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            if section not in t:
                t[section] = tomlkit.table()
            for k, v in given.items():
                t[section][k] = v
    text = tomlkit.dumps(doc)
    try:
        reg = TenantRegistry.from_text(text, source=str(tenants_file))
    except RegistryError as e:
        _fail(f"not written: the result would not load: {e}")
    tenants_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(tenants_file, text)
    got = reg.get(name)
    assert got is not None
    click.echo(f"{'added' if created else 'updated'} tenant {name} in {tenants_file}: key {key_id(hexkey)}, "
               f"capabilities {', '.join(sorted(got.capabilities))}, {len(got.keys)} key(s)")


def _load_report(target: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(target).read_text())
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"cannot read {target}: {e}", 2)
    except json.JSONDecodeError as e:
        _fail(f"{target} is not JSON ({e}); save the report with 'p2psched status JOB_ID --json'", 2)
    return _extract(data, target)


def _extract(data: Any, where: str) -> dict[str, Any]:
    """Accept a bare report, a job record (``result.attestation``) or a result object."""
    if isinstance(data, dict):
        if "signature" in data and "node_pubkey" in data:
            return data
        for holder in (data.get("result"), data):
            if isinstance(holder, dict) and isinstance(holder.get("attestation"), dict):
                found: dict[str, Any] = holder["attestation"]
                return found
    _fail(f"{where} holds no attestation report (a job record's result.attestation, or the report itself); "
          "a job that has not finished has none", 1)


def _peer_key(peers: Any, node_id: str) -> str | None:
    items = peers.get("peers", peers.get("members", [])) if isinstance(peers, dict) else peers
    for p in items if isinstance(items, list) else []:
        if isinstance(p, dict) and node_id in (p.get("node_id"), p.get("id"), p.get("node")):
            k = p.get("node_pubkey") or p.get("pubkey")
            return str(k) if k else None
    return None


def _node_pubkey(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A raw Ed25519 public key in hex (security/keys.py public_hex): 32 bytes, 64 hex digits."""
    if value is None:
        return None
    key = value.strip().lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise click.BadParameter(f"{value!r} is not an Ed25519 public key: it must be 64 hex digits (0-9, a-f), "
                                 "the executor's node_pubkey in 'p2psched peers --json' (or its DATA_DIR/node.pub)")
    return key


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", metavar="JOB_ID|REPORT.json")
@click.option("--agent", "agent_url", help="Agent URL: fetch the job's report and the executor's public key from it.")
@click.option("--node-pubkey", callback=_node_pubkey,
              help="The executor's Ed25519 public key: 64 hex digits, its node_pubkey in 'p2psched peers --json'.")
@click.option("--module", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Check the module's hash.")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Check the input's hash.")
@click.option("--output", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Check the output's hash.")
@click.option("--allow-list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Measurement allow-list file: the executor's measurement must be on it.")
@click.option("--tenant", help="Tenant to sign the agent requests as (when the agent has a registry).")
@click.option("--key", type=click.Path(path_type=Path), help="The tenant's private key file.")
@click.option("--json", "as_json", is_flag=True, help="Print the verified report.")
def verify(target: str, agent_url: str | None, node_pubkey: str | None, module: Path | None,
           input_file: Path | None, output: Path | None, allow_list: Path | None, tenant: str | None,
           key: Path | None, as_json: bool) -> None:
    """Verify a job's attestation report: its signature, the executor's key, and hashes.

    TARGET is a report file (a bare report or a saved job record), or a job id with
    --agent. With --agent the executor's public key comes from the agent's peer list
    and the output is fetched and hashed; otherwise give --node-pubkey, or only the
    report's integrity is checked (and the output says so).
    """
    from p2psched.security.attestation import AttestationError, load_allow_list, verify_report

    output_bytes = output.read_bytes() if output else None
    key_source = "--node-pubkey" if node_pubkey else None
    if Path(target).is_file():
        report = _load_report(target)
        if agent_url and not node_pubkey:
            node_pubkey = _fetch_node_key(agent_url, str(report.get("node_id", "")), tenant, key)
            key_source = f"agent {agent_url}"
    elif agent_url:
        report, fetched_output, fetched_key = _fetch_from_agent(agent_url, target, tenant, key)
        if output_bytes is None:
            output_bytes = fetched_output
        if not node_pubkey and fetched_key:
            node_pubkey, key_source = fetched_key, f"agent {agent_url}"
    else:
        _fail(f"{target!r} is not a file; to verify a job by id, give --agent URL", 2)
    try:
        allowed = load_allow_list(allow_list) if allow_list else None
    except ValueError as e:
        _fail(str(e), 2)
    try:
        verify_report(report, node_pubkey, module=module.read_bytes() if module else None,
                      input=input_file.read_bytes() if input_file else None, output=output_bytes,
                      allowed_measurements=allowed)
    except AttestationError as e:
        _fail(f"verification FAILED for job {report.get('job_id')!r}: {e}")
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    checked = ["signature"]
    checked.append(f"node key (from {key_source})" if node_pubkey else "node key NOT checked (give --node-pubkey or --agent)")
    checked += [w for w, b in (("module", module), ("input", input_file), ("output", output_bytes)) if b is not None]
    if allowed is not None:
        checked.append("measurement allow-list")
    click.echo(
        f"OK: job {report['job_id']} of tenant {report['tenant']} ran on node {report['node_id']} "
        f"(measurement {report['measurement'][:16]}...), {report['reason']}; checked: {', '.join(checked)}"
    )


def _client(agent_url: str, tenant: str | None, key: Path | None) -> Any:
    import httpx

    auth = None
    if tenant and key:
        from p2psched.security.client import RequestSigner
        from p2psched.security.keys import KeyFormatError

        try:
            auth = RequestSigner(tenant, key).auth
        except KeyFormatError as e:
            _fail(str(e), 2)
    from p2psched.cli.client import agent_base_url

    return httpx.Client(base_url=agent_base_url(agent_url), timeout=30.0, auth=auth)


def _get(client: Any, path: str) -> Any:
    import httpx

    try:
        resp = client.get(path)
    except httpx.HTTPError as e:
        _fail(f"cannot reach the agent at {client.base_url}: {e}", 3)
    return resp


def _fetch_node_key(agent_url: str, node_id: str, tenant: str | None, key: Path | None) -> str | None:
    with _client(agent_url, tenant, key) as client:
        resp = _get(client, "/v1/peers")
        if resp.status_code != 200:
            _fail(f"agent answered {resp.status_code} for /v1/peers: {resp.text[:300]}", 3)
        found = _peer_key(resp.json(), node_id)
        if found is None:
            _fail(f"the agent knows no public key for node {node_id!r} (not a member now?); give --node-pubkey", 3)
        return found


def _fetch_from_agent(agent_url: str, job_id: str, tenant: str | None,
                      key: Path | None) -> tuple[dict[str, Any], bytes | None, str | None]:
    with _client(agent_url, tenant, key) as client:
        resp = _get(client, f"/v1/jobs/{job_id}")
        if resp.status_code != 200:
            _fail(f"agent answered {resp.status_code} for job {job_id}: {resp.text[:300]}", 3)
        report = _extract(resp.json(), f"job {job_id}")
        out = _get(client, f"/v1/jobs/{job_id}/result")
        output = out.content if out.status_code == 200 else None
    node_key = _fetch_node_key(agent_url, str(report.get("node_id", "")), tenant, key)
    return report, output, node_key
