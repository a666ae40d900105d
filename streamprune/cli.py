"""Command-line interface: each command is a thin wrapper over one library function."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from streamprune.dist import RankLost, Ranks
from streamprune.errors import ArgumentError, StreamPruneError
from streamprune.formats import FORMATS
from streamprune.owl import OWL_LAMBDA, OWL_M
from streamprune.pruners import METHODS

logger = logging.getLogger("streamprune")
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune language models one block at a time.")
console = Console(stderr=True)


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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


class OffloadChoice(str, Enum):
    auto = "auto"
    device = "device"
    cpu = "cpu"
    disk = "disk"


def parse_size(text: str | None) -> int | None:
    """'24GiB', '20GB', '512MiB' or a plain byte count."""
    from streamprune.memory import parse_size as parse

    return None if text is None else parse(text)


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json).")],
    data: Annotated[Path, typer.Option("--data", help="Evaluation data: .txt, .jsonl with a 'text' field, or .npy token ids.")],
    seqlen: Annotated[Optional[int], typer.Option(help="Window length (default: the model's maximum, at most 2048).")] = None,
    nsamples: Annotated[Optional[int], typer.Option(help="Use at most this many windows.")] = None,
    device: Annotated[DeviceChoice, typer.Option(help="Where to compute.")] = DeviceChoice.auto,
    batch: Annotated[int, typer.Option(help="Windows per forward call (shrinks to fit the GPU budget).")] = 8,
    offload_activations: Annotated[OffloadChoice, typer.Option(help="Where the windows' hidden states live: on the device when they fit, else host memory, else a temporary file in $TMPDIR.")] = OffloadChoice.auto,
    max_gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory the evaluation may plan for, e.g. 24GiB or 20GB.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Perplexity of MODEL_DIR on DATA, streaming one block at a time."""
    from streamprune.evaluate import evaluate

    _setup_logging(verbose)
    try:
        result = evaluate(model_dir, data, seqlen=seqlen, nsamples=nsamples, device=device.value, progress=True,
                          offload_activations=offload_activations.value, max_gpu_memory=parse_size(max_gpu_memory),
                          batch=batch)
    except StreamPruneError as e:
        _fail(e)
    print(f"perplexity {result.perplexity:.4f}  ({result.windows} windows x {result.seqlen} tokens, {result.device}, "
          f"batch {result.batch}, hidden states on {result.offload_activations}, {result.seconds:.1f}s)")
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


class MoeCalibrationChoice(str, Enum):
    routed = "routed"
    all = "all"


MethodChoice = Enum("MethodChoice", {name: name for name in METHODS}, type=str)  # type: ignore[misc]
WBITS_HELP = "Quantize the kept weights to 2, 3, 4 or 8 bits in the same solve (default: no quantization)."
GROUP_SIZE_HELP = "Input columns per quantization group (must divide every pruned matrix's columns); -1: one per row."
FormatChoice = Enum("FormatChoice", {name.replace("-", "_"): name for name in FORMATS}, type=str)  # type: ignore[misc]
FORMAT_HELP = ("How the pruned linears are written: 'dense' (weights in the input's dtype; with --wbits, the dequantized "
               "values) or 'compressed-tensors' (needs --wbits: int weights packed into int32 with per-group scales, the "
               "pack-quantized format transformers and vLLM load).")
SYM_HELP = "Symmetric grid (zero point 2**(wbits-1)) or asymmetric (its own zero point per group)."
EVAL_HELP = ("Also compute the pruned model's perplexity on this file (.txt, .jsonl with 'text', or .npy token ids) in "
             "the same pass, on the windows `streamprune eval` would draw.")
EVAL_NSAMPLES_HELP = "--eval: use at most this many windows."
EVAL_SEQLEN_HELP = "--eval: window length (default: the model's maximum, at most 2048)."
EVAL_DENSE_HELP = "--eval: also the dense model's perplexity on the same windows, from the same reads."
class AllocationChoice(str, Enum):
    uniform = "uniform"
    owl = "owl"


