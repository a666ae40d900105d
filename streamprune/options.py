"""Every option of the commands, declared once: its type and default (the field), its help, the commands that take
it, its check and whether it is part of a job's fingerprint.

The command line (`cli.py`), the Python API (`prune`, `sweep`, `plan`, `evaluate`) and the fingerprint of a run
(`journal.fingerprint`) are all derived from these declarations. Adding an option means adding its field here and
using it where it acts.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamprune.activations import PLACEMENTS
from streamprune.errors import ArgumentError
from streamprune.experts import EXPERT_CRITERIA
from streamprune.formats import FORMATS
from streamprune.owl import ALLOCATIONS, OWL_LAMBDA, OWL_M
from streamprune.pruners import METHODS
from streamprune.pruners.admm import DEFAULT_SOLVE as ADMM_DEFAULT_SOLVE
from streamprune.pruners.admm import SOLVES as ADMM_SOLVES

RUN, SWEEP, PLAN, EVAL = "run", "sweep", "plan", "eval"
MOE_CALIBRATION = ("routed", "all")


@dataclass(frozen=True)
class Scope:
    """What decides which options a job's fingerprint holds."""

    knobs: frozenset[str] = frozenset()  # the options the job's methods read
    moe: bool = False  # the model has routed experts
    quantized: bool = False  # --wbits is given
    owl: bool = False  # --allocation owl
    experts_removed: bool = False  # --prune-experts
    digests: Mapping[str, str] = dataclasses.field(default_factory=dict)  # a data file's digest stands for its path


Rule = Callable[[Scope, str, Any], bool]  # (scope, option name, value) -> part of the fingerprint


def always(scope: Scope, name: str, value: Any) -> bool:
    return True


def when_read(scope: Scope, name: str, value: Any) -> bool:
    """A method's own option: when a method of the job reads it."""
    return name in scope.knobs


def when_moe(scope: Scope, name: str, value: Any) -> bool:
    return scope.moe


def when_quantized(scope: Scope, name: str, value: Any) -> bool:
    return scope.quantized


def when_owl(scope: Scope, name: str, value: Any) -> bool:
    return scope.owl


def when_experts_removed(scope: Scope, name: str, value: Any) -> bool:
    return scope.experts_removed


def when_not_dense(scope: Scope, name: str, value: Any) -> bool:
    return value not in (None, "dense")


def when_given(scope: Scope, name: str, value: Any) -> bool:
    return value is not None


def when_evaluated(scope: Scope, name: str, value: Any) -> bool:
    return "eval" in scope.digests


@dataclass(frozen=True)
class Decl:
    """How one option is written on the command line, checked and fingerprinted (its type and default are the
    field's)."""

    help: str
    commands: frozenset[str]
    flag: str | None = None  # the command line's spelling when not --name-with-dashes (e.g. "--sym/--asym")
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # the smallest value accepted
    parse: Callable[[str], Any] | None = None  # the command line's text to the value (a size, a list)
    repeat: bool = False  # the command line takes it several times (its values as a tuple of texts)
    fingerprint: Rule | None = None  # part of the fingerprint under this rule (None: never)

    def flags(self, name: str) -> list[str]:
        return [self.flag or "--" + name.replace("_", "-")]

    def check(self, name: str, value: Any) -> None:
        label = name.replace("_", "-")
        if self.choices is not None and value is not None and value not in self.choices:
            raise ArgumentError(f"{label} {value!r} is not one of {', '.join(self.choices)}")
        if self.minimum is not None and value is not None and not value >= self.minimum:
            raise ArgumentError(f"{label} {value!r} must be at least {self.minimum:g}")


def option(default: Any, help: str, commands: tuple[str, ...], **decl: Any) -> Any:
    """A field of an options dataclass, with its declaration."""
    return field(default=default, metadata={"decl": Decl(help, frozenset(commands), **decl)})


@dataclass(frozen=True)
class Shared:
    """An option of both options dataclasses (`eval`'s and the others'), declared once."""

    default: Any
    decl: Decl

    def field(self) -> Any:
        return field(default=self.default, metadata={"decl": self.decl})


