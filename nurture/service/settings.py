"""Service settings, from the environment only (secrets never come from files in the repo).

One object serves the worker, the event API and ``nurture up``; each reads what it needs and
fails fast, naming the variable, when a value it needs is missing or malformed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client, TLSConfig
from temporalio.runtime import Runtime

from nurture.delivery.links import UnsubscribeLinks
from nurture.storage.db import THREADS, Database, Pool, database_url

log = logging.getLogger("nurture.settings")

MIN_SECRET = 16
"""Characters ``NURTURE_SECRET`` needs at least: a short secret makes links guessable."""


class SettingsError(SystemExit):
    """A missing or malformed setting; the message names the variable."""


def _keys(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in env.get(name, "").split(",") if key.strip())


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise SettingsError(f"{name} must be a whole number of connections, got {raw!r}")
    return int(raw)


def _tls(env: Mapping[str, str], implied: bool) -> bool:
    """``TEMPORAL_TLS``: on when set to 1/true/yes, off when set to 0/false/no, else ``implied``."""
    raw = env.get("TEMPORAL_TLS", "").strip().lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    if raw:
        raise SettingsError(f"TEMPORAL_TLS must be 1 or 0, got {raw!r}")
    return implied


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the running service is configured with."""

    temporal_address: str = "localhost:7233"
    """``TEMPORAL_ADDRESS``: the Temporal frontend, host:port."""
    namespace: str = "default"
    """``TEMPORAL_NAMESPACE``."""
    task_queue: str = "nurture"
    """``NURTURE_TASK_QUEUE``: the queue journey workflows run on."""
    tls: bool = False
    """``TEMPORAL_TLS=1`` (implied by any TLS file below): connect with TLS."""
    tls_cert: Path | None = None
    """``TEMPORAL_TLS_CERT``: client certificate (PEM) for mTLS, with ``TEMPORAL_TLS_KEY``."""
    tls_key: Path | None = None
    """``TEMPORAL_TLS_KEY``: the client certificate's private key (PEM)."""
    tls_ca: Path | None = None
    """``TEMPORAL_TLS_CA``: CA bundle that signs the server's certificate."""
    tls_server_name: str = ""
    """``TEMPORAL_TLS_SERVER_NAME``: the name the server's certificate is checked against, when it
    is not the host in ``TEMPORAL_ADDRESS`` (a cluster reached through a private address)."""
    api_key: str = field(default="", repr=False)
    """``TEMPORAL_API_KEY``: an API key (Temporal Cloud), sent with every call; implies TLS unless
    ``TEMPORAL_TLS=0``."""
    home: Path = Path(".nurture")
    """``NURTURE_HOME``: local state (SQLite database, dev server data, logs)."""
    database: str = ""
    """``DATABASE_URL`` (default: SQLite in ``NURTURE_HOME``)."""
    db_pool: Pool = field(default_factory=Pool)
    """``NURTURE_DB_POOL_SIZE`` and ``NURTURE_DB_MAX_OVERFLOW``: PostgreSQL connections each process
    keeps open, and may open beyond those under a burst."""
    journeys: Path = Path("journeys")
    """``NURTURE_JOURNEYS``: directory of journey files."""
    templates: Path = Path("templates")
    """``NURTURE_TEMPLATES``: directory of templates."""
    audiences: Path | None = None
    """``NURTURE_AUDIENCES``: directory of audience files (default: ``audiences`` beside the journeys)."""
    broadcasts: Path | None = None
    """``NURTURE_BROADCASTS``: directory of broadcast files (default: ``broadcasts`` beside the journeys)."""
    config: Path | None = None
    """``NURTURE_CONFIG``: the project file (default: ``nurture.yaml`` beside the journeys directory)."""
    write_keys: tuple[str, ...] = field(default=(), repr=False)
    """``NURTURE_WRITE_KEYS``: comma-separated keys that send events to the API."""
    read_keys: tuple[str, ...] = field(default=(), repr=False)
    """``NURTURE_READ_KEYS``: comma-separated keys that read profiles, runs, messages and the outbox."""
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    """``NURTURE_ADMIN_KEYS``: comma-separated keys that read, export and forget users."""
    metrics_port: int | None = None
    """``NURTURE_METRICS_PORT``: where the worker serves Prometheus metrics (unset: off)."""
    public_url: str = ""
    """``NURTURE_PUBLIC_URL``: the API's address as the outside world sees it (no trailing slash)."""
    secret: str = field(default="", repr=False)
    """``NURTURE_SECRET``: signs unsubscribe links (at least 16 characters)."""
    twilio_auth_token: str = field(default="", repr=False)
    """``TWILIO_AUTH_TOKEN``: checks the signature of Twilio's webhooks."""
    sendgrid_webhook_public_key: str = field(default="", repr=False)
    """``SENDGRID_WEBHOOK_PUBLIC_KEY``: checks the signature of SendGrid's Event Webhook."""
    wechat_token: str = field(default="", repr=False)
    """``WECHAT_TOKEN``: the Official Account's server-configuration Token, which signs its pushes."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        cert, key, ca = path("TEMPORAL_TLS_CERT"), path("TEMPORAL_TLS_KEY"), path("TEMPORAL_TLS_CA")
        if bool(cert) != bool(key):
            raise SettingsError("TEMPORAL_TLS_CERT and TEMPORAL_TLS_KEY go together: set both or neither")
        server_name = env.get("TEMPORAL_TLS_SERVER_NAME", "").strip()
        api_key = env.get("TEMPORAL_API_KEY", "").strip()
        tls = _tls(env, implied=bool(cert or ca or server_name or api_key))
        if not tls and (cert or ca or server_name):
            raise SettingsError(
                "TEMPORAL_TLS=0 contradicts TEMPORAL_TLS_CERT, TEMPORAL_TLS_CA and TEMPORAL_TLS_SERVER_NAME"
            )
        metrics = env.get("NURTURE_METRICS_PORT", "").strip()
        if metrics and not metrics.isdigit():
            raise SettingsError(f"NURTURE_METRICS_PORT must be a port number, got {metrics!r}")
        home = Path(env.get("NURTURE_HOME", ".nurture"))
        public_url = env.get("NURTURE_PUBLIC_URL", "").strip().rstrip("/")
        if public_url and not public_url.startswith(("https://", "http://")):
            raise SettingsError(f"NURTURE_PUBLIC_URL must start with https:// (or http://), got {public_url!r}")
        secret = env.get("NURTURE_SECRET", "").strip()
        if secret and len(secret) < MIN_SECRET:
            raise SettingsError(
                f"NURTURE_SECRET must be at least {MIN_SECRET} characters "
                "(e.g. $(python -c 'import secrets; print(secrets.token_urlsafe(32))'))"
            )
        return cls(
            temporal_address=env.get("TEMPORAL_ADDRESS", cls.temporal_address),
            namespace=env.get("TEMPORAL_NAMESPACE", cls.namespace),
            task_queue=env.get("NURTURE_TASK_QUEUE", cls.task_queue),
            tls=tls,
            tls_cert=cert,
            tls_key=key,
            tls_ca=ca,
            tls_server_name=server_name,
            api_key=api_key,
            home=home,
            database=database_url(env, home),
            db_pool=Pool(
                size=_count(env, "NURTURE_DB_POOL_SIZE", Pool.size),
                overflow=_count(env, "NURTURE_DB_MAX_OVERFLOW", Pool.overflow),
            ),
            journeys=Path(env.get("NURTURE_JOURNEYS", "journeys")),
            templates=Path(env.get("NURTURE_TEMPLATES", "templates")),
            audiences=path("NURTURE_AUDIENCES"),
            broadcasts=path("NURTURE_BROADCASTS"),
            config=path("NURTURE_CONFIG"),
            write_keys=_keys(env, "NURTURE_WRITE_KEYS"),
            read_keys=_keys(env, "NURTURE_READ_KEYS"),
            admin_keys=_keys(env, "NURTURE_ADMIN_KEYS"),
            metrics_port=int(metrics) if metrics else None,
            public_url=public_url,
            secret=secret,
            twilio_auth_token=env.get("TWILIO_AUTH_TOKEN", "").strip(),
            sendgrid_webhook_public_key=env.get("SENDGRID_WEBHOOK_PUBLIC_KEY", "").strip(),
            wechat_token=env.get("WECHAT_TOKEN", "").strip(),
        )

    def require_write_keys(self) -> tuple[str, ...]:
        """The API's keys; refusing to serve an unauthenticated API."""
        if not self.write_keys:
            raise SettingsError(
                "NURTURE_WRITE_KEYS is not set: the event API needs at least one write key "
                "(e.g. NURTURE_WRITE_KEYS=$(python -c 'import secrets; print(secrets.token_urlsafe(24))'))"
            )
        return self.write_keys

    def unsubscribe_links(self) -> UnsubscribeLinks | None:
        """Signed unsubscribe links, when ``NURTURE_SECRET`` and ``NURTURE_PUBLIC_URL`` are both set."""
        if not self.secret or not self.public_url:
            return None
        return UnsubscribeLinks(secret=self.secret, public_url=self.public_url)

    def tls_config(self) -> TLSConfig | bool:
        if not self.tls:
            return False
        return TLSConfig(
            server_root_ca_cert=self.tls_ca.read_bytes() if self.tls_ca else None,
            client_cert=self.tls_cert.read_bytes() if self.tls_cert else None,
            client_private_key=self.tls_key.read_bytes() if self.tls_key else None,
            domain=self.tls_server_name or None,
        )

    async def connect(self, runtime: Runtime | None = None) -> Client:
        """A Temporal client for these settings (on ``runtime``, else the SDK's default)."""
        return await Client.connect(
            self.temporal_address,
            namespace=self.namespace,
            tls=self.tls_config(),
            api_key=self.api_key or None,
            runtime=runtime,
        )

    def open_database(self) -> Database:
        """An engine on ``DATABASE_URL`` with this process's connection pool (logging
        :meth:`pool_advice`, if any)."""
        advice = self.pool_advice()
        if advice is not None:
            log.warning("%s", advice)
        return Database(self.database, pool=self.db_pool)

    def pool_advice(self) -> str | None:
        """A warning for the log when ``NURTURE_DB_POOL_SIZE`` keeps fewer PostgreSQL connections
        than the process has threads for database work: under load it would open and close the
        rest for much of its work."""
        if self.database.startswith("sqlite") or self.db_pool.size >= THREADS:
            return None
        return (
            f"NURTURE_DB_POOL_SIZE={self.db_pool.size} keeps fewer connections than the {THREADS} threads "
            "this process runs database work on: under load it opens and closes a connection for much of "
            f"the work beyond {self.db_pool.size}, a new PostgreSQL backend each time (default: {THREADS})"
        )
