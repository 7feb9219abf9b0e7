"""``--gpus CONFIG``: GPUs declared rather than discovered.

For hosts without NVML, and for tests and simulations. Declared GPUs are offered
as slots like real ones, but every view marks them ``declared`` and their UUIDs say
so (``GPU-declared-0``), so nobody mistakes them for hardware.

Inline form (one string)::

    CONFIG  := GROUP ("," GROUP)*
    GROUP   := [COUNT "x"] MODEL ["/" PROFILE]
    MODEL   := NAME "-" MEMORY "GB"          e.g. H100-80GB, A100-40GB, L4-24GB
    PROFILE := whole | shared:N | mig | mig:P1+P2+...

    "2xH100-80GB"                          two whole H100s
    "1xH100-80GB/mig, 2xL4-24GB/shared:4"  one MIG-carved H100, two L4s in quarters
    "H100-80GB/mig:4g.40gb+3g.40gb"        one H100 with a fixed MIG layout

File form, chosen when CONFIG names a ``.toml``, ``.yaml`` or ``.yml`` file::

    # gpus.toml                            # gpus.yaml
    [[gpus]]                               gpus:
    model = "H100-80GB"                      - model: H100-80GB
    count = 2                                  count: 2
    profile = "mig"                            profile: mig

``mig`` profiles need a model whose MIG rules are known (see
:data:`p2psched.gpu.profiles.MIG_GEOMETRIES`); ``whole`` and ``shared:N`` take any
model that names its memory.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from p2psched.gpu.discovery import GpuInfo, GpuInventory
from p2psched.gpu.profiles import MIG_GEOMETRIES, check_layout, geometry_for, parse_profile

#: A host with more than 64 GPUs of one declaration is a typo, not a machine
#: (the largest NVLink domains today hold 72 GPUs across many hosts).
MAX_DECLARED = 64
MAX_CONFIG_BYTES = 64 * 1024

_MODEL_RE = re.compile(r"^([A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*?)-(\d{1,4})GB$", re.IGNORECASE)
_GROUP_RE = re.compile(r"^(?:(\d+)\s*[xX]\s*)?([^/\s]+)(?:\s*/\s*(\S+))?$")


class DeclaredGroup(BaseModel):
    """One kind of GPU, ``count`` times, all cut the same way."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=64, description="NAME-<memory>GB, e.g. H100-80GB.")
    count: int = Field(1, ge=1, le=MAX_DECLARED, description="How many GPUs of this model.")
    profile: str = Field("whole", max_length=256, description="whole, shared:N, mig or mig:LAYOUT.")


class DeclaredFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: list[DeclaredGroup] = Field(min_length=1, max_length=MAX_DECLARED)


def parse_declared(config: str | Path, *, default_profile: str = "whole") -> GpuInventory:
    """Parse an inline string or a TOML/YAML file into a declared inventory.

    ``default_profile`` (``--gpu-profile``) cuts the groups that name no profile.
    Raises ValueError with a sentence that names the bad part and the fix.
    """
    text = str(config).strip()
    path = Path(text)
    if path.suffix.lower() in (".toml", ".yaml", ".yml"):
        groups, origin = _read_file(path), str(path)
    else:
        groups, origin = _parse_inline(text), f"--gpus {text!r}"
    groups = [g if "profile" in g.model_fields_set else g.model_copy(update={"profile": default_profile})
              for g in groups]
    gpus: list[GpuInfo] = []
    for g in groups:
        gpus.extend(_expand(g, start=len(gpus), origin=origin))
    if len(gpus) > MAX_DECLARED:
        raise ValueError(f"{origin} declares {len(gpus)} GPUs; at most {MAX_DECLARED} fit one agent")
    return GpuInventory(gpus=tuple(gpus), source="declared", reason=f"declared by {origin}")


def _parse_inline(text: str) -> list[DeclaredGroup]:
    if not text:
        raise ValueError("--gpus is empty; give e.g. '2xH100-80GB' or a .toml/.yaml file")
    groups: list[DeclaredGroup] = []
    for part in text.split(","):
        part = part.strip()
        m = _GROUP_RE.match(part)
        if not part or not m:
            raise ValueError(f"--gpus {text!r}: cannot read {part!r}; each comma-separated part is "
                             "[COUNT x]MODEL[/PROFILE], e.g. '2xH100-80GB' or '1xH100-80GB/mig'")
        count = int(m.group(1)) if m.group(1) else 1
        if not 1 <= count <= MAX_DECLARED:
            raise ValueError(f"--gpus {text!r}: count {count} in {part!r} must be from 1 to {MAX_DECLARED}")
        named = {"profile": m.group(3)} if m.group(3) else {}  # unnamed: --gpu-profile's (parse_declared)
        groups.append(DeclaredGroup(model=m.group(2), count=count, **named))
    return groups


def _read_file(path: Path) -> list[DeclaredGroup]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"--gpus {str(path)!r}: cannot read the file ({e.strerror}); "
                         "give a readable .toml/.yaml file or an inline string such as '2xH100-80GB'") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes is too large for a GPU declaration (limit {MAX_CONFIG_BYTES})")
    data: Any
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(raw.decode())
        else:
            data = yaml.safe_load(raw)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table with a 'gpus' list, e.g. [[gpus]] model = \"H100-80GB\"")
    try:
        return DeclaredFile.model_validate(data).gpus
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"{path}: {loc}: {first['msg']}; each entry takes model, count and profile") from None


def _expand(g: DeclaredGroup, start: int, origin: str) -> list[GpuInfo]:
    m = _MODEL_RE.match(g.model)
    if not m:
        raise ValueError(f"{origin}: GPU model {g.model!r} must name its memory, e.g. 'H100-80GB' or 'L4-24GB'")
    model = f"{m.group(1).upper()}-{int(m.group(2))}GB"
    mem = int(m.group(2)) << 30  # NVML reports an "80GB" H100 as 80 GiB (81559 MiB usable)
    if not mem:
        raise ValueError(f"{origin}: GPU model {g.model!r} has no memory; name its memory, e.g. 'H100-80GB'")
    prof = parse_profile(g.profile, f"{origin}: profile for {model}")
    if prof.kind in ("mig", "mig-fixed"):
        geom = geometry_for(model)
        if geom is None:
            raise ValueError(f"{origin}: MIG rules for {model} are not known; MIG profiles work on "
                             f"{', '.join(MIG_GEOMETRIES)}; use 'whole' or 'shared:N' for other models")
        if prof.kind == "mig-fixed":
            try:
                check_layout(geom, prof.layout)
            except ValueError as e:
                raise ValueError(f"{origin}: {e}") from None
        model = geom.model
    return [GpuInfo(index=i, uuid=f"GPU-declared-{i}", model=model, memory_bytes=mem, minor=i, declared=True,
                    profile=str(prof))
            for i in range(start, start + g.count)]
