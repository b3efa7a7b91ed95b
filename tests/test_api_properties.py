"""Property-based: Schemathesis generates calls from the API's own ``/openapi.json`` (valid and
invalid), sends them to the served API on SQLite with a real Temporal dev server, and checks that
no input gets a 5xx and that every answer has a documented status code, content type, headers and
body schema. Each operation is called with a key of the kind it documents.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import uvicorn_thread

from nurture.service.api import create_app
from nurture.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 25
"""Generated calls per operation and mode: enough to find what schemathesis found, well under a minute."""
KEYS = {
    "WriteKey": "props-write-key-0123",
    "ReadKey": "props-read-key-0123",
    "AdminKey": "props-admin-key-0123",
}


@pytest.fixture(scope="module")
def api_schema(dev_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseSchema]:
    """The API as ``nurture up`` serves it, with every webhook configured (unconfigured, they
    answer 503 by design), and its schema as served."""
    sendgrid = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = sendgrid.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    app_settings = Settings(
        write_keys=(KEYS["WriteKey"],),
        read_keys=(KEYS["ReadKey"],),
        admin_keys=(KEYS["AdminKey"],),
        temporal_address=dev_server,
        task_queue="test-api-properties",
        database=f"sqlite:///{tmp_path_factory.mktemp('properties') / 'nurture.db'}",
        journeys=ROOT / "journeys",
        templates=ROOT / "templates",
        public_url="https://nurture.example.com",
        secret="properties-secret-0123456789",
        twilio_auth_token="properties-twilio-token",
        sendgrid_webhook_public_key=base64.b64encode(der).decode(),
        wechat_token="properties-wechat-token",
    )
    with uvicorn_thread(create_app(app_settings)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        # Every call carries the operation's key (``key_for``), which replaces any Authorization
        # the generator draws: a drawn (or mutated) security header would only make a valid call
        # look like an invalid one.
        schema.config.generation.update(with_security_parameters=False)
        yield schema


def key_for(operation: APIOperation) -> dict[str, str]:
    """The key of the first kind the operation documents (webhooks document none)."""
    for requirement in operation.definition.raw.get("security", []):
        for name in requirement:
            if name in KEYS:
                return {"Authorization": f"Bearer {KEYS[name]}"}
    return {}


def operations(schema: BaseSchema) -> list[APIOperation]:
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(operation: APIOperation, strategy: st.SearchStrategy[Case]) -> None:
    """Send ``EXAMPLES`` calls drawn from ``strategy``, with the operation's key, and check each answer."""
    headers = key_for(operation)

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Case) -> None:
        # Some schema-valid calls are refused on purpose, by rules JSON Schema cannot state (an
        # opt-out name must be a channel or topic; no NUL in any string; 64-bit integers), each
        # with a documented 400: so a 400 for a valid-looking call is no failure here.
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_generated_call_is_answered_as_documented(api_schema: BaseSchema, mode: GenerationMode) -> None:
    failures: dict[str, str] = {}
    for operation in operations(api_schema):
        strategy = operation.as_strategy(generation_mode=mode)
        if mode is GenerationMode.POSITIVE:  # the documented examples too
            strategy = st.one_of(*api_schema.get_strategies_from_examples(operation), strategy)
        try:
            fuzz(operation, strategy)
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, operation.label  # nothing there to make invalid
        except (Exception, BaseExceptionGroup) as exc:  # every operation is tried; each failure named
            failures[operation.label] = str(exc)
    assert not failures, "\n\n".join(f"{label}:\n{failure}" for label, failure in failures.items())
