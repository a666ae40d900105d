"""Predicting a run's peak host and device memory from the checkpoint's headers alone.

The model (see docs/memory.md): at any moment the process holds a fixed overhead (the
Python interpreter, torch and streamprune), the block being pruned as read plus the next block read
ahead (and a copy of the block on a GPU), the two calibration activation buffers wherever they are
placed, and one of two workspaces: while calibrating, X^T X of the inputs being watched plus the
forward workspace of one batch of windows; while pruning, X^T X, the solver's matrices and the
largest linear's temporaries. Embedding and head tensors are handled one at a time before and after
the blocks. Before all of it, the calibration windows are drawn: a bounded read and tokenization of
the data file (see calib.py), after which only the windows' token ids stay.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor

from streamprune.activations import choose_placement
from streamprune.arch import EXPERT_SEQUENTIAL, PRUNABLE, SEQUENTIAL, ModelConfig, Role, Site
from streamprune.arch.block import index_rows, layer_kinds, score_rows
from streamprune.arch.delta import CHUNK
from streamprune.calib import calib_sources, eval_windows, load_tokens, padded, read_workspace
from streamprune.checkpoint import Checkpoint
from streamprune.errors import ArgumentError, DataError
from streamprune.experts import kept_experts
from streamprune.memory import resolve_device
from streamprune.pruners import default_errors
from streamprune.pruners import Grid
from streamprune.pruners import method as pruner_method
from streamprune.tensorfile import TensorInfo

# RSS of a process that has imported torch and streamprune and started a run (measured on Linux x86-64).
HOST_OVERHEAD = 250 * 2**20
# RSS that lm-evaluation-harness adds once imported (transformers, datasets, ...: 147 MiB) with its index of tasks
# built (81 MiB), for --eval-tasks (measured with lm-eval 0.4.13 on Linux x86-64)
TASKS_OVERHEAD = 230 * 2**20
# Float32 temporaries of one batch in the block forward, in units of (batch * seqlen * width).
FORWARD_HIDDEN_COPIES = 8
FORWARD_FFN_COPIES = 3
# Soft-capped attention (Gemma 2): the float32 scores of one chunk of queries, and their softmax.
SOFTCAP_SCORE_COPIES = 2
# DeepSeek sparse attention's indexer: float32 copies of its queries (projected, rotated, upcast) and of one chunk of
# its scores (the products, their relu, the heads' weighted sum)
INDEX_QUERY_COPIES = 3
INDEX_SCORE_COPIES = 3
# Linear attention (Gated DeltaNet), per token of a window: float32 copies of every value head's queries and keys, of
# its values and outputs, of its chunks' (C x C) decays, triangular systems and scores, and the convolution's input
# (fitted to VmHWM at 2048 tokens on six head layouts; with two chunk copies the plan fell below one of seven
# measurements of tests/test_memory.py's layout, by 0.6%: three keep it above, by 7-8% there)
LINEAR_KEY_COPIES = 6  # of (value heads x key dim)
LINEAR_VALUE_COPIES = 5  # of (value heads x value dim)
LINEAR_CHUNK_COPIES = 3  # of (value heads x CHUNK)
GPU_HEADROOM = 0.9  # the share of the GPU budget that is planned for (the rest: CUDA context, fragmentation)


@dataclass
class MemoryPlan:
    placement: str
    batch: int  # windows per forward call, after fitting the GPU budget
    offload_hessian: bool  # X^T X waits in host memory while its solver matrix is on the GPU
    host_peak: int  # of one rank (the only one without --nproc)
    device_peak: int  # of one rank, on its own GPU
    consumers: list[tuple[str, int, str]] = field(default_factory=list)  # (what, bytes, where)
    nproc: int = 1  # ranks per node: the node's host memory holds this many times `host_peak`
    read_bytes: int = 0  # of the checkpoint, every pass counted (--prune-experts reads the routed experts twice)
    output_bytes: int = 0  # of the checkpoint written
    # with the activations on disk: the bytes one block (an MoE one, where there are) reads from and writes to their
    # files, every routed expert taken as routed at least --moe-min-tokens calibration tokens (one that is not
    # reads every token's row twice more)
    disk_read_per_block: int = 0
    disk_written_per_block: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"placement": self.placement, "batch": self.batch, "offload_hessian": self.offload_hessian,
                "nproc": self.nproc, "host_peak_bytes": self.host_peak, "device_peak_bytes": self.device_peak,
                "read_bytes": self.read_bytes, "output_bytes": self.output_bytes,
                "disk_read_per_block": self.disk_read_per_block, "disk_written_per_block": self.disk_written_per_block,
                "consumers": [{"what": w, "bytes": b, "where": p} for w, b, p in self.consumers]}


@dataclass
class Footprint:
    """Sizes in bytes that a run's memory is made of (see the module docstring)."""

    raw_block: int  # one block as stored (also its copy on a GPU; on the CPU the same tensors)
    pruned_stored: int  # the pruned weights as stored, awaiting the write
    hessians: int  # X^T X of the inputs watched at once (one site, or all of them without --sequential)
    solver_matrix: int  # the solver's d x d matrix for the widest input (0 for Wanda and magnitude)
    widest_hessian: int  # X^T X of the widest input: what moves to host memory when it is offloaded
    linear_solve: int  # the largest linear's temporaries while it is pruned
    site_dense: int  # the dense weights of the largest site, as stored, kept until their errors are computed
    linear_fp32: int  # one linear upcast to float32 by the forward
    per_window: int  # forward workspace of one calibration window
    activations: int  # the activation buffers (two while pruning: block input and output; one for eval)
    embed_stored: int  # the token embedding as stored
    embed_fp32: int  # and in float32
    positions: int = 0  # RoPE tables and window masks, or ALiBi's (1, H, T, T) bias: held for the whole run
    calib_ids: int = 0  # the calibration windows' token ids (int64), held for the whole run
    calib_read: int = 0  # drawing them from text, before block 0: the most that is read and tokenized at once
    expert_stored: int = 0  # one routed expert as stored (MoE): streamed one at a time, the next one read ahead
    routes: int = 0  # every calibration token's chosen experts and weights, held while a block's experts run
    site_unrounded: int = 0  # --wbits with errors: the largest site's weights before rounding (float32), until scored
    eval_activations: int = 0  # --eval: the evaluation windows' hidden states (part of `activations`, placed alike)
    # a checkpoint that stores linears encoded (fp8, packed): those of the largest block (of one expert) as stored and
    # as decoded (on the compute device, the block in use and the expert in flight), and the decoding's float64
    # temporaries of one slice of rows
    encoded: int = 0
    decoded: int = 0
    expert_encoded: int = 0
    expert_decoded: int = 0
    decode_workspace: int = 0

    @property
    def device_block(self) -> int:
        """The block's weights on the compute device: as stored, its encoded linears decoded."""
        return self.raw_block - self.encoded + self.decoded

    @property
    def device_expert(self) -> int:
        return self.expert_stored - self.expert_encoded + self.expert_decoded

    def calibrate_peak(self, batch: int) -> int:
        """Compute-device bytes while the block runs forward, beside its weights and the activations."""
        return self.hessians + self.linear_fp32 + batch * self.per_window

    def solve_peak(self, offload_hessian: bool) -> int:
        """Compute-device bytes while one linear is pruned, beside the block's weights and the activations."""
        matrices = self.hessians + self.solver_matrix - (self.widest_hessian if offload_hessian else 0)
        return matrices + self.linear_solve + self.site_dense + self.site_unrounded

    def device_peak(self, batch: int, offload_hessian: bool, activations_on_device: bool) -> int:
        """The block's weights (and one expert's, dense and pruned, with the routes), the activations, positions,
        and the larger workspace."""
        return (self.device_block + 2 * self.device_expert + self.routes + self.decode_workspace
                + (self.activations if activations_on_device else 0) + self.positions
                + max(self.calibrate_peak(batch), self.solve_peak(offload_hessian)))


