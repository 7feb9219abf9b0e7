"""mask_patterns: each pattern masks its literal text and, where it compiles, its regex
matches; for wasm jobs as for process jobs, through a real agent."""

from __future__ import annotations

import hashlib
import random
import tracemalloc
import types
from collections.abc import Callable

import pytest
import trio

from p2psched.jobs.spec import JobSpec
from p2psched.sandbox import masking
from p2psched.sandbox.masking import MARKER, WITHHELD, compiled, mask

from agents import running_agent, wasm_spec


def test_a_pattern_masks_its_literal_text_where_as_a_regex_it_would_not_match() -> None:
    out = b"user=ann pass=s3cr3t$1 sum=a+b (x\n"
    # As regexes: `$` is the end and `+` repeats `a`, so neither matches its own text;
    # `(x` is no regex at all.
    assert mask(out, ["s3cr3t$1", "a+b", "(x"]) == b"user=ann pass=[masked] sum=[masked] [masked]\n"


def test_a_pattern_that_is_a_regex_masks_its_matches() -> None:
    assert mask(b"token=abc123 ok key-999\n", [r"token=\w+", "key-[0-9]+"]) == b"[masked] ok [masked]\n"


def test_overlapping_matches_become_one_marker_and_empty_matches_none() -> None:
    # "abc" and "bcd" overlap; a later pattern ("masked") never matches inside a marker;
    # "z*" matches the empty string everywhere and masks nothing.
    assert mask(b"xabcdx masked", ["abc", "bcd", "masked", "z*"]) == b"x[masked]x [masked]"
    assert mask(b"nothing here", ["absent"]) == b"nothing here"


def test_a_pattern_that_is_no_regex_is_accepted_in_a_spec() -> None:
    spec = JobSpec(runtime="process", command=["/bin/true"], mask_patterns=["pass(word", "s3cr3t$1"])
    assert spec.mask_patterns == ["pass(word", "s3cr3t$1"]
    assert "literal" in (JobSpec.model_fields["mask_patterns"].description or "")


async def test_a_wasm_jobs_output_is_masked_before_it_is_stored_and_attested(tmp_path) -> None:
    """hello.wasm prints "hello from p2psched"; the record, /result, /output and the
    attestation's output hash all see only the masked bytes."""
    async with running_agent(tmp_path, cpus=1) as (_agent, http):
        spec = wasm_spec("hello.wasm", mask_patterns=["hello", r"p2p\w+"])
        job_id = (await http.post("/v1/jobs", json=spec)).json()["id"]
        rec = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
        assert rec["state"] == "succeeded", rec
        masked = b"[masked] from [masked]\n"
        assert rec["result"]["stdout"] == masked.decode()
        assert (await http.get(f"/v1/jobs/{job_id}/result")).content == masked
        assert (await http.get(f"/v1/jobs/{job_id}/output")).content == masked
        assert rec["result"]["output_sha256"] == hashlib.sha256(masked).hexdigest()
        assert rec["result"]["attestation"]["output_sha256"] == hashlib.sha256(masked).hexdigest()


@pytest.mark.root
async def test_a_process_jobs_literal_secret_is_masked_through_the_agent(tmp_path) -> None:
    async with running_agent(tmp_path, cpus=1) as (_agent, http):
        spec = {"runtime": "process", "command": ["/bin/sh", "-c", "echo 'pw s3cr3t$1 ok'; echo 'a+b' >&2"],
                "mask_patterns": ["s3cr3t$1", "a+b"]}
        job_id = (await http.post("/v1/jobs", json=spec)).json()["id"]
        rec = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
        assert rec["state"] == "succeeded", rec
        assert (await http.get(f"/v1/jobs/{job_id}/result")).content == b"pw [masked] ok\n"
        assert rec["result"]["stderr"] == "[masked]\n"