ALLOCATION_HELP = ("Each block's sparsity: 'uniform' (--sparsity everywhere) or 'owl' (outlier-weighted: blocks with more "
                   "outliers among their Wanda scores keep more weights; the mean over all pruned weights stays "
                   "--sparsity; needs --calib and an unstructured pattern).")
OWL_LAMBDA_HELP = "--allocation owl: the block sparsities spread over 2 x lambda around --sparsity (their weighted mean)."
OWL_M_HELP = "--allocation owl: a weight is an outlier when its Wanda score exceeds M times its block's mean score."
LAYER_ERRORS_HELP = ("Compute each pruned linear's reconstruction error for the report (default: for sparsegpt, "
                     "which holds X^T X anyway; wanda and magnitude would keep a d x d X^T X for it alone).")


# Options that run, sweep and plan share
Nsamples = Annotated[int, typer.Option(help="Number of calibration windows.")]
Seqlen = Annotated[Optional[int], typer.Option(help="Calibration window length (default: the model's maximum, at most 2048).")]
Seed = Annotated[int, typer.Option(help="Seed for drawing calibration windows.")]
Sequential = Annotated[bool, typer.Option("--sequential/--no-sequential", help="Statistics of later sub-layers come from already pruned earlier ones.")]
Blocksize = Annotated[int, typer.Option(help="SparseGPT column block size.")]
Damp = Annotated[float, typer.Option(help="SparseGPT and ADMM Hessian damping, relative to its mean diagonal.")]
AdmmIterations = Annotated[int, typer.Option(help="ADMM: iterations of the joint mask and weight search (the sparsity rises over the first three quarters).")]
AdmmRho = Annotated[float, typer.Option(help="ADMM: penalty rho, relative to the Hessian's unit diagonal after scaling.")]
LayerErrors = Annotated[Optional[bool], typer.Option("--layer-errors/--no-layer-errors", help=LAYER_ERRORS_HELP, show_default=False)]