def split_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in split_list(text))
    except ValueError as e:
        raise ArgumentError(f"sparsities {text!r} is not a comma-separated list of numbers") from e


def parse_fractions(text: str) -> float | tuple[float, ...]:
    """One fraction (a run's) or several (a sweep's)."""
    try:
        levels = tuple(float(item) for item in split_list(text))
    except ValueError as e:
        raise ArgumentError(f"--prune-experts {text!r} is not a fraction or a comma-separated list of them") from e
    return levels[0] if len(levels) == 1 else levels


def parse_size(text: str) -> int:
    from streamprune.memory import parse_size as parse

    return parse(text)


ALL = (RUN, SWEEP, PLAN)
RUN_SWEEP = (RUN, SWEEP)
RUN_PLAN = (RUN, PLAN)
SWEEP_PLAN = (SWEEP, PLAN)
DEVICE = Shared("auto", Decl("Where to compute: auto (CUDA when present), cpu, cuda or cuda:N.",
                             frozenset((RUN, SWEEP, PLAN, EVAL)), fingerprint=always))
BATCH = Shared(8, Decl("Windows per forward call (shrinks to fit the GPU budget).", frozenset((RUN, SWEEP, PLAN, EVAL)),
                       minimum=1, fingerprint=always))  # the batch as fitted to the GPU budget
OFFLOAD_ACTIVATIONS = Shared("auto", Decl(
    "Where activations live: on the device when they fit, else host memory, else temporary files (in OUT_DIR; for "
    "eval in $TMPDIR).", frozenset((RUN, SWEEP, PLAN, EVAL)), choices=PLACEMENTS))
INCLUDE_PATH = Shared(None, Decl("Tasks: a folder of lm-eval task YAML files (e.g. tasks over local data files).",
                                 frozenset((RUN, PLAN, EVAL))))
NUM_FEWSHOT = Shared(None, Decl("Tasks: few-shot examples per request (default: each task's own).",
                                frozenset((RUN, PLAN, EVAL)), minimum=0))
LIMIT = Shared(None, Decl("Tasks: at most this many documents per task (below 1: that fraction).",
                          frozenset((RUN, PLAN, EVAL)), minimum=0))
MAX_GPU_MEMORY = Shared(None, Decl(  # bytes
    "GPU memory the job may plan for, e.g. 24GiB or 20GB (planning a GPU job on a machine without one: the card's "
    "size).", frozenset((RUN, SWEEP, PLAN, EVAL)), parse=parse_size))


