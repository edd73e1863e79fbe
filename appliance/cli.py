"""`appliance`: run the model on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from appliance.config import SECRET, ConfigError, config_path, default_map, settings
from appliance.console import friendly_errors, stderr
from appliance.startup import load_engine
from kernels.backend import describe
from models.sampling import SamplingParams
from models.store import ModelStore

SHUTDOWN_GRACE_S = 3  # seconds running requests get to finish after SIGTERM, on HTTP and gRPC alike

app = typer.Typer(
    help="The appliance: local LLM inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="The configuration: config.toml, APPLIANCE_* variables, flags.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="GGUF path or known model name (default: SmolLM2-135M-Instruct).")
]
BackendOpt = Annotated[str, typer.Option(help="Compute backend: auto, cpu, cuda, numpy.")]
BudgetOpt = Annotated[
    str | None,
    typer.Option(help="Memory for the model here, e.g. 190MB (weights as held, plus KV); the rest goes to workers."),
]
WorkerOpt = Annotated[list[str] | None, typer.Option("--worker", help="A paired worker's host:port; may be repeated.")]
DiscoverOpt = Annotated[bool, typer.Option(help="Also use paired workers found on the LAN by mDNS.")]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="Threads of the cpu backend's kernels (default: this machine's cores).")
]
WireOpt = Annotated[str, typer.Option(help="Hidden states on the wire: float32 or float16.")]
DraftOpt = Annotated[
    str,
    typer.Option(
        help="Speculative decoding: lookup (prompt-lookup drafts), none (one token a step), auto (lookup with"
        " workers), or a draft model (a GGUF file or a store name with the same vocabulary, run whole here)."
    ),
]
StepTimeoutOpt = Annotated[float, typer.Option(help="Seconds a worker may take per step before it is dropped.")]


@app.callback()
def _configuration(ctx: typer.Context) -> None:
    """`serve` takes its defaults from $APPLIANCE_HOME/config.toml and APPLIANCE_* (appliance/config.py)."""
    if ctx.invoked_subcommand == "serve":
        try:
            ctx.default_map = {"serve": default_map("serve", ctx.command.commands["serve"])}
        except ConfigError as e:
            stderr.print(f"[bold red]error:[/] {escape(str(e))}")
            raise typer.Exit(1) from e


def serve_command():
    """The click command of `appliance serve` (config.py checks the file's keys against its options)."""
    return typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]


@config_app.command()
def show(as_json: Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")] = False) -> None:
    """Each effective setting of `serve` and `appliance-worker` (before flags) and where it comes from."""
    import json

    from rich.console import Console
    from rich.table import Table

    from appliance.worker_cli import worker_command

    try:
        found = {"serve": settings("serve", serve_command()), "worker": settings("worker", worker_command())}
    except ConfigError as e:
        stderr.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from e
    rows = {
        section: {
            name: {"value": "(secret)" if name in SECRET and s.value else s.value, "source": s.source}
            for name, s in values.items()
        }
        for section, values in found.items()
    }
    if as_json:
        print(json.dumps({"file": str(config_path()), **rows}, indent=2, default=str))
        return
    console = Console(highlight=False)
    console.print(f"config file: {config_path()}" + ("" if config_path().is_file() else " (none)"))
    for section, values in rows.items():
        table = Table(title=escape(f"[{section}]"))
        for col in ("setting", "value", "source"):
            table.add_column(col)
        for name, row in values.items():
            table.add_row(name, str(row["value"]), row["source"])
        console.print(table)


@app.command()
@friendly_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (with --chat: the user's message).")],
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message, with --chat.")] = None,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy.")] = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repeat_penalty: float = 1.0,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string; may be repeated.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print token counts and speed to stderr.")] = False,
    memory_budget: BudgetOpt = None,
    worker: WorkerOpt = None,
    discover: DiscoverOpt = False,
    wire_dtype: WireOpt = "float32",
    step_timeout: StepTimeoutOpt = 10.0,
    draft: DraftOpt = "auto",
) -> None:
    """Generate text from a prompt, streamed token by token."""
    sampling = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repeat_penalty, seed=seed
    )
    engine = load_engine(
        ModelStore().resolve(model), backend, memory_budget, worker, discover, wire_dtype, step_timeout, threads, draft
    )
    gen = engine.generate(engine.prompt_ids(prompt, chat=chat, system=system), sampling, max_tokens, stop or ())
    start = time.perf_counter()
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        seconds = time.perf_counter() - start
        stderr.print(
            f"[dim]{gen.prompt_tokens} prompt + {gen.completion_tokens} generated tokens in "
            f"{seconds:.2f} s, finish: {gen.finish_reason}, backend: {describe(engine.model.backend)}[/]"
        )