async def test_a_pattern_that_backtracks_without_end_withholds_the_output_and_holds_nothing_up() -> None:
    # (a|a)+b on 40 a's backtracks for hours. With `re`, masking a process job's output
    # (a thread of the agent) held the GIL: /healthz waited 18 s for 29 characters.
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        out = await trio.to_thread.run_sync(mask, b"token=" + b"a" * 40 + b"!", ["(a|a)+b", "token"])
        nursery.cancel_scope.cancel()
    assert out == WITHHELD  # nothing of it kept: a secret could be in what no pattern looked at
    assert ticks >= 5  # the event loop ran while the pattern did (with `re`: 0 or 1)


def _peak(fn: Callable[[], bytes]) -> tuple[bytes, int]:
    """What ``fn`` returns, and the most memory Python held for it at once."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_pattern_that_matches_at_every_byte_of_16_mib_takes_memory_in_proportion_to_the_output() -> None:
    # 16 million matches: collected a tuple each and sorted, they took 125 bytes per byte
    # of output (2 GB here; a wasm worker, or the agent for a process job, grew by as much).
    data = bytes(16 << 20)
    out, peak = _peak(lambda: mask(data, ["\u0000"]))
    assert out in (WITHHELD, MARKER)  # given up in time, or masked whole: never a part of it
    assert peak < 4 * len(data)


def test_many_matches_are_merged_as_they_are_found_not_collected() -> None:
    # Each pattern twice over (as literal and as regex), 64 touching matches to a run,
    # 256 runs: each run is one marker, and no match outlives its merging.
    data = (b"ab" * 64 + b"_") * 256
    out, peak = _peak(lambda: mask(data, ["ab", "a+b"]))
    assert out == (MARKER + b"_") * 256
    assert peak < 4 * len(data)


@pytest.mark.parametrize(("data", "pattern"), [
    (b"(" * (1 << 20), "("),  # its literal text only: "(" is no regex
    (b"ab" * (1 << 19), "a."),  # its regex only
    (bytes(1 << 20), "z*"),  # a regex whose every match is empty, and masks nothing
])
def test_however_many_matches_a_pattern_has_the_time_limit_holds(monkeypatch, data: bytes, pattern: str) -> None:
    # A clock that moves 0.1 s each time it is read: the limit is over after 20 reads,
    # which a million matches pass only if their search reads the clock as it goes.
    now = 0.0

    def monotonic() -> float:
        nonlocal now
        now += 0.1
        return now

    monkeypatch.setattr(masking, "time", types.SimpleNamespace(monotonic=monotonic))
    assert mask(data, [pattern]) == WITHHELD


def test_masking_is_what_collecting_and_sorting_every_match_gives() -> None:
    """The merge as matches come against the plain way (every span, sorted, merged), on
    small random outputs and patterns: literal, regex, both, overlapping and touching."""

    def collected(data: bytes, patterns: list[str]) -> bytes:
        spans = []
        for p in patterns:
            lit = p.encode()
            spans += [(i, i + len(lit)) for i in range(len(data)) if lit and data.startswith(lit, i)]
            if (pattern := compiled(p)) is not None:
                spans += [m.span() for m in pattern.finditer(data) if m.end() > m.start()]
        out, done, run = b"", 0, None
        for s, e in sorted(spans) + [(len(data) + 1, 0)]:
            if run is not None and s <= run[1]:
                run = (run[0], max(run[1], e))
                continue
            if run is not None:
                out += data[done:run[0]] + MARKER
                done = run[1]
            run = (s, e)
        return out + data[done:]

    rng = random.Random(7)
    for _ in range(3000):
        data = bytes(rng.choice(b"abx()+.*\n") for _ in range(rng.randrange(30)))
        patterns = ["".join(rng.choice("ab(.*+?|)[]x^$") for _ in range(rng.randrange(4)))
                    for _ in range(rng.randrange(4))]
        assert mask(data, patterns) == collected(data, patterns), (data, patterns)
