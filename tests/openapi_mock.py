"""A loopback mock of a provider API that validates every request against the provider's OpenAPI spec.

Contract tests point the real provider SDK at :class:`OpenApiMock`. Each request is matched to an
operation of the spec, its credentials are checked against the spec's security schemes, and its
parameters and body are validated with ``openapi-core``; a request the spec does not allow gets a
4xx answer naming the violation, so an adapter that drifts from the provider's API fails its tests
instead of failing in production. Faults (429, 5xx, timeouts, dropped connections, an answer lost
after the request was accepted) and documented error bodies can be scripted for the next requests.

Created resources are remembered: the answer to a create describes the request (its fields, the
path's ids, the current time), and a ``GET`` of the same collection lists what was accepted there,
newest first and filtered by its query, so a client can look up a message whose answer it lost.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import uuid
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.paths.exceptions import OperationNotFound, PathError
from openapi_core.templating.paths.finders import APICallPathFinder
from openapi_core.validation.request.exceptions import SecurityValidationError
from openapi_core.validation.schemas.datatypes import FormatValidatorsDict
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from openapi_schema_validator import oas30_format_checker, oas31_format_checker
from werkzeug.datastructures import Headers, ImmutableMultiDict

__all__ = ["FAULTS", "OpenApiMock", "RecordedRequest", "provider_spec"]

FAULTS = ("429", "500", "503", "timeout", "drop", "accept_then_drop")
"""The kinds :meth:`OpenApiMock.fail_next` can inject."""

_KNOWN_FORMATS = frozenset(oas30_format_checker.checkers) | frozenset(oas31_format_checker.checkers)

_PAGING = frozenset({"PageSize", "Page", "PageToken"})
"""List query parameters that page rather than filter."""
_DEFAULT_PAGE_SIZE = 50

_JSON = "application/json"


def provider_spec(name: str) -> Path:
    """The provider spec ``name``: from ``$NURTURE_PROVIDER_SPECS``, else the copy in
    ``tests/specs``. Fails (never skips) when it is missing: the contract tests need it."""
    folder = os.environ.get("NURTURE_PROVIDER_SPECS")
    path = (Path(folder) if folder else Path(__file__).resolve().parent / "specs") / name
    if not path.is_file():
        raise FileNotFoundError(f"provider spec {path} is missing; set NURTURE_PROVIDER_SPECS to its folder")
    return path


@dataclass(frozen=True)
class RecordedRequest:
    """One request the mock received."""

    method: str
    """Upper-case HTTP method."""
    path: str
    """The path, without the query string."""
    query: dict[str, str | list[str]]
    """Query parameters; a repeated name maps to a list."""
    headers: dict[str, str]
    """Headers, names lower-cased."""
    body: Any
    """The parsed body: a dict for forms (repeated fields as lists), JSON, text, or ``None``."""
    raw_body: bytes = b""
    """The body as sent."""
    response_id: str | None = None
    """For accepted requests: the id the mock answered with (a ``sid`` or ``X-Message-Id``)."""
    response: Any = None
    """For accepted requests: the body the mock answered with (or would have, had the answer not
    been lost)."""
    fault: str | None = None
    """For faulted requests: the fault kind, or ``answer:<status>`` for :meth:`OpenApiMock.answer_next`;
    for accepted ones, ``accept_then_drop`` when the answer was never sent."""


@dataclass
class _Scripted:
    kind: str
    status: int = 0
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    reads: bool = False
    """For lookups (GET) instead of sends."""


class _SpecRequest:
    """A received request in the shape ``openapi-core`` validates (its ``Request`` protocol)."""

    def __init__(self, host_url: str, record: RecordedRequest) -> None:
        self.host_url = host_url
        self.path = record.path
        self.method = record.method.lower()
        self.body: bytes | None = record.raw_body or None
        self.content_type = record.headers.get("content-type", "").lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(_pairs(record.query)), header=Headers(list(record.headers.items()))
        )


@dataclass(frozen=True)
class _Operation:
    """The spec's operation a request matched, and the values of its path's variables."""

    spec: dict[str, Any]
    path_variables: dict[str, str]


@dataclass(frozen=True)
class _Spec:
    document: dict[str, Any]
    api: OpenAPI
    host_url: str
    lock: threading.Lock


_SPECS: dict[Path, _Spec] = {}
_SPECS_LOCK = threading.Lock()


def _load_spec(path: Path) -> _Spec:
    """The parsed and checked spec at ``path``, shared by every mock of it (parsing Twilio's takes ~1 s)."""
    path = path.resolve()
    with _SPECS_LOCK:
        spec = _SPECS.get(path)
        if spec is None:
            document = json.loads(path.read_text(encoding="utf-8"))
            servers = document.get("servers") or [{"url": "http://localhost"}]
            parts = urlsplit(servers[0]["url"])
            # Formats a provider names without defining (Twilio's phone-number, uri-map...):
            # openapi-core refuses a parameter whose format it does not know, so any string of
            # the parameter's schema type is taken, as the provider documents them as strings.
            custom: FormatValidatorsDict = {name: _is_text for name in _formats(document) - _KNOWN_FORMATS}
            config = Config(extra_format_validators=custom)
            spec = _Spec(
                document=document,
                api=OpenAPI.from_dict(document, config=config),
                # Requests are validated as if sent to the spec's first server, wherever the mock listens.
                host_url=f"{parts.scheme}://{parts.netloc}",
                lock=threading.Lock(),
            )
            _SPECS[path] = spec
        return spec


class OpenApiMock:
    """A threaded HTTP server on loopback answering as the API described by an OpenAPI document.

    Use as a context manager; ``url`` is its base URL. Every request is validated: ``accepted``
    holds those answered with a success generated from the spec (and those accepted whose answer
    was then held or lost), which the provider therefore has, ``reads`` the ``GET``/``HEAD``
    requests answered with a success (lookups change nothing, so they are kept apart),
    ``rejected`` the ``(request, violation)`` pairs answered 401/404/405/422, and ``faulted`` the
    valid requests that got a scripted fault or answer instead, which the provider does not have.
    """

    def __init__(self, spec_path: Path, *, port: int = 0, timeout_hold: float = 5.0) -> None:
        """``timeout_hold``: how long a ``timeout`` fault holds its request (longer than the
        client's timeout; the hold ends early when the mock stops)."""
        self.spec_path = spec_path
        self.port = port
        self.timeout_hold = timeout_hold
        self.accepted: list[RecordedRequest] = []
        self.reads: list[RecordedRequest] = []
        self.rejected: list[tuple[RecordedRequest, str]] = []
        self.faulted: list[RecordedRequest] = []
        self._spec = _load_spec(spec_path)
        self._finder = APICallPathFinder(self._spec.api.spec)
        self._script: deque[_Scripted] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self._server is None:
            raise RuntimeError("the mock is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OpenApiMock:
        """Listen and serve in a background thread."""
        mock = self

        class Handler(_Handler):
            owner = mock

        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release held requests, stop serving and close the socket."""
        self._stopping.set()
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> OpenApiMock:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def fail_next(self, kind: str, count: int = 1, *, reads: bool = False) -> None:
        """Fault the next ``count`` valid requests: ``429`` (with ``Retry-After: 1``), ``500``,
        ``503``, ``timeout`` (hold, then close without answering), ``drop`` (close at once), or
        ``accept_then_drop`` (accept the request, recorded in ``accepted``, then close without
        answering: the answer is lost on its way back). Faults are for sends; ``reads=True``
        faults the next lookups (GET) instead."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(FAULTS)}")
        with self._lock:
            self._script.extend(_Scripted(kind, reads=reads) for _ in range(count))

    def answer_next(
        self,
        status: int,
        body: dict[str, Any] | str,
        headers: dict[str, str] | None = None,
        *,
        reads: bool = False,
    ) -> None:
        """Answer the next valid send (``reads=True``: lookup) with ``status`` and ``body`` (a
        dict is sent as JSON)."""
        with self._lock:
            self._script.append(_Scripted("answer", status, body, dict(headers or {}), reads=reads))

    def hold_next(self, count: int = 1) -> None:
        """Accept the next ``count`` valid requests (they are recorded in ``accepted`` at once)
        but hold their answers until :meth:`release` (then they are answered) or :meth:`stop`
        (then the connection is closed): the provider has the message and the client has not
        heard back, as when the sending process dies or the client times out."""
        with self._lock:
            self._script.extend(_Scripted("hold") for _ in range(count))

    def release(self) -> None:
        """Answer the held requests."""
        self._released.set()

    def reset(self) -> None:
        """Forget recorded requests and scripted faults."""
        with self._lock:
            self.accepted.clear()
            self.reads.clear()
            self.rejected.clear()
            self.faulted.clear()
            self._script.clear()

    # -- used by the handler ---------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        record = _read(handler)
        operation = self._operation(record)
        if isinstance(operation, tuple):
            status, problem = operation
            self._reject(handler, record, status, problem)
            return
        refusal = self._credentials_problem(record, operation)
        if refusal is not None:
            self._reject(handler, record, 401, refusal)
            return
        with self._spec.lock:
            result = self._spec.api.unmarshal_request(_SpecRequest(self._spec.host_url, record))
        if result.errors:
            status = 401 if any(isinstance(e, SecurityValidationError) for e in result.errors) else 422
            self._reject(handler, record, status, "; ".join(_describe(e) for e in result.errors))
            return
        with self._lock:
            # Faults scripted for sends are not used up by a lookup in between, nor the reverse.
            reading = record.method in ("GET", "HEAD")
            scripted = next((x for x in self._script if x.reads == reading), None)
            if scripted is not None:
                self._script.remove(scripted)
        if scripted is not None and scripted.kind not in ("hold", "accept_then_drop"):
            self._fault(handler, record, scripted)
            return
        with self._lock:  # a listing must not see a create half recorded
            status, body, headers, response_id = self._success(record, operation)
            lost = scripted is not None and scripted.kind == "accept_then_drop"
            recorded = _with(
                record, response_id=response_id, response=body, fault="accept_then_drop" if lost else None
            )
            (self.reads if record.method in ("GET", "HEAD") else self.accepted).append(recorded)
        if lost:
            handler.drop()
            return
        if scripted is not None:
            while not (self._released.is_set() or self._stopping.is_set()):
                self._released.wait(0.05)
            if self._stopping.is_set():  # the client gave up long ago; a stopping server says nothing
                handler.drop()
                return
        handler.answer(status, body, headers)

    def _operation(self, record: RecordedRequest) -> _Operation | tuple[int, str]:
        """The spec's operation for ``record``, or the status and text to reject it with."""
        try:
            found = self._finder.find(record.method.lower(), self._spec.host_url + record.path)
        except OperationNotFound as error:
            return 405, str(error)
        except PathError as error:
            return 404, str(error)
        _, template, method = found.operation.parts
        return _Operation(self._spec.document["paths"][template][method], dict(found.path_result.variables))

    def _credentials_problem(self, record: RecordedRequest, operation: _Operation) -> str | None:
        """Why the request's credentials do not satisfy the operation's security, or ``None``.

        ``openapi-core`` only checks that the header is there; a real API also refuses a header
        that is not a well-formed credential of the scheme it requires.
        """
        requirements = operation.spec.get("security", self._spec.document.get("security", []))
        if not requirements:
            return None
        schemes = self._spec.document.get("components", {}).get("securitySchemes", {})
        authorization = record.headers.get("authorization", "")
        problems = []
        for requirement in requirements:
            unmet = [
                f"{name}: {problem}"
                for name in requirement
                if (problem := _scheme_problem(schemes.get(name, {}), authorization, record)) is not None
            ]
            if not unmet:
                return None
            problems.extend(unmet)
        return "credentials refused: " + "; ".join(problems)

    def _reject(self, handler: _Handler, record: RecordedRequest, status: int, problem: str) -> None:
        with self._lock:
            self.rejected.append((record, problem))
        headers = {"WWW-Authenticate": self._challenge()} if status == 401 else {}
        body = {"status": status, "message": problem, "errors": [{"message": problem, "field": None}]}
        handler.answer(status, body, headers)

    def _challenge(self) -> str:
        """The ``WWW-Authenticate`` value for the spec's HTTP security scheme."""
        schemes = self._spec.document.get("components", {}).get("securitySchemes", {}).values()
        http = [str(scheme.get("scheme", "")) for scheme in schemes if scheme.get("type") == "http"]
        return (http[0] if http else "Basic").capitalize()

    def _fault(self, handler: _Handler, record: RecordedRequest, scripted: _Scripted) -> None:
        kind = scripted.kind if scripted.kind != "answer" else f"answer:{scripted.status}"
        with self._lock:
            self.faulted.append(_with(record, fault=kind))
        if scripted.kind == "answer":
            handler.answer(scripted.status, scripted.body, scripted.headers)
        elif scripted.kind in ("429", "500", "503"):
            status = int(scripted.kind)
            headers = {"Retry-After": "1"} if status == 429 else {}
            message = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
            body = {"status": status, "message": message[status], "errors": [{"message": message[status]}]}
            handler.answer(status, body, headers)
        else:
            if scripted.kind == "timeout":
                self._stopping.wait(self.timeout_hold)
            handler.drop()

    def _success(
        self, record: RecordedRequest, operation: _Operation
    ) -> tuple[int, Any, dict[str, str], str | None]:
        """The lowest documented 2xx answer, its body from the spec's example or schema, made to
        describe this request: a created resource gets the request's fields, a listing holds
        what was created in the same collection. Called holding ``_lock``."""
        responses = operation.spec.get("responses", {})
        codes = sorted(code for code in responses if code.isdigit() and code.startswith("2"))
        status = int(codes[0]) if codes else 200
        response = self._resolve(responses[codes[0]]) if codes else {}
        headers = {
            name: str(_sample(self._resolve(header).get("schema", {}), self._resolve))
            for name, header in response.get("headers", {}).items()
        }
        media = response.get("content", {}).get(_JSON)
        if media is None:
            # SendGrid answers 202 without a body; its message id comes in this header.
            message_id = uuid.uuid4().hex
            headers["X-Message-Id"] = message_id
            return status, None, headers, message_id
        body = self._example(media)
        response_id: str | None = None
        if isinstance(body, dict):
            body = dict(body)
            schema = self._resolve(media.get("schema", {}))
            if record.method == "GET" and self._list_key(schema) is not None:
                self._list(body, schema, record)
                return status, body, headers, None
            _echo(body, record.body, self._request_fields(operation))
            _echo(body, operation.path_variables)
            self._stamp(body, schema)
            if isinstance(body.get("sid"), str):
                # A new sid each time, keeping the resource's prefix (SM for messages).
                prefix = body["sid"][:2] if body["sid"][:2].isalpha() else "SM"
                body["sid"] = response_id = prefix.upper() + uuid.uuid4().hex
        return status, body, headers, response_id

    def _request_fields(self, operation: _Operation) -> set[str]:
        """The form or JSON fields the operation's request body can have."""
        content = self._resolve(operation.spec.get("requestBody", {})).get("content", {})
        fields: set[str] = set()
        for media in content.values():
            fields.update(self._resolve(media.get("schema", {})).get("properties", {}))
        return fields

    def _stamp(self, body: dict[str, Any], schema: dict[str, Any]) -> None:
        """Set the answer's timestamps (``date_created``...) to now, in the format the spec gives."""
        now = datetime.now(UTC)
        for name, prop in schema.get("properties", {}).items():
            kind = self._resolve(prop).get("format")
            if name in body and name.startswith("date_") and kind == "date-time-rfc-2822":
                body[name] = format_datetime(now)
            elif name in body and name.startswith("date_") and kind == "date-time":
                body[name] = now.isoformat().replace("+00:00", "Z")

    def _list_key(self, schema: dict[str, Any]) -> str | None:
        """The one array property of a list answer (``messages``), if the answer is a list."""
        arrays = [
            name
            for name, prop in schema.get("properties", {}).items()
            if self._resolve(prop).get("type") == "array"
        ]
        return arrays[0] if len(arrays) == 1 else None

    def _list(self, body: dict[str, Any], schema: dict[str, Any], record: RecordedRequest) -> None:
        """Fill a list answer with the resources accepted in this collection, newest first,
        filtered by the query (``To=...`` keeps those whose ``to`` matches; ``DateSent>=`` style
        bounds compare dates) and cut to ``PageSize``: one page, no next one."""
        key = self._list_key(schema)
        assert key is not None
        created = [
            dict(r.response)
            for r in reversed(self.accepted)
            if r.path == record.path and isinstance(r.response, dict)
        ]
        for name, value in record.query.items():
            if name not in _PAGING and isinstance(value, str):
                created = [item for item in created if _matches(item, name, value)]
        size = record.query.get("PageSize")
        page_size = int(size) if isinstance(size, str) and size.isdigit() else _DEFAULT_PAGE_SIZE
        body[key] = created[:page_size]
        uri = record.path + (f"?{urlencode(_pairs(record.query))}" if record.query else "")
        meta = {
            "page": 0,
            "page_size": page_size,
            "start": 0,
            "end": max(len(body[key]) - 1, 0),
            "first_page_uri": uri,
            "uri": uri,
            "next_page_uri": None,
            "previous_page_uri": None,
        }
        body.update({name: value for name, value in meta.items() if name in body})

    def _example(self, media: dict[str, Any]) -> Any:
        if "example" in media:
            return media["example"]
        for example in media.get("examples", {}).values():
            resolved = self._resolve(example)
            if "value" in resolved:
                return resolved["value"]
        return _sample(self._resolve(media.get("schema", {})), self._resolve)

    def _resolve(self, node: Any) -> Any:
        """``node`` with a local ``$ref`` followed."""
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            target: Any = self._spec.document
            for part in node["$ref"][2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node


class _Handler(BaseHTTPRequestHandler):
    owner: OpenApiMock
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.owner._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def answer(self, status: int, body: Any, headers: dict[str, str]) -> None:
        if body is None:
            payload, content_type = b"", None
        elif isinstance(body, str):
            payload, content_type = body.encode(), "text/plain; charset=utf-8"
        else:
            payload, content_type = json.dumps(body).encode(), _JSON
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)

    def drop(self) -> None:
        """Close the connection without a word, as a crashed proxy or a network cut would."""
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``accepted``/``reads``/``rejected`` instead of a log."""


def _read(handler: _Handler) -> RecordedRequest:
    url = urlsplit(handler.path)
    length = int(handler.headers.get("Content-Length") or 0)
    raw = handler.rfile.read(length) if length else b""
    headers = {name.lower(): value for name, value in handler.headers.items()}
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    body: Any = None
    if raw:
        if content_type == "application/x-www-form-urlencoded":
            body = _flatten(parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True))
        elif content_type.endswith("json"):
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        else:
            body = raw.decode("utf-8", "replace")
    return RecordedRequest(
        method=handler.command.upper(),
        path=url.path,
        query=_flatten(parse_qs(url.query, keep_blank_values=True)),
        headers=headers,
        body=body,
        raw_body=raw,
    )


def _formats(node: Any) -> set[str]:
    """Every ``format`` named anywhere in ``node``."""
    if isinstance(node, list):
        return set().union(*(_formats(item) for item in node))
    if not isinstance(node, dict):
        return set()
    found = {node["format"]} if isinstance(node.get("format"), str) else set()
    return found.union(*(_formats(value) for value in node.values()))


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _flatten(values: dict[str, list[str]]) -> dict[str, str | list[str]]:
    return {name: items[0] if len(items) == 1 else items for name, items in values.items()}


def _with(record: RecordedRequest, **changes: Any) -> RecordedRequest:
    return RecordedRequest(**{**record.__dict__, **changes})


def _scheme_problem(scheme: dict[str, Any], authorization: str, record: RecordedRequest) -> str | None:
    kind = scheme.get("type")
    if kind == "http":
        expected = str(scheme.get("scheme", "")).lower()
        given, _, credentials = authorization.partition(" ")
        if given.lower() != expected or not credentials.strip():
            return f"needs an Authorization: {expected.capitalize()} header"
        if expected == "basic":
            try:
                user, colon, password = base64.b64decode(credentials, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return "Basic credentials are not base64 of user:password"
            if not (user and colon and password):
                return "Basic credentials need a user and a password"
        return None
    if kind == "apiKey":
        name = str(scheme.get("name", "")).lower()
        where = scheme.get("in")
        present = record.headers.get(name) if where == "header" else record.query.get(scheme.get("name", ""))
        return None if present else f"needs the {where} {scheme.get('name')}"
    return None  # oauth2/openIdConnect are not used by the provider specs this mock serves


def _describe(error: BaseException) -> str:
    """The violation, down to the schema messages openapi-core wraps in ``__cause__``."""
    parts = [str(error) or type(error).__name__]
    cause = error.__cause__
    while cause is not None:
        if isinstance(cause, InvalidSchemaValue):
            for schema_error in cause.schema_errors:
                location = "/".join(str(p) for p in getattr(schema_error, "absolute_path", []))
                message = getattr(schema_error, "message", str(schema_error))
                parts.append(f"{location}: {message}" if location else message)
        else:
            parts.append(str(cause) or type(cause).__name__)
        cause = cause.__cause__
    return ": ".join(parts)


_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def _snake(name: str) -> str:
    return _SNAKE.sub("_", name).lower()


def _echo(body: dict[str, Any], values: Any, fields: Collection[str] = ()) -> None:
    """Copy request values into the answer (``To`` -> ``to``, ``MessagingServiceSid`` ->
    ``messaging_service_sid``, ``AccountSid`` from the path -> ``account_sid``), so the answer
    describes the request rather than the example. Of ``fields`` (all the request could have
    sent), those it did not send are emptied: a message sent through a Messaging Service does not
    come back with the example's ``from`` number."""
    if not isinstance(values, dict):
        return
    for name in set(fields) - values.keys():
        key = _snake(name)
        if key in body and key != "sid" and isinstance(body[key], str):
            body[key] = None
    for name, value in values.items():
        key = _snake(name)
        if key in body and key != "sid" and isinstance(value, str) and isinstance(body[key], str | None):
            body[key] = value


def _matches(item: dict[str, Any], name: str, wanted: str) -> bool:
    """Whether a listed resource passes the filter ``name=wanted``: ``To`` compares ``to``;
    ``DateSent``, ``DateSent<`` and ``DateSent>`` compare ``date_sent`` with a date (same day,
    on or before, on or after) or a date-time. Unknown names do not filter."""
    bound = name[-1] if name[-1] in "<>" else "="
    key = _snake(name.rstrip("<>"))
    if key not in item:
        return True
    value = item[key]
    if not key.startswith("date_"):
        return bool(value == wanted)
    when = _when(value)
    limit = _bound(wanted)
    if when is None or limit is None:
        return False
    if isinstance(limit, datetime):
        return {"<": when <= limit, ">": when >= limit, "=": when == limit}[bound]
    day = when.astimezone(UTC).date()
    return {"<": day <= limit, ">": day >= limit, "=": day == limit}[bound]


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _bound(value: str) -> datetime | date | None:
    try:
        return date.fromisoformat(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _pairs(query: dict[str, str | list[str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, vs in query.items() for v in (vs if isinstance(vs, list) else [vs])]


def _sample(schema: Any, resolve: Any, depth: int = 0) -> Any:
    """A value that satisfies ``schema``, preferring its own example, default or first enum value."""
    schema = resolve(schema)
    if not isinstance(schema, dict) or depth > 8:
        return None
    for key in ("example", "default", "const"):
        if key in schema:
            return schema[key]
    if schema.get("examples"):
        examples = schema["examples"]
        return examples[0] if isinstance(examples, list) else next(iter(examples.values()))
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("allOf", "oneOf", "anyOf"):
        if schema.get(key):
            if key == "allOf":
                merged: dict[str, Any] = {}
                for part in schema[key]:
                    value = _sample(part, resolve, depth + 1)
                    if isinstance(value, dict):
                        merged.update(value)
                return merged
            return _sample(schema[key][0], resolve, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        return {name: _sample(sub, resolve, depth + 1) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [_sample(schema.get("items", {}), resolve, depth + 1)]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return False
    if kind == "string":
        formats = {"date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "uri": "https://example.com/"}
        return formats.get(schema.get("format", ""), "x" * int(schema.get("minLength", 1)))
    return None