def block_sizes(ckpt: Checkpoint) -> tuple[int, int, dict[Role, TensorInfo], list[list[TensorInfo]]]:
    """The largest block as stored outside its routed experts, one routed expert as stored, the linears by role and
    the sites' linears (experts' included); the blocks of a model share their shapes, except an MoE model's dense
    blocks and a hybrid model's blocks of each mixer: the first block of each kind stands for the others."""
    cfg = ckpt.config
    kinds = {cfg.kind(b): b for b in reversed(range(cfg.n_layers))}  # the first block of each kind
    raw_block = max(ckpt.stored_bytes(*ckpt.block_names(b)) for b in kinds.values())
    linears: dict[Role, TensorInfo] = {}
    for b in kinds.values():  # each role's largest (Gemma 4's global blocks have wider heads)
        for role in PRUNABLE:
            if ((role, "weight"), b) in ckpt.names:
                info = ckpt.info(ckpt.names[((role, "weight"), b)])
                if role not in linears or info.nbytes > linears[role].nbytes:
                    linears[role] = info
    expert = 0
    moe = [b for kind, b in kinds.items() if kind[0]]
    if moe:
        names = ckpt.experts[(moe[0], 0)]
        linears.update({param[0]: ckpt.info(name) for param, name in names.items() if param[1] == "weight"})
        expert = ckpt.stored_bytes(*names.values())
    sites = [[linears[r] for r in roles if r in linears] for _, roles in SEQUENTIAL + EXPERT_SEQUENTIAL]
    return raw_block, expert, linears, [site for site in sites if site]


