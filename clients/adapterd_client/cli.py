"""The `adapterd` command: the client commands `generate`, `chat`, `models`,
`adapters upload|list|show|delete|download`, `files upload|list|content|delete`,
`jobs create|list|show|cancel|follow`, `status` (talk to `--url`, default $ADAPTERD_URL or
http://127.0.0.1:8000). Where the server distribution is installed, its operator commands (`serve`, `worker`,
`trainer`) join them through the entry-point group `adapterd.cli`; the SDK itself imports nothing of the server."""

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


adapters_app = typer.Typer(help="Upload, merge, list, show, download and delete adapters.", no_args_is_help=True)
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


@adapters_app.command("merge")
def adapters_merge(
    name: str,
    ids: Annotated[list[str], typer.Argument(help="the adapters to merge (name or name@version)")],
    weights: Annotated[str | None, typer.Option(help="comma-separated, one per adapter (default 1 each)")] = None,
    strategy: Annotated[str, typer.Option(help="linear or ties")] = "linear",
    density: Annotated[float, typer.Option(help="TIES: the fraction of entries each adapter keeps")] = 1.0,
    public: Annotated[bool, typer.Option(help="visible to every tenant")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Merge IDS into a new version of adapter NAME (what `merged_adapters` does per request)."""
    spec: dict = {"ids": list(ids), "strategy": strategy, "density": density}
    try:
        if weights:
            spec["weights"] = [float(w) for w in weights.split(",")]
        with Client(url, api_key) as client:
            latest = client.save_merge(name, spec, public=public).versions[-1]
    except ValueError as exc:
        raise typer.BadParameter(f"--weights: {exc}") from exc
    except AdapterdError as exc:
        raise _fail(exc) from exc
    typer.echo(f"{latest.id}	{latest.kind}	r={latest.rank}	{','.join(latest.targets)}")


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


files_app = typer.Typer(help="Upload, list and delete fine-tune training files (JSONL).", no_args_is_help=True)
app.add_typer(files_app, name="files")
jobs_app = typer.Typer(help="Create, list, show, cancel and follow fine-tune jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@files_app.command("upload")
def files_upload(
    path: Annotated[Path, typer.Argument(help="a JSONL file: {prompt, completion} or {messages} per line")],
    purpose: Annotated[str, typer.Option(help="what the file is for")] = "fine-tune",
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Upload a training file; prints its id (every line is checked; a bad one is reported by number)."""
    try:
        with Client(url, api_key) as client:
            f = client.upload_file(path, purpose)
    except (AdapterdError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"{f.id}\t{f.filename}\t{f.records} records\t{_size(f.bytes)}")


@files_app.command("list")
def files_list(url: Url = None, api_key: ApiKey = None) -> None:
    """Your training files, newest first."""
    try:
        with Client(url, api_key) as client:
            for f in client.list_files().data:
                typer.echo(f"{f.id}\t{f.filename}\t{f.records} records\t{_size(f.bytes)}")
    except AdapterdError as exc:
        raise _fail(exc) from exc


@files_app.command("delete")
def files_delete(file_id: str, url: Url = None, api_key: ApiKey = None) -> None:
    """Delete a training file."""
    try:
        with Client(url, api_key) as client:
            client.delete_file(file_id)
    except AdapterdError as exc:
        raise _fail(exc) from exc
    typer.echo(f"deleted {file_id}")


def _param(item: str) -> tuple[str, object]:
    import json

    key, eq, raw = item.partition("=")
    if not eq or not key:
        raise typer.BadParameter(f"{item!r} is not KEY=VALUE")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _job_line(j) -> str:
    progress = f"step {j.step}/{j.total_steps}" if j.total_steps else ""
    result = j.fine_tuned_model or (f"{j.error.code}: {j.error.message}" if j.error else "")
    return "\t".join(x for x in (j.id, j.status, j.model, j.method.get("type", ""), progress, result) if x)


@jobs_app.command("create")
def jobs_create(
    training_file: Annotated[str, typer.Argument(help="a file id, or a local .jsonl to upload first")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="the base model (default: the server's)")] = None,
    method: Annotated[str, typer.Option(help="lora, s2ft or medusa")] = "lora",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="a hyperparameter KEY=VALUE")] = None,
    validation_file: Annotated[str | None, typer.Option(help="a file id or a local .jsonl")] = None,
    suffix: Annotated[str | None, typer.Option(help="part of the adapter's name")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    compeft_density: Annotated[float | None, typer.Option(help="ComPEFT-compress the result")] = None,
    compeft_alpha: Annotated[float, typer.Option(help="ComPEFT scale factor α")] = 1.0,
    follow: Annotated[bool, typer.Option(help="then follow it with a progress bar")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Create a fine-tune job; prints its id (or follows it with --follow)."""
    spec = {"type": method, **dict(_param(p) for p in param or [])}
    compression = ({"method": "compeft", "density": compeft_density, "alpha": compeft_alpha}
                   if compeft_density is not None else None)
    try:
        with Client(url, api_key) as client:
            def file_id(ref: str | None) -> str | None:
                return client.upload_file(ref).id if ref and Path(ref).is_file() else ref

            job = client.create_job(model or _base_model(client), file_id(training_file), spec,
                                    validation_file=file_id(validation_file), suffix=suffix, seed=seed,
                                    compression=compression)
            typer.echo(job.id)
            if follow:
                _follow(client, job.id)
    except (AdapterdError, OSError) as exc:
        raise _fail(exc) from exc


@jobs_app.command("list")
def jobs_list(
    after: Annotated[str | None, typer.Option(help="continue after this job id")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Your fine-tune jobs, newest first."""
    try:
        with Client(url, api_key) as client:
            page = client.list_jobs(after, limit)
    except AdapterdError as exc:
        raise _fail(exc) from exc
    for j in page.data:
        typer.echo(_job_line(j))
    if page.has_more:
        typer.echo(f"(more: --after {page.data[-1].id})", err=True)


@jobs_app.command("show")
def jobs_show(job_id: str, url: Url = None, api_key: ApiKey = None) -> None:
    """One job as JSON."""
    try:
        with Client(url, api_key) as client:
            typer.echo(client.get_job(job_id).model_dump_json(indent=2))
    except AdapterdError as exc:
        raise _fail(exc) from exc


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: Url = None, api_key: ApiKey = None) -> None:
    """Cancel a job (a running one stops at its next training step)."""
    try:
        with Client(url, api_key) as client:
            typer.echo(_job_line(client.cancel_job(job_id)))
    except AdapterdError as exc:
        raise _fail(exc) from exc


@jobs_app.command("follow")
def jobs_follow(job_id: str, url: Url = None, api_key: ApiKey = None) -> None:
    """Follow a job: its messages, and a progress bar with step, loss and ETA; exits 1 unless it succeeds."""
    try:
        with Client(url, api_key) as client:
            _follow(client, job_id)
    except AdapterdError as exc:
        raise _fail(exc) from exc


def _follow(client: Client, job_id: str) -> None:
    from adapterd_client.job_progress import follow

    job = follow(client, job_id)
    typer.echo(_job_line(job))
    if job.status != "succeeded":
        raise typer.Exit(1)


@files_app.command("content")
def files_content(
    file_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """A file's bytes: a training file, or a job's result CSV (its `result_files`)."""
    try:
        with Client(url, api_key) as client:
            data = client.file_content(file_id)
    except AdapterdError as exc:
        raise _fail(exc) from exc
    if output is not None:
        output.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)


@app.command()
def status(url: Url = None, api_key: ApiKey = None) -> None:
    """Is the service ready, and which workers and fine-tune trainers are alive; exits 1 unless ready."""
    try:
        with Client(url, api_key, max_retries=0) as client:
            ready = client.ready()
    except AdapterdError as exc:
        raise _fail(exc) from exc
    typer.echo(f"{ready.status}: model {ready.model}, {ready.workers} worker(s), {ready.trainers} trainer(s)")
    for t in ready.trainer_list:
        typer.echo(f"trainer {t.id}\t{t.model}\t" + (f"training {t.job}" if t.job else "idle"))
    if not ready.trainers:
        typer.echo("no fine-tune trainer is running: jobs wait in the queue (start one with `adapterd trainer`)",
                   err=True)


def add_operator_commands(target: typer.Typer) -> None:
    """Adds the commands other installed distributions register under `adapterd.cli` (the server's
    `serve`, `worker`, `trainer`). Each entry point is a callable taking the Typer app."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="adapterd.cli"):
        try:
            register = ep.load()
        except ImportError:  # a stale or half-installed distribution: the client commands still work
            continue
        register(target)


def main() -> None:
    add_operator_commands(app)
    app()


if __name__ == "__main__":
    main()