@app.command("run")
def run_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory to prune (only read).")],
    out_dir: Annotated[Path, typer.Argument(help="Where the pruned checkpoint is written.")],
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights removed per matrix, in [0, 1) (default 0.5; N:M implies it).")] = None,
    method: Annotated[MethodChoice, typer.Option(help="Pruning method.")] = MethodChoice.sparsegpt,
    pattern: Annotated[str, typer.Option(help="'unstructured' or N:M such as 2:4 or 4:8.")] = "unstructured",
    calib: Annotated[Optional[Path], typer.Option(help="Calibration data: .txt, .jsonl with a 'text' field, or .npy token ids.")] = None,
    nsamples: Nsamples = 128,
    seqlen: Seqlen = None,
    seed: Seed = 0,
    device: Annotated[DeviceChoice, typer.Option(help="Where to compute.")] = DeviceChoice.auto,
    sequential: Sequential = True,
    blocksize: Blocksize = 128,
    damp: Damp = 0.01,
    admm_iterations: AdmmIterations = 8,
    admm_rho: AdmmRho = 0.3,
    batch: Annotated[int, typer.Option(help="Calibration windows per forward call.")] = 8,
    layer_errors: LayerErrors = None,
    offload_activations: Annotated[OffloadChoice, typer.Option(help="Where calibration activations live: on the device when they fit, else host memory, else a temporary file in OUT_DIR.")] = OffloadChoice.auto,
    max_gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory the run may plan for, e.g. 24GiB or 20GB.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the checkpoint files of a non-empty OUT_DIR that holds no run of this job.")] = False,
    restart: Annotated[bool, typer.Option(help="Start over even if OUT_DIR holds an unfinished run with other arguments.")] = False,
    profile_memory: Annotated[bool, typer.Option(help="Sample RSS and GPU memory into OUT_DIR/streamprune_memory.csv.")] = False,
    moe_calibration: Annotated[MoeCalibrationChoice, typer.Option(help="Mixture-of-Experts: each expert's statistics come from the calibration tokens routed to it, or from every token (its output still uses the router's weights).")] = MoeCalibrationChoice.routed,
    moe_min_tokens: Annotated[int, typer.Option(help="Mixture-of-Experts: an expert routed fewer calibration tokens takes the statistics of every token entering its MoE layer.")] = 128,
    wbits: Annotated[Optional[int], typer.Option(help=WBITS_HELP)] = None,
    group_size: Annotated[int, typer.Option(help=GROUP_SIZE_HELP)] = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help=SYM_HELP)] = True,
    format: Annotated[FormatChoice, typer.Option("--format", help=FORMAT_HELP)] = FormatChoice.dense,
    eval: Annotated[Optional[Path], typer.Option("--eval", help=EVAL_HELP)] = None,
    eval_nsamples: Annotated[Optional[int], typer.Option(help=EVAL_NSAMPLES_HELP)] = None,
    eval_seqlen: Annotated[Optional[int], typer.Option(help=EVAL_SEQLEN_HELP)] = None,
    eval_dense: Annotated[bool, typer.Option("--eval-dense", help=EVAL_DENSE_HELP)] = False,
    allocation: Annotated[AllocationChoice, typer.Option(help=ALLOCATION_HELP)] = AllocationChoice.uniform,
    owl_lambda: Annotated[float, typer.Option(help=OWL_LAMBDA_HELP)] = OWL_LAMBDA,
    owl_m: Annotated[float, typer.Option(help=OWL_M_HELP)] = OWL_M,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Prune MODEL_DIR into OUT_DIR, one decoder block at a time; rerunning resumes an interrupted run."""
    from streamprune.pipeline import prune
    from streamprune.report import REPORT_NAME, summary_table

    ranks = Ranks()
    try:
        ranks = Ranks.from_env()  # several with torchrun: `torchrun --nproc-per-node N -m streamprune run ...`
        _setup_logging(verbose, ranks.rank)
        ranks.stop_on_sigterm()
        report = prune(model_dir, out_dir, progress=True, ranks=ranks, method=method.value, sparsity=sparsity, pattern=pattern,
                       calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device.value,
                       sequential=sequential, blocksize=blocksize, damp=damp, admm_iterations=admm_iterations,
                       admm_rho=admm_rho, batch=batch, layer_errors=layer_errors,
                       offload_activations=offload_activations.value, max_gpu_memory=parse_size(max_gpu_memory),
                       overwrite=overwrite, restart=restart, profile_memory=profile_memory,
                       moe_calibration=moe_calibration.value, moe_min_tokens=moe_min_tokens, wbits=wbits,
                       group_size=group_size, sym=sym, format=format.value, eval=eval, eval_nsamples=eval_nsamples,
                       eval_seqlen=eval_seqlen, eval_dense=eval_dense, allocation=allocation.value,
                       owl_lambda=owl_lambda, owl_m=owl_m)
    except StreamPruneError as e:
        _fail(e, ranks)
    except BaseException as e:  # a bug or an interrupt: its traceback is this rank's; the others stay quiet
        ranks.claim_report(f"{type(e).__name__}: {e}")
        raise
    ranks.close()
    if not ranks.is_writer:
        return
    Console().print(summary_table(report))
    if report.perplexity is not None:
        dense = "" if report.dense_perplexity is None else f", dense {report.dense_perplexity:.4f}"
        print(f"perplexity {report.perplexity:.4f}{dense}  ({report.eval['windows']} windows x "  # type: ignore[index]
              f"{report.eval['seqlen']} tokens of {report.eval['file']})")  # type: ignore[index]
    print(f"wrote {out_dir} (report: {out_dir / REPORT_NAME})")


SWEEP_METHODS_HELP = "Comma-separated methods, each swept over every level and pattern."
SPARSITIES_HELP = "Comma-separated unstructured sparsity levels, e.g. 0.1,0.2,0.3."
PATTERNS_HELP = "Comma-separated N:M patterns swept too, e.g. 2:4,4:8 (default: none)."


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_levels(text: str) -> list[float]:
    try:
        return [float(item) for item in split_list(text)]
    except ValueError as e:
        raise ArgumentError(f"sparsities {text!r} is not a comma-separated list of numbers") from e


@app.command("sweep")
def sweep_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory to prune (only read).")],
    out_dir: Annotated[Path, typer.Argument(help="Where sweep.json, sweep.csv and sweep.png are written.")],
    calib: Annotated[Path, typer.Option(help="Calibration data: .txt, .jsonl with a 'text' field, or .npy token ids.")],
    eval: Annotated[Path, typer.Option("--eval", help="Evaluation data, as for run --eval.")],
    sparsities: Annotated[str, typer.Option(help=SPARSITIES_HELP)] = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8",
    methods: Annotated[str, typer.Option(help=SWEEP_METHODS_HELP)] = "sparsegpt,wanda,magnitude",
    patterns: Annotated[str, typer.Option(help=PATTERNS_HELP)] = "",
    save_dir: Annotated[Optional[Path], typer.Option(help="Also write each point's pruned checkpoint into SAVE_DIR/<method>-<level>.")] = None,
    nsamples: Nsamples = 128,
    seqlen: Seqlen = None,
    seed: Seed = 0,
    device: Annotated[DeviceChoice, typer.Option(help="Where to compute.")] = DeviceChoice.auto,
    sequential: Sequential = True,
    blocksize: Blocksize = 128,
    damp: Damp = 0.01,
    admm_iterations: AdmmIterations = 8,
    admm_rho: AdmmRho = 0.3,
    batch: Annotated[int, typer.Option(help="Windows per forward call.")] = 8,
    layer_errors: LayerErrors = None,
    offload_activations: Annotated[OffloadChoice, typer.Option(help="Where every point's activations live: on the device when they fit, else host memory, else temporary files in OUT_DIR.")] = OffloadChoice.auto,
    max_gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory the sweep may plan for, e.g. 24GiB or 20GB.")] = None,
    eval_nsamples: Annotated[Optional[int], typer.Option(help=EVAL_NSAMPLES_HELP)] = None,
    eval_seqlen: Annotated[Optional[int], typer.Option(help=EVAL_SEQLEN_HELP)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the sweep files of a non-empty OUT_DIR that holds no sweep.")] = False,
    restart: Annotated[bool, typer.Option(help="Start over even if OUT_DIR holds an unfinished sweep with other arguments.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Prune and evaluate many (method, sparsity) points in one read of MODEL_DIR; rerunning resumes."""
    from streamprune.sweep import SWEEP_NAME, summary_table, sweep

    _setup_logging(verbose)
    try:
        result = sweep(model_dir, out_dir, methods=split_list(methods), sparsities=parse_levels(sparsities),
                       patterns=split_list(patterns), save_dir=save_dir, progress=True, calib=calib, eval=eval,
                       nsamples=nsamples, seqlen=seqlen, seed=seed, device=device.value, sequential=sequential,
                       blocksize=blocksize, damp=damp, admm_iterations=admm_iterations, admm_rho=admm_rho,
                       batch=batch, layer_errors=layer_errors,
                       offload_activations=offload_activations.value, max_gpu_memory=parse_size(max_gpu_memory),
                       eval_nsamples=eval_nsamples, eval_seqlen=eval_seqlen, overwrite=overwrite, restart=restart)
    except StreamPruneError as e:
        _fail(e)
    Console().print(summary_table(result))
    print(f"wrote {out_dir / SWEEP_NAME}, sweep.csv" + (", sweep.png" if (out_dir / "sweep.png").is_file() else ""))