def encoded_sizes(ckpt: Checkpoint) -> dict[str, int]:
    """For a checkpoint that stores linears encoded (fp8): the largest block's and one expert's encoded linears as
    stored and as decoded, and the decoding's float64 temporaries (a slice of rows of the widest one, and its scales
    spread over it)."""
    encoded = ckpt.layout.encoded
    if not encoded:
        return {}
    cfg = ckpt.config

    def sizes(names: list[str]) -> tuple[int, int]:
        mine = [n for n in names if n in encoded]
        return sum(ckpt.stored_bytes(n) for n in mine), sum(ckpt.info(n).nbytes for n in mine)

    kinds = {cfg.kind(b): b for b in reversed(range(cfg.n_layers))}
    block = max((sizes(ckpt.block_names(b)) for b in kinds.values()), key=lambda s: s[1])
    moe = [b for kind, b in kinds.items() if kind[0]]
    expert = sizes(list(ckpt.experts[(moe[0], 0)].values())) if moe else (0, 0)
    rows = getattr(ckpt.layout.format, "rows_at_once", 0)
    widest = max(ckpt.info(n).shape[1] for n in encoded)
    return dict(encoded=block[0], decoded=block[1], expert_encoded=expert[0], expert_decoded=expert[1],
                decode_workspace=2 * rows * widest * 8)


def site_widths(order: tuple[tuple[Site, tuple[Role, ...]], ...], linears: dict[Role, TensorInfo]) -> list[int]:
    """The input width of each site of `order` that has linears."""
    return [next(linears[r] for r in roles if r in linears).shape[1] for _, roles in order
            if any(r in linears for r in roles)]


def window_workspace(cfg: ModelConfig, seqlen: int) -> int:
    """Float32 temporaries of the block forward for one window. Attention runs on fused kernels, which never
    hold the (H, T, T) scores (on CUDA the math kernel, which would, is excluded; see `fused_attention`);
    soft-capped attention and attention with sinks, which no fused kernel computes, hold them for `score_rows`
    queries at a time."""
    width = max(cfg.hidden_size, *(cfg.n_heads * cfg.block(b).head_dim for b in range(cfg.n_layers)))
    ffn = max(cfg.ffn_dim, cfg.expert_ffn_dim, cfg.shared_ffn_dim)
    router = 2 * cfg.n_experts  # the router's logits and probabilities of each token
    explicit = cfg.attn_softcap is not None or cfg.attn_sinks
    scores = SOFTCAP_SCORE_COPIES * cfg.n_heads * score_rows(cfg, seqlen) if explicit else 0
    per_token = FORWARD_HIDDEN_COPIES * width + FORWARD_FFN_COPIES * ffn + router + scores
    if "linear_attention" in cfg.layer_types:  # a Gated DeltaNet block's mixer, beside its input and output
        nv = cfg.linear_v_heads
        conv = 2 * cfg.linear_k_heads * cfg.linear_k_dim + nv * cfg.linear_v_dim
        linear = (LINEAR_KEY_COPIES * nv * cfg.linear_k_dim + LINEAR_VALUE_COPIES * nv * cfg.linear_v_dim
                  + LINEAR_CHUNK_COPIES * nv * CHUNK + conv + FORWARD_HIDDEN_COPIES * cfg.hidden_size)
        per_token = max(per_token, linear)
    per_token += 3 * cfg.per_layer_dim  # per-layer inputs: the block's own, its projection and its gated copy
    if cfg.index_topk and cfg.index_topk < seqlen:  # sparse attention: its (T, T) mask, the indexer's queries, and
        per_token += seqlen + INDEX_QUERY_COPIES * cfg.index_heads * cfg.index_head_dim  # the (rows, heads, T) scores
        per_token += INDEX_SCORE_COPIES * cfg.index_heads * index_rows(cfg, seqlen)  # of a chunk (T per token's worth)
    return per_token * seqlen * 4


def routes_bytes(cfg: ModelConfig, tokens: int) -> int:
    """Each token's chosen experts (int64) and weights (float32), and the selection of one expert's rows."""
    return tokens * cfg.experts_per_tok * (8 + 4 + 1 + 8) if cfg.n_experts else 0


def carried_width(cfg: ModelConfig) -> int:
    """Floats per token a stream keeps beside its hidden states (hidden.HiddenStream.carry): the embeddings, for
    per-layer inputs; the keys and values of each block that later blocks reuse."""
    width = cfg.hidden_size if cfg.per_layer_dim else 0
    for bid in range(cfg.n_layers):
        if cfg.kv_mode(bid) == "store":
            b = cfg.block(bid)
            width += 2 * b.n_kv_heads * b.head_dim
    return width


def per_layer_bytes(cfg: ModelConfig, tokens: int) -> int:
    """A block's slices of the per-layer inputs' projection and table (perlayer.py), in float32, for windows of
    `tokens` tokens (at most that many distinct ids), and its inputs of one window's worth of rows, as stored."""
    if not cfg.per_layer_dim:
        return 0
    ids = min(tokens, cfg.vocab_size, cfg.per_layer_vocab)
    return (cfg.per_layer_dim * cfg.hidden_size + 2 * ids * cfg.per_layer_dim) * 4


def positions_bytes(cfg: ModelConfig, seqlen: int) -> int:
    """What `positions` holds for the run: ALiBi's float32 (1, H, T, T) bias, or for each kind of block RoPE's
    (T, head_dim) tables, a sliding window's or chunks' (1, 1, T, T) mask and NoPE queries' (T,) temperatures."""
    if cfg.pos == "alibi":
        return cfg.n_heads * seqlen * seqlen * 4
    if cfg.pos != "rope":
        return 0
    total = 0
    for name, kind in layer_kinds(cfg, seqlen).items():
        total += 0 if kind.rope is None else 2 * seqlen * kind.rotary_dim * 4
        total += seqlen * seqlen * 4 if kind.masked else 0
        total += seqlen * 4 if name.endswith(":nope") and cfg.nope_temperature is not None else 0
    return total