@dataclass
class PruneOptions:
    """The options of `run`, `sweep` and `plan` (each takes those that name it)."""

    method: str = option("sparsegpt", "Pruning method.", RUN_PLAN, choices=tuple(METHODS), fingerprint=always)
    sparsity: float | None = option(
        None, "Fraction of weights removed per matrix, in [0, 1) (default 0.5; N:M implies it).", (RUN,),
        fingerprint=always)
    pattern: str = option("unstructured", "'unstructured' or N:M such as 2:4 or 4:8.", (RUN,), fingerprint=always)
    calib: tuple[str, ...] | Path | None = option(
        None, "Calibration data: .txt, .jsonl with a 'text' field, or .npy token ids; FILE:N draws N windows from FILE "
              "(default --nsamples); repeat it to calibrate on several files.", ALL, repeat=True)
    nsamples: int = option(128, "Number of calibration windows (of each --calib FILE given without a count).", ALL,
                           fingerprint=always)
    seqlen: int | None = option(None, "Calibration window length (default: the model's maximum, at most 2048).", ALL,
                                fingerprint=always)
    seed: int = option(0, "Seed for drawing calibration windows.", RUN_SWEEP, fingerprint=always)
    device: str = DEVICE.field()
    sequential: bool = option(True, "Statistics of later sub-layers come from already pruned earlier ones.", ALL,
                              flag="--sequential/--no-sequential", fingerprint=always)
    blocksize: int = option(128, "SparseGPT column block size.", ALL, fingerprint=when_read)
    damp: float = option(0.01, "SparseGPT and ADMM Hessian damping, relative to its mean diagonal.", RUN_SWEEP,
                         fingerprint=when_read)
    admm_iterations: int = option(8, "ADMM: iterations of the joint mask and weight search (the sparsity rises over "
                                     "the first three quarters).", RUN_SWEEP, fingerprint=when_read)
    admm_rho: float = option(0.3, "ADMM: penalty rho, relative to the Hessian's unit diagonal after scaling.",
                             RUN_SWEEP, fingerprint=when_read)
    admm_solve: str = option(
        ADMM_DEFAULT_SOLVE, "ADMM: how the kept weights of the final mask are solved: pcg (a few preconditioned "
                            "conjugate-gradient steps from the ADMM iterate) or exact (conjugate gradients to the "
                            "optimum of the mask, several times slower).", RUN_SWEEP, choices=ADMM_SOLVES,
        fingerprint=when_read)
    batch: int = BATCH.field()
    threads: int | None = option(None, "CPU threads the job computes with (default: torch's, one per core); the "
                                       "pruned weights' last bits depend on it, so the same count gives the same "
                                       "bytes.", RUN_SWEEP, minimum=1)
    layer_errors: bool | None = option(
        None, "Compute each pruned linear's reconstruction error for the report (default: for sparsegpt, which holds "
              "X^T X anyway; wanda and magnitude would keep a d x d X^T X for it alone).", ALL,
        flag="--layer-errors/--no-layer-errors", fingerprint=always)
    offload_activations: str = OFFLOAD_ACTIVATIONS.field()
    max_gpu_memory: int | None = MAX_GPU_MEMORY.field()
    overwrite: bool = option(False, "Replace the files of a non-empty OUT_DIR that holds no job of streamprune.",
                             RUN_SWEEP)
    restart: bool = option(False, "Start over even if OUT_DIR holds an unfinished job with other arguments.",
                           RUN_SWEEP)
    profile_memory: bool = option(False, "Sample RSS and GPU memory into OUT_DIR/streamprune_memory.csv.", (RUN,))
    moe_calibration: str = option(
        "routed", "Mixture-of-Experts: each expert's statistics come from the calibration tokens routed to it, or "
                  "from every token (its output still uses the router's weights).", RUN_SWEEP,
        choices=MOE_CALIBRATION, fingerprint=when_moe)
    moe_min_tokens: int = option(
        128, "Mixture-of-Experts: an expert routed fewer calibration tokens takes the statistics of every token "
             "entering its MoE layer.", RUN_SWEEP, minimum=1, fingerprint=when_moe)
    prune_experts: float | tuple[float, ...] | None = option(
        None, "Mixture-of-Experts: remove this fraction F of the routed experts of every MoE block (floor(F x "
              "experts), the same count in each), those --expert-criterion scores lowest; the output is the same "
              "architecture with fewer experts, renumbered in their order. With --sparsity 0 (and no --wbits) nothing "
              "else changes: every kept tensor is copied bit for bit. A sweep takes several, comma-separated.", ALL,
        parse=parse_fractions, fingerprint=when_given)
    expert_criterion: str = option(
        "reap", "--prune-experts: the score whose lowest experts go: reap (mean over the calibration tokens routed "
                "to the expert of router weight x output norm), ean (sum of its output norms over them), frequency "
                "(how many are routed to it) or random (drawn from --seed).", RUN_PLAN, choices=EXPERT_CRITERIA,
        fingerprint=when_experts_removed)
    expert_criteria: tuple[str, ...] = option(
        ("reap",), "Sweep: the criteria whose expert removal is swept at each --prune-experts fraction, "
                   "comma-separated (those of --expert-criterion but random).", (SWEEP,), parse=split_list)
    expert_scores: Path | None = option(
        None, "--prune-experts: remove the experts with the lowest scores of this report (streamprune_report.json "
              "of a run of the same model, e.g. with --prune-experts 0, which scores every expert and removes none) "
              "instead of scoring them: no calibration data is read unless something else needs it.", RUN_PLAN,
        fingerprint=when_given)
    compensate_experts: bool = option(
        False, "--prune-experts: after a block's experts are chosen, fit each kept expert's down projection by least "
               "squares so that the block's output on the calibration tokens stays as near the dense block's as it "
               "can (needs --calib and --sequential); the output keeps plain removal's names and shapes. A sweep "
               "sweeps each removal point with and without it.", ALL, flag="--compensate-experts",
        fingerprint=when_experts_removed)
    experts_multiple: int = option(1, "--prune-experts: round the kept count down to a multiple of this (as "
                                      "expert-parallel serving needs).", ALL, minimum=1,
                                   fingerprint=when_experts_removed)
    wbits: int | None = option(None, "Quantize the kept weights to 2, 3, 4 or 8 bits in the same solve (default: no "
                                     "quantization).", RUN_PLAN, fingerprint=when_quantized)
    group_size: int = option(128, "Input columns per quantization group (must divide every pruned matrix's "
                                  "columns); -1: one per row.", RUN_PLAN, fingerprint=when_quantized)
    sym: bool = option(True, "Symmetric grid (zero point 2**(wbits-1)) or asymmetric (its own zero point per "
                             "group).", RUN_PLAN, flag="--sym/--asym", fingerprint=when_quantized)
    format: str | None = option(
        None, "How the pruned linears are written: 'dense' (weights in the model's dtype; with --wbits, the "
              "dequantized values), 'compressed-tensors' (needs --wbits: int weights packed into int32 with "
              "per-group scales, the pack-quantized format transformers and vLLM load), 'fp8' (float8 e4m3 with a "
              "scale per 128 x 128 tile, as DeepSeek-V3 is published) or 'mxfp4' (the routed experts in FP4 with a "
              "power-of-two scale per 32 inputs, as gpt-oss is published; the other linears dense). Default: as the "
              "input stores them (fp8 or mxfp4 for such a checkpoint, else dense).", (RUN,), choices=FORMATS,
        fingerprint=when_not_dense)
    eval: Path | None = option(
        None, "Also compute the pruned model's perplexity on this file (.txt, .jsonl with 'text', or .npy token ids) "
              "in the same pass, on the windows `streamprune eval` would draw.", ALL, flag="--eval",
        fingerprint=when_given)
    eval_nsamples: int | None = option(None, "--eval: use at most this many windows.", ALL)
    eval_seqlen: int | None = option(None, "--eval: window length (default: the model's maximum, at most 2048).", ALL)
    eval_dense: bool = option(False, "--eval: also the dense model's perplexity on the same windows, from the same "
                                     "reads.", RUN_PLAN, flag="--eval-dense", fingerprint=when_evaluated)
    eval_tasks: tuple[str, ...] = option(
        (), "Also score the pruned model on these lm-evaluation-harness tasks (comma-separated) in the same pass, as "
            "`streamprune eval --tasks` would (with --eval-dense, the dense model too; needs the tasks extra).",
        RUN_PLAN, parse=split_list)
    include_path: Path | None = INCLUDE_PATH.field()
    num_fewshot: int | None = NUM_FEWSHOT.field()
    limit: float | None = LIMIT.field()
    allocation: str = option(
        "uniform", "Each block's sparsity: 'uniform' (--sparsity everywhere) or 'owl' (outlier-weighted: blocks with "
                   "more outliers among their Wanda scores keep more weights; the mean over all pruned weights stays "
                   "--sparsity; needs --calib and an unstructured pattern).", RUN_PLAN, choices=ALLOCATIONS,
        fingerprint=when_owl)
    owl_lambda: float = option(OWL_LAMBDA, "--allocation owl: the block sparsities spread over 2 x lambda around "
                                           "--sparsity (their weighted mean).", (RUN,), fingerprint=when_owl)
    owl_m: float = option(OWL_M, "--allocation owl: a weight is an outlier when its Wanda score exceeds M times its "
                                 "block's mean score.", (RUN,), fingerprint=when_owl)
    methods: tuple[str, ...] = option(("sparsegpt", "wanda", "magnitude"), "Comma-separated methods, each swept over "
                                      "every level and pattern.", SWEEP_PLAN, parse=split_list)
    sparsities: tuple[float, ...] | None = option(
        None, "Comma-separated unstructured sparsity levels, e.g. 0.1,0.2,0.3 (default 0.1 to 0.8; with "
              "--prune-experts, 0: the experts removed, nothing else).", SWEEP_PLAN, parse=parse_levels)
    patterns: tuple[str, ...] = option((), "Comma-separated N:M patterns swept too, e.g. 2:4,4:8 (default: none).",
                                       SWEEP_PLAN, parse=split_list)
    save_dir: Path | None = option(None, "Also write each point's pruned checkpoint into SAVE_DIR/<method>-<level>.",
                                   (SWEEP,), fingerprint=always)
    nproc: int = option(1, "Ranks per node (torchrun --nproc-per-node): the plan is one rank's, its share of the "
                           "windows beside a whole block.", (PLAN,), minimum=1)

    @classmethod
    def of(cls, command: str, options: Mapping[str, Any]) -> PruneOptions:
        """The options given to `command` through the Python API, checked."""
        return given(cls, command, options)

    def args(self, command: str) -> dict[str, Any]:
        """The options `command` takes, by name (paths as text), for its report."""
        return {name: str(v) if isinstance(v, Path) else v for name in names(type(self), command)
                for v in [getattr(self, name)]}


