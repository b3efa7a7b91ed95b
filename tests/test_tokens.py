"""Token stores: the in-memory one and the shared database one, alone and behind WeChat senders."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from channel_support import WECHAT_APP_ID as APP_ID
from channel_support import WECHAT_MESSAGE as MESSAGE
from channel_support import WECHAT_SECRET as SECRET
from channel_support import wechat_envelope as envelope
from support import rows
from wechat_server import WeChatServer

from channels.wechat import MemoryTokens, TokenStore, WeChatTemplate
from nurture.language.templates import RenderedMessage
from nurture.storage.db import Database
from nurture.storage.models import ProviderToken
from nurture.storage.tokens import DbTokens

NAME = "wechat:wx-test-app"
LATER = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture(params=["memory", "db"])
def store(request: pytest.FixtureRequest) -> TokenStore:
    if request.param == "memory":
        return MemoryTokens()
    return DbTokens(request.getfixturevalue("sqlite_db"))


async def test_missing_token_is_none(store: TokenStore) -> None:
    assert await store.get(NAME) is None


async def test_put_then_get_and_replace(store: TokenStore) -> None:
    await store.put(NAME, "first", LATER)
    assert await store.get(NAME) == ("first", LATER)

    await store.put(NAME, "second", LATER + timedelta(hours=2))
    assert await store.get(NAME) == ("second", LATER + timedelta(hours=2))
    assert await store.get("wechat:other") is None


async def test_expiry_comes_back_as_the_same_instant_in_utc(store: TokenStore) -> None:
    beijing = timezone(timedelta(hours=8))
    await store.put(NAME, "t", datetime(2030, 1, 1, 20, 0, tzinfo=beijing))

    stored = await store.get(NAME)

    assert stored is not None
    assert stored[1] == LATER
    assert stored[1].utcoffset() == timedelta(0)


async def test_discard_deletes_only_the_token_it_names(store: TokenStore) -> None:
    await store.put(NAME, "newer", LATER)

    await store.discard(NAME, "stale")
    assert await store.get(NAME) == ("newer", LATER)

    await store.discard(NAME, "newer")
    assert await store.get(NAME) is None
    await store.discard(NAME, "newer")  # discarding what is gone is fine
    assert await store.get(NAME) is None


async def test_db_tokens_on_both_engines(database: Database) -> None:
    tokens = DbTokens(database)
    await tokens.put(NAME, "a", LATER)
    await tokens.put(NAME, "b", LATER + timedelta(seconds=1))
    await tokens.discard(NAME, "a")

    assert await tokens.get(NAME) == ("b", LATER + timedelta(seconds=1))
    [row] = rows(database, ProviderToken)
    assert row.name == NAME and row.token == "b"
    await tokens.discard(NAME, "b")
    assert rows(database, ProviderToken) == []

    # Workers refreshing at the same moment: the upsert leaves one row, never a duplicate key.
    await asyncio.gather(*(tokens.put(NAME, f"t{i}", LATER) for i in range(8)))
    [row] = rows(database, ProviderToken)
    assert row.token in {f"t{i}" for i in range(8)}


@pytest.fixture
def server() -> Iterator[WeChatServer]:
    with WeChatServer(app_id=APP_ID, app_secret=SECRET, openids={"o-alice", "o-bob"}) as running:
        yield running


def two_workers(database: Database, server: WeChatServer) -> list[WeChatTemplate]:
    """Two senders as two workers would have them: separate instances, separate stores, one DB."""
    return [
        WeChatTemplate(app_id=APP_ID, app_secret=SECRET, tokens=DbTokens(database), base_url=server.url)
        for _ in range(2)
    ]


async def test_two_senders_sharing_the_database_fetch_the_token_once(
    database: Database, server: WeChatServer
) -> None:
    first, second = two_workers(database, server)
    try:
        await first.deliver(MESSAGE, envelope(key="run-1:s1"))
        await second.deliver(MESSAGE, envelope("o-bob", key="run-2:s1"))
        await asyncio.gather(
            *((first, second)[i % 2].deliver(MESSAGE, envelope(key=f"run-c{i}:s1")) for i in range(6))
        )
        assert server.token_requests == 1
        assert len(server.messages) == 8
        assert {message.token for message in server.messages} == {server.tokens[0]}
        [row] = rows(database, ProviderToken, name=NAME)
        assert row.token == server.tokens[0]

        # The token expires early (revoked, or refreshed elsewhere): one refresh serves both.
        server.expire_tokens()
        await first.deliver(MESSAGE, envelope(key="run-3:s1"))
        await second.deliver(MESSAGE, envelope("o-bob", key="run-4:s1"))
    finally:
        await first.aclose()
        await second.aclose()

    assert server.token_requests == 2
    assert len(server.messages) == 10
    assert [m.token for m in server.messages[-2:]] == [server.tokens[1], server.tokens[1]]
    assert rows(database, ProviderToken, name=NAME)[0].token == server.tokens[1]


async def test_a_refusal_of_an_old_token_keeps_the_newer_one(
    sqlite_db: Database, server: WeChatServer
) -> None:
    """A worker whose send was refused with an old token must not erase the new one another
    worker already stored: it discards by value, then picks up the newer token."""
    tokens = DbTokens(sqlite_db)
    async with WeChatTemplate(app_id=APP_ID, app_secret=SECRET, tokens=tokens, base_url=server.url) as sender:
        await sender.deliver(MESSAGE, envelope(key="run-1:s1"))
        old = server.tokens[0]
        server.expire_tokens()
        await sender.deliver(MESSAGE, envelope(key="run-2:s1"))  # stores the newer token
        newer = server.tokens[1]

        await tokens.discard(NAME, old)

        assert (await tokens.get(NAME) or ("",))[0] == newer
        bare = RenderedMessage(channel="wechat", template="t", locale=None, template_id="x", data={})
        await sender.deliver(bare, envelope(key="run-3:s1"))
    assert server.token_requests == 2
    assert server.messages[-1].token == newer
