"""A streaming server whose sessions remember across calls and restarts.

A recurrent model's whole memory of a conversation is a fixed-size state, so the server keeps
every session's memory at a constant cost, on disk after every call, and continues it after a
restart. `serve.engine` (sessions, batching, the decode loop) knows nothing of HTTP;
`serve.api` puts FastAPI routes (OpenAI-compatible ones included) and the dashboard over it.

    python -m serve                       # then open http://127.0.0.1:8000/

    from serve import Engine, EngineConfig, SamplingParams, build_adapter
    engine = Engine(build_adapter("bdh"), EngineConfig(state_dir="states")).start()
"""
from .builder import build_adapter, model_fingerprint
from .engine import Engine, EngineConfig, EngineError, SamplingParams
from .models import BDHAdapter, BSBRAdapter, ModelAdapter, kv_cache_bytes

__all__ = ["Engine", "EngineConfig", "EngineError", "SamplingParams", "build_adapter",
           "model_fingerprint", "ModelAdapter", "BDHAdapter", "BSBRAdapter", "kv_cache_bytes"]
