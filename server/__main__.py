"""Gateway entry point: `python -m server --host 127.0.0.1 --port 8000 --redis-url URL --data-dir DIR`.
Flags override the `ADAPTERD_*` environment (see server.settings)."""

from __future__ import annotations

import argparse
import logging
import sys

from adapters_store import tracing
from adapters_store.cluster_auth import ClusterSecretError
from server.settings import GatewaySettings, InsecureBindError

KEEP_ALIVE_S = 75  # idle client connections stay open this long (uvicorn's default of 5 s drops slow clients)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server", description="adapterd gateway")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--redis-url")
    p.add_argument("--data-dir")
    p.add_argument("--base-model-path", help="the base model folder (its config.json checks uploads)")
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        default=None,
        help="allow binding a non-loopback address with no API keys",
    )
    p.add_argument("--otlp-endpoint", help="send OpenTelemetry traces to this OTLP/HTTP base URL (default: "
                   "$OTEL_EXPORTER_OTLP_ENDPOINT; neither: tracing off)")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from server.app import create_app

    args = _parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "log_level"}
    settings = GatewaySettings(**overrides)
    from adapters_store.json_logging import configure

    configure("gateway", logging.INFO)
    tracing.configure("adapterd-gateway", tracing.traces_url(settings.otlp_endpoint))
    try:
        settings.cluster_signer()
        app = create_app(settings)
    except (InsecureBindError, ClusterSecretError) as exc:
        print(f"adapterd gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=None,  # uvicorn's own loggers propagate to the JSON handler
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=int(settings.drain_grace_s),  # SIGTERM: stop listening, finish open requests
    )


if __name__ == "__main__":
    main()
