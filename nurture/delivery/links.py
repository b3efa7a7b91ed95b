"""Signed one-click unsubscribe links: ``{public_url}/u/{token}``.

A token is ``base64url(payload) + "." + base64url(HMAC-SHA256(key, payload))``, the payload being
compact JSON with the user id, the channel and an optional topic. Only the holder of
``NURTURE_SECRET`` can make one, so a link opts out exactly the user it was made for: out of its
topic when it names one (the user keeps the channel for other messages), else out of its channel.
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

from nurture.language.ir import CHANNELS

TOKEN_LIMIT = 2048
"""Characters; longer tokens are refused before any work is done on them."""

_KEY_LABEL = b"nurture/unsubscribe-link/v1"
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
    # Unused low bits in the last character would give one payload several spellings.
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
        # A key of its own, so the same NURTURE_SECRET can sign other things without a token made
        # for one purpose ever being accepted for another.
        self._key = hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()
        self.public_url = public_url.rstrip("/")

    def token(self, user_id: str, channel: str, topic: str | None = None) -> str:
        """The signed token for ``user_id`` on ``channel`` (and ``topic``)."""
        if not user_id:
            raise ValueError("user_id is empty")
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")
        fields: dict[str, str] = {"u": user_id, "c": channel}
        if topic is not None:
            fields["t"] = topic
        payload = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
        return f"{_encode(payload)}.{_encode(self._sign(payload))}"

    def url(self, user_id: str, channel: str, topic: str | None = None) -> str:
        """``{public_url}/u/{token}``."""
        return f"{self.public_url}/u/{self.token(user_id, channel, topic)}"

    def verify(self, token: str) -> UnsubscribeTarget:
        """Whom ``token`` unsubscribes; :class:`InvalidLink` unless it was made with this secret."""
        if len(token) > TOKEN_LIMIT or token.count(".") != 1:
            raise InvalidLink("malformed token")
        payload_text, signature_text = token.split(".")
        payload, signature = _decode(payload_text), _decode(signature_text)
        if len(signature) != _DIGEST_SIZE or not hmac.compare_digest(signature, self._sign(payload)):
            raise InvalidLink("bad signature")
        # Signed by us, so well formed unless the format changed: still checked, never trusted blindly.
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

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()