@app.command()
@friendly_errors
def serve(
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: the whole LAN).")] = "0.0.0.0",
    http_port: Annotated[int, typer.Option(help="HTTP port (Triton's default).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (Triton's default).")] = 8001,
    api_key: Annotated[
        list[str] | None, typer.Option(help="Accepted inference key; may be repeated. Default: one made once.")
    ] = None,
    admin_key: Annotated[str | None, typer.Option(help="The admin key (load/unload). Default: one made once.")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Accept requests without a key (trusted setups).")] = False,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together in one step.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond the batch before 429.")] = 64,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 4096,
    memory_budget: BudgetOpt = None,
    worker: WorkerOpt = None,
    discover: DiscoverOpt = True,
    wire_dtype: WireOpt = "float32",
    step_timeout: StepTimeoutOpt = 10.0,
    draft: DraftOpt = "auto",
    advertise: Annotated[bool, typer.Option(help="Announce this appliance on the LAN by mDNS (for pairing).")] = True,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            help="HTTPS and gRPC over TLS. Default: on unless --host is loopback. --no-tls beyond loopback sends "
            "prompts and keys in clear.",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="The owner's server certificate (PEM); default: one from the appliance's CA.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The key of --tls-cert (PEM).")] = None,
    tls_name: Annotated[
        list[str] | None, typer.Option(help="One more DNS name or address for the CA's certificate; may be repeated.")
    ] = None,
    admin_mtls: Annotated[
        bool,
        typer.Option("--admin-mtls", help="Administration also needs a client certificate from the appliance's CA."),
    ] = False,
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="A GGUF LoRA adapter file, served as MODEL+STEM; may be repeated."),
    ] = None,
    prefix_cache_mb: Annotated[
        int, typer.Option(min=0, help="MiB of finished requests' KV kept for prompts that start the same way (0: off).")
    ] = 256,
) -> None:
    """Serve the model to the home: OpenAI-compatible REST, Anthropic's Messages API, Ollama's API, KServe v2
    (Triton) over REST and gRPC."""
    import uvicorn

    from appliance.serving.app import create_app
    from appliance.serving.client_keys import ClientKeys
    from appliance.serving.keys import key_file, server_keys
    from appliance.serving.kserve.grpc import start_grpc
    from appliance.serving.scheduler import Scheduler
    from appliance.serving.state import ServerState

    class _HttpServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """As uvicorn's, but without re-raising the signal at the end: gRPC and the scheduler stop after."""
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server_tls = _server_tls(host, tls, tls_cert, tls_key, tls_name, admin_mtls)
    if no_auth:
        keys: frozenset[str] = frozenset()
        admin_keys: frozenset[str] = frozenset()
        stderr.print("[bold yellow]WARNING: --no-auth: anyone who can reach this port can use the model.[/]")
    else:
        keys, admin_keys = server_keys(api_key, admin_key)
        if not api_key:
            stderr.print(f"API key: in {key_file('api')} (send it as 'Authorization: Bearer <key>')")
        if not admin_key:
            stderr.print(f"admin key: in {key_file('admin')}")
    engine = load_engine(
        ModelStore().resolve(model), backend, memory_budget, worker, discover, wire_dtype, step_timeout, threads, draft
    )
    engine.enable_prefix_cache(prefix_cache_mb << 20)
    scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
    admin_ca = None
    if admin_mtls:
        from offload.pki import certificate_authority

        admin_ca = certificate_authority()
    state = ServerState(
        engine,
        scheduler,
        engine.name,
        keys,
        admin_keys,
        ClientKeys(),
        max_tokens_limit=max_tokens_limit,
        admin_ca=admin_ca,
    )
    for path in adapter or []:
        state.adapters.load(path)
    app = create_app(state)

    async def run() -> None:
        http_socket = listen(host, http_port)  # both ports bound before "serving" is said
        credentials = server_tls.grpc_credentials() if server_tls else None
        grpc_server = await start_grpc(app.state.kserve, host, grpc_port, credentials)
        web, secured = ("HTTPS", " (TLS)") if server_tls else ("HTTP", "")
        stderr.print(
            f"serving {engine.name} (backend: {describe(engine.model.backend)}): "
            f"{web} on {host}:{http_port}, gRPC{secured} on {host}:{grpc_port}"
        )
        # SIGTERM/SIGINT: uvicorn stops taking connections and gives running requests a few seconds;
        # gRPC drains over the same seconds, side by side.
        tls_options = server_tls.uvicorn_options() if server_tls else {}
        http = _HttpServer(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **tls_options)
        )
        renewal = asyncio.ensure_future(server_tls.keep_fresh()) if server_tls else None

        async def stop_grpc_on_exit() -> None:
            while not http.should_exit:
                await asyncio.sleep(0.1)
            await grpc_server.stop(grace=SHUTDOWN_GRACE_S)

        stopper = asyncio.ensure_future(stop_grpc_on_exit())
        try:
            await http.serve(sockets=[http_socket])
        finally:
            http.should_exit = True
            if renewal is not None:
                renewal.cancel()
            await stopper

    announced = None
    if advertise:
        from offload.discovery import APPLIANCE_TYPE
        from offload.discovery import advertise as announce

        try:
            scheme = {"scheme": "https" if server_tls else "http"}  # how pairing workers must call
            announced = announce(APPLIANCE_TYPE, f"appliance-{http_port}", http_port, scheme)
        except Exception as e:  # no multicast on this network: pairing then needs --appliance
            stderr.print(f"[yellow]mDNS announcement failed ({e}); workers must pair with --appliance URL[/]")
    # The scheduler thread and the event loop share the GIL: hand it over every 0.5 ms, not 5 ms, so
    # finished tokens reach their streams promptly (1 client: 18.8 -> 23.2 tok/s in bench-serve here).
    sys.setswitchinterval(0.0005)
    scheduler.start()
    try:
        asyncio.run(run())
    finally:
        scheduler.stop()
        if announced is not None:
            announced.close()


