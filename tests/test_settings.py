"""Connection settings for a deployment: Temporal over TLS and mTLS (through a TLS front to a real
dev server, as a self-hosted cluster's ingress or Temporal Cloud is reached), API keys, and the
database connection pool on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from conftest import POSTGRES
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import event, text
from support import fresh_postgres

from nurture.cli.up import TEMPORAL_CONNECTION, UpOptions, stack_settings
from nurture.service.settings import Settings, SettingsError
from nurture.storage.db import THREADS, Pool

SERVER_NAME = "temporal.nurture.internal"
"""The name on the TLS front's certificate: not the address dialled (127.0.0.1)."""


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey, *,
    ca: bool = False, dns: str | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA, the TLS front's certificate for :data:`SERVER_NAME`, and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nurture test CA")])
    ca = _issue("nurture test CA", ca_key, ca_name, ca_key, ca=True)
    files = {}
    for role, dns in (("server", SERVER_NAME), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"nurture test {role}", key, ca_name, ca_key, dns=dns)
        files[f"{role}_cert"] = folder / f"{role}.pem"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"] = folder / f"{role}-key.pem"
        files[f"{role}_key"].write_bytes(_key_pem(key))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(ca=folder / "ca.pem", **files)


@contextlib.asynccontextmanager
async def tls_front(pki: Pki, upstream: str, *, require_client_cert: bool) -> AsyncIterator[str]:
    """A TLS-terminating TCP front (HTTP/2, as gRPC needs) to the plain dev server; its address."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.set_alpn_protocols(["h2"])
    if require_client_cert:
        context.load_verify_locations(pki.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    host, port = upstream.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def tls_env(address: str, pki: Pki, **more: str) -> dict[str, str]:
    return {"TEMPORAL_ADDRESS": address, "TEMPORAL_TLS_CA": str(pki.ca), **more}


async def healthy(settings: Settings) -> bool:
    client = await asyncio.wait_for(settings.connect(), 30)
    return await client.service_client.check_health(timeout=dt.timedelta(seconds=10))


async def refused(settings: Settings) -> str:
    with pytest.raises((RuntimeError, TimeoutError)) as caught:
        await healthy(settings)
    return str(caught.value)


# -- Temporal: TLS, mTLS, server name, API key -----------------------------------------------------


async def test_mtls_with_a_private_ca_and_a_server_name_reaches_temporal(dev_server: str, pki: Pki) -> None:
    async with tls_front(pki, dev_server, require_client_cert=True) as front:
        client_files = {"TEMPORAL_TLS_CERT": str(pki.client_cert), "TEMPORAL_TLS_KEY": str(pki.client_key)}
        settings = Settings.from_env(tls_env(front, pki, TEMPORAL_TLS_SERVER_NAME=SERVER_NAME, **client_files))
        assert settings.tls and settings.tls_server_name == SERVER_NAME
        assert await healthy(settings)

        # Without a client certificate the front refuses the handshake.
        anonymous = Settings.from_env(tls_env(front, pki, TEMPORAL_TLS_SERVER_NAME=SERVER_NAME))
        assert await refused(anonymous)


async def test_tls_checks_the_certificate_against_the_server_name(dev_server: str, pki: Pki) -> None:
    async with tls_front(pki, dev_server, require_client_cert=False) as front:
        assert await healthy(Settings.from_env(tls_env(front, pki, TEMPORAL_TLS_SERVER_NAME=SERVER_NAME)))
        # Dialling 127.0.0.1 without the name: the certificate does not name 127.0.0.1.
        assert await refused(Settings.from_env(tls_env(front, pki)))


async def test_an_api_key_is_sent_and_implies_tls(dev_server: str) -> None:
    implied = Settings.from_env({"TEMPORAL_ADDRESS": dev_server, "TEMPORAL_API_KEY": " cloud-key "})
    assert implied.tls and implied.api_key == "cloud-key"
    assert "cloud-key" not in repr(implied)
    # The dev server speaks plain gRPC and ignores keys: with TLS turned off, the key still goes along.
    plain = Settings.from_env({"TEMPORAL_ADDRESS": dev_server, "TEMPORAL_API_KEY": "cloud-key", "TEMPORAL_TLS": "0"})
    client = await plain.connect()
    assert client.api_key == "cloud-key"
    assert await client.service_client.check_health()
    assert (await Settings.from_env({"TEMPORAL_ADDRESS": dev_server}).connect()).api_key is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TEMPORAL_TLS": "maybe"}, "TEMPORAL_TLS must be 1 or 0"),
        ({"TEMPORAL_TLS": "0", "TEMPORAL_TLS_CA": "ca.pem"}, "TEMPORAL_TLS=0 contradicts"),
        ({"TEMPORAL_TLS": "false", "TEMPORAL_TLS_SERVER_NAME": "t.example"}, "TEMPORAL_TLS=0 contradicts"),
        ({"TEMPORAL_TLS_CERT": "c.pem"}, "TEMPORAL_TLS_CERT and TEMPORAL_TLS_KEY go together"),
        ({"NURTURE_DB_POOL_SIZE": "ten"}, "NURTURE_DB_POOL_SIZE must be a whole number"),
        ({"NURTURE_DB_MAX_OVERFLOW": "-1"}, "NURTURE_DB_MAX_OVERFLOW must be a whole number"),
    ],
)
def test_contradictory_or_malformed_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_tls_is_off_by_default_and_on_when_a_file_or_name_asks_for_it() -> None:
    assert Settings.from_env({}).tls is False
    assert Settings.from_env({}).tls_config() is False
    assert Settings.from_env({"TEMPORAL_TLS": "1"}).tls is True
    assert Settings.from_env({"TEMPORAL_TLS_SERVER_NAME": "t.example"}).tls is True


def test_nurture_up_talks_plainly_to_its_own_dev_server(tmp_path: Path) -> None:
    remote = {name: "1" for name in TEMPORAL_CONNECTION} | {"TEMPORAL_API_KEY": "cloud-key"}
    settings = stack_settings(UpOptions(home=tmp_path), remote)
    assert (settings.tls, settings.api_key, settings.tls_server_name) == (False, "", "")
    assert settings.temporal_address == "127.0.0.1:7233"


# -- PostgreSQL: the connection pool ---------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with fresh_postgres() as url:
        yield url

def server_connections(url: str) -> int:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES) as admin:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


def test_the_pool_settings_bound_the_connections_a_process_opens(postgres_url: str) -> None:
    assert Settings.from_env({}).db_pool == Pool(size=THREADS, overflow=10)
    settings = Settings.from_env(
        {"DATABASE_URL": postgres_url, "NURTURE_DB_POOL_SIZE": "2", "NURTURE_DB_MAX_OVERFLOW": "1"}
    )
    assert settings.db_pool == Pool(size=2, overflow=1) and settings.db_pool.most == 3
    db = settings.open_database()
    try:
        with contextlib.ExitStack() as held:
            for _ in range(3):
                held.enter_context(db.engine.connect())
            assert server_connections(postgres_url) == 3
            assert db.engine.pool.checkedout() == 3  # type: ignore[attr-defined]
        # Back in the pool: the two it keeps stay open, the overflow one is closed.
        assert server_connections(postgres_url) == 2
    finally:
        db.dispose()


async def busy_threads(settings: Settings) -> int:
    """New server connections while every thread of the default executor runs short sessions at
    once, as the event API's calls do under load."""
    db = settings.open_database()
    opened = []
    event.listen(db.engine, "connect", lambda *_: opened.append(1))
    try:

        def sessions() -> None:
            for _ in range(20):
                with db.session() as session:  # held a moment, as a call's transaction is
                    session.execute(text("SELECT pg_sleep(0.003)"))
                time.sleep(0.003)  # then the call's other work: a start, the answer

        await asyncio.gather(*(asyncio.to_thread(sessions) for _ in range(THREADS)))
        return len(opened)
    finally:
        db.dispose()


async def test_the_default_pool_keeps_a_connection_for_every_thread_and_a_smaller_one_is_warned_of(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    kept = Settings.from_env({"DATABASE_URL": postgres_url})
    small = Settings.from_env({"DATABASE_URL": postgres_url, "NURTURE_DB_POOL_SIZE": "1"})
    assert kept.pool_advice() is None
    assert Settings.from_env({"NURTURE_DB_POOL_SIZE": "1"}).pool_advice() is None  # SQLite: no pool

    assert await busy_threads(kept) <= THREADS  # each opened once, then kept
    with caplog.at_level("WARNING", logger="nurture.settings"):
        opened = await busy_threads(small)

    assert opened > THREADS  # opened and closed again and again
    assert [r.getMessage() for r in caplog.records if r.name == "nurture.settings"] == [small.pool_advice()]
    assert f"NURTURE_DB_POOL_SIZE=1 keeps fewer connections than the {THREADS} threads" in str(small.pool_advice())
