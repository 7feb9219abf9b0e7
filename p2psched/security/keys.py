"""Ed25519 keys as p2psched stores them, and the canonical encoding every signature covers.

Formats (one choice each, so there is nothing to negotiate):

* A **private key** file is PKCS#8 PEM, unencrypted, mode 0600 (``openssl pkey -in
  alice.key -text`` reads it). Its protection is the file mode, as with SSH host keys.
* A **public key** is the 32 raw bytes as 64 lowercase hex digits: short enough for one
  TOML line and for the gossiped node state. A ``.pub`` file holds that line; a PEM
  public key is accepted on input too.
* A **key id** is the first 16 hex digits of sha256(raw public key). It only selects
  which of a tenant's keys to try; the signature is what proves anything.
* **Canonical JSON**: UTF-8, keys sorted, no whitespace, no NaN/Infinity, floats in
  Python's shortest round-trip form. Signed payloads hold only strings, integers,
  booleans, null, and the few floats of a job's resources, so this is stable.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

# cryptography (~6.5 MB resident) is imported where a key is used, not here: an idle
# agent reads its public key from node.pub and verifies nothing until a request comes.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class KeyFormatError(ValueError):
    """A key file or key string that is not an Ed25519 key in a format we read."""


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def public_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_id(pub_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(pub_hex)).hexdigest()[:16]


def parse_public_key(text: str) -> str:
    """Return the 64-hex form of a public key given as hex or PEM; raise KeyFormatError."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            pub = serialization.load_pem_public_key(text.encode())
        except ValueError as e:
            raise KeyFormatError(f"not a PEM public key ({e})") from None
        if not isinstance(pub, Ed25519PublicKey):
            raise KeyFormatError(f"the PEM key is {type(pub).__name__}; p2psched tenant keys are Ed25519")
        return public_hex(pub)
    lowered = text.lower()
    if len(lowered) != 64 or any(c not in "0123456789abcdef" for c in lowered):
        raise KeyFormatError(
            "an Ed25519 public key is 64 hex digits (as 'p2psched tenant keygen' writes to NAME.pub) or a PEM block"
        )
    return lowered


def load_public_hex(pub_hex: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex))


def verify_sig(pub_hex: str, signature_hex: str, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        sig = bytes.fromhex(signature_hex)
        load_public_hex(pub_hex).verify(sig, message)
    except (ValueError, InvalidSignature):
        return False
    return True


def generate() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write ``key`` so that it is never readable by others, not even for an instant."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; remove it first, or choose another --out directory") from None
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(key))
    os.chmod(path, 0o600)  # O_CREAT's mode is masked by umask only downwards, but an existing file keeps its mode


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFormatError(f"{path} does not exist; create a key with 'p2psched tenant keygen NAME --out DIR'") from None
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(text, password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text.decode()))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise KeyFormatError(f"{path} is not an unencrypted Ed25519 private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"{path} holds a {type(key).__name__}; p2psched keys are Ed25519")
    return key