def footprint(ckpt: Checkpoint, nsamples: int, seqlen: int, method: str = "sparsegpt", sequential: bool = True,
              errors: bool | None = None, knobs: dict[str, Any] | None = None, grid: Grid | None = None,
              eval_windows: int = 0, eval_seqlen: int = 0, eval_streams: int = 0, owl: bool = False,
              compensate: bool = False) -> Footprint:
    """The sizes a run of `method` is made of; `errors` as `layer_errors` (None: the method's default); `knobs`
    the method's own options (their defaults where absent); `grid` the quantization grid (--wbits), if any;
    `eval_windows` windows of `eval_seqlen` tokens pushed through the blocks in `eval_streams` streams (--eval: the
    pruned model's; --eval-dense: the dense one's too), each one buffer (two for an MoE model), placed like the
    calibration activations. `owl` (--allocation owl): a forward of the dense model over the calibration windows
    before block 0, in the calibration activations (its column norms are vectors, its scores one linear's at a time:
    within the solve's terms); for magnitude, which otherwise has none, one buffer of them. `compensate`
    (--compensate-experts): a third calibration buffer, the dense block's output."""
    cls = pruner_method(method)
    keep = cls.accumulates(default_errors(cls, errors))  # what calibration accumulates: "xtx", "norms" or nothing
    cfg = ckpt.config
    raw_block, expert, linears, sites = block_sizes(ckpt)
    widths = [site[0].shape[1] for site in sites]
    largest = max(linears.values(), key=lambda i: math.prod(i.shape))
    widest = max(widths) ** 2 * 4
    embed = ckpt.tensors[ckpt.names[((Role.TOKEN_EMBD, "weight"), None)]]
    common = dict(raw_block=raw_block, pruned_stored=sum(i.nbytes for i in linears.values()),
                  site_dense=max(sum(i.nbytes for i in site) for site in sites), linear_fp32=math.prod(largest.shape) * 4,
                  embed_stored=embed.nbytes, embed_fp32=math.prod(embed.shape) * 4,
                  linear_solve=cls.workspace(*largest.shape, max(widths), knobs or {}, grid), expert_stored=expert,
                  site_unrounded=max(sum(4 * math.prod(i.shape) for i in site) for site in sites)
                  if grid is not None and keep == "xtx" else 0, **encoded_sizes(ckpt))
    kept = carried_width(cfg)  # each stream's embeddings and shared keys and values, kept beside its buffers
    evals = dict(eval_activations=eval_streams * ((2 if cfg.n_experts else 1) * cfg.hidden_size + kept) * eval_windows
                 * eval_seqlen * 4,
                 positions=positions_bytes(cfg, eval_seqlen) + per_layer_bytes(cfg, eval_windows * eval_seqlen)
                 if eval_streams else 0,
                 per_window=window_workspace(cfg, eval_seqlen) if eval_streams else 0,
                 routes=routes_bytes(cfg, eval_windows * eval_seqlen) if eval_streams else 0)
    if not keep and not owl:  # magnitude without reconstruction errors: no statistics, no forward (but --eval's)
        return Footprint(hessians=0, solver_matrix=0, widest_hessian=0, activations=evals["eval_activations"],
                         **evals, **common)
    if not keep:  # magnitude with --allocation owl: the dense pass's one buffer (updated in place) and its forward
        return Footprint(hessians=0, solver_matrix=0, widest_hessian=0,
                         per_window=max(window_workspace(cfg, seqlen), evals["per_window"]),
                         activations=(cfg.hidden_size + kept) * nsamples * seqlen * 4 + evals["eval_activations"],
                         eval_activations=evals["eval_activations"],
                         positions=positions_bytes(cfg, seqlen) + per_layer_bytes(cfg, nsamples * seqlen)
                         + evals["positions"], calib_ids=nsamples * seqlen * 8,
                         calib_read=read_workspace(seqlen), routes=evals["routes"], **common)
    # the inputs whose statistics are held at once: one site's; without --sequential, every site of the block
    # outside the routed experts, or one expert's two (its gate/up input and its down input), whichever is larger
    block_widths, expert_widths = (site_widths(order, linears) for order in (SEQUENTIAL, EXPERT_SEQUENTIAL))
    per_input = (lambda w: w * w * 4) if keep == "xtx" else (lambda w: w * 4)
    if sequential:
        held = per_input(max(widths))
    else:
        held = max(sum(per_input(w) for w in block_widths), sum(per_input(w) for w in expert_widths))
    return Footprint(
        hessians=held, solver_matrix=cls.solver_matrices * widest,
        widest_hessian=widest if keep == "xtx" else 0,
        per_window=max(window_workspace(cfg, seqlen), evals["per_window"]),
        activations=((3 if compensate else 2) * cfg.hidden_size + kept) * nsamples * seqlen * 4
        + evals["eval_activations"],
        eval_activations=evals["eval_activations"],
        positions=positions_bytes(cfg, seqlen) + per_layer_bytes(cfg, nsamples * seqlen) + evals["positions"],
        calib_ids=nsamples * seqlen * 8, calib_read=read_workspace(seqlen),
        routes=max(routes_bytes(cfg, nsamples * seqlen), evals["routes"]), **common)


