"""Job spec files: many jobs written down once, for ``p2psched batch``.

A file holds job specs as the API takes them (docs/api: ``POST /v1/jobs``), in YAML
or JSON, in one of three shapes:

- one spec: a mapping;
- many: a list of specs, or ``{"defaults": {...}, "jobs": [...]}``, where each job is
  ``defaults`` deep-merged with its own keys (maps merge, anything else the job's wins);
- JSON Lines (``.jsonl``, ``.ndjson``): one spec per line.

Three keys are read here, not sent: paths are relative to the file.

- ``module_file``: a .wasm file; it becomes ``module`` (or ``module_sha256`` once the
  agent holds it, see :class:`Batch`);
- ``input_file``: the guest's stdin, from a file;
- ``input_text``: the guest's stdin, as UTF-8 text (a prompt, a config).

Every job is checked against :class:`~p2psched.jobs.spec.JobSpec` here, before
anything is sent, so a typo in job 500 does not leave 499 submitted. Each error
names the file, the job and the field.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from p2psched.jobs.spec import MAX_INPUT_BYTES, MAX_MODULE_BYTES, JobSpec

#: Keys this reader resolves; the rest go to the agent as they are.
FILE_KEYS = ("module_file", "input_file", "input_text")
#: More jobs than this in one file is more likely a mistake than a plan; the
#: agent's queue (10,000 by default) would refuse most of them anyway.
MAX_JOBS = 100_000
#: The formats read, for messages: YAML (which reads JSON too) and JSON Lines.
FORMATS = "YAML or JSON (.yaml, .yml, .json) or JSON Lines (.jsonl, .ndjson)"
#: Formats people write specs in that this reader does not take: named up front, since
#: the YAML reader would take most of them for text and report something stranger.
_OTHER_FORMATS = {".toml": "TOML", ".ini": "INI", ".cfg": "INI", ".xml": "XML", ".csv": "CSV", ".tsv": "TSV"}


class SpecFileError(ValueError):
    """A spec file that cannot be read or holds an invalid job; the message says where."""


@dataclass
class Job:
    """One job of a file: its spec as JSON data, without the module's bytes."""

    index: int  # its place in the file, from 0
    spec: dict[str, Any]
    module_sha256: str | None = None  # of module_file, whose bytes are in Batch.modules
    #: The job as the file wrote it, before the file's defaults were merged in: what
    #: tells an error in the job from one in ``defaults``.
    own: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def where(self) -> str:
        return f"jobs[{self.index}]"


