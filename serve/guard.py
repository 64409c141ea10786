"""An ASGI layer in front of kserve's app: it caps the body size (413) and refuses a malformed
inference request envelope (400) before kserve's decoder sees it, so no request can make the
server answer 5xx or fall over. Answers are JSON {"error": "..."}, the form tritonclient reads.

It is handed to uvicorn as the app object; it resolves kserve's app lazily by import string so
that it pickles into kserve's worker processes when --workers > 1.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from serve.validation import INFERENCE_HEADER, RequestError, parse_envelope

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

KSERVE_APP = "kserve.model_server:app"
_INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer/?$")
# kserve's model repository extension would let any client unload the one model we serve.
_REPOSITORY_PATH = re.compile(r"^/v2/repository(/|$)")
# kserve answers any versioned model path with 501; the file we serve has no versions.
_VERSION_PATH = re.compile(r"^/v2/models/[^/]+/versions(/|$)")
# kserve's V1 explain route answers 501 without an explainer; this server has none.
_EXPLAIN_PATH = re.compile(r"^/v1/models/[^/]+:explain/?$")
# A client that stops sending halfway through its body would hold its connection (and up to
# --max-body-bytes of buffer) forever: one that sends nothing for this long gets 408.
BODY_IDLE_SECONDS = 30.0


async def _answer(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI app: body-size cap for every request, envelope checks for V2 infer requests."""

    def __init__(
        self,
        max_body_bytes: int,
        app: str = KSERVE_APP,
        body_idle_seconds: float = BODY_IDLE_SECONDS,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.app_path = app
        self.body_idle_seconds = body_idle_seconds
        self._app: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_app"] = None
        return state

    def _inner(self) -> Any:
        if self._app is None:
            module, _, attr = self.app_path.partition(":")
            self._app = getattr(importlib.import_module(module), attr)
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._inner()
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if _REPOSITORY_PATH.match(scope["path"]):
            await _answer(send, 403, "this server serves one fixed model; loading/unloading is off")
            return
        if _VERSION_PATH.match(scope["path"]):
            await _answer(
                send, 404, "this model has no versions; drop '/versions/...' from the URL"
            )
            return
        if _EXPLAIN_PATH.match(scope["path"]):
            await _answer(send, 404, "this server has no explainer; use /v2/models/NAME/infer")
            return
        headers = {k.decode("latin1").lower(): v.decode("latin1") for k, v in scope["headers"]}
        is_infer = scope["method"] == "POST" and _INFER_PATH.match(scope["path"]) is not None
        try:
            body, size, disconnected = await self._read_body(receive)
        except TimeoutError:
            await _answer(
                send,
                408,
                f"the request body stalled for {self.body_idle_seconds:g} s; send it whole",
            )
            return
        if body is None:
            if not disconnected:
                await _answer(send, 413, self._too_large(size))
            return
        if is_infer and not disconnected:
            if "content-type" not in headers and INFERENCE_HEADER not in headers:
                # tritonclient sends JSON requests without a Content-Type; FastAPI would then
                # hand kserve raw bytes, which it refuses. A V2 body without either header is JSON.
                scope = dict(scope)
                scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]
                headers["content-type"] = "application/json"
            try:
                parse_envelope(body, headers.get("content-type"), headers.get(INFERENCE_HEADER))
            except RequestError as e:
                await _answer(send, e.status, str(e))
                return
        await app(scope, _replay(body, disconnected, receive), send)

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, int, bool]:
        """(body or None past the cap, bytes seen, whether the client went away).

        A body past the cap is still read (and dropped), up to a hard limit, so that the client
        is done sending and reads our 413 instead of a reset connection. TimeoutError when the
        client sends nothing for body_idle_seconds.
        """
        chunks: list[bytes] = []
        size = 0
        drain_limit = max(8 * self.max_body_bytes, 64 << 20)
        while True:
            message = await asyncio.wait_for(receive(), self.body_idle_seconds)
            if message["type"] == "http.disconnect":
                return (b"".join(chunks) if size <= self.max_body_bytes else None), size, True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body_bytes:
                chunks.append(chunk)
            else:
                chunks.clear()
            if not message.get("more_body", False) or size > drain_limit:
                return (b"".join(chunks) if size <= self.max_body_bytes else None), size, False

    def _too_large(self, size: int) -> str:
        return (
            f"the request body ({size} bytes received) exceeds this server's limit of"
            f" {self.max_body_bytes} bytes; send fewer images per request or raise --max-body-bytes"
        )


def _replay(body: bytes, disconnected: bool, receive: Receive) -> Receive:
    """A receive() that yields the already-read body once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if disconnected:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
