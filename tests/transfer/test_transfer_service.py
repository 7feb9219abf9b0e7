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