@dataclass
class Batch:
    """What a file asks for: its jobs in order, and the bytes of each module they name
    by file. The bytes go with the first job of each request that uses them; the
    rest of that request names them by sha256 (the agent stores a module with its
    first job), so a sweep of 1,000 jobs over one module sends it once a request."""

    path: Path
    jobs: list[Job]
    modules: dict[str, bytes] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # the file's 'defaults:', merged into every job

    def request_body(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """The specs of ``jobs`` for one ``POST /v1/jobs:batch``, each module's bytes once."""
        sent: set[str] = set()
        out = []
        for job in jobs:
            spec = dict(job.spec)
            sha = job.module_sha256
            if sha is not None:
                if sha in sent:
                    spec["module_sha256"] = sha
                else:
                    spec["module"] = base64.b64encode(self.modules[sha]).decode()
                    sent.add(sha)
            out.append(spec)
        return out

    def size(self, job: Job) -> int:
        """About how many bytes ``job`` adds to a request, its module included."""
        extra = len(self.modules[job.module_sha256]) * 4 // 3 if job.module_sha256 is not None else 0
        return len(json.dumps(job.spec)) + extra


def load(path: Path, *, id_prefix: str | None = None, labels: dict[str, str] | None = None) -> Batch:
    """Read and check the jobs of ``path``; raises :class:`SpecFileError`.

    ``id_prefix``: a job without an ``id`` gets ``PREFIX-N``, N its place in the file
    from 1, so that running the same file again submits nothing twice. ``labels``
    are added to every job's (over the file's value for the same key)."""
    raw = _read(path)
    specs, defaults = _specs(path, raw)
    if not specs:
        raise SpecFileError(f"{path}: holds no jobs; write one spec, a list of specs, or 'jobs:' with a list")
    if len(specs) > MAX_JOBS:
        raise SpecFileError(f"{path}: holds {len(specs)} jobs; split it into files of at most {MAX_JOBS}")
    batch = Batch(path=path, jobs=[], defaults=defaults)
    base = path.parent
    for i, own in enumerate(specs):
        if not isinstance(own, dict):
            raise SpecFileError(f"{path}: jobs[{i}] is {_words(own)}, not a mapping of spec fields")
        job = Job(index=i, spec=_merge(defaults, own) if defaults else dict(own), own=own)
        _resolve(batch, job, base)
        if id_prefix is not None and "id" not in job.spec:
            job.spec["id"] = f"{id_prefix}-{i + 1}"
        if labels and isinstance(job.spec.get("labels", {}), dict):  # (_check names a labels that is not a map)
            job.spec["labels"] = {**job.spec.get("labels", {}), **labels}
        _check(batch, job)
        batch.jobs.append(job)
    ids = [j.spec["id"] for j in batch.jobs if "id" in j.spec]
    if len(ids) != len(set(ids)):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SpecFileError(f"{path}: id {dup!r} is given to more than one job; ids name one job each")
    return batch


def _words(value: Any) -> str:
    """What a YAML/JSON value is, in the words of the file's author, not Python's."""
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"text ({value[:40]!r}{'...' if len(value) > 40 else ''})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} value"  # YAML's dates and binary


def _read(path: Path) -> Any:
    other = _OTHER_FORMATS.get(path.suffix.lower())
    if other is not None:
        raise SpecFileError(f"{path}: is a {other} file, and spec files are {FORMATS}; write the specs in one of "
                            "those")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecFileError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SpecFileError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); is it a spec file?") from None
    if path.suffix in (".jsonl", ".ndjson"):
        specs = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                specs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SpecFileError(f"{path}:{no}: not a JSON spec: {e.msg} (column {e.colno})") from None
        return specs
    import yaml

    try:
        return yaml.safe_load(text)  # YAML reads JSON too
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise SpecFileError(f"{path}{at}: not valid YAML or JSON: {getattr(e, 'problem', None) or e}") from None


def _specs(path: Path, raw: Any) -> tuple[list[Any], dict[str, Any]]:
    """The jobs of the file as it writes them, and its defaults ({} for none)."""
    if isinstance(raw, list):
        return raw, {}
    if raw is None:
        raise SpecFileError(f"{path}: is empty; write one spec (a mapping of spec fields), a list of specs, "
                            f"or 'jobs:' with a list, in {FORMATS}")
    if not isinstance(raw, dict):
        raise SpecFileError(f"{path}: holds {_words(raw)}, not specs; write one spec (a mapping of spec fields), "
                            f"a list of specs, or 'jobs:' with a list, in {FORMATS}")
    if "jobs" not in raw:
        if "defaults" in raw:
            raise SpecFileError(f"{path}: has 'defaults' but no 'jobs' list for them to apply to")
        return [raw], {}
    extra = set(raw) - {"defaults", "jobs"}
    if extra:
        raise SpecFileError(f"{path}: beside 'jobs' only 'defaults' may be given; move {sorted(extra)} into "
                            "'defaults' or into each job")
    jobs, defaults = raw["jobs"], raw.get("defaults") or {}
    if not isinstance(jobs, list):
        raise SpecFileError(f"{path}: 'jobs' must be a list of specs")
    if not isinstance(defaults, dict):
        raise SpecFileError(f"{path}: 'defaults' must be a mapping of spec fields, not {_words(defaults)}")
    return jobs, defaults


