"""Unsubscribe links: round trips, opaque tokens, old signed links still accepted, and every kind
of tampering refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
from support import link_payload, v1_link_token

from nurture.delivery.links import InvalidLink, UnsubscribeLinks, UnsubscribeTarget
from nurture.service.settings import Settings, SettingsError

SECRET = "links-secret-0123456789abcdef"
LINKS = UnsubscribeLinks(secret=SECRET, public_url="https://nurture.example.com/")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sealed(payload: bytes) -> str:
    """``payload`` encrypted with LINKS' key, as a token: well made, whatever it says."""
    return b64(LINKS._cipher.encrypt(payload, [b"nurture/unsubscribe-link/v2"]))


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


def test_a_link_reveals_nothing_about_whom_it_is_for() -> None:
    """The link is read by mail scanners, proxies and logs: the user id must not be in it."""
    user = "pii.person@example.com"
    for topic in (None, "promotions"):
        token = LINKS.token(user, "email", topic)
        readable = [token, *(unb64(part).decode("latin-1") for part in token.split("."))]
        for text in readable:
            for secret in ("pii", "person", "example", '"u"', "email", "promotions"):
                assert secret not in text, (secret, token)
        assert LINKS.verify(token) == UnsubscribeTarget(user, "email", topic)


@pytest.mark.parametrize("topic", [None, "promotions"])
def test_links_sent_before_encryption_still_work(topic: str | None) -> None:
    fields = {"u": "li@example.com", "c": "sms"} | ({"t": topic} if topic else {})
    old = v1_link_token(SECRET, link_payload(**fields))

    assert LINKS.verify(old) == UnsubscribeTarget("li@example.com", "sms", topic)
    with pytest.raises(InvalidLink):
        LINKS.verify(v1_link_token("another-secret-0123456789", link_payload(**fields)))


def test_a_changed_payload_is_refused() -> None:
    payload, signature = v1_link_token(SECRET, link_payload(u="u-1", c="email")).split(".")
    forged = b64(link_payload(u="u-2", c="email"))
    assert forged != payload
    with pytest.raises(InvalidLink):
        LINKS.verify(f"{forged}.{signature}")
    token = bytearray(unb64(LINKS.token("u-1", "email")))
    for at in (0, 16, len(token) - 1):  # the synthetic IV, and the ciphertext's first and last bytes
        changed = bytearray(token)
        changed[at] ^= 0x01
        with pytest.raises(InvalidLink):
            LINKS.verify(b64(bytes(changed)))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],  # truncated
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # one character changed
        lambda t: t[:20],
        lambda t: t + ".x",
        lambda t: t[:10] + "." + t[10:],
        lambda t: t + "=",  # padding
        lambda t: t.replace("-", "+").replace("_", "/") + "+/",  # the standard alphabet
        lambda t: " " + t,
        lambda t: "",
        lambda t: ".",
        lambda t: t + "A" * 4000,
        lambda t: v1_link_token(SECRET, link_payload(u="u-1", c="email"))[:-1],
        lambda t: v1_link_token(SECRET, link_payload(u="u-1", c="email")).replace(".", ""),
        lambda t: v1_link_token(SECRET, link_payload(u="u-1", c="email")).split(".")[0] + "." + "A" * 4000,
    ],
)
def test_a_mangled_token_is_refused(mangle: Callable[[str], str]) -> None:
    token = LINKS.token("u-1", "email", "news")
    with pytest.raises(InvalidLink):
        LINKS.verify(mangle(token))


def test_a_non_canonical_encoding_is_refused() -> None:
    """Unused bits in the last character would make a second spelling of a valid token."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    payload, signature = v1_link_token(SECRET, link_payload(u="u-1", c="email")).split(".")
    token = LINKS.token("u-12", "email")  # 40 bytes: 54 characters, the last with 4 unused bits
    for prefix, text in ((f"{payload}.", signature), ("", token)):
        last = alphabet.index(text[-1])
        assert last & 0b11 == 0
        twin = text[:-1] + alphabet[last | 0b01]
        assert unb64(twin) == unb64(text)
        with pytest.raises(InvalidLink):
            LINKS.verify(prefix + twin)


def test_a_payload_of_the_wrong_shape_is_refused() -> None:
    """Even correctly encrypted or signed, only the fields a link carries are accepted."""
    for fields in (
        {"u": "u-1"},
        {"u": "u-1", "c": "fax"},
        {"u": "", "c": "email"},
        {"u": "u", "c": "email", "x": 1},
        {"u": 7, "c": "email"},
        {"u": "u", "c": "email", "t": ["a"]},
    ):
        payload = json.dumps(fields).encode()
        for token in (sealed(payload), v1_link_token(SECRET, payload)):
            with pytest.raises(InvalidLink):
                LINKS.verify(token)
    for token in (sealed(b"not json"), v1_link_token(SECRET, b"not json"), sealed(b"")):
        with pytest.raises(InvalidLink):
            LINKS.verify(token)


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
