"""The cluster CA, node certificates, and mutual-TLS contexts for the transfer service.

Public interface:

* ``init_ca(out_dir)`` writes ``ca.pem`` and ``ca.key`` (``p2psched ca init``).
* ``issue_node_cert(node_id, ca_dir, out_dir)`` writes ``NODE_ID.pem`` and
  ``NODE_ID.key`` signed by the CA, plus a copy of ``ca.pem``, so that ``out_dir`` is
  all one agent needs (``p2psched cert issue``).
* ``files = NodeTLS.from_dir(tls_dir, node_id)``; then ``server_context(files)`` and
  ``client_context(files)`` give ``ssl.SSLContext`` objects for ``trio.SSLStream``:
  TLS 1.3 only, both sides present certificates, both verify them against the cluster
  CA. Without a valid certificate from the same CA the handshake fails.
* Identity: the CA proves "some cluster node"; which one is the node id in the
  certificate (URI SAN ``p2psched://node/<id>``, also the CN). After the handshake,
  ``peer_node_id(ssl_stream)`` returns it; ``check_peer(ssl_stream, expected)`` raises
  :class:`PeerIdentityError` if a client reached another node than it meant to.
  ``connect_peer`` and ``accept_peer`` do the handshake and these checks for trio.

Keys are ECDSA P-256: supported by every TLS stack, and fast to handshake. Node
certificates last 825 days (the CA/Browser Forum's former maximum); the CA 10 years.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
NODE_URI_PREFIX = "p2psched://node/"
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
CA_DAYS = 3650
NODE_DAYS = 825


class TLSSetupError(ValueError):
    """CA or certificate files missing or unusable; the message says how to create them."""


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate is valid but names another node than expected, or none."""


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TLSSetupError(f"{path} already exists; remove it first (it is a private key: be sure), or choose another --out") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _now(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.timezone.utc)


def init_ca(out_dir: str | os.PathLike[str], *, common_name: str = "p2psched cluster CA",
            days: int = CA_DAYS, now: dt.datetime | None = None) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists() or key_path.exists():
        raise TLSSetupError(
            f"{out} already holds a CA ({CA_CERT}/{CA_KEY}); every node certificate depends on it, so it is "
            "not replaced: remove both files first if you really mean to start a new CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now(now) - dt.timedelta(minutes=5)  # tolerate peers whose clocks run a little behind
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise TLSSetupError(f"{ca_dir} holds no CA ({CA_CERT} and {CA_KEY}); create one with 'p2psched ca init --out {ca_dir}'")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSSetupError(f"{key_path} is not an EC key as 'p2psched ca init' writes")
    return cert, key


def issue_node_cert(node_id: str, ca_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                    hosts: tuple[str, ...] = (), days: int = NODE_DAYS,
                    now: dt.datetime | None = None) -> tuple[Path, Path]:
    """Issue ``NODE_ID.pem``/``.key`` in ``out_dir``; ``hosts`` adds DNS names or IPs to the SAN."""
    if not NODE_ID_RE.match(node_id):
        raise TLSSetupError(f"node id {node_id!r} must be 1-128 letters, digits and . _ : - starting with a letter or digit")
    ca_path = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(NODE_URI_PREFIX + quote(node_id, safe=""))]
    for h in (node_id, *hosts) if _HOSTNAME_RE.match(node_id) else hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not _HOSTNAME_RE.match(h):
                raise TLSSetupError(f"--host {h!r} is neither an IP address nor a DNS name") from None
            sans.append(x509.DNSName(h))
    start = _now(now) - dt.timedelta(minutes=5)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / f"{node_id}.pem", out / f"{node_id}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if out.resolve() != ca_path.resolve():
        (out / CA_CERT).write_bytes((ca_path / CA_CERT).read_bytes())
    return cert_path, key_path


@dataclass(frozen=True, slots=True)
class NodeTLS:
    ca: Path
    cert: Path
    key: Path
    node_id: str

    @classmethod
    def from_dir(cls, tls_dir: str | os.PathLike[str], node_id: str) -> NodeTLS:
        d = Path(tls_dir)
        files = cls(d / CA_CERT, d / f"{node_id}.pem", d / f"{node_id}.key", node_id)
        missing = [p.name for p in (files.ca, files.cert, files.key) if not p.exists()]
        if missing:
            raise TLSSetupError(
                f"{d} lacks {', '.join(missing)}; create them with 'p2psched ca init --out CA_DIR' (once per cluster) "
                f"and 'p2psched cert issue {node_id} --ca CA_DIR --out {d}', or run with --insecure"
            )
        return files


def _base(files: NodeTLS, purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=str(files.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # no downgrade path; every peer runs the same code
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(files: NodeTLS) -> ssl.SSLContext:
    """For the accepting side: requires and verifies the client's certificate."""
    return _base(files, ssl.Purpose.CLIENT_AUTH)


def client_context(files: NodeTLS) -> ssl.SSLContext:
    """For the connecting side. Hostname checking is off: node ids need not be DNS names,
    and peers are reached by address; ``check_peer`` checks the node id instead."""
    ctx = _base(files, ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    return ctx


def peer_node_id(stream: Any) -> str:
    """The node id in the verified peer certificate of a handshaken ``trio.SSLStream``
    (which forwards ``getpeercert`` to its SSLObject) or an ``ssl.SSLObject``."""
    cert = stream.getpeercert()
    if not cert:
        raise PeerIdentityError("the peer presented no certificate")
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith(NODE_URI_PREFIX):
            return unquote(value[len(NODE_URI_PREFIX):])
    raise PeerIdentityError("the peer's certificate names no p2psched node; issue it with 'p2psched cert issue NODE_ID'")


def check_peer(stream: Any, expected_node_id: str) -> None:
    got = peer_node_id(stream)
    if got != expected_node_id:
        raise PeerIdentityError(
            f"connected to node {got!r} but expected {expected_node_id!r}: the address in gossip points at another "
            "node, or a certificate was copied between hosts"
        )


async def connect_peer(host: str, port: int, expected_node_id: str, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """Open a TCP connection, handshake, and check the peer is ``expected_node_id``."""
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    try:
        await stream.do_handshake()
        check_peer(stream, expected_node_id)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def accept_peer(tcp: trio.abc.Stream, ctx: ssl.SSLContext) -> tuple[trio.SSLStream[Any], str]:
    """Handshake as the server on an accepted stream; return it with the client's node id."""
    stream = trio.SSLStream(tcp, ctx, server_side=True)
    try:
        await stream.do_handshake()
        node = peer_node_id(stream)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, node