@dataclass
class EvalOptions:
    """The options of `eval`."""

    seqlen: int | None = option(None, "--data: window length (default: the model's maximum, at most 2048).", (EVAL,))
    nsamples: int | None = option(None, "--data: use at most this many windows.", (EVAL,))
    tasks: tuple[str, ...] = option((), "lm-evaluation-harness tasks, comma-separated (e.g. piqa,arc_easy): every "
                                        "log-likelihood request scored in one pass (needs the tasks extra).", (EVAL,),
                                    parse=split_list)
    include_path: Path | None = INCLUDE_PATH.field()
    num_fewshot: int | None = NUM_FEWSHOT.field()
    limit: float | None = LIMIT.field()
    device: str = DEVICE.field()
    batch: int = BATCH.field()
    offload_activations: str = OFFLOAD_ACTIVATIONS.field()
    max_gpu_memory: int | None = MAX_GPU_MEMORY.field()

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> EvalOptions:
        """The options given to `evaluate`, checked."""
        return given(cls, EVAL, options)


def decl(f: dataclasses.Field) -> Decl:
    return f.metadata["decl"]


def declared(cls: type, command: str) -> list[tuple[dataclasses.Field, Decl, Any]]:
    """The fields of options dataclass `cls` that `command` takes, with their declarations and types."""
    hints = typing.get_type_hints(cls)
    return [(f, decl(f), hints[f.name]) for f in dataclasses.fields(cls) if command in decl(f).commands]


