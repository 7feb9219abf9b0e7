"""Packet sealing: AES-GCM under a cluster keyring, the cluster name as associated
data, and a replay window.

Sealed datagram or TCP frame::

    0x01 | nonce (12 random bytes) | AES-GCM( timestamp_ms (8 bytes, big-endian) | plaintext )
    associated data: b"p2psched-gossip\\0" + cluster name

Overhead: 1 + 12 + 8 + 16 (tag) = 37 bytes (``SEALED_OVERHEAD``). Insecure mode
(``--insecure``) sends ``0x00 | len(cluster) | cluster | plaintext`` so that clusters
still stay apart, but anyone on the network can read and forge packets.

The keyring holds one primary key, used to seal, and any number of others that are
still accepted, which is how keys rotate without downtime (the same scheme as Serf's
``keyring``): add the new key on every agent, make it primary everywhere, then remove
the old one.

Key file format (what ``p2psched keygen --gossip`` writes, mode 0600): UTF-8 text, one
base64-encoded AES key (16, 24 or 32 bytes) per line, the primary key first; blank
lines and lines starting with ``#`` are ignored.

Replays: a packet whose timestamp is more than ``replay_window`` seconds from our
clock is dropped, and a nonce seen within the window is dropped again. Agents' clocks
must agree within the window (NTP keeps them within milliseconds).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections import OrderedDict
from pathlib import Path

SEALED_OVERHEAD = 1 + 12 + 8 + 16
_AAD_PREFIX = b"p2psched-gossip\0"
_SEALED, _PLAIN = 0x01, 0x00
_MAX_REMEMBERED = 200_000  # nonces; ~20 MB at worst, far above any legitimate rate


class KeyringError(ValueError):
    """The key file is missing or malformed; the message says how to fix it."""


class OpenError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_keys(text: str, source: str = "key file") -> list[bytes]:
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(f"{source} line {n}: not base64; each line must hold one key as written by "
                               "`p2psched keygen --gossip`") from None
        if len(key) not in (16, 24, 32):
            raise KeyringError(f"{source} line {n}: key is {len(key)} bytes; AES keys are 16, 24 or 32 bytes "
                               "(create one with `p2psched keygen --gossip`)")
        keys.append(key)
    if not keys:
        raise KeyringError(f"{source} holds no key; create one with `p2psched keygen --gossip -o {source}`")
    return keys


def new_key_file_text() -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()
    return ("# p2psched gossip keyring: one base64 AES key per line, the primary (sealing) key first.\n"
            "# Rotate: add a new key on every agent, move it first everywhere, then remove the old one.\n"
            f"{key}\n")


class Sealer:
    """Seals and opens packets. ``now`` is wall-clock seconds (the only clock-derived
    input, passed in by the adapter)."""

    overhead: int

    def seal(self, now: float, plaintext: bytes) -> bytes:
        raise NotImplementedError

    def open(self, now: float, data: bytes) -> bytes:
        raise NotImplementedError


class PlainSealer(Sealer):
    def __init__(self, cluster_name: str) -> None:
        name = cluster_name.encode()
        if len(name) > 255:
            raise KeyringError("cluster name must be at most 255 bytes")
        self._prefix = bytes([_PLAIN, len(name)]) + name
        self.overhead = len(self._prefix)

    def seal(self, now: float, plaintext: bytes) -> bytes:
        return self._prefix + plaintext

    def open(self, now: float, data: bytes) -> bytes:
        if not data:
            raise OpenError("short")
        if data[0] == _SEALED:
            raise OpenError("encrypted")  # a peer has a key and we run --insecure
        if not data.startswith(self._prefix):
            raise OpenError("cluster" if data[0] == _PLAIN else "version")
        return data[self.overhead:]


class Keyring(Sealer):
    overhead = SEALED_OVERHEAD

    def __init__(self, keys: list[bytes], cluster_name: str, replay_window: float = 60.0) -> None:
        if not keys:
            raise KeyringError("a keyring needs at least one key")
        # Imported here: an agent running --insecure, or standalone, never loads
        # cryptography's bindings (~6.5 MB) for gossip.
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._invalid_tag = InvalidTag
        self._aeads = [AESGCM(k) for k in keys]
        self._aad = _AAD_PREFIX + cluster_name.encode()
        self.window = replay_window
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    @classmethod
    def load(cls, path: Path, cluster_name: str, replay_window: float = 60.0) -> Keyring:
        try:
            text = path.read_text()
        except OSError as e:
            raise KeyringError(f"cannot read gossip key file {path}: {e.strerror}; create one with "
                               f"`p2psched keygen --gossip -o {path}` or run with --insecure for a test") from None
        return cls(parse_keys(text, str(path)), cluster_name, replay_window)

    def seal(self, now: float, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        body = struct.pack(">Q", int(now * 1000)) + plaintext
        return bytes([_SEALED]) + nonce + self._aeads[0].encrypt(nonce, body, self._aad)

    def open(self, now: float, data: bytes) -> bytes:
        if not data:
            raise OpenError("short")
        if data[0] != _SEALED:
            raise OpenError("unencrypted" if data[0] == _PLAIN else "version")
        if len(data) < SEALED_OVERHEAD:
            raise OpenError("short")
        nonce, ct = data[1:13], data[13:]
        for aead in self._aeads:
            try:
                body = aead.decrypt(nonce, ct, self._aad)
                break
            except self._invalid_tag:
                continue
        else:
            raise OpenError("auth")  # wrong key, or another cluster's name
        (ts_ms,) = struct.unpack(">Q", body[:8])
        if abs(ts_ms / 1000 - now) > self.window:
            raise OpenError("stale")
        seen = self._seen
        if nonce in seen:
            raise OpenError("replay")
        while seen:
            oldest, expiry = next(iter(seen.items()))
            if expiry > now and len(seen) < _MAX_REMEMBERED:
                break
            seen.popitem(last=False)
        # Remember until no timestamp it could carry is still inside the window.
        seen[nonce] = now + 2 * self.window
        return body[8:]


def sealer_for(key_file: Path | None, insecure: bool, cluster_name: str, replay_window: float) -> Sealer:
    if insecure:
        return PlainSealer(cluster_name)
    if key_file is None:
        raise KeyringError("gossip encryption needs a key file: create one with `p2psched keygen --gossip -o "
                           "gossip.key` and pass --gossip-key gossip.key to every agent, or run with --insecure "
                           "on a trusted test network")
    return Keyring.load(key_file, cluster_name, replay_window)
