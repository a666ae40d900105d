"""Command-line interface: each command is a thin wrapper over one library function; its options are those the
function takes, each built from its one declaration in `streamprune.options` (flag, type, default, help)."""

from __future__ import annotations

import enum
import inspect
import json
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from streamprune.dist import RankLost, Ranks
from streamprune.errors import StreamPruneError
from streamprune.fileio import atomic_write
from streamprune.options import EVAL, PLAN, RUN, SWEEP, EvalOptions, PruneOptions, declared

logger = logging.getLogger("streamprune")
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune language models one block at a time.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Prune language models one block at a time."""


def _setup_logging(verbose: bool, rank: int = 0) -> None:
    """Warnings from rank 0 only (the ranks of a run would repeat each other), errors from every rank."""
    level = (logging.DEBUG if verbose else logging.WARNING) if rank == 0 else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _fail(err: StreamPruneError, ranks: Ranks | None = None) -> None:
    """The one-line message, printed once per job: with several ranks by the first rank that raised it (or rank 0
    when a rank vanished without one), prefixed with its rank."""
    ranks = ranks or Ranks()
    if ranks.claim_report(str(err), lost=isinstance(err, RankLost)):
        where = f"rank {ranks.rank}: " if ranks.distributed and not isinstance(err, RankLost) else ""
        console.print(f"[bold red]error:[/] {escape(where + str(err))}", highlight=False, soft_wrap=True)
    ranks.close()
    raise typer.Exit(code=2)


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _argument(name: str, help: str) -> inspect.Parameter:
    return _param(name, Annotated[Path, typer.Argument(help=help)])


VERBOSE = _param("verbose", Annotated[bool, typer.Option("--verbose", "-v", help="Say more of what happens.")], False)
JSON = _param("json_out", Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")],
              None)


def _option(name: str, decl: Any, typ: Any, default: Any) -> inspect.Parameter:
    """The command-line parameter of one declared option: a choice becomes an enumeration, an option parsed from
    text (a size, a list) takes the text."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in args:
        typ = next(a for a in args if a is not type(None))
    if decl.repeat:  # --calib A --calib B:32
        typ, default = list[str], None
    elif decl.choices is not None:
        typ = enum.Enum(name, {c.replace("-", "_"): c for c in decl.choices}, type=str)  # type: ignore[misc]
        default = None if default is None else typ(default)
    elif decl.parse is not None:
        typ = str
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
    flags = decl.flags(name)
    option = typer.Option(*flags, help=decl.help, show_default="/" not in flags[0] or default is not None)
    return _param(name, Annotated[Optional[typ] if default is None else typ, option], default)


def _value(decl: Any, value: Any) -> Any:
    """An option's value as the library takes it."""
    if isinstance(value, enum.Enum):
        return value.value
    if decl.repeat:
        return tuple(value) if value else None
    if decl.parse is not None and isinstance(value, str):
        return decl.parse(value)
    return value


def command(name: str, options: type, command_name: str, *own: inspect.Parameter) -> Callable[[Callable], Callable]:
    """Register `fn(options=..., **own)` as command `name`: its parameters are `own` (arguments, command-line-only
    options) and every option `options` declares for `command_name`, handed to `fn` as one dict."""
    fields = declared(options, command_name)

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        def invoke(**kwargs: Any) -> None:
            try:
                values = {f.name: _value(d, kwargs.pop(f.name)) for f, d, _ in fields}
            except StreamPruneError as e:
                _fail(e)
            fn(options=values, **kwargs)

        invoke.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*own, *(_option(f.name, d, typ, f.default) for f, d, typ in fields), VERBOSE])
        invoke.__doc__ = fn.__doc__
        app.command(name)(invoke)
        return fn

    return register