def names(cls: type, command: str) -> list[str]:
    return [f.name for f, _, _ in declared(cls, command)]


def given(cls: type, command: str, options: Mapping[str, Any]) -> Any:
    """An instance of options dataclass `cls` from the options given to `command` through the Python API, each
    checked; an option the command does not take is refused by name."""
    unknown = set(options) - set(names(cls, command))
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    opts = cls(**options)
    check(opts, command)
    return opts


def check(opts: Any, command: str) -> None:
    """Each option's own check (choices, minimum); checks that involve the model or other options are the job's."""
    for f, d, _ in declared(type(opts), command):
        d.check(f.name, getattr(opts, f.name))


def fingerprint_args(args: Mapping[str, Any], command: str, scope: Scope) -> dict[str, Any]:
    """The options of `command` that change what a job writes, under `scope`: each whose rule holds, with its
    resolved value from `args` (a data file: its digest)."""
    return {f.name: scope.digests.get(f.name, args[f.name]) for f, d, _ in declared(PruneOptions, command)
            if d.fingerprint is not None and d.fingerprint(scope, f.name, args[f.name])}


def finite_at_least(label: str, value: float, minimum: float, strict: bool = False) -> None:
    """Refuse a value that is not a finite number >= (or, `strict`, >) `minimum`."""
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ArgumentError(f"{label} {value!r} must be a finite number {'>' if strict else '>='} {minimum:g}")