def _server_tls(
    host: str, tls: bool | None, cert: Path | None, key: Path | None, names: list[str] | None, admin_mtls: bool
):
    """The home-facing ports' TLS (appliance/serving/tls.py), or None for plain HTTP and gRPC; says which."""
    from appliance.serving.tls import ServerTLS, is_loopback

    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both (or neither, for the appliance's CA)")
    use_tls = tls if tls is not None else bool(cert) or not is_loopback(host)
    if not use_tls:
        if cert or admin_mtls:
            raise ValueError(f"{'--tls-cert' if cert else '--admin-mtls'} needs TLS: drop --no-tls")
        if not is_loopback(host):
            stderr.print(
                f"[bold yellow]WARNING: --no-tls: prompts, answers and API keys cross the network in clear; "
                f"anyone on the LAN of {host} can read them.[/]"
            )
        return None
    from offload.pki import certificate_authority

    ca = certificate_authority()
    if cert is not None and key is not None:
        server = ServerTLS(cert, key, client_ca=ca.ca_pem if admin_mtls else None)
        stderr.print(f"TLS: the certificate {cert} (re-read when it changes)")
    else:
        server = ServerTLS.from_ca(ca, host, names, admin_mtls)
        stderr.print(
            f"TLS: a certificate from this appliance's CA ({ca.folder / 'ca.pem'}, SHA-256 {ca.fingerprint()}); "
            "trust it once on each device: appliance-ctl ca export"
        )
    return server


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or a ValueError (an `error:` line) when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise ValueError(f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}") from e


@app.command()
@friendly_errors
def plan(
    model: ModelOpt = None,
    memory_budget: Annotated[str, typer.Option(help="Memory for the model here, e.g. 190MB.")] = "190MB",
    worker: WorkerOpt = None,
    wire_dtype: WireOpt = "float32",
    backend: BackendOpt = "auto",
) -> None:
    """Where each layer would run: devices, layer ranges, bytes (as the backend holds them), ms per token."""
    from rich.console import Console
    from rich.table import Table

    from appliance.startup import coordinator_for
    from models.llama import Llama
    from offload.planner import describe

    llama = Llama.load(str(ModelStore().resolve(model)), backend)
    coordinator = coordinator_for(llama, memory_budget, worker or [], wire_dtype=wire_dtype)
    chosen = coordinator.make_plan()
    table = Table(title=f"{llama.file.path.name}: {llama.config.n_layers} layers, budget {memory_budget} here")
    rows = describe(chosen, llama.config.n_layers)
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("device", "address", "layers") else "right")
    for row in rows:
        table.add_row(
            *(
                f"{v / 1e6:.1f} MB" if k in ("bytes", "budget") else f"{v:.3f}" if isinstance(v, float) else str(v)
                for k, v in row.items()
            )
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"predicted: {chosen.ms_per_token:.2f} ms per token ({len(chosen.chain) + 1} one-way trips)")


