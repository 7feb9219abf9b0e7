"""Mutual TLS between agents over real trio TCP connections, with certificates from the cluster CA."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path
import pytest
import trio
from cryptography import x509

from p2psched.security.tls import (
    NodeTLS,
    PeerIdentityError,
    TLSSetupError,
    accept_peer,
    client_context,
    connect_peer,
    init_ca,
    issue_node_cert,
    server_context,
)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, NodeTLS]:
    """A cluster CA with nodes h0-0 and h0-1, and a foreign CA with node h0-1 (same name, wrong CA)."""
    init_ca(tmp_path / "ca")
    init_ca(tmp_path / "foreign-ca")
    for node in ("h0-0", "h0-1"):
        issue_node_cert(node, tmp_path / "ca", tmp_path / node)
    issue_node_cert("h0-1", tmp_path / "foreign-ca", tmp_path / "foreign")
    out = {n: NodeTLS.from_dir(tmp_path / n, n) for n in ("h0-0", "h0-1")}
    foreign = NodeTLS.from_dir(tmp_path / "foreign", "h0-1")
    out["foreign"] = foreign
    # The same node name, certified by another CA, presented to a cluster member (which it trusts).
    out["foreign-client"] = NodeTLS(out["h0-1"].ca, foreign.cert, foreign.key, "h0-1")
    # Self-signed: a certificate that vouches for itself (the foreign CA's own), with the cluster CA as trust.
    out["self-signed"] = NodeTLS(out["h0-1"].ca, tmp_path / "foreign-ca" / "ca.pem",
                                 tmp_path / "foreign-ca" / "ca.key", "h0-1")
    return out


class Server:
    """Accepts one connection on loopback, does the TLS handshake, echoes the client's node id."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.peer: str | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        tcp = await listeners[0].accept()
        try:
            stream, self.peer = await accept_peer(tcp, self.ctx)
            request = await stream.receive_some(100)
            await stream.send_all(b"hello " + self.peer.encode() + b", you said " + request)
            await stream.aclose()
        except (trio.BrokenResourceError, ssl.SSLError, PeerIdentityError) as e:
            self.error = e
        finally:
            await listeners[0].aclose()
            self.done.set()


async def talk(port: int, expected: str, ctx: ssl.SSLContext) -> bytes:
    stream = await connect_peer("127.0.0.1", port, expected, ctx)
    await stream.send_all(b"ping")
    data = await stream.receive_some(100)
    await stream.aclose()
    return data


async def test_mutual_tls_with_cluster_certificates(pki: dict[str, NodeTLS]) -> None:
    server = Server(server_context(pki["h0-0"]))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        with trio.fail_after(10):
            reply = await talk(port, "h0-0", client_context(pki["h0-1"]))
            await server.done.wait()
    assert reply == b"hello h0-1, you said ping"
    assert server.peer == "h0-1" and server.error is None


def _chain_error(e: BaseException | None) -> str:
    while e is not None and not isinstance(e, ssl.SSLError):
        e = e.__cause__ or e.__context__
    return str(e)


@pytest.mark.parametrize("client", ["foreign-client", "self-signed", "no-certificate"])
async def test_a_client_without_a_cluster_certificate_is_refused(pki: dict[str, NodeTLS], client: str) -> None:
    if client == "no-certificate":
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["h0-1"].ca))
        ctx.check_hostname = False
    else:
        ctx = client_context(pki[client])
    server = Server(server_context(pki["h0-0"]))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        with trio.fail_after(10):
            try:
                reply = await talk(port, "h0-0", ctx)
            except trio.BrokenResourceError:
                reply = None
            await server.done.wait()
    # In TLS 1.3 the server judges the client's certificate after the client's handshake has
    # finished, so the client learns of the refusal as a broken stream or an empty reply.
    assert not reply
    assert server.peer is None
    assert server.error is not None
    assert "certificate" in _chain_error(server.error).lower(), _chain_error(server.error)


async def test_a_server_with_a_foreign_certificate_is_refused_by_the_client(pki: dict[str, NodeTLS]) -> None:
    server = Server(server_context(pki["foreign"]))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        with trio.fail_after(10):
            with pytest.raises(trio.BrokenResourceError) as info:
                await talk(port, "h0-1", client_context(pki["h0-0"]))
            await server.done.wait()
    assert "certificate verify failed" in _chain_error(info.value)


async def test_the_client_checks_which_node_answered(pki: dict[str, NodeTLS]) -> None:
    server = Server(server_context(pki["h0-0"]))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        with trio.fail_after(10):
            with pytest.raises(PeerIdentityError, match="connected to node 'h0-0' but expected 'h0-5'"):
                await talk(port, "h0-5", client_context(pki["h0-1"]))
            await server.done.wait()


def test_certificate_contents(pki: dict[str, NodeTLS], tmp_path: Path) -> None:
    cert = x509.load_pem_x509_certificate(pki["h0-0"].cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["p2psched://node/h0-0"]
    assert san.get_values_for_type(x509.DNSName) == ["h0-0"]
    assert cert.subject.rfc4514_string() == "CN=h0-0"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(pki["h0-0"].key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    # A node id that is not a DNS name still gets its URI identity, and extra hosts are added.
    c, _ = issue_node_cert("rack1_node:7", tmp_path / "ca", tmp_path / "odd", hosts=("10.0.0.7", "node7.example"))
    san = x509.load_pem_x509_certificate(c.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["p2psched://node/rack1_node%3A7"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert san.get_values_for_type(x509.DNSName) == ["node7.example"]


def test_setup_errors_say_how_to_fix(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    with pytest.raises(TLSSetupError, match="not replaced"):
        init_ca(tmp_path / "ca")
    with pytest.raises(TLSSetupError, match="p2psched ca init"):
        issue_node_cert("h0-0", tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(TLSSetupError, match="p2psched cert issue h0-0"):
        NodeTLS.from_dir(tmp_path / "empty", "h0-0")
    with pytest.raises(TLSSetupError, match="node id"):
        issue_node_cert("../etc", tmp_path / "ca", tmp_path / "out")
    issue_node_cert("h0-0", tmp_path / "ca", tmp_path / "out")
    with pytest.raises(TLSSetupError, match="already exists"):
        issue_node_cert("h0-0", tmp_path / "ca", tmp_path / "out")