def _write_json(path: Path, result: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


@command("eval", EvalOptions, EVAL, _argument("model_dir", "Hugging Face model directory (config.json, *.safetensors, "
                                                          "tokenizer.json)."),
         _param("data", Annotated[Path | None, typer.Option("--data", help="Perplexity data: .txt, .jsonl with a "
                                                                           "'text' field, or .npy token ids.")], None),
         JSON)
def eval_cmd(model_dir: Path, data: Path | None, json_out: Path | None, verbose: bool, options: dict[str, Any]) -> None:
    """Perplexity of MODEL_DIR on DATA, and/or its lm-evaluation-harness --tasks, streaming one block at a time."""
    from streamprune.evaluate import evaluate

    _setup_logging(verbose)
    try:
        result = evaluate(model_dir, data, progress=True, **options)
    except StreamPruneError as e:
        _fail(e)
    if result.tasks is not None:
        from streamprune.tasks import table

        print(table(result.tasks))
    where = (f"{result.device}, batch {result.batch}, hidden states on {result.offload_activations}, "
             f"{result.seconds:.1f}s, peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB")
    if result.perplexity is not None:
        print(f"perplexity {result.perplexity:.4f}  ({result.windows} windows x {result.seqlen} tokens, {where})")
    else:
        print(f"{result.task_sequences} sequences scored ({where})")
    if json_out:
        _write_json(json_out, result.to_dict())


@command("run", PruneOptions, RUN, _argument("model_dir", "Hugging Face model directory to prune (only read)."),
         _argument("out_dir", "Where the pruned checkpoint is written."))
def run_cmd(model_dir: Path, out_dir: Path, verbose: bool, options: dict[str, Any]) -> None:
    """Prune MODEL_DIR into OUT_DIR, one decoder block at a time; rerunning resumes an interrupted run."""
    from streamprune.pipeline import prune
    from streamprune.report import REPORT_NAME, summary_table

    ranks = Ranks()
    try:
        ranks = Ranks.from_env()  # several with torchrun: `torchrun --nproc-per-node N -m streamprune run ...`
        _setup_logging(verbose, ranks.rank)
        ranks.stop_on_sigterm()
        report = prune(model_dir, out_dir, progress=True, ranks=ranks, **options)
    except StreamPruneError as e:
        _fail(e, ranks)
    except BaseException as e:  # a bug or an interrupt: its traceback is this rank's; the others stay quiet
        ranks.claim_report(f"{type(e).__name__}: {e}")
        raise
    ranks.close()
    if not ranks.is_writer:
        return
    Console().print(summary_table(report))
    if report.perplexity is not None and report.eval is not None:
        dense = "" if report.dense_perplexity is None else f", dense {report.dense_perplexity:.4f}"
        print(f"perplexity {report.perplexity:.4f}{dense}  ({report.eval['windows']} windows x "
              f"{report.eval['seqlen']} tokens of {report.eval['file']})")
    print(f"wrote {out_dir} (report: {out_dir / REPORT_NAME})")


@command("sweep", PruneOptions, SWEEP, _argument("model_dir", "Hugging Face model directory to prune (only read)."),
         _argument("out_dir", "Where sweep.json, sweep.csv and sweep.png are written."))
def sweep_cmd(model_dir: Path, out_dir: Path, verbose: bool, options: dict[str, Any]) -> None:
    """Prune and evaluate many (method, sparsity) points in one read of MODEL_DIR; rerunning resumes."""
    from streamprune.pipeline import sweep
    from streamprune.sweep import SWEEP_NAME, summary_table

    _setup_logging(verbose)
    try:
        result = sweep(model_dir, out_dir, progress=True, **options)
    except StreamPruneError as e:
        _fail(e)
    Console().print(summary_table(result))
    print(f"wrote {out_dir / SWEEP_NAME}, sweep.csv" + (", sweep.png" if (out_dir / "sweep.png").is_file() else ""))


@command("plan", PruneOptions, PLAN, _argument("model_dir", "Hugging Face model directory."),
         _param("sweep", Annotated[bool, typer.Option("--sweep", help="Plan `streamprune sweep` with --methods, "
                                                      "--sparsities and --patterns (needs --eval) instead of a run.")],
                False), JSON)
def plan_cmd(model_dir: Path, sweep: bool, json_out: Path | None, verbose: bool, options: dict[str, Any]) -> None:
    """Predict the peak host and GPU memory of `streamprune run` (or, with --sweep, `streamprune sweep`) without
    running anything."""
    from rich.table import Table

    from streamprune.plan import plan, sweep_plan

    _setup_logging(verbose)
    try:
        result = (sweep_plan if sweep else plan)(model_dir, **options)
    except StreamPruneError as e:
        _fail(e)
    nproc = options["nproc"]
    ranks = "" if nproc == 1 else f", per rank of {nproc}"
    table = Table(title=f"memory plan of the {'sweep' if sweep else 'run'} of {model_dir} (activations: "
                        f"{result.placement}{ranks})")
    table.add_column("consumer")
    table.add_column("MiB", justify="right")
    table.add_column("where")
    for what, nbytes, where in result.consumers:
        table.add_row(what, f"{nbytes / 2**20:,.1f}", where)
    table.caption = (f"predicted peak: host {result.host_peak / 2**20:,.0f} MiB, "
                     f"GPU {result.device_peak / 2**20:,.0f} MiB; {result.batch} windows per forward call")
    if nproc > 1:
        table.caption += (f"\n{nproc} ranks per node: host {nproc * result.host_peak / 2**20:,.0f} MiB in all, "
                          "each rank on its own GPU")
    if result.read_bytes:
        table.caption += (f"\nreads {result.read_bytes / 2**20:,.1f} MiB of the checkpoint, writes "
                          f"{result.output_bytes / 2**20:,.1f} MiB (unquantized)")
    if result.disk_read_per_block:
        table.caption += (f"\nactivations on disk: {result.disk_read_per_block / 2**20:,.1f} MiB read and "
                          f"{result.disk_written_per_block / 2**20:,.1f} MiB written per block (an expert routed fewer "
                          "than --moe-min-tokens tokens reads every token twice more)")
    if result.offload_hessian:
        table.caption += "\nX^T X waits in host memory while its inverse factor is on the GPU (to fit the budget)"
    Console().print(table)
    if json_out:
        _write_json(json_out, result.to_dict())


def main() -> None:
    from streamprune.memory import allocate_large_buffers_with_mmap

    allocate_large_buffers_with_mmap()  # flat RSS over many blocks; process-wide, so the command line decides
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

