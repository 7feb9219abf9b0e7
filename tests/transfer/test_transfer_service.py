"""The transfer service over real TCP: a request its handler fails on gets an error
reply, and the service goes on serving (a peer's odd message must not stop an agent)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from agents import free_port
from p2psched.transfer.service import TransferError, TransferService


async def test_a_handler_that_fails_on_a_message_answers_with_an_error_and_keeps_serving() -> None:
    async def handler(peer: str | None, msg: dict[str, Any]) -> dict[str, Any]:
        if msg["t"] == "status":
            return {"t": "ack", "entry": msg["entry"]["at"] + 1}  # a bug: TypeError on a list
        return {"t": "ack", "id": msg.get("id")}

    port = free_port()
    server = TransferService(("127.0.0.1", port), handler, node_id="server")
    client = TransferService(("127.0.0.1", free_port()), handler, node_id="client")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        address = f"127.0.0.1:{port}"
        assert (await client.request("server", address, {"t": "status", "id": "a", "entry": {"at": 1}}))["entry"] == 2
        with pytest.raises(TransferError, match="status.*TypeError"):
            await client.request("server", address, {"t": "status", "id": "b", "entry": {"at": [1]}})
        # The same connection and new ones are still served.
        assert (await client.request("server", address, {"t": "cancel", "id": "c"}))["id"] == "c"
        await client.aclose()
        fresh = TransferService(("127.0.0.1", free_port()), handler, node_id="fresh")
        assert (await fresh.request("server", address, {"t": "cancel", "id": "d"}))["id"] == "d"
        await fresh.aclose()
        nursery.cancel_scope.cancel()


def test_an_answer_to_a_submission_is_checked_before_a_client_sees_it():
    """A client-chosen id's home answers the agent the client asked; that agent hands the
    answer on as it is, so a malformed one must be a named error, not a 500."""
    from p2psched.transfer.messages import check_submit_reply

    check_submit_reply({"t": "submitted", "job": {"id": "j", "state": "queued", "timeline": []}, "created": True})
    check_submit_reply({"t": "submit_error", "status": 429, "reason": "queue_full", "message": "full",
                        "retry_after": 2.5})
    check_submit_reply({"t": "submit_error", "status": 400, "reason": "invalid_spec", "message": "bad"})
    for bad, named in [
        ({"t": "submitted", "job": {"id": "j"}, "created": True}, "submitted reply: job.state: Field required"),
        ({"t": "submitted", "job": "j", "created": True}, "submitted reply: job: Input should be a valid dictionary"),
        ({"t": "submitted", "job": {"id": "j", "state": "queued"}, "created": 1},
         "created: Input should be a valid boolean"),
        ({"t": "submit_error", "status": 200, "reason": "r", "message": "m"},
         "status: Input should be greater than or equal to 400"),
        ({"t": "submit_error", "status": "429", "reason": "r", "message": "m"},
         "status: Input should be a valid integer"),
        ({"t": "submit_error", "status": 429, "reason": "r", "message": "m", "retry_after": -1}, "retry_after"),
        ({"t": "submit_error", "status": 503, "message": "m"}, "reason: Field required"),
        ({"t": "ack"}, "a reply of type 'ack', not submitted or submit_error"),
    ]:
        with pytest.raises(ValueError) as e:
            check_submit_reply(bad)
        assert named in str(e.value), (bad, str(e.value))


async def test_a_request_says_whether_it_went_out_and_a_timed_out_one_is_sent_once() -> None:
    """A caller must know whether the peer may have acted on a request it got no answer
    to (a client id's home may hold the job): a refused connection sent nothing; a
    peer that read the request and never answered got it, once: the request is not
    sent again on a fresh connection after the whole timeout has passed."""
    got: list[dict[str, Any]] = []

    async def hangs(peer: str | None, msg: dict[str, Any]) -> dict[str, Any]:
        got.append(msg)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    client = TransferService(("127.0.0.1", free_port()), hangs, node_id="client")
    with pytest.raises(TransferError) as refused:
        await client.request("nobody", f"127.0.0.1:{free_port()}", {"t": "cancel", "id": "a"}, timeout=5)
    assert refused.value.sent is False
    port = free_port()
    server = TransferService(("127.0.0.1", port), hangs, node_id="server")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with pytest.raises(TransferError) as unanswered:
            await client.request("server", f"127.0.0.1:{port}", {"t": "cancel", "id": "b"}, timeout=0.5)
        assert unanswered.value.sent is True
        await trio.sleep(0.2)
        assert [m["id"] for m in got] == ["b"]
        nursery.cancel_scope.cancel()
    await client.aclose()