def sweep_footprint(ckpt: Checkpoint, points: list[tuple[str, dict[str, Any], bool]], nsamples: int, seqlen: int,
                    sequential: bool, eval_windows: int, eval_seqlen: int) -> Footprint:
    """The sizes a sweep is made of: the block's weights once (each point prunes its own copy, one point at a time,
    so the workspaces are the largest point's), and every point's activations: its calibration buffers (none for
    magnitude without statistics) and its evaluation stream, plus the dense model's evaluation stream. `points`:
    (method, knobs, whether it compensates removed experts) of each point."""
    fps = [footprint(ckpt, nsamples, seqlen, method, sequential, None, knobs, None, eval_windows, eval_seqlen, 1,
                     compensate=compensate) for method, knobs, compensate in points]
    dense_eval = fps[0].eval_activations  # one stream's buffers, the dense model's
    largest = {f.name: max(getattr(fp, f.name) for fp in fps) for f in dataclasses.fields(Footprint)}
    summed = {"activations": sum(fp.activations for fp in fps) + dense_eval,
              "eval_activations": sum(fp.eval_activations for fp in fps) + dense_eval}
    cfg = ckpt.config
    if cfg.n_experts:  # while a block's experts go round the points, every point holds its routes (calibration and
        # evaluation tokens', the dense stream's too) and, without --sequential or where the block's third pass needs
        # it (ModelConfig.moe_beside_mlp), its pruned block outside the experts
        eval_routes = routes_bytes(cfg, eval_windows * eval_seqlen)
        summed["routes"] = (sum(routes_bytes(cfg, nsamples * seqlen) for fp in fps if fp.calib_ids)
                            + (len(fps) + 1) * eval_routes)
        if not sequential or cfg.moe_beside_mlp:
            summed["pruned_stored"] = sum(fp.pruned_stored for fp in fps)
    return Footprint(**(largest | summed))


def eval_footprint(ckpt: Checkpoint, nsamples: int, seqlen: int) -> Footprint:
    """The sizes an evaluation is made of: the block, one activation buffer (updated in place) and the forward."""
    raw_block, expert, linears, _ = block_sizes(ckpt)
    largest = max(math.prod(i.shape) for i in linears.values())
    embed = ckpt.tensors[ckpt.names[((Role.TOKEN_EMBD, "weight"), None)]]
    cfg = ckpt.config
    # an MoE block writes its output into a second buffer; per-layer inputs and shared keys and values keep theirs
    width = (2 if cfg.n_experts else 1) * cfg.hidden_size + carried_width(cfg)
    return Footprint(raw_block=raw_block, pruned_stored=0, hessians=0, solver_matrix=0, widest_hessian=0,
                     linear_solve=0, site_dense=0, linear_fp32=largest * 4,
                     per_window=window_workspace(cfg, seqlen),
                     activations=width * nsamples * seqlen * 4,
                     embed_stored=embed.nbytes, embed_fp32=math.prod(embed.shape) * 4,
                     positions=positions_bytes(cfg, seqlen) + per_layer_bytes(cfg, nsamples * seqlen),
                     expert_stored=expert,
                     routes=routes_bytes(cfg, nsamples * seqlen), **encoded_sizes(ckpt))


def run_eval_windows(ckpt: Checkpoint, data: str | Path | None, nsamples: int | None, seqlen: int | None,
                     dense: bool) -> Tensor | None:
    """The token windows (K, T) of a run's --eval FILE, drawn as `streamprune eval` draws them; None without it."""
    if data is None:
        if dense or nsamples is not None or seqlen is not None:
            raise ArgumentError("--eval-dense, --eval-nsamples and --eval-seqlen need --eval FILE")
        return None
    seqlen = ckpt.config.default_seqlen if seqlen is None else seqlen
    ckpt.config.check_seqlen(seqlen)
    return eval_windows(load_tokens(data, ckpt.dir, ckpt.config.vocab_size), seqlen, nsamples, source=str(data))


def eval_tasks(ckpt: Checkpoint, opts: Any, ranks: int) -> tuple[Any, dict]:
    """--eval-tasks: the tasks, checked, and the token sequences their requests score (none without it); `ranks`: the
    processes of the run."""
    if not opts.eval_tasks:
        return None, {}
    if ranks > 1:
        raise ArgumentError("--eval-tasks runs in one process: evaluate the output with `streamprune eval --tasks`")
    from streamprune.tasks import prepare_tasks  # lm-eval, only when tasks are asked for

    tasks = prepare_tasks(ckpt, opts.eval_tasks, opts.include_path, opts.num_fewshot, opts.limit)
    return tasks, tasks.record()


