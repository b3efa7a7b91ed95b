"""How many SMS segments a text needs, and in which encoding.

An SMS carries 140 octets. Text written entirely in the GSM 7-bit default alphabet (3GPP TS 23.038:
the basic character set plus its extension table, whose characters take an escape septet and so
count twice) is sent as GSM-7: 160 septets in a single message. Any other character switches the
whole message to UCS-2, counted in UTF-16 code units (an emoji outside the Basic Multilingual
Plane takes two): 70 in a single message. A longer text is split into concatenated segments,
each of which loses 6 octets to the header that joins them: 153 septets or 67 code units per
segment. Carriers bill per segment, so this is the number a marketer needs to see.

:func:`minimum_text` and :func:`minimum_info` apply the count to a parsed Jinja template, for
compile-time warnings: the fewest segments any rendering of it can need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from jinja2 import nodes

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"  # 0x1B, the escape to the extension table, is not a character
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
"""The GSM 7-bit default alphabet: one septet each."""

GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
"""The extension table: an escape septet plus one, so two septets each."""

Encoding = Literal["GSM-7", "UCS-2"]

_LIMITS: dict[Encoding, tuple[int, int]] = {"GSM-7": (160, 153), "UCS-2": (70, 67)}
"""Units in a single message, and per segment of a concatenated one."""


@dataclass(frozen=True)
class SmsInfo:
    """The encoding and the segment count of one SMS text."""

    encoding: Encoding
    """``GSM-7`` when every character is in the GSM alphabet, else ``UCS-2``."""
    characters: int
    """Length in the encoding's units: septets for GSM-7, UTF-16 code units for UCS-2."""
    segments: int
    """Messages the carrier sends (and bills); 1 for an empty text."""
    per_segment: int
    """Units one segment holds: 160 or 70 alone, 153 or 67 when concatenated."""

    @property
    def capacity(self) -> int:
        """Units the segments could hold together."""
        return self.segments * self.per_segment

    def describe(self) -> str:
        """E.g. ``GSM-7, 2 segments (187/306 characters)``."""
        plural = "" if self.segments == 1 else "s"
        return f"{self.encoding}, {self.segments} segment{plural} ({self.characters}/{self.capacity} characters)"


def is_gsm7(text: str) -> bool:
    """Whether the text can be sent as GSM-7."""
    return all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text)


def non_gsm7(text: str) -> list[str]:
    """The distinct characters that force UCS-2, in order of first appearance."""
    return list(dict.fromkeys(c for c in text if c not in GSM7_BASIC and c not in GSM7_EXTENSION))


def sms_info(text: str) -> SmsInfo:
    """Encoding and segments of ``text`` as sent."""
    encoding: Encoding
    if is_gsm7(text):
        encoding = "GSM-7"
        units = [2 if char in GSM7_EXTENSION else 1 for char in text]
    else:
        encoding = "UCS-2"
        units = [2 if ord(char) > 0xFFFF else 1 for char in text]
    single, per_segment = _LIMITS[encoding]
    total = sum(units)
    if total <= single:
        return SmsInfo(encoding, total, 1, single)
    return SmsInfo(encoding, total, _pack(units, per_segment), per_segment)


def _pack(units: Iterable[int], per_segment: int) -> int:
    """Segments needed when no character is split between two of them.

    An escape septet and the character after it, or the two halves of a surrogate pair, must
    arrive in the same segment, so a segment may end one unit short: 152 plain septets and a '€'
    do not fit in 153.
    """
    segments, used = 1, 0
    for size in units:
        if used + size > per_segment:
            segments, used = segments + 1, 0
        used += size
    return segments


def minimum_info(ast: nodes.Template) -> SmsInfo:
    """The fewest segments any rendering of a parsed SMS template can need."""
    return sms_info(minimum_text(ast))


def minimum_text(ast: nodes.Template) -> str:
    """A rendering of a parsed SMS template that needs the fewest segments any rendering can.

    Every ``{{ }}`` renders as nothing (a trait may be empty), an ``if`` takes its shortest branch
    and a ``for`` loop its shorter outcome: the body once or the ``else`` (nothing without one).
    Whatever a recipient's data, the message is at least this long. Which branch is shortest
    depends on the encoding (a branch with one Chinese character makes the whole text UCS-2), so
    two renderings are built, one keeping GSM-7 when it can and one with the fewest characters,
    and the one needing fewer segments is the answer.
    """
    texts = [_shortest(ast.body, key).strip() for key in (_gsm7_first, _utf16_length)]
    return min(texts, key=lambda text: (sms_info(text).segments, sms_info(text).characters))


def _gsm7_first(text: str) -> tuple[bool, int]:
    return (not is_gsm7(text), len(text))


def _utf16_length(text: str) -> tuple[bool, int]:
    return (False, len(text.encode("utf-16-le")) // 2)


def _shortest(body: list[nodes.Node], key: Callable[[str], tuple[bool, int]]) -> str:
    """The shortest text ``body`` can render, by ``key``."""
    parts: list[str] = []
    for node in body:
        if isinstance(node, nodes.Output):
            # Literal text only: an expression may render as nothing.
            parts.extend(child.data for child in node.nodes if isinstance(child, nodes.TemplateData))
        elif isinstance(node, nodes.If):
            branches = [node.body, *(arm.body for arm in node.elif_), node.else_]
            parts.append(min((_shortest(branch, key) for branch in branches), key=key))
        elif isinstance(node, nodes.For):
            parts.append(min(_shortest(node.body, key), _shortest(node.else_, key), key=key))
        elif isinstance(node, (nodes.With, nodes.Scope, nodes.Block)):
            parts.append(_shortest(node.body, key))
        # Anything else (set, macro, call and filter blocks) counts as nothing: a filter block
        # could truncate its text, and the estimate must never exceed a real rendering.
    return "".join(parts)
