"""Signed unsubscribe links: round trips, and every kind of tampering refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest

from nurture.delivery.links import InvalidLink, UnsubscribeLinks, UnsubscribeTarget
from nurture.service.settings import Settings, SettingsError

SECRET = "links-secret-0123456789abcdef"
LINKS = UnsubscribeLinks(secret=SECRET, public_url="https://nurture.example.com/")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("user_id", "channel", "topic"),
    [
        ("u-1", "email", None),
        ("li@example.com", "sms", "weekly digest"),
        ("用户 42/../?#", "wechat", ""),
    ],
)
def test_a_link_names_its_user_channel_and_topic(user_id: str, channel: str, topic: str | None) -> None:
    url = LINKS.url(user_id, channel, topic)

    prefix = "https://nurture.example.com/u/"
    assert url.startswith(prefix)
    token = url.removeprefix(prefix)
    assert "/" not in token and "?" not in token and "=" not in token
    assert LINKS.verify(token) == UnsubscribeTarget(user_id, channel, topic)


def test_links_never_expire_and_are_stable() -> None:
    """The same link every time, so an old email's link is the one we still accept."""
    assert LINKS.token("u-1", "email") == LINKS.token("u-1", "email")
    assert LINKS.token("u-1", "email") != LINKS.token("u-2", "email")
    assert LINKS.token("u-1", "email") != LINKS.token("u-1", "email", "news")


def test_another_secret_does_not_verify() -> None:
    other = UnsubscribeLinks(secret="another-secret-0123456789", public_url="https://x.example")
    with pytest.raises(InvalidLink):
        other.verify(LINKS.token("u-1", "email"))


def test_a_changed_payload_is_refused() -> None:
    payload, signature = LINKS.token("u-1", "email").split(".")
    forged = b64(json.dumps({"u": "u-2", "c": "email"}, separators=(",", ":")).encode())
    assert forged != payload
    with pytest.raises(InvalidLink):
        LINKS.verify(f"{forged}.{signature}")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],  # truncated signature
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # one character changed
        lambda t: t.replace(".", ""),
        lambda t: t + ".x",
        lambda t: t + "=",  # padding
        lambda t: t.replace("-", "+").replace("_", "/") + "+/",  # the standard alphabet
        lambda t: " " + t,
        lambda t: "",
        lambda t: ".",
        lambda t: t.split(".")[0] + "." + "A" * 4000,
    ],
)
def test_a_mangled_token_is_refused(mangle: Callable[[str], str]) -> None:
    token = LINKS.token("u-1", "email", "news")
    with pytest.raises(InvalidLink):
        LINKS.verify(mangle(token))


def test_a_non_canonical_encoding_is_refused() -> None:
    """Unused bits in the last character would make a second spelling of a valid signature."""
    payload, signature = LINKS.token("u-1", "email").split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    # 32 bytes are 43 characters: the last one carries 4 bits, its 2 low bits are unused.
    assert last & 0b11 == 0
    twin = signature[:-1] + alphabet[last | 0b01]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(signature + "=")
    with pytest.raises(InvalidLink):
        LINKS.verify(f"{payload}.{twin}")


def test_a_signed_payload_of_the_wrong_shape_is_refused() -> None:
    """Even correctly signed, only the fields a link carries are accepted."""
    sign = LINKS._sign
    for fields in (
        {"u": "u-1"},
        {"u": "u-1", "c": "fax"},
        {"u": "", "c": "email"},
        {"u": "u", "c": "email", "x": 1},
    ):
        payload = json.dumps(fields).encode()
        with pytest.raises(InvalidLink):
            LINKS.verify(f"{b64(payload)}.{b64(sign(payload))}")
    payload = b"not json"
    with pytest.raises(InvalidLink):
        LINKS.verify(f"{b64(payload)}.{b64(sign(payload))}")


def test_links_refuse_unknown_channels_and_empty_users() -> None:
    with pytest.raises(ValueError, match="channel"):
        LINKS.url("u-1", "fax")
    with pytest.raises(ValueError, match="user_id"):
        LINKS.url("", "email")
    with pytest.raises(ValueError, match="secret"):
        UnsubscribeLinks(secret="", public_url="https://x.example")


def test_settings_make_links_only_with_a_secret_and_a_public_url() -> None:
    env = {"NURTURE_SECRET": SECRET, "NURTURE_PUBLIC_URL": "https://hooks.example.com/nurture/"}
    settings = Settings.from_env(env)

    assert settings.public_url == "https://hooks.example.com/nurture"
    links = settings.unsubscribe_links()
    assert links is not None
    assert links.url("u-1", "email").startswith("https://hooks.example.com/nurture/u/")
    assert Settings.from_env({"NURTURE_SECRET": SECRET}).unsubscribe_links() is None
    assert Settings.from_env({"NURTURE_PUBLIC_URL": "https://x.example"}).unsubscribe_links() is None


def test_settings_keep_secrets_out_of_their_repr() -> None:
    settings = Settings.from_env(
        {
            "NURTURE_SECRET": SECRET,
            "TWILIO_AUTH_TOKEN": "twilio-token-xyz",
            "NURTURE_PUBLIC_URL": "https://x.example",
        }
    )
    assert settings.twilio_auth_token == "twilio-token-xyz"
    assert SECRET not in repr(settings) and "twilio-token-xyz" not in repr(settings)
    assert "https://x.example" in repr(settings)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"NURTURE_SECRET": "short"}, "NURTURE_SECRET"),
        ({"NURTURE_PUBLIC_URL": "nurture.example.com"}, "NURTURE_PUBLIC_URL"),
    ],
)
def test_settings_refuse_malformed_values(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)