def eval_sizes(windows: Tensor | None, dense: bool, sequences: Iterable[Sequence[int]] = ()) -> tuple[int, int, int]:
    """`footprint`'s eval arguments: the windows' count and length (with tasks' token `sequences`: the count of the
    longest length that holds as many hidden states), and the streams (pruned; the dense one too)."""
    lengths = ([] if windows is None else [windows.shape[1]] * windows.shape[0]) + [padded(len(s)) for s in sequences]
    if not lengths:
        return 0, 0, 0
    longest = max(lengths)
    return math.ceil(sum(lengths) / longest), longest, 2 if dense else 1


@dataclass(frozen=True)
class Decision:
    placement: str  # of the calibration activations: "device", "cpu" or "disk"
    batch: int  # windows per forward call
    offload_hessian: bool  # X^T X waits in host memory while its solver matrix is on the GPU


def decide(fp: Footprint, device: torch.device, offload_activations: str, max_gpu_memory: int | None,
           batch: int, nsamples: int, ranks_per_host: int = 1) -> Decision:
    """Activation placement, windows per forward call, and whether X^T X leaves the GPU during the solve.

    The budget is 90% of `max_gpu_memory` (default: the card's memory). The block's weights and the
    solve come first; if the solve does not fit beside X^T X, X^T X waits in host memory meanwhile;
    the activations go to the device only if they fit beside that and one window's forward workspace;
    the batch then shrinks until the forward fits what is left. `ranks_per_host` processes share the host's
    memory (each holds its share of the windows: `fp` is one rank's).
    """
    batch = max(1, min(batch, nsamples))
    host_budget = psutil.virtual_memory().available // 2 // ranks_per_host
    if device.type != "cuda":
        return Decision(choose_placement(offload_activations, fp.activations, device, None, host_budget), batch, False)
    total = max_gpu_memory or torch.cuda.get_device_properties(device).total_memory
    budget = int(total * GPU_HEADROOM)
    offload = fp.device_peak(1, False, False) > budget and fp.widest_hessian > 0
    need = fp.device_peak(1, offload, False)
    if need > budget:
        raise ArgumentError(
            f"{total / 2**30:.1f} GiB of GPU memory cannot hold one block: its weights "
            f"({fp.device_block / 2**30:.1f} GiB) and the larger of the solve "
            f"({fp.solve_peak(offload) / 2**30:.1f} GiB, X^T X {'in host memory' if offload else 'included'}) and the "
            f"forward of one window ({fp.calibrate_peak(1) / 2**30:.2f} GiB, X^T X included) need "
            f"{need / GPU_HEADROOM / 2**30:.1f} GiB; use --device cpu or a larger card"
        )
    placement = choose_placement(offload_activations, fp.activations, device, budget - need, host_budget)
    free = (budget - fp.device_block - (fp.activations if placement == "device" else 0) - fp.positions - fp.hessians
            - fp.linear_fp32)
    if fp.per_window:
        batch = max(1, min(batch, free // fp.per_window))
    return Decision(placement, batch, offload)


def plan(model_dir: str | Path, **options: Any) -> MemoryPlan:
    """Predicted peak memory of `streamprune run` with these options; nothing is run or allocated.

    Args:
        model_dir: the checkpoint to prune.
        **options: the options `plan` takes (see `streamprune.options.PruneOptions`), as for `streamprune run`: a
            run on a GPU can be planned on a machine without one when `max_gpu_memory` gives the card's size;
            `eval` is tokenized to count its windows; `allocation` "owl" adds the dense pass's activations to
            magnitude's plan (the other methods' runs hold them anyway); `nproc`, the ranks per node (`torchrun
            --nproc-per-node`): the plan is one rank's, holding its share of the windows (the largest share) beside
            a whole block, each rank on its own GPU.
    """
    from streamprune.options import PLAN, PruneOptions

    opts = counted(PruneOptions.of(PLAN, options))
    ckpt = Checkpoint(model_dir)
    dev = planned_device(opts.device, opts.max_gpu_memory)
    seqlen = ckpt.config.default_seqlen if opts.seqlen is None else opts.seqlen
    grid = None if opts.wbits is None else Grid(opts.wbits, opts.group_size, opts.sym)
    windows = run_eval_windows(ckpt, opts.eval, opts.eval_nsamples, opts.eval_seqlen,
                               opts.eval_dense and not opts.eval_tasks)
    if windows is not None:  # rank 0's share, the largest
        windows = windows[: -(-windows.shape[0] // opts.nproc)]
    _, sequences = eval_tasks(ckpt, opts, opts.nproc)
    fp = footprint(ckpt, -(-opts.nsamples // opts.nproc), seqlen, opts.method, opts.sequential, opts.layer_errors,
                   {"blocksize": opts.blocksize}, grid, *eval_sizes(windows, opts.eval_dense, sequences),
                   owl=opts.allocation == "owl", compensate=opts.compensate_experts)
    decision = decide(fp, dev, opts.offload_activations, opts.max_gpu_memory, opts.batch, opts.nsamples, opts.nproc)
    result = memory_plan(fp, dev, decision, nproc=opts.nproc, tasks=bool(opts.eval_tasks))
    stored = sum(info.nbytes for info in ckpt.tensors.values())
    result.read_bytes = result.output_bytes = stored
    # scores read from the calibration data: a survey pass reads every routed expert once more
    surveys = opts.prune_experts is not None and (opts.expert_scores is None and opts.expert_criterion != "random"
                                                  or opts.compensate_experts)
    if isinstance(opts.prune_experts, (tuple, list)):
        raise ArgumentError("--prune-experts: a run removes one fraction (plan --sweep takes several)")
    if opts.prune_experts is not None:  # the removed experts are not written
        out = ckpt.keeping_experts(kept_experts(ckpt.config, opts.prune_experts, opts.experts_multiple))
        result.read_bytes += ckpt.stored_bytes(*ckpt.expert_of) if surveys else 0
        result.output_bytes = sum(info.nbytes for info in out.tensors.values())
    if result.placement == "disk":
        buffer = -(-opts.nsamples // opts.nproc) * seqlen * ckpt.config.hidden_size * 4
        result.disk_read_per_block, result.disk_written_per_block = disk_io_per_block(
            ckpt, opts.sequential, buffer, surveys)
    return result


def counted(opts: Any) -> Any:
    """`opts` with --nsamples as the windows of its --calib sources (each FILE:N counts N, a FILE without a count
    --nsamples), when there are any; the files are not read."""
    sources = calib_sources(opts.calib, opts.nsamples)
    return dataclasses.replace(opts, nsamples=sum(s.windows for s in sources)) if sources else opts


def disk_io_per_block(ckpt: Checkpoint, sequential: bool, buffer: int, removes: bool = False) -> tuple[int, int]:
    """The bytes a block reads from and writes to the activation files of `buffer` bytes each, for the block that
    moves the most (an MoE one, where there are). With --sequential: a forward over the block's input per site
    outside the routed experts, and one to the MoE input (written over the input, the output without the experts
    beside it); each expert reads its tokens' rows for its gate/up, for its down projection and for its output, and
    adds that output to the block's (its rows read and written): 4 x top-k buffers read, top-k written. Without it:
    one forward writing the MoE input, the experts' rows read once, then the pruned block forward again (its
    experts' rows read, their outputs added). Removing experts (`removes`) adds the survey (each expert's rows once)
    and the tokens routed again (the MoE input read once more). Where the block is computed again once its experts are
    summed (ModelConfig.moe_beside_mlp), the third pass reads the residual stream the first kept and the sum and writes
    the output."""
    cfg = ckpt.config
    bid = next((b for b in range(cfg.n_layers) if cfg.is_moe(b)), 0)
    roles = set(ckpt.pruned_linears(bid))
    stages = sum(1 for _, site_roles in SEQUENTIAL if roles & set(site_roles))
    k = cfg.experts_per_tok if cfg.is_moe(bid) else 0
    survey = (k + 1) * buffer if removes and k else 0
    third = int(cfg.moe_beside_mlp and k > 0)
    if sequential:
        read, written = (stages + 1) + 4 * k, (2 if k else 1) + k
    else:
        read, written = 2 + 3 * k, (3 if k else 1) + k
    return (read + 2 * third) * buffer + survey, (written + third) * buffer


def sweep_plan(model_dir: str | Path, **options: Any) -> MemoryPlan:
    """Predicted peak memory of `streamprune sweep` with these options (`eval` is required: it is tokenized to
    count its windows; the points from `methods`, `sparsities` and `patterns`); nothing is run or allocated."""
    from streamprune.options import PLAN, PruneOptions
    from streamprune.sweep import as_fractions, sweep_points

    opts = counted(PruneOptions.of(PLAN, options))
    if opts.nproc != 1:
        raise ArgumentError("--sweep plans one process; drop --nproc")
    if opts.eval is None:
        raise DataError("a sweep's plan needs its evaluation data: pass --eval FILE")
    points = sweep_points(list(opts.methods), None if opts.sparsities is None else list(opts.sparsities),
                          list(opts.patterns), as_fractions(opts.prune_experts), list(opts.expert_criteria),
                          opts.compensate_experts)
    ckpt = Checkpoint(model_dir)
    seqlen = ckpt.config.default_seqlen if opts.seqlen is None else opts.seqlen
    ewindows = run_eval_windows(ckpt, opts.eval, opts.eval_nsamples, opts.eval_seqlen, False)
    assert ewindows is not None
    return plan_sweep(ckpt, [(p.method, p.compensate) for p in points], opts, seqlen, ewindows,
                      planned_device(opts.device, opts.max_gpu_memory))


def plan_sweep(ckpt: Checkpoint, methods: list[tuple[str, bool]], opts: Any, seqlen: int, eval_windows: Tensor,
               device: torch.device) -> MemoryPlan:
    """The memory plan of a sweep whose points use `methods` (each point's method, and whether it compensates
    removed experts; see `sweep_footprint`), its placement and batch decided as a run's are."""
    knobs = [(name, {k: getattr(opts, k) for k in pruner_method(name).knobs}, comp) for name, comp in methods]
    fp = sweep_footprint(ckpt, knobs, opts.nsamples, seqlen, opts.sequential, *eval_windows.shape)
    decision = decide(fp, device, opts.offload_activations, opts.max_gpu_memory, opts.batch, opts.nsamples)
    return memory_plan(fp, device, decision, points=len(methods))


def planned_device(device: str, max_gpu_memory: int | None) -> torch.device:
    """The device a plan is for: a GPU run can be planned on a machine without one when the card's size is given."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        if not max_gpu_memory:
            raise ArgumentError(f"device {device!r}: no CUDA device is available here; pass --max-gpu-memory "
                                "(the card's size) to plan a GPU run on this machine")
        return torch.device(device)  # planning only: nothing is allocated
    return resolve_device(device)


def memory_plan(fp: Footprint, dev: torch.device, d: Decision, points: int = 1, nproc: int = 1,
                tasks: bool = False) -> MemoryPlan:
    """The peak host and device memory of a run made of `fp` (one rank's, of `nproc` per node), placed as `d`
    decided, with its consumers (`points`: the pruning points of a sweep, whose activations `fp` sums; `tasks`: it
    scores lm-eval tasks)."""
    of = f", {points} points" if points > 1 else ""
    on_device = dev.type == "cuda"
    compute = "device" if on_device else "host"
    where_act = {"device": compute, "cpu": "host", "disk": "disk"}[d.placement]
    act_on = {where: fp.activations if where_act == where else 0 for where in ("host", "device")}
    work = max(fp.calibrate_peak(d.batch), fp.solve_peak(d.offload_hessian))  # on the compute device
    offloaded = fp.widest_hessian if d.offload_hessian else 0
    decoded_host = 0 if on_device else fp.decoded + fp.expert_decoded + fp.decode_workspace  # else on the card
    host_block = (2 * fp.raw_block + decoded_host + fp.pruned_stored + 3 * fp.expert_stored + act_on["host"] + offloaded
                  + (0 if on_device else work + fp.positions + fp.routes))
    host_embed = fp.embed_stored + act_on["host"] + (0 if on_device else fp.embed_fp32)
    device_peak = 0
    if on_device:
        device_peak = max(fp.device_peak(d.batch, d.offload_hessian, d.placement == "device"),
                          fp.embed_fp32 + act_on["device"])
    consumers = [
        ("fixed overhead (interpreter, torch)", HOST_OVERHEAD, "host"),
        ("lm-evaluation-harness, imported, and its task index (--eval-tasks)", TASKS_OVERHEAD if tasks else 0, "host"),
        ("block as read, and the next one read ahead", 2 * fp.raw_block, "host"),
        ("its encoded linears (fp8, packed) decoded, an expert's too, and the decoding's float64 slice (on a GPU:"
         " within its weights there)", decoded_host, "host"),
        ("pruned weights awaiting the write", fp.pruned_stored, "host"),
        ("block weights on the GPU", fp.device_block if on_device else 0, "device"),
        ("routed experts: the one in flight, dense and pruned, and the next one read ahead", 3 * fp.expert_stored,
         "host"),
        ("routed expert on the GPU, dense and pruned", 2 * fp.device_expert if on_device else 0, "device"),
        ("routes: each calibration token's experts and weights", fp.routes, compute),
        ("X^T X of the inputs being calibrated and pruned", fp.hessians, compute),
        ("solver matrix (SparseGPT's inverse factor, built in place)", fp.solver_matrix, compute),
        ("X^T X waiting in host memory during the solve", offloaded, "host"),
        ("largest linear while pruned, and its site's dense weights", fp.linear_solve + fp.site_dense, compute),
        ("the site's weights before rounding (--wbits), until their errors", fp.site_unrounded, compute),
        (f"forward workspace of one batch ({d.batch} windows)", d.batch * fp.per_window + fp.linear_fp32, compute),
        (f"calibration activations (input and output buffers{of})", fp.activations - fp.eval_activations, where_act),
        (f"evaluation hidden states (--eval, --eval-dense{of} and the dense model)" if of else
         "evaluation hidden states (--eval, --eval-tasks, --eval-dense)", fp.eval_activations, where_act),
        ("position tables (RoPE), sliding-window masks or ALiBi bias", fp.positions, compute),
        ("token embedding while embedding windows", fp.embed_stored + fp.embed_fp32, compute),
        ("calibration token ids", fp.calib_ids, "host"),
        ("calibration text read and tokenized while drawing windows (before block 0)", fp.calib_read, "host"),
    ]
    consumers.sort(key=lambda c: -c[1])
    host_peak = HOST_OVERHEAD + (TASKS_OVERHEAD if tasks else 0) + fp.calib_ids + max(host_block, host_embed,
                                                                                     fp.calib_read)
    return MemoryPlan(d.placement, d.batch, d.offload_hessian, host_peak, device_peak, consumers, nproc)
