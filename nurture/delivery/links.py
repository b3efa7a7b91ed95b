"""Signed, opaque one-click unsubscribe links: ``{public_url}/u/{token}``.

A token is ``base64url(AES-SIV(key, payload))``, the payload being compact JSON with the user id,
the channel and an optional topic, and the key derived from ``NURTURE_SECRET`` (HKDF-SHA256). The
link reveals nothing about whom it is for (an email address used as a user id stays unreadable to
anyone holding the link, a log line or a mail scanner's report), and only the holder of the secret
can make one: AES-SIV authenticates what it encrypts, so any other token is refused. It is
deterministic, so a user's link for a channel (and topic) is the same in every message, and a
re-rendered message is the same message.

Links sent before tokens were encrypted (version 1: ``base64url(payload) + "." +
base64url(HMAC-SHA256(key, payload))``, readable) are still accepted, so the unsubscribe link in an
old email keeps working; no new ones are made.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nurture.language.ir import CHANNELS

TOKEN_LIMIT = 2048
"""Characters; longer tokens are refused before any work is done on them."""

_LABEL = b"nurture/unsubscribe-link/v2"
_LEGACY_LABEL = b"nurture/unsubscribe-link/v1"
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_DIGEST_SIZE = hashlib.sha256().digest_size


class InvalidLink(ValueError):
    """A token that was not made by these links (tampered, truncated or malformed)."""


@dataclass(frozen=True)
class UnsubscribeTarget:
    """Whom a link unsubscribes, from which channel and (optionally) topic."""

    user_id: str
    channel: str
    topic: str | None = None

    @property
    def opts_out_of(self) -> str:
        """The name the link adds to the user's opt-outs: its topic if it has one, else its channel."""
        return self.topic or self.channel


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    """Strict base64url without padding: other alphabets, padding and stray bits are refused."""
    if not _SEGMENT.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidLink("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidLink("not base64url") from None
    # Unused low bits in the last character would give one token several spellings.
    if _encode(data) != text:
        raise InvalidLink("not canonical base64url")
    return data


class UnsubscribeLinks:
    """Makes and checks unsubscribe links.

    Links never expire: an unsubscribe link in an email read months later must still work (and
    CAN-SPAM and RFC 8058 expect it to). Rotating ``NURTURE_SECRET`` invalidates every link sent.
    """

    def __init__(self, *, secret: str, public_url: str) -> None:
        if not secret:
            raise ValueError("unsubscribe links need a secret")
        # Keys of their own, so the same NURTURE_SECRET can sign other things without a token made
        # for one purpose ever being accepted for another. AES-SIV takes two AES-256 keys.
        self._cipher = AESSIV(HKDF(hashes.SHA256(), 64, salt=None, info=_LABEL).derive(secret.encode()))
        self._legacy_key = hmac.new(secret.encode(), _LEGACY_LABEL, hashlib.sha256).digest()
        self.public_url = public_url.rstrip("/")

    def token(self, user_id: str, channel: str, topic: str | None = None) -> str:
        """The encrypted token for ``user_id`` on ``channel`` (and ``topic``)."""
        if not user_id:
            raise ValueError("user_id is empty")
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")
        fields: dict[str, str] = {"u": user_id, "c": channel}
        if topic is not None:
            fields["t"] = topic
        payload = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
        return _encode(self._cipher.encrypt(payload, [_LABEL]))

    def url(self, user_id: str, channel: str, topic: str | None = None) -> str:
        """``{public_url}/u/{token}``."""
        return f"{self.public_url}/u/{self.token(user_id, channel, topic)}"

    def verify(self, token: str) -> UnsubscribeTarget:
        """Whom ``token`` unsubscribes; :class:`InvalidLink` unless it was made with this secret."""
        if len(token) > TOKEN_LIMIT:
            raise InvalidLink("malformed token")
        payload = self._legacy_payload(token) if "." in token else self._payload(token)
        # Made by us, so well formed unless the format changed: still checked, never trusted blindly.
        try:
            fields: Any = json.loads(payload)
        except ValueError:
            raise InvalidLink("bad payload") from None
        if not isinstance(fields, dict) or not {"u", "c"} <= fields.keys() <= {"u", "c", "t"}:
            raise InvalidLink("bad payload")
        user_id, channel, topic = fields["u"], fields["c"], fields.get("t")
        if not isinstance(user_id, str) or not user_id or channel not in CHANNELS:
            raise InvalidLink("bad payload")
        if topic is not None and not isinstance(topic, str):
            raise InvalidLink("bad payload")
        return UnsubscribeTarget(user_id, channel, topic)

    def _payload(self, token: str) -> bytes:
        sealed = _decode(token)
        try:
            return self._cipher.decrypt(sealed, [_LABEL])
        except (InvalidTag, ValueError):  # ValueError: shorter than the synthetic IV
            raise InvalidLink("bad token") from None

    def _legacy_payload(self, token: str) -> bytes:
        """A version 1 token's payload, if its signature is ours."""
        if token.count(".") != 1:
            raise InvalidLink("malformed token")
        payload_text, signature_text = token.split(".")
        payload, signature = _decode(payload_text), _decode(signature_text)
        expected = hmac.new(self._legacy_key, payload, hashlib.sha256).digest()
        if len(signature) != _DIGEST_SIZE or not hmac.compare_digest(signature, expected):
            raise InvalidLink("bad signature")
        return payload
