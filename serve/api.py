"""The HTTP layer: FastAPI routes over a `serve.engine.Engine`.

    app = create_app(engine, api_key="secret")      # then uvicorn.run(app, ...)

Routes (all under bearer-token auth when ``api_key`` is set, except /health and the dashboard's
static page, which holds no data and asks for the key itself):

    GET  /health                          liveness
    GET  /                                the dashboard (serve/static)
    GET  /v1/models                       OpenAI: the one model served
    POST /v1/completions                  OpenAI, stream or not; "session" / X-Session-Id
    POST /v1/chat/completions             OpenAI chat, likewise
    POST /v1/sessions                     a new session → {"id": ...}; {"fork": id} copies one
    GET  /v1/sessions                     every session, most recently active first
    GET  /v1/sessions/{id}                its state size, tokens seen, last activity
    DELETE /v1/sessions/{id}
    POST /v1/sessions/{id}/generate       the new text → tokens (Server-Sent Events or JSON)
    WS   /v1/sessions/{id}/ws             {"prompt": ...} messages in, token events out
    GET  /v1/metrics                      the server's numbers, the sessions, the glass brain
    GET  /v1/metrics/stream               the same every ``metrics_interval`` s, as SSE

Errors are OpenAI error objects: 400 bad input (schema errors included, non-UTF-8 text), 401 no
or wrong key, 404 unknown session, 409 session busy, 413 body too large, 429 too many sessions
or concurrent calls. A client that goes away cancels its call; the session is left as it was.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Header, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.websockets import WebSocketDisconnect

from . import protocol as P
from .engine import BadRequest, Engine, EngineError, SamplingParams, UnknownSession
from .models import kv_cache_bytes

STATIC = Path(__file__).with_name("static")
SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
KV_FORMULA = ("GPT-2 124M KV cache in bf16: 2 (K and V) x 12 layers x 768 x 2 bytes = "
              "36,864 bytes per token of context")


class Unauthorized(EngineError):
    status = 401


def _json(status: int, body: dict, headers=None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes is answered 413 (from its
    Content-Length before reading, or as soon as the streamed body passes the limit)."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        message = (f"request body too large: the limit is {self.limit} bytes "
                   f"(--max-request-bytes)")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _json(413, P.error_body(message, 413))(scope, receive, send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise self._TooLarge()
            return msg

        async def tracked_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except self._TooLarge:
            if not started:
                await _json(413, P.error_body(message, 413))(scope, receive, send)


def _encode(text: str, name: str = "prompt") -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"{name}: not valid UTF-8 text ({exc.reason} at character "
                         f"{exc.start})") from None


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _session_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not SESSION_ID.match(value):
        raise UnknownSession(f"session {value[:64]!r}: no such session (ids are 32 hex digits)")
    return value


def create_app(engine: Engine, *, api_key: str | None = None, max_request_bytes: int = 1 << 20,
               metrics_interval: float = 0.25) -> FastAPI:
    app = FastAPI(title="Glass Brain server", version="0.1.0",
                  description="Recurrent-state sessions that remember across calls and restarts")
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    app.state.engine = engine
    model_name = engine.adapter.name

    def check_key(authorization: str | None) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(),
                                                                    api_key.encode()):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def auth(authorization: str | None = Header(None)):
        check_key(authorization)

    @app.exception_handler(EngineError)
    async def engine_error(_, exc: EngineError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _json(exc.status, P.error_body(exc.message, exc.status), headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        msg = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in msg:
            msg = "the body is not valid JSON in UTF-8"
        return _json(exc.status_code, P.error_body(msg, exc.status_code), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            msg = "the body is not valid JSON in UTF-8"
        else:
            msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: "
                            f"{e.get('msg')}" for e in errs[:5])
        return _json(400, P.error_body(msg, 400, where))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/", include_in_schema=False)
    async def dashboard():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "glassbrain"}]}

    # ---------------------------------------------------------------- sessions

    @v1.post("/sessions", status_code=201)
    async def create_session(body: P.CreateSession | None = None):
        if body is not None and body.fork is not None:
            rec = engine.fork_session(_session_id(body.fork))
        else:
            rec = engine.create_session(keep_text=bool(body and body.keep_text))
        return {"id": rec.id, "object": "session", **engine.session_info(rec.id)}

    @v1.get("/sessions")
    async def list_sessions(limit: int = 100):
        recs = sorted(engine.sessions.values(), key=lambda r: -r.last_active)[:max(0, limit)]
        return {"object": "list", "data": [engine.session_info(r.id) for r in recs]}

    @v1.get("/sessions/{session_id}")
    async def get_session(session_id: str):
        return {"object": "session", **engine.session_info(_session_id(session_id))}

    @v1.delete("/sessions/{session_id}")
    async def delete_session(session_id: str):
        engine.delete_session(_session_id(session_id))
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    def start(session_id, prompt: str, params: SamplingParams):
        params.stop = tuple(_encode(s, "stop") for s in params.stop)
        return engine.submit(session_id, _encode(prompt), params,
                             loop=asyncio.get_running_loop())

    def stream(call, shape):
        """SSE of ``shape(event)`` per event (None: skip), then [DONE]; cancels the call when
        the client goes away."""
        async def body():
            try:
                async for event in call.events():
                    if event["type"] == "error":
                        yield _sse(P.error_body(event["message"], event["status"]))
                        return
                    out = shape(event)
                    if out is not None:
                        yield _sse(out)
                yield _sse("[DONE]")
            finally:
                if not call.finished:
                    call.cancel()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def collect(call):
        parts = []
        try:
            async for event in call.events():
                if event["type"] == "token":
                    parts.append(event["text"])
                elif event["type"] == "error":
                    raise EngineError(event["message"], event["status"])
                else:
                    parts.append(event.get("text", ""))
                    return "".join(parts), event
        finally:
            if not call.finished:
                call.cancel()

    @v1.post("/sessions/{session_id}/generate")
    async def generate(session_id: str, body: P.GenerateRequest):
        sid = _session_id(session_id)
        call = start(sid, body.prompt, SamplingParams(body.max_tokens, body.temperature,
                                                      body.top_k, body.seed, body.stops()))
        if body.stream:
            return stream(call, lambda e: e)
        text, done = await collect(call)
        return {**done, "type": "done", "text": text}

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def session_ws(ws: WebSocket, session_id: str):
        try:
            check_key(ws.headers.get("authorization"))
            sid = _session_id(session_id)
            engine.get_session(sid)
        except EngineError as exc:
            await ws.close(code=4000 + exc.status, reason=exc.message[:120])
            return
        await ws.accept()
        try:
            while True:
                try:
                    body = P.GenerateRequest.model_validate(await ws.receive_json())
                    call = start(sid, body.prompt, SamplingParams(
                        body.max_tokens, body.temperature, body.top_k, body.seed,
                        body.stops()))
                except (EngineError, ValueError) as exc:
                    status = getattr(exc, "status", 400)
                    await ws.send_json({"type": "error", "status": status,
                                        "message": getattr(exc, "message", str(exc))[:2000]})
                    continue
                try:
                    async for event in call.events():
                        await ws.send_json(event)
                finally:
                    if not call.finished:
                        call.cancel()
        except WebSocketDisconnect:
            return

    # ---------------------------------------------------------------- OpenAI

    def openai_call(body: P._Sampling, prompt: str, header_session: str | None, default_max):
        sid = _session_id(body.session or header_session)
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = getattr(body, "max_completion_tokens", None)
        params = SamplingParams(default_max if max_tokens is None else max_tokens,
                                1.0 if body.temperature is None else body.temperature,
                                body.top_k, body.seed, body.stops())
        return start(sid, prompt, params)

    @v1.post("/completions")
    async def completions(body: P.CompletionRequest,
                          x_session_id: str | None = Header(None)):
        call = openai_call(body, body.prompt, x_session_id, 16)
        cid = f"cmpl-{call.id}"
        if body.stream:
            return stream(call, lambda e: P.completion_chunk(
                cid, model_name, e["text"],
                e.get("finish_reason"), e.get("usage")) if e["type"] != "token" or e["text"]
                else None)
        text, done = await collect(call)
        return P.completion_chunk(cid, model_name, text, done["finish_reason"], done["usage"])

    @v1.post("/chat/completions")
    async def chat(body: P.ChatCompletionRequest, x_session_id: str | None = Header(None)):
        call = openai_call(body, P.render_chat(body.messages), x_session_id, 256)
        cid = f"chatcmpl-{call.id}"
        if body.stream:
            first = [True]

            def shape(e):
                if e["type"] == "token":
                    delta = {"content": e["text"]}
                    if first[0]:
                        delta["role"], first[0] = "assistant", False
                    return P.chat_chunk(cid, model_name, delta)
                delta = {"content": e["text"]} if e.get("text") else {}
                return P.chat_chunk(cid, model_name, delta, e["finish_reason"], e["usage"])
            return stream(call, shape)
        text, done = await collect(call)
        return P.chat_completion(cid, model_name, text, done["finish_reason"], done["usage"])

    # ---------------------------------------------------------------- metrics

    def snapshot(session: str | None) -> dict:
        m = engine.metrics()
        recs = sorted(engine.sessions.values(), key=lambda r: -r.last_active)
        obs = engine.observations
        live = sorted(obs, key=lambda k: -obs[k]["time"])
        rows = []
        for r in recs[:24]:
            o = obs.get(r.id, {})
            rows.append({"id": r.id, "tokens_seen": r.tokens_seen, "calls": r.calls,
                         "last_active": r.last_active, "state_bytes": engine.state_nbytes,
                         "stored_bytes": r.stored_bytes,
                         "kv_cache_bytes": kv_cache_bytes(r.tokens_seen),
                         "tokens_per_s": o.get("tokens_per_s", 0.0)
                         if o and time.time() - o["time"] < 2 else 0.0,
                         "busy": engine.is_busy(r.id), "resident": engine.where(r.id)})
        pick = session if session in obs else (live[0] if live else None)
        return {"time": time.time(), "server": m, "kv_formula": KV_FORMULA, "sessions": rows,
                "brain": _brain(pick, obs.get(pick)) if pick else None}

    @v1.get("/metrics")
    async def metrics(session: str | None = None):
        return snapshot(session)

    @v1.get("/metrics/stream")
    async def metrics_stream(request: Request, session: str | None = None):
        async def body():
            while not await request.is_disconnected():
                yield _sse(snapshot(session))
                await asyncio.sleep(metrics_interval)
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    app.include_router(v1)
    return app


def _brain(key: str, obs: dict | None) -> dict | None:
    """The dashboard's view of one session's latest token: BDH's active-neuron grid per layer
    (uint8, 255 = every neuron of the cell fired; base64) and densities, or BSBR's bank."""
    if obs is None:
        return None
    out = {"session": key, "time": obs["time"], "tokens_per_s": obs.get("tokens_per_s")}
    if "grid" in obs:
        grid = obs["grid"]
        out.update(kind="neurons", layers=int(grid.shape[0]), cells=int(grid.shape[1]),
                   grid=base64.b64encode((grid.clamp(0, 1) * 255).round().byte()
                                         .numpy().tobytes()).decode(),
                   density=[[round(float(x), 4) for x in row] for row in obs["density"]])
    elif "bank" in obs:
        out.update(kind="bank", bank=obs["bank"])
    return out
