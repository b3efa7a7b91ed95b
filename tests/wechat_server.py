"""A loopback stand-in for the WeChat Official Account API that enforces the documented flow.

``GET /cgi-bin/token`` checks grant_type, appid and secret and issues tokens with a configurable
lifetime; ``POST /cgi-bin/message/template/send`` checks the token and the body's shape, knows
which openids exist and follow the account, and records what it accepts. Faults are injected with
:meth:`WeChatServer.fail_next`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

Endpoint = Literal["send", "token"]
FAULTS = ("busy", "500", "timeout", "drop", "drop_after_accept")


@dataclass
class Fault:
    """A queued failure: a fault name from :data:`FAULTS` or a WeChat errcode to answer with."""

    kind: str | int
    remaining: int


@dataclass
class Accepted:
    """A template message the server accepted."""

    msgid: int
    body: dict[str, Any]
    token: str


@dataclass
class _State:
    tokens: dict[str, float] = field(default_factory=dict)
    """Token -> monotonic expiry."""
    token_requests: int = 0
    send_requests: int = 0
    messages: list[Accepted] = field(default_factory=list)
    by_client_msg_id: dict[tuple[str, str], int] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=lambda: {"send": [], "token": []})
    next_msgid: int = 200228332


class WeChatServer:
    """``with WeChatServer(...) as server:`` serves on ``server.url`` until the block ends."""

    def __init__(
        self,
        *,
        app_id: str = "wx-test-app",
        app_secret: str = "test-secret",
        openids: Iterable[str] | None = ("o-alice", "o-bob"),
        non_followers: Iterable[str] = (),
        templates: Iterable[str] | None = None,
        token_lifetime: int = 7200,
        hang: float = 2.0,
    ) -> None:
        """``openids``: the followers (``None``: any openid follows); ``templates``: the template
        ids that exist (``None``: any); ``hang``: how long a
        ``timeout`` fault keeps the client waiting."""
        self.app_id = app_id
        self.app_secret = app_secret
        self.openids = None if openids is None else set(openids)
        self.non_followers = set(non_followers)
        self.templates = None if templates is None else set(templates)
        self.token_lifetime = token_lifetime
        self.hang = hang
        self._state = _State()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- control ---------------------------------------------------------------------------

    def __enter__(self) -> WeChatServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01})
        self._thread.daemon = True
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def fail_next(self, kind: str | int, count: int = 1, *, endpoint: Endpoint = "send") -> None:
        """Make the next ``count`` requests to ``endpoint`` fail.

        ``kind``: ``busy`` (errcode -1), ``500`` (HTTP 500), ``timeout`` (no answer for
        ``hang`` seconds), ``drop`` (connection closed before the request is handled),
        ``drop_after_accept`` (the message is accepted, then the connection is closed without an
        answer), or an int: answer with that errcode.
        """
        if isinstance(kind, str) and kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULTS} or an errcode")
        with self._lock:
            self._state.faults[endpoint].append(Fault(kind, count))

    def expire_tokens(self) -> None:
        """Every token issued so far expires now."""
        with self._lock:
            for token in self._state.tokens:
                self._state.tokens[token] = 0.0

    @property
    def token_requests(self) -> int:
        """How many token requests were answered with a token."""
        with self._lock:
            return self._state.token_requests

    @property
    def send_requests(self) -> int:
        """How many template send requests arrived (whatever their outcome)."""
        with self._lock:
            return self._state.send_requests

    @property
    def messages(self) -> list[Accepted]:
        """The accepted template messages, oldest first."""
        with self._lock:
            return list(self._state.messages)

    @property
    def tokens(self) -> list[str]:
        """Every token issued, oldest first."""
        with self._lock:
            return list(self._state.tokens)

    # -- request handling (called from the handler threads) --------------------------------

    def _take_fault(self, endpoint: Endpoint) -> str | int | None:
        with self._lock:
            queue = self._state.faults[endpoint]
            if not queue:
                return None
            fault = queue[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.pop(0)
            return fault.kind

    def _token(self, query: dict[str, list[str]]) -> dict[str, Any]:
        def one(name: str) -> str | None:
            values = query.get(name)
            return values[0] if values else None

        if one("grant_type") != "client_credential":
            return {"errcode": 40002, "errmsg": "invalid grant_type"}
        if not one("appid"):
            return {"errcode": 41002, "errmsg": "appid missing"}
        if one("appid") != self.app_id:
            return {"errcode": 40013, "errmsg": "invalid appid"}
        if not one("secret"):
            return {"errcode": 41004, "errmsg": "appsecret missing"}
        if one("secret") != self.app_secret:
            return {"errcode": 40125, "errmsg": "invalid appsecret"}
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._state.token_requests += 1
            self._state.tokens[token] = time.monotonic() + self.token_lifetime
        return {"access_token": token, "expires_in": self.token_lifetime}

    def _check_token(self, query: dict[str, list[str]]) -> dict[str, Any] | str:
        values = query.get("access_token")
        if not values or not values[0]:
            return {"errcode": 41001, "errmsg": "access_token missing"}
        token = values[0]
        with self._lock:
            expiry = self._state.tokens.get(token)
        if expiry is None:
            return {"errcode": 40001, "errmsg": "invalid credential, access_token is invalid or not latest"}
        if expiry <= time.monotonic():
            return {"errcode": 42001, "errmsg": "access_token expired"}
        return token

    def _send(self, token: str, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"errcode": 47001, "errmsg": "data format error"}
        problem = _shape_problem(body)
        if problem:
            return {"errcode": 47003, "errmsg": f"argument invalid! {problem}"}
        if self.templates is not None and body["template_id"] not in self.templates:
            return {"errcode": 40037, "errmsg": "invalid template_id"}
        openid = body["touser"]
        if openid in self.non_followers:
            return {"errcode": 43004, "errmsg": "require subscribe"}
        if self.openids is not None and openid not in self.openids:
            return {"errcode": 40003, "errmsg": "invalid openid"}
        with self._lock:
            key = body.get("client_msg_id")
            if key is not None and (openid, key) in self._state.by_client_msg_id:
                # WeChat sends one message per openid + client_msg_id; a repeat is not sent again.
                return {"errcode": 0, "errmsg": "ok", "msgid": self._state.by_client_msg_id[(openid, key)]}
            msgid = self._state.next_msgid
            self._state.next_msgid += 1
            self._state.messages.append(Accepted(msgid, body, token))
            if key is not None:
                self._state.by_client_msg_id[(openid, key)] = msgid
        return {"errcode": 0, "errmsg": "ok", "msgid": msgid}


def _shape_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body is not an object"
    for name in ("touser", "template_id"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} must be a non-empty string"
    data = body.get("data")
    if not isinstance(data, dict):
        return "data must be an object"
    for name, value in data.items():
        if not isinstance(value, dict) or not isinstance(value.get("value"), str):
            return f"data.{name} must be an object with a string value"
    if "url" in body and not isinstance(body["url"], str):
        return "url must be a string"
    if "miniprogram" in body:
        mini = body["miniprogram"]
        if not isinstance(mini, dict) or not all(isinstance(mini.get(k), str) for k in ("appid", "pagepath")):
            return "miniprogram needs string appid and pagepath"
    if "client_msg_id" in body and (
        not isinstance(body["client_msg_id"], str) or len(body["client_msg_id"].encode()) > 64
    ):
        return "client_msg_id must be a string of at most 64 bytes"
    return None


class _Handler(BaseHTTPRequestHandler):
    api: WeChatServer
    protocol_version = "HTTP/1.1"
    # Buffer each answer and send it in one piece: headers and body in separate packets would
    # meet the client's delayed ACK and cost ~40 ms per request.
    wbufsize = 1 << 16

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/cgi-bin/token":
            self._reply(404, {"errcode": 404, "errmsg": "not found"})
            return
        if self._fault("token"):
            return
        self._reply(200, self.api._token(parse_qs(url.query)))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if url.path != "/cgi-bin/message/template/send":
            self._reply(404, {"errcode": 404, "errmsg": "not found"})
            return
        with self.api._lock:
            self.api._state.send_requests += 1
        fault = self.api._take_fault("send")
        if fault == "drop_after_accept":
            token = self.api._check_token(parse_qs(url.query))
            if isinstance(token, str):
                self.api._send(token, raw)
            self._drop()
            return
        if fault is not None and self._apply(fault):
            return
        token = self.api._check_token(parse_qs(url.query))
        if not isinstance(token, str):
            self._reply(200, token)
            return
        self._reply(200, self.api._send(token, raw))

    def _fault(self, endpoint: Endpoint) -> bool:
        fault = self.api._take_fault(endpoint)
        return fault is not None and self._apply(fault)

    def _apply(self, fault: str | int) -> bool:
        """Answer with ``fault``; True when the request is done."""
        if isinstance(fault, int):
            self._reply(200, {"errcode": fault, "errmsg": f"injected errcode {fault}"})
        elif fault == "busy":
            self._reply(200, {"errcode": -1, "errmsg": "system error"})
        elif fault == "500":
            self._reply(500, {"errcode": -1, "errmsg": "internal server error"})
        elif fault == "timeout":
            self.api._closing.wait(self.api.hang)
            self._drop()
        elif fault == "drop":
            self._drop()
        else:
            return False
        return True

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            # WeChat labels its JSON as text/plain.
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
