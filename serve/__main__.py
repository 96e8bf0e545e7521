"""python -m serve: start the server (BDH by default, on 127.0.0.1:8000).

    python -m serve [--model bdh|bsbr] [--checkpoint PATH] [--device cpu|cuda]
                    [--host 127.0.0.1] [--port 8000] [--state-dir runs/serve/state] [--api-key KEY]

With no checkpoint it serves a small model trained in seconds on the text it carries (cached
in the state folder, so a restart serves the same weights). Open http://127.0.0.1:8000/ for the
dashboard. The API key may also come from the environment variable GLASSBRAIN_API_KEY.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from .codec import CODECS
from .engine import EngineConfig

API_KEY_ENV = "GLASSBRAIN_API_KEY"
log = logging.getLogger("serve")


def build_parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["bdh", "bsbr"], default="bdh",
                   help="model family (ignored with --checkpoint, which names its own)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint of python -m experiments.train (BDH or BSBR)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback needs --api-key to be safe")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", default=d.state_dir,
                   help="where session states, their index and the small model's weights live")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health "
                        f"(default: ${API_KEY_ENV} if set)")
    p.add_argument("--codec", choices=CODECS, default=d.codec,
                   help="state storage: raw/rows/zlib are lossless (bit-exact resume), bf16 "
                        "is lossy and half the size")
    p.add_argument("--bank", default="8,4,4",
                   help="BSBR bank slots per level (a bounded bank: fixed-size state)")
    p.add_argument("--train-steps", type=int, default=150,
                   help="training steps of the small model when no --checkpoint is given")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions)
    p.add_argument("--max-active", type=int, default=d.max_active,
                   help="concurrent calls (rows of the decode batch); more are answered 429")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--device-sessions", type=int, default=d.device_sessions,
                   help="idle session states kept on the device (LRU)")
    p.add_argument("--host-sessions", type=int, default=d.host_sessions,
                   help="idle session states kept in host memory after those (LRU); the rest "
                        "are read back from disk when used")
    p.add_argument("--no-observe", action="store_true",
                   help="do not record the glass brain (a little faster)")
    p.add_argument("--decode-mode", choices=["eager", "graph", "sparse", "auto"], default=None,
                   help="BDH's decoding step (bdh.decode.BDHDecoder); default eager, or auto "
                        "(a CUDA graph on CUDA) with --no-observe: only eager steps record the "
                        "glass brain")
    p.add_argument("--log-level", default="info")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and api_key is None:
        log.warning("binding %s, which is reachable from other machines, WITHOUT an API key: "
                    "anyone who can reach it can read and write every session. Pass --api-key "
                    "(or set %s).", args.host, API_KEY_ENV)
    try:
        bank = tuple(int(x) for x in args.bank.split(","))
    except ValueError:
        sys.exit(f"--bank: expected comma-separated ints such as 8,4,4, got {args.bank!r}")

    import torch
    import uvicorn

    from .api import create_app
    from .builder import build_adapter, model_fingerprint
    from .engine import Engine

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA device is available")
    os.makedirs(args.state_dir, exist_ok=True)
    adapter = build_adapter(args.model, checkpoint=args.checkpoint, device=args.device,
                            cache_dir=args.state_dir, train_steps=args.train_steps, bank=bank,
                            decode_mode=args.decode_mode or ("auto" if args.no_observe
                                                             else "eager"),
                            log=log.info)
    config = EngineConfig(state_dir=args.state_dir, codec=args.codec,
                          max_sessions=args.max_sessions, max_active=args.max_active,
                          max_prompt_tokens=args.max_prompt_tokens,
                          max_new_tokens=args.max_new_tokens,
                          device_sessions=args.device_sessions,
                          host_sessions=args.host_sessions, observe=not args.no_observe)
    engine = Engine(adapter, config, model_fingerprint(adapter.model)).start()
    log.info("%s (%s parameters, %s bytes of state per session) with %d stored sessions; "
             "dashboard at http://%s:%d/", adapter.name, f"{adapter.describe()['params']:,}",
             f"{engine.state_nbytes:,}", len(engine.sessions), args.host, args.port)
    app = create_app(engine, api_key=api_key, max_request_bytes=args.max_request_bytes)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
