"""The `adapterd` command: `serve` (the whole service; imports the server lazily), and the client
commands `generate`, `chat`, `models`, `adapters upload|list|show|delete|download` (talk to `--url`,
default $ADAPTERD_URL or http://127.0.0.1:8000)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from adapterd_client.client import Client
from adapterd_client.errors import AdapterdError

app = typer.Typer(help="adapterd: many fine-tuned adapters over one shared base LLM.", no_args_is_help=True)

Url = Annotated[str | None, typer.Option("--url", envvar="ADAPTERD_URL", help="gateway URL")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="ADAPTERD_API_KEY", help="API key")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1)]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, max=2.0)]
Stream = Annotated[bool, typer.Option("--stream/--no-stream", help="print tokens as they come")]


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address the gateway binds")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gateway port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    model: Annotated[str | None, typer.Option(help="HF model folder (default: SmolLM2-135M-Instruct)")] = None,
    redis_url: Annotated[str | None, typer.Option(help="use this Redis instead of the embedded one")] = None,
    data_dir: Annotated[Path, typer.Option(help="adapters/ and the embedded Redis live here")] = Path(".adapterd"),
    allow_insecure: Annotated[bool, typer.Option(help="allow a non-loopback bind without API keys")] = False,
    heartbeat_ttl: Annotated[float, typer.Option(help="seconds a silent worker stays routable")] = 5.0,
) -> None:
    """Start Redis (embedded valkey unless --redis-url), the workers and the gateway; Ctrl-C stops all."""
    from server.launcher import ServeOptions
    from server.launcher import serve as run

    options = ServeOptions(host=host, port=port, workers=workers, model=model, redis_url=redis_url,
                           data_dir=data_dir, allow_insecure=allow_insecure, heartbeat_ttl_s=heartbeat_ttl)
    raise typer.Exit(run(options))


@app.command()
def generate(
    prompt: str,
    adapter: Annotated[str | None, typer.Option("--adapter", "-a", help="adapter name[@version]")] = None,
    max_tokens: MaxTokens = 64,
    temperature: Temperature = 0.0,
    stream: Stream = True,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Complete PROMPT with the base model or an adapter (native /generate)."""
    params = {"max_new_tokens": max_tokens, **({"temperature": temperature} if temperature > 0 else {})}
    try:
        with Client(url, api_key) as client:
            if stream:
                for event in client.generate_stream(prompt, adapter, **params):
                    typer.echo(event.token.text, nl=False)
                typer.echo()
            else:
                typer.echo(client.generate(prompt, adapter, **params).generated_text)
    except AdapterdError as exc:
        raise _fail(exc) from exc


def _base_model(client: Client) -> str:
    for card in client.models().data:
        if card.parent is None:
            return card.id
    raise AdapterdError("the server lists no base model (is a worker up?)")


@app.command()
def chat(
    message: str,
    model: Annotated[str | None, typer.Option("--model", "-m", help="base model id or adapter name")] = None,
    system: Annotated[str | None, typer.Option(help="a system message")] = None,
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.0,
    stream: Stream = True,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Send one chat MESSAGE (chat template applied by the server) and print the reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    try:
        with Client(url, api_key) as client:
            name = model or _base_model(client)
            if stream:
                for chunk in client.chat_stream(name, messages, max_tokens=max_tokens, temperature=temperature):
                    for choice in chunk.choices:
                        typer.echo(choice.delta.content or "", nl=False)
                typer.echo()
            else:
                reply = client.chat(name, messages, max_tokens=max_tokens, temperature=temperature)
                typer.echo(reply.choices[0].message.content)
    except AdapterdError as exc:
        raise _fail(exc) from exc


@app.command()
def models(url: Url = None, api_key: ApiKey = None) -> None:
    """List the base model and the adapters (with their parent)."""
    try:
        with Client(url, api_key) as client:
            for card in client.models().data:
                typer.echo(card.id if card.parent is None else f"{card.id}\t(adapter of {card.parent})")
    except AdapterdError as exc:
        raise _fail(exc) from exc


adapters_app = typer.Typer(help="Upload, list, show, download and delete adapters.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.2f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.1f} KiB"


@adapters_app.command("upload")
def adapters_upload(
    name: str,
    paths: Annotated[list[Path], typer.Argument(help="a PEFT folder, a .zip/.tar.gz, or .safetensors + .json")],
    kind: Annotated[str | None, typer.Option(help="lora, compeft or s2ft (detected otherwise)")] = None,
    compeft_density: Annotated[float | None, typer.Option(help="ComPEFT-compress at this density")] = None,
    compeft_alpha: Annotated[float, typer.Option(help="ComPEFT scale factor α")] = 1.0,
    public: Annotated[bool, typer.Option(help="visible to every tenant")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Upload PATHS as a new version of adapter NAME (with a progress bar)."""
    from tqdm import tqdm

    from adapterd_client.base import upload_size

    compression = ({"method": "compeft", "density": compeft_density, "alpha": compeft_alpha}
                   if compeft_density is not None else None)
    try:
        with Client(url, api_key) as client, tqdm(total=upload_size(paths), unit="B", unit_scale=True,
                                                  desc=f"uploading {name}", file=sys.stderr) as bar:
            info = client.upload_adapter(name, *paths, kind=kind, compression=compression, public=public,
                                         progress=bar.update)
    except (AdapterdError, OSError) as exc:
        raise _fail(exc) from exc
    latest = info.versions[-1]
    typer.echo(f"{latest.id}\t{latest.kind}\tr={latest.rank}\t{_size(latest.stored_bytes)}"
               f"\t{latest.compression_ratio:.1f}x")


@adapters_app.command("list")
def adapters_list(url: Url = None, api_key: ApiKey = None) -> None:
    """The adapters you can use: name, latest version, versions, owner."""
    try:
        with Client(url, api_key) as client:
            for a in client.list_adapters().data:
                public = "\tpublic" if a.public else ""
                typer.echo(f"{a.name}\t@{a.latest}\t{len(a.versions)} version(s)\t{a.owner}{public}")
    except AdapterdError as exc:
        raise _fail(exc) from exc


@adapters_app.command("show")
def adapters_show(name: str, url: Url = None, api_key: ApiKey = None) -> None:
    """NAME's versions with kind, rank, sizes and compression ratio."""
    try:
        with Client(url, api_key) as client:
            for v in client.get_adapter(name).versions:
                typer.echo(f"{v.id}\t{v.kind}\tr={v.rank}\talpha={v.alpha:g}\t{','.join(v.targets)}"
                           f"\t{_size(v.stored_bytes)}\t{v.compression_ratio:.1f}x")
    except AdapterdError as exc:
        raise _fail(exc) from exc


@adapters_app.command("delete")
def adapters_delete(ref: str, url: Url = None, api_key: ApiKey = None) -> None:
    """Delete NAME@VERSION, or every version of NAME."""
    try:
        with Client(url, api_key) as client:
            deleted = client.delete_adapter(ref)
    except AdapterdError as exc:
        raise _fail(exc) from exc
    typer.echo(f"deleted {deleted.name} version(s) {', '.join(map(str, deleted.versions))}")


@adapters_app.command("download")
def adapters_download(
    ref: str,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="zip file to write")] = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Download NAME[@VERSION] as a zip of a PEFT folder (peft loads it once unzipped)."""
    target = out or Path(f"{ref.replace('@', '-')}.zip")
    try:
        with Client(url, api_key) as client:
            target.write_bytes(client.download_adapter(ref))
    except (AdapterdError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(str(target))


if __name__ == "__main__":
    app()
