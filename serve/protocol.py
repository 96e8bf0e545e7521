"""Request and response bodies: OpenAI's completions / chat schema (the fields this server
honours), plus the session routes' own. Unknown fields are ignored, as OpenAI clients send
some this server has no use for; values it cannot honour are refused with a message.

Extensions to OpenAI's schema: ``session`` (a session id: the call continues that session's
memory; the ``X-Session-Id`` header does the same) and ``top_k``.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Stop = str | list[str] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Body):
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    stop: Stop = None
    stream: bool = False
    session: str | None = None

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if v is not None and v != 1.0:
            raise ValueError("top_p < 1 is not supported by this server; use top_k")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v not in (None, 1):
            raise ValueError("n > 1 is not supported by this server (one choice per call)")
        return v

    def stops(self) -> tuple:
        s = self.stop
        return () if s is None else (s,) if isinstance(s, str) else tuple(s)


class CompletionRequest(_Sampling):
    model: str | None = None
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("expected one prompt (a string, or a list of one string)")
            return v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v is not None:
            raise ValueError("logprobs are not supported by this server")
        return v


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


def render_chat(messages: list[ChatMessage]) -> str:
    """The text a byte-level model reads for a list of chat messages: one "role: content" line
    per message, then "assistant: " for the reply."""
    return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant: "


class CreateSession(_Body):
    """keep_text: the session keeps its text (GET shows it); fork: start from a copy of that
    session's memory instead of an empty one."""
    keep_text: bool = False
    fork: str | None = None


class GenerateRequest(_Body):
    """A call on a session: ``prompt`` is only the new text; the session remembers the rest."""
    prompt: str = ""
    max_tokens: int = Field(64, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    stop: Stop = None
    stream: bool = True

    def stops(self) -> tuple:
        s = self.stop
        return () if s is None else (s,) if isinstance(s, str) else tuple(s)


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def usage(u: dict) -> dict:
    return {k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def completion_chunk(cid: str, model: str, text: str, finish_reason=None, u=None) -> dict:
    out = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": None,
                        "finish_reason": finish_reason}]}
    if u is not None:
        out["usage"] = usage(u)
    return out


def chat_chunk(cid: str, model: str, delta: dict, finish_reason=None, u=None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model, "choices": [{"index": 0, "delta": delta,
                                        "finish_reason": finish_reason}]}
    if u is not None:
        out["usage"] = usage(u)
    return out


def chat_completion(cid: str, model: str, text: str, finish_reason: str, u: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": usage(u)}