@app.command("plan")
def plan_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory.")],
    nsamples: Nsamples = 128,
    seqlen: Seqlen = None,
    device: Annotated[DeviceChoice, typer.Option(help="Where the run would compute.")] = DeviceChoice.auto,
    offload_activations: Annotated[OffloadChoice, typer.Option(help="Activation placement, as for run.")] = OffloadChoice.auto,
    max_gpu_memory: Annotated[Optional[str], typer.Option(help="GPU memory the run may plan for, e.g. 24GiB.")] = None,
    method: Annotated[MethodChoice, typer.Option(help="Pruning method.")] = MethodChoice.sparsegpt,
    batch: Annotated[int, typer.Option(help="Calibration windows per forward call.")] = 8,
    sequential: Annotated[bool, typer.Option("--sequential/--no-sequential", help="As for run: --no-sequential holds every site's X^T X at once.")] = True,
    layer_errors: LayerErrors = None,
    blocksize: Blocksize = 128,
    wbits: Annotated[Optional[int], typer.Option(help=WBITS_HELP)] = None,
    group_size: Annotated[int, typer.Option(help=GROUP_SIZE_HELP)] = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help=SYM_HELP)] = True,
    eval: Annotated[Optional[Path], typer.Option("--eval", help=EVAL_HELP)] = None,
    eval_nsamples: Annotated[Optional[int], typer.Option(help=EVAL_NSAMPLES_HELP)] = None,
    eval_seqlen: Annotated[Optional[int], typer.Option(help=EVAL_SEQLEN_HELP)] = None,
    eval_dense: Annotated[bool, typer.Option("--eval-dense", help=EVAL_DENSE_HELP)] = False,
    allocation: Annotated[AllocationChoice, typer.Option(help=ALLOCATION_HELP)] = AllocationChoice.uniform,
    nproc: Annotated[int, typer.Option(help="Ranks per node (torchrun --nproc-per-node): the plan is one rank's, its share of the windows beside a whole block.")] = 1,
    sweep: Annotated[bool, typer.Option("--sweep", help="Plan `streamprune sweep` with --methods, --sparsities and --patterns (needs --eval) instead of a run.")] = False,
    methods: Annotated[str, typer.Option(help="--sweep: " + SWEEP_METHODS_HELP)] = "sparsegpt,wanda,magnitude",
    sparsities: Annotated[str, typer.Option(help="--sweep: " + SPARSITIES_HELP)] = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8",
    patterns: Annotated[str, typer.Option(help="--sweep: " + PATTERNS_HELP)] = "",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the plan as JSON here.")] = None,
) -> None:
    """Predict the peak host and GPU memory of `streamprune run` (or, with --sweep, `streamprune sweep`) without
    running anything."""
    from rich.table import Table

    from streamprune.plan import plan
    from streamprune.sweep import sweep_plan

    try:
        if sweep:
            if nproc != 1:
                raise ArgumentError("--sweep plans one process; drop --nproc")
            result = sweep_plan(model_dir, split_list(methods), parse_levels(sparsities), split_list(patterns), eval,
                                nsamples=nsamples, seqlen=seqlen, device=device.value,
                                offload_activations=offload_activations.value,
                                max_gpu_memory=parse_size(max_gpu_memory), batch=batch, sequential=sequential,
                                blocksize=blocksize, eval_nsamples=eval_nsamples, eval_seqlen=eval_seqlen)
        else:
            result = plan(model_dir, nsamples=nsamples, seqlen=seqlen, device=device.value,
                          offload_activations=offload_activations.value, max_gpu_memory=parse_size(max_gpu_memory),
                          method=method.value, batch=batch, sequential=sequential, layer_errors=layer_errors,
                          blocksize=blocksize, wbits=wbits, group_size=group_size, sym=sym, eval=eval,
                          eval_nsamples=eval_nsamples, eval_seqlen=eval_seqlen, eval_dense=eval_dense,
                          allocation=allocation.value, nproc=nproc)
    except StreamPruneError as e:
        _fail(e)
    what = "sweep" if sweep else "run"
    ranks = "" if nproc == 1 else f", per rank of {nproc}"
    table = Table(title=f"memory plan of the {what} of {model_dir} (activations: {result.placement}{ranks})")
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
    if result.offload_hessian:
        table.caption += "\nX^T X waits in host memory while its inverse factor is on the GPU (to fit the budget)"
    Console().print(table)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def main() -> None:
    from streamprune.memory import allocate_large_buffers_with_mmap

    allocate_large_buffers_with_mmap()  # flat RSS over many blocks; process-wide, so the command line decides
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