def _merge(defaults: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in job.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _from_defaults(batch: Batch, job: Job, loc: Sequence[str | int]) -> bool:
    """Whether the value at ``loc`` in ``job.spec`` is the file's default, not the job's own:
    maps merge key by key, and anything else the job gives wins."""
    own: Any = job.own
    default: Any = batch.defaults
    for part in loc:
        in_own = isinstance(own, dict) and part in own
        in_default = isinstance(default, dict) and part in default
        if not in_own:
            return in_default
        if not (in_default and isinstance(own[part], dict) and isinstance(default[part], dict)):
            return False  # the job's own value, over any default
        own, default = own[part], default[part]
    return False  # a map both give: name the job's


def _place(batch: Batch, job: Job, loc: Sequence[str | int]) -> str:
    """Where the file wrote the value at ``loc``: ``jobs[N].a.b``, or ``defaults.a.b``."""
    head = "defaults" if _from_defaults(batch, job, loc) else job.where
    return ".".join([head, *map(str, loc)])


def _resolve(batch: Batch, job: Job, base: Path) -> None:
    """Turn the file-relative keys of ``job`` into spec fields."""
    spec = job.spec
    where = f"{batch.path}: {job.where}"
    if "module_file" in spec:
        if "module" in spec or "module_sha256" in spec:
            raise SpecFileError(f"{where}: give 'module_file' or 'module'/'module_sha256', not both")
        data = _file_bytes(base, spec.pop("module_file"), f"{batch.path}: {_place(batch, job, ['module_file'])}",
                           MAX_MODULE_BYTES)
        sha = hashlib.sha256(data).hexdigest()
        batch.modules.setdefault(sha, data)
        job.module_sha256 = sha
    given = [k for k in ("input", "input_file", "input_text") if k in spec]
    if len(given) > 1:
        raise SpecFileError(f"{where}: give one of 'input' (base64), 'input_file' or 'input_text', not {given}")
    if "input_file" in spec:
        data = _file_bytes(base, spec.pop("input_file"), f"{batch.path}: {_place(batch, job, ['input_file'])}",
                           MAX_INPUT_BYTES)
        spec["input"] = base64.b64encode(data).decode()
    elif "input_text" in spec:
        text = spec.pop("input_text")
        if not isinstance(text, str):
            raise SpecFileError(f"{batch.path}: {_place(batch, job, ['input_text'])}: must be text; "
                                "use input_file for bytes")
        spec["input"] = base64.b64encode(text.encode()).decode()


def _file_bytes(base: Path, name: Any, where: str, limit: int) -> bytes:
    if not isinstance(name, str) or not name:
        raise SpecFileError(f"{where}: must be a file path")
    path = base / name
    try:
        size = path.stat().st_size
        if size > limit:
            raise SpecFileError(f"{where}: {path} is {size} bytes; the limit is {limit}")
        return path.read_bytes()
    except OSError as e:
        raise SpecFileError(f"{where}: cannot read {path}: {e.strerror or e}") from None


def _check(batch: Batch, job: Job) -> None:
    """Validate ``job`` as the agent will, with its module's digest standing in for its bytes."""
    from p2psched.api.errors import field_errors

    spec = dict(job.spec)
    if job.module_sha256 is not None:
        spec["module_sha256"] = job.module_sha256
    try:
        JobSpec.model_validate(spec, strict=False)
    except ValidationError as e:
        prefix = f"{job.where}."
        details = field_errors(e, prefix=prefix)
        for d, err in zip(details, e.errors(include_url=False)):  # field_errors keeps their order
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            if loc and d["field"].startswith(prefix) and _from_defaults(batch, job, loc):
                d["field"] = "defaults." + d["field"][len(prefix):]
            if d["message"].startswith("unknown field"):
                d["message"] = f"unknown field; a spec file takes the API's spec fields and {', '.join(FILE_KEYS)}"
        lines = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
        raise SpecFileError(f"{batch.path}: {lines}") from None
