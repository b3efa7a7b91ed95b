"""Who is in the project-wide holdout (the global control group).

Like a split's variant, membership is a pure function, here of the project's salt and the user
id: every journey, runtime and report agrees on it without storing it first, and it does not
depend on the journey, the run or any experiment the user is in.
"""

from __future__ import annotations

import hashlib

from nurture.language.ir import Holdout

BUCKETS = 10_000
"""Users are spread over this many buckets, so a share is drawn in steps of 0.01%."""


def in_holdout(user_id: str, holdout: Holdout | None) -> bool:
    """Whether ``user_id`` is held out: the first 8 bytes of ``sha256("<salt>:<user id>")``, as a
    big-endian integer, modulo 10,000 fall below ``percent`` × 100."""
    if holdout is None:
        return False
    digest = hashlib.sha256(f"{holdout.salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS < round(holdout.percent * 100)