@app.command()
@friendly_errors
def bench(
    model: ModelOpt = None,
    backend: Annotated[
        str, typer.Option(help="Our backend to measure; auto: every one this machine runs (C, NumPy, CUDA).")
    ] = "auto",
    threads: Annotated[
        list[int] | None, typer.Option(help="Thread counts; may be repeated (default: 1 and all cores).")
    ] = None,
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    peers: Annotated[bool, typer.Option(help="Measure the peers (llama.cpp, transformers) in the same run.")] = True,
) -> None:
    """Prefill (pp, TTFT) and decode (tg) tokens/s and peak memory at 1 thread and all cores, beside llama.cpp."""
    from appliance.bench.engine import run_bench
    from kernels import cuda_backend, native

    if backend == "auto":
        backends = (["cuda"] if cuda_backend.available() else []) + (["cpu"] if native.available() else []) + ["numpy"]
    else:
        backends = [backend]
    counts = sorted(set(threads or [1, os.cpu_count() or 1]))
    if counts[0] < 1:
        raise typer.BadParameter("thread counts must be at least 1", param_hint="--threads")
    run_bench(ModelStore().resolve(model), backends, counts, prompt_tokens, decode_tokens, peers)


@app.command("bench-serve")
@friendly_errors
def bench_serve(
    model: ModelOpt = None,
    clients: Annotated[list[int] | None, typer.Option(help="Concurrency levels; may be repeated.")] = None,
    max_tokens: int = 32,
    peers: Annotated[bool, typer.Option(help="Measure llama.cpp's servers in the same run.")] = True,
    max_batch: Annotated[int, typer.Option(help="Our --max-batch and llama-server's -np.")] = 16,
    chat_only: Annotated[
        bool, typer.Option(help="Only the chat figures (prefix cache, constrained decoding).")
    ] = False,
    system_words: Annotated[int, typer.Option(help="The two-turn chat's system prompt, in words.")] = 1500,
) -> None:
    """Aggregate tokens/s, TTFT and inter-token latency at 1, 4, 8 and 16 clients, beside llama.cpp's
    llama-server and llama-cpp-python's server; then the same while a 2000-token prompt arrives; then a
    two-turn chat's TTFT with and without the prefix cache, and constrained against free decoding."""
    from appliance.bench.chat import run_chat_bench
    from appliance.bench.serve import run_bench_serve

    path = ModelStore().resolve(model)
    if not chat_only:
        run_bench_serve(path, clients or [1, 4, 8, 16], max_tokens, peers, max_batch)
    run_chat_bench(path, system_words)


@app.command("bench-offload")
@friendly_errors
def bench_offload(
    model: ModelOpt = None,
    prompt_tokens: int = 64,
    decode_tokens: int = 32,
    delay: Annotated[list[float] | None, typer.Option(help="One-way link delays in ms; may be repeated.")] = None,
    llama_bin: Annotated[
        Path | None, typer.Option(help="Folder with llama.cpp's llama-bench and ggml-rpc-server (the peer).")
    ] = None,
    clients: Annotated[list[int] | None, typer.Option(help="Clients decoding together; may be repeated.")] = None,
    workers: Annotated[list[int] | None, typer.Option(help="Placements: 1 and/or 2 workers; may be repeated.")] = None,
) -> None:
    """Tokens/s, round trips and draft acceptance all-local vs split over 1 and 2 workers, loopback and delayed
    links, 1/4/8 clients, drafts on and off, beside llama.cpp RPC."""
    from appliance.bench.offload import run_bench_offload

    run_bench_offload(
        ModelStore().resolve(model), prompt_tokens, decode_tokens, delay or [0.0, 2.0, 5.0], llama_bin, clients, workers
    )


if __name__ == "__main__":
    app()
