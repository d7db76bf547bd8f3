"""`python -m sdapi [--host H] [--port P] [--api-auth user:pass,...] [--cors-allow-origins O,...]`

Loads every checkpoint under SD_MODELS_DIR (as the Cog predictor does), then serves webui's
API on 127.0.0.1:7860 unless told otherwise (port also from PORT).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# One OpenMP thread per torch-calling thread, set before torch loads: requests run in a worker
# thread, and per-thread OpenMP teams oversubscribe the cores (README "Many users at once").
os.environ.setdefault("OMP_NUM_THREADS", "1")

from engine.api import Engine, EngineConfig
from engine.device import setup_logging

from .app import ServerConfig, create_app, parse_auth

DEFAULT_PORT = 7860


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdapi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PORT") or DEFAULT_PORT),
        help=f"port (default: PORT, else {DEFAULT_PORT})",
    )
    parser.add_argument("--api-auth", default="", help="HTTP basic auth: user:pass[,user2:pass2]")
    parser.add_argument(
        "--cors-allow-origins", default="", help="comma-separated origins (default: CORS off)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    try:
        auth = parse_auth(args.api_auth) if args.api_auth else {}
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    origins = tuple(o.strip() for o in args.cors_allow_origins.split(",") if o.strip())
    setup_logging()
    engine = Engine.setup(EngineConfig.from_env())
    app = create_app(engine, ServerConfig(auth=auth, cors_origins=origins))
    import uvicorn  # only the server needs it

    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
