"""Slot profiles: how one physical GPU is cut into typed virtual slots.

A profile is chosen per GPU and written as a short string:

``whole``
    One slot of type ``whole``: the job owns the GPU.
``shared:N``
    N equal time-sliced shares of type ``share-1/N``. Time slicing isolates
    nothing on its own; see ``docs/gpu.md`` for what is enforced and what is advisory.
``mig``
    MIG-style slices carved on demand under NVIDIA's placement rules for the model
    (table below). Slot types are the MIG profile names, e.g. ``1g.10gb``.
``mig:LAYOUT``
    A fixed MIG layout, e.g. ``mig:4g.40gb+3g.40gb``, checked against the same
    rules once, at start. Real MIG GPUs use the instances the operator created.

Placement rules, from ``nvidia-smi mig -lgipp`` and NVIDIA's MIG user guide: a GPU
of the A100/H100/H200 family has 7 compute slices and 8 memory slices, and each
GPU-instance profile occupies a run of memory slices that may only *start* at
certain offsets. On an H100 80GB::

    1g.10gb  1 compute, 1 memory slice,  starts {0,1,2,3,4,5,6}   -> at most 7
    1g.20gb  1 compute, 2 memory slices, starts {0,2,4,6}         -> at most 4
    2g.20gb  2 compute, 2 memory slices, starts {0,2,4}           -> at most 3
    3g.40gb  3 compute, 4 memory slices, starts {0,4}             -> at most 2
    4g.40gb  4 compute, 4 memory slices, starts {0}               -> at most 1
    7g.80gb  7 compute, 8 memory slices, starts {0}               -> at most 1

So after a 4g.40gb (slices 0-3) a 3g.40gb still fits at 4, a second 4g.40gb does
not, and a 1g.10gb parked at slice 0 blocks the 4g.40gb entirely. Slots of
different types compete for the same slices; their counts are not additive.
Media-extension profiles (``+me``) are left out: a job scheduler has no way to
ask for a video decoder, and each GPU allows only one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

#: Upper bound for ``shared:N``. NVIDIA's device plugin and DCGM examples use up to
#: 48 replicas; beyond 64 each share is so thin that time slicing is all overhead.
MAX_SHARES = 64

WHOLE = "whole"


@dataclass(frozen=True, slots=True)
class MigProfile:
    name: str  # "3g.40gb"
    compute: int  # compute slices (of the geometry's compute_slices)
    size: int  # memory slices occupied
    starts: tuple[int, ...]  # memory-slice offsets where an instance may start


@dataclass(frozen=True, slots=True, eq=False)  # identity hash: cheap cache keys for the tables below
class MigGeometry:
    model: str  # canonical model key, e.g. "H100-80GB"
    compute_slices: int
    memory_slices: int
    profiles: tuple[MigProfile, ...]

    def profile(self, name: str) -> MigProfile | None:
        for p in self.profiles:
            if p.name == name:
                return p
        return None

    def names(self) -> list[str]:
        return [p.name for p in self.profiles]


def _seven_slice(model: str, names: tuple[str, str, str, str, str, str]) -> MigGeometry:
    """The A100/H100/H200 geometry; only the memory in the names differs by model."""
    g1, g1w, g2, g3, g4, g7 = names
    return MigGeometry(model, 7, 8, (
        MigProfile(g1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
        MigProfile(g1w, 1, 2, (0, 2, 4, 6)),
        MigProfile(g2, 2, 2, (0, 2, 4)),
        MigProfile(g3, 3, 4, (0, 4)),
        MigProfile(g4, 4, 4, (0,)),
        MigProfile(g7, 7, 8, (0,)),
    ))


#: Models whose MIG rules are known. Keys are how ``--gpus`` names them.
MIG_GEOMETRIES: dict[str, MigGeometry] = {
    g.model: g for g in (
        _seven_slice("A100-40GB", ("1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb")),
        _seven_slice("A100-80GB", ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb")),
        _seven_slice("H100-80GB", ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb")),
        _seven_slice("H100-94GB", ("1g.12gb", "1g.24gb", "2g.24gb", "3g.47gb", "4g.47gb", "7g.94gb")),
        _seven_slice("H200-141GB", ("1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb")),
        # A30: 4 compute and 4 memory slices.
        MigGeometry("A30-24GB", 4, 4, (
            MigProfile("1g.6gb", 1, 1, (0, 1, 2, 3)),
            MigProfile("2g.12gb", 2, 2, (0, 2)),
            MigProfile("4g.24gb", 4, 4, (0,)),
        )),
    )
}

_MIG_NAME_RE = re.compile(r"^(\d+)g\.(\d+)gb$")
_MIG_TYPE_RE = re.compile(r"^(?:(\d+)c\.)?(\d+)g\.(\d+)gb(?:\+me)?$")  # as NVML names existing instances
_SHARE_RE = re.compile(r"^share-1/(\d+)$")


@dataclass(frozen=True, slots=True)
class Profile:
    """A parsed profile string."""

    kind: str  # "whole" | "shared" | "mig" | "mig-fixed"
    shares: int = 0
    layout: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.kind == "shared":
            return f"shared:{self.shares}"
        if self.kind == "mig-fixed":
            return "mig:" + "+".join(self.layout)
        return self.kind


def parse_profile(text: str, where: str = "profile") -> Profile:
    """Parse ``whole``, ``shared:N``, ``mig`` or ``mig:A+B+...``; ValueError teaches the forms."""
    t = text.strip()
    forms = "use 'whole', 'shared:N' (N from 2 to 64), 'mig', or 'mig:LAYOUT' such as 'mig:4g.40gb+3g.40gb'"
    if t == WHOLE:
        return Profile(WHOLE)
    if t == "mig":
        return Profile("mig")
    if t.startswith("shared:"):
        n = t.removeprefix("shared:")
        if not n.isdigit() or not 2 <= int(n) <= MAX_SHARES:
            raise ValueError(f"{where} {text!r}: the share count must be a whole number from 2 to {MAX_SHARES}; "
                             "for one share per GPU use 'whole'")
        return Profile("shared", shares=int(n))
    if t.startswith("mig:"):
        parts = tuple(p.strip() for p in t.removeprefix("mig:").split("+"))
        if not parts or any(not _MIG_NAME_RE.match(p) for p in parts):
            raise ValueError(f"{where} {text!r}: a MIG layout is profile names joined by '+', "
                             "e.g. 'mig:3g.40gb+2g.20gb+1g.10gb'")
        return Profile("mig-fixed", layout=parts)
    raise ValueError(f"{where} {text!r} is not a slot profile; {forms}")


def share_type(n: int) -> str:
    return f"share-1/{n}"


def slot_fraction(slot_type: str) -> float:
    """How much of one GPU a slot of this type is, for ordering types by size.

    MIG types count compute slices out of 7 (A30's 4-slice types come out a little
    small, which only affects which type an untyped request prefers).
    """
    if slot_type == WHOLE:
        return 1.0
    m = _SHARE_RE.match(slot_type)
    if m:
        return 1.0 / int(m.group(1))
    m = _MIG_TYPE_RE.match(slot_type)
    if m:
        return min(1.0, int(m.group(1) or m.group(2)) / 7)
    return 0.0


def geometry_for(model: str) -> MigGeometry | None:
    """The MIG geometry of a declared model name (``H100-80GB``) or an NVML name
    (``NVIDIA H100 80GB HBM3``), or None where MIG rules are unknown."""
    key = model.strip().upper()
    if key in MIG_GEOMETRIES:
        return MIG_GEOMETRIES[key]
    # NVML names: "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A30"
    flat = key.replace("-", " ")
    for fam in ("H200", "H100", "A100", "A30"):
        if re.search(rf"\b{fam}\b", flat):
            mem = re.search(r"\b(\d+)GB\b", flat)
            for g in MIG_GEOMETRIES.values():
                if g.model.startswith(fam + "-") and (mem is None or g.model.endswith(f"-{mem.group(1)}GB")):
                    return g
    return None


# -- the MIG placement model ------------------------------------------------------
#
# A GPU's MIG state is a bitmask of occupied memory slices plus the compute slices in
# use. With NVIDIA's start offsets the memory mask is the binding constraint, but the
# compute count is checked too so a geometry table mistake cannot over-commit.


def placements(geom: MigGeometry, profile: MigProfile, mask: int, compute_used: int) -> list[int]:
    """Start offsets where ``profile`` fits given the occupied ``mask``."""
    if compute_used + profile.compute > geom.compute_slices:
        return []
    run = (1 << profile.size) - 1
    return [s for s in profile.starts if not (mask >> s) & run]


def occupy(profile: MigProfile, start: int) -> int:
    return ((1 << profile.size) - 1) << start


@lru_cache(maxsize=1 << 17)  # bounded by geometries x 2^8 masks x compute x profiles
def max_count(geom: MigGeometry, name: str, mask: int, compute_used: int) -> int:
    """The most further instances of one profile that fit, searched exactly.

    The state space is tiny (2^8 masks), so an exact search is cheap and cached.
    """
    prof = geom.profile(name)
    if prof is None:
        return 0
    best = 0
    for s in placements(geom, prof, mask, compute_used):
        best = max(best, 1 + max_count(geom, name, mask | occupy(prof, s), compute_used + prof.compute))
        if best == _ceiling(geom, prof):
            break
    return best


def _ceiling(geom: MigGeometry, prof: MigProfile) -> int:
    return min(len(prof.starts), geom.compute_slices // prof.compute, geom.memory_slices // prof.size)


def capacity(geom: MigGeometry, mask: int, compute_used: int) -> dict[str, int]:
    """For each profile, how many more instances of it alone would fit."""
    return dict(_capacity(geom, mask, compute_used))


@lru_cache(maxsize=1 << 14)
def _capacity(geom: MigGeometry, mask: int, compute_used: int) -> tuple[tuple[str, int], ...]:
    return tuple((p.name, max_count(geom, p.name, mask, compute_used)) for p in geom.profiles)


def choose_start(geom: MigGeometry, name: str, mask: int, compute_used: int) -> int | None:
    """Where to carve one instance of ``name``, keeping the most room for later requests.

    Candidates are ranked by what still fits afterwards: first the same profile (so a
    multi-slot request that fits is never talked out of fitting), then the other
    profiles from largest to smallest (so a small slice does not strand a large one;
    a 1g.10gb goes to slice 6, not 0, and a 4g.40gb still fits after it).
    """
    prof = geom.profile(name)
    if prof is None:
        return None
    order = [name] + [p.name for p in sorted(geom.profiles, key=lambda p: (-p.size, -p.compute)) if p.name != name]
    best: tuple[tuple[int, ...], int] | None = None
    for s in placements(geom, prof, mask, compute_used):
        m2, c2 = mask | occupy(prof, s), compute_used + prof.compute
        key = tuple(max_count(geom, n, m2, c2) for n in order)
        if best is None or key > best[0]:
            best = (key, s)
    return None if best is None else best[1]


def check_layout(geom: MigGeometry, layout: tuple[str, ...]) -> list[tuple[str, int]]:
    """Place a fixed layout, largest first; ValueError names what does not fit and why."""
    unknown = [n for n in layout if geom.profile(n) is None]
    if unknown:
        raise ValueError(f"MIG profile {unknown[0]!r} does not exist on {geom.model}; "
                         f"its profiles are {', '.join(geom.names())}")

    def size_key(n: str) -> tuple[int, int]:
        p = geom.profile(n)
        assert p is not None
        return (-p.size, -p.compute)

    # Exact search, largest first: layouts are at most 7 instances over 8 slices.
    ordered = sorted(layout, key=size_key)

    def place(i: int, mask: int, comp: int) -> list[tuple[str, int]] | None:
        if i == len(ordered):
            return []
        p = geom.profile(ordered[i])
        assert p is not None
        for s in placements(geom, p, mask, comp):
            rest = place(i + 1, mask | occupy(p, s), comp + p.compute)
            if rest is not None:
                return [(p.name, s), *rest]
        return None

    result = place(0, 0, 0)
    if result is None:
        raise ValueError(f"MIG layout {'+'.join(layout)} does not fit one {geom.model}: it has "
                         f"{geom.compute_slices} compute and {geom.memory_slices} memory slices and each profile "
                         "may start only at fixed offsets (see 'nvidia-smi mig -lgipp'); "
                         "e.g. 4g+3g fits, 4g+4g and 3g+3g+1g do not")
    return result
