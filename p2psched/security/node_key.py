"""The node's identity key on disk, read without loading cryptography until it signs.

``data_dir/node.key`` is the Ed25519 private key (PKCS#8 PEM, 0600, keys.py's format)
and ``data_dir/node.pub`` its public key as one line of 64 hex digits (the same form as
a tenant's ``.pub`` file, so ``p2psched tenant verify --node-pubkey "$(cat node.pub)"``
works). The agent gossips the public key from start-up but signs only after its first
job, so it reads ``node.pub`` at start and loads the private key on the first signature:
cryptography's bindings are ~6.5 MB of an idle agent's memory.

``node.pub`` is derived from ``node.key``, never the other way round. Creating a key,
and deriving a missing or older ``node.pub``, runs in a short-lived child process
(``python -m p2psched.security.node_key DIR``, ~0.1 s, once per data directory), so
that the agent itself never loads cryptography for it. Should ``node.pub`` still not
match the key (a key restored with its old modification time), the first signature
finds out, says so, and rewrites it.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger("p2psched.security")

NODE_KEY_FILE = "node.key"
NODE_PUB_FILE = "node.pub"
#: DER of a PKCS#8 Ed25519 private key (RFC 8410) up to its 32-byte seed: what
#: keys.write_private_key and ``openssl genpkey -algorithm ed25519`` write.
_PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


class NodeKeyError(RuntimeError):
    """The node key exists but cannot be used."""


def _is_pkcs8_ed25519(data: bytes) -> bool:
    """True if ``data`` is an unencrypted PKCS#8 PEM Ed25519 key: any 32-byte seed is a key."""
    text = data.strip()
    if not (text.startswith(_PEM_BEGIN) and text.endswith(_PEM_END)):
        return False
    try:
        der = base64.b64decode(b"".join(text[len(_PEM_BEGIN):-len(_PEM_END)].split()), validate=True)
    except ValueError:
        return False
    return len(der) == len(_PKCS8_ED25519_PREFIX) + 32 and der.startswith(_PKCS8_ED25519_PREFIX)


def _check_mode(path: Path, st: os.stat_result) -> None:
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise NodeKeyError(
            f"node key {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); anyone who reads it "
            f"can sign attestation reports as this node. Run 'chmod 600 {path}' (or delete it to create a new identity)"
        )


def load_or_create_private_key(data_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The node's private key, created (with its ``node.pub``) if there is none."""
    from p2psched.security.keys import KeyFormatError, generate, load_private_key, write_private_key

    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / NODE_KEY_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        key = generate()
        try:
            write_private_key(path, key)
        except FileExistsError:  # another process created it between stat and open
            return load_or_create_private_key(d)
        write_public_file(d, key)
        return key
    _check_mode(path, st)
    try:
        return load_private_key(path)
    except KeyFormatError as e:
        raise NodeKeyError(f"node key {path} is unusable: {e}; delete it to create a new node identity") from None


def write_public_file(data_dir: Path, key: Ed25519PrivateKey) -> str:
    from p2psched.security.keys import public_hex

    pub = public_hex(key)
    tmp = data_dir / (NODE_PUB_FILE + ".tmp")
    tmp.write_text(pub + "\n")
    os.replace(tmp, data_dir / NODE_PUB_FILE)
    return pub


class NodeKey:
    """The node's public key now, its private key on the first signature."""

    def __init__(self, data_dir: Path, public_hex: str, private: Ed25519PrivateKey | None = None) -> None:
        self.data_dir = data_dir
        self.public_hex = public_hex
        self._private = private

    @property
    def loaded(self) -> bool:
        return self._private is not None

    def private(self) -> Ed25519PrivateKey:
        if self._private is None:
            from p2psched.security.keys import public_hex

            key = load_or_create_private_key(self.data_dir)
            pub = public_hex(key)
            if pub != self.public_hex:
                write_public_file(self.data_dir, key)
                log.error("%s did not match %s; it is rewritten, and this node now gossips public key %s...",
                          self.data_dir / NODE_PUB_FILE, self.data_dir / NODE_KEY_FILE, pub[:16])
                self.public_hex = pub
            self._private = key
        return self._private


def open_node_key(data_dir: str | os.PathLike[str]) -> NodeKey:
    """The node key of ``data_dir`` as the agent uses it: created there if missing.

    Refuses, as before the key was loaded lazily, a key others can read and a key
    file that is not a key."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, pub_path = d / NODE_KEY_FILE, d / NODE_PUB_FILE
    try:
        key_st = key_path.stat()
    except FileNotFoundError:
        return NodeKey(d, _derive_in_child(d))
    _check_mode(key_path, key_st)
    data = key_path.read_bytes()
    if not _is_pkcs8_ed25519(data):
        # A key in another form keys.py reads (64 hex digits), or no key at all: load
        # it here, as always, so that an unusable key stops the agent at start.
        key = load_or_create_private_key(d)
        return NodeKey(d, write_public_file(d, key), key)
    from p2psched.security.keys import KeyFormatError, parse_public_key

    try:
        pub_st = pub_path.stat()
        pub = parse_public_key(pub_path.read_text())
    except (FileNotFoundError, UnicodeDecodeError, KeyFormatError):
        pub, pub_st = "", None
    if not pub or pub_st is None or pub_st.st_mtime_ns < key_st.st_mtime_ns:
        pub = _derive_in_child(d)
    return NodeKey(d, pub)


def _derive_in_child(data_dir: Path) -> str:
    """Create the key if missing and (re)write node.pub, in a child process."""
    proc = subprocess.run([sys.executable, "-m", "p2psched.security.node_key", str(data_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise NodeKeyError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                           else f"could not derive the node's public key in {data_dir}")
    return (data_dir / NODE_PUB_FILE).read_text().strip()


def main(argv: list[str]) -> int:
    d = Path(argv[0])
    try:
        write_public_file(d, load_or_create_private_key(d))
    except (NodeKeyError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
