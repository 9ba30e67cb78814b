"""The server distribution's operator commands: `serve` (the whole service), `worker` (one model worker),
`trainer` (one fine-tune trainer), `gateway` (the gateway alone). Installed as `adapterd-server`, and offered
by the SDK's `adapterd` command through the entry-point group `adapterd.cli` (`register`). Workers and
trainers are imported lazily, so this module stays torch-free."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="adapterd operator commands: serve, worker, trainer, gateway.", no_args_is_help=True)


class Dtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class Quantize(StrEnum):
    none = "none"
    int8 = "int8"
    w8a8 = "w8a8"
    int4 = "int4"
    fp16 = "fp16"
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def serve(
    host: Annotated[str, typer.Option(help="address the gateway binds")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gateway port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    model: Annotated[str | None, typer.Option(help="HF model folder (default: SmolLM2-135M-Instruct)")] = None,
    redis_url: Annotated[str | None, typer.Option(envvar="ADAPTERD_REDIS_URL",
                                                  help="use this Redis instead of the embedded one")] = None,
    data_dir: Annotated[Path, typer.Option(help="adapters/ and the embedded Redis live here")] = Path(".adapterd"),
    allow_insecure: Annotated[bool, typer.Option(help="allow a non-loopback bind without API keys")] = False,
    heartbeat_ttl: Annotated[float, typer.Option(help="seconds a silent worker stays routable")] = 5.0,
    trainers: Annotated[int, typer.Option(min=0, help="fine-tune trainer processes (0: none)")] = 1,
    max_seq: Annotated[int | None, typer.Option(
        "--max-seq", "--max-model-len", min=1,
        help="context length (default: the model's, capped so the KV cache of a full batch fits 2 GiB)")] = None,
    dtype: Annotated[Dtype, typer.Option(help="base weights' dtype (auto: measured on this machine)")] = Dtype.auto,
    quantize: Annotated[Quantize, typer.Option(
        help="int8: weight-only int8 base weights; w8a8: int8 weights and activations (per-token scales); "
             "int4: weight-only 4-bit groups of 32 (CPU); "
             "fp16: weight-only half precision, fp32 tokens (half the bytes streamed per step)",
    )] = Quantize.none,
    otlp_endpoint: Annotated[str | None, typer.Option(
        help="OpenTelemetry traces of the gateway and workers to this OTLP/HTTP base URL "
             "(default: $OTEL_EXPORTER_OTLP_ENDPOINT; neither: off)")] = None,
) -> None:
    """Start Redis (embedded valkey unless --redis-url), the workers, the trainers and the gateway; Ctrl-C
    stops all."""
    from server.launcher import ServeOptions
    from server.launcher import serve as run

    options = ServeOptions(host=host, port=port, workers=workers, model=model, redis_url=redis_url,
                           data_dir=data_dir, allow_insecure=allow_insecure, heartbeat_ttl_s=heartbeat_ttl,
                           trainers=trainers, otlp_endpoint=otlp_endpoint,
                           worker_args=["--dtype", dtype.value, "--quantize", quantize.value,
                                        *(["--max-seq", str(max_seq)] if max_seq else [])])
    raise typer.Exit(run(options))


def trainer(
    redis_url: Annotated[str, typer.Option(envvar="ADAPTERD_REDIS_URL", help="the Redis the gateway uses")
                         ] = "redis://127.0.0.1:6379/0",
    model: Annotated[str | None, typer.Option(help="HF base model folder (default: SmolLM2-135M-Instruct)")] = None,
    model_id: Annotated[str | None, typer.Option(help="the base model's id in jobs (default: folder name)")] = None,
    data_dir: Annotated[Path, typer.Option(help="work files; the store is DATA_DIR/store")] = Path(".adapterd"),
    store_url: Annotated[str | None, typer.Option(help="the adapter store (file:// or s3://)")] = None,
    trainer_id: Annotated[str | None, typer.Option(help="this trainer's name (default: host-pid)")] = None,
    claim_timeout: Annotated[float, typer.Option(help="seconds before a silent trainer's job is taken over")] = 30.0,
    max_attempts: Annotated[int, typer.Option(min=1, help="times a job is started before it fails")] = 3,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="steps between checkpoints")] = 10,
    nproc: Annotated[int, typer.Option(min=1, help="processes that train each job data-parallel")] = 1,
) -> None:
    """Run a fine-tune trainer: claims jobs for its base model from the queue and trains them."""
    from workers.trainer.worker import main

    if model is None:
        from workers.model.default_model import ensure_default_model

        model = str(ensure_default_model())
    argv = ["--redis-url", redis_url, "--model", model, "--data-dir", str(data_dir),
            "--claim-timeout", str(claim_timeout), "--max-attempts", str(max_attempts),
            "--checkpoint-every", str(checkpoint_every), "--nproc", str(nproc)]
    for flag, value in (("--model-id", model_id), ("--store-url", store_url), ("--trainer-id", trainer_id)):
        if value:
            argv += [flag, value]
    main(argv)


def worker(ctx: typer.Context) -> None:
    """Run one model worker; takes `python -m workers.service`'s options (--help lists them)."""
    from workers.service.app import main

    main(list(ctx.args))


def gateway(ctx: typer.Context) -> None:
    """Run the gateway alone; takes `python -m server`'s options (--help lists them)."""
    from server.__main__ import main

    main(list(ctx.args))


def register(target: typer.Typer) -> None:
    """Adds the operator commands to `target` (the SDK's `adapterd` app, or this module's own)."""
    target.command()(serve)
    target.command()(trainer)
    target.command(context_settings=PASS_THROUGH)(worker)
    target.command(context_settings=PASS_THROUGH)(gateway)


register(app)

if __name__ == "__main__":
    app()
