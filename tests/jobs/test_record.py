"""A result's JSON form: what an older agent stored or sent still loads."""

from p2psched.jobs.record import RECORD_TEXT_BYTES, JobResult

#: A result as agents wrote it before output_bytes and the *_in_record_truncated flags.
OLD = {"exit_code": 0, "reason": "exit 0", "stdout": "hi\n", "stderr": "", "stdout_truncated": False,
       "stderr_truncated": False, "cpu_ms": 1.5, "peak_mem_bytes": 4096, "output_sha256": "ab" * 32,
       "limit_hit": None, "signal": None, "warnings": [], "attestation": None, "artifacts": {}}


def test_a_result_from_before_output_bytes_loads_with_its_size_unknown():
    res = JobResult.from_dict(OLD)
    assert (res.stdout, res.output_sha256, res.cpu_ms) == ("hi\n", "ab" * 32, 1.5)
    assert res.output_bytes is None
    assert not res.stdout_in_record_truncated and not res.stderr_in_record_truncated
    assert JobResult.from_dict(res.as_dict()) == res  # stored again, it reads back the same


def test_an_old_results_text_as_long_as_a_record_holds_is_taken_as_perhaps_cut():
    full = "x" * RECORD_TEXT_BYTES
    res = JobResult.from_dict({**OLD, "stdout": full, "stderr": full, "stderr_truncated": True})
    assert res.stdout_in_record_truncated and res.stderr_in_record_truncated
    # stderr_truncated alone (its own limit, under 64 KiB) is not a cut of the record's text
    res = JobResult.from_dict({**OLD, "stderr": "y" * 100, "stderr_truncated": True})
    assert not res.stderr_in_record_truncated and res.stderr_truncated


def test_a_new_result_says_the_size_it_was_given():
    res = JobResult(exit_code=0, reason="exit 0", stdout="x", output_bytes=100_000, stdout_in_record_truncated=True)
    d = res.as_dict()
    assert d["output_bytes"] == 100_000 and d["stdout_in_record_truncated"] is True
    assert d["stderr_in_record_truncated"] is False
    assert JobResult.from_dict(d) == res
