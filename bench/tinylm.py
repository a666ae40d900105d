"""Small language models trained offline on English text shipped with Python: a LLaMA, a Mixtral and a Qwen3.5.

Corpus: docstrings of a fixed list of pure-Python stdlib modules (parsed with ``ast``, never
imported), then the ``pydoc_data.topics`` help texts in sorted key order, joined by blank lines and
split at a paragraph boundary into train (~90%) and test (~10%). A byte-level BPE and a 4-layer GQA
model are trained on the train text only; the float32 checkpoint (with ``tokenizer.json``,
``train.txt``, ``test.txt``, ``build_info.json``) is cached as ``<name>-<version>`` in
``$STREAMPRUNE_CACHE`` (default ``~/.cache/streamprune``); bump a recipe's version when it changes.

Three recipes share the corpus, tokenizer, schedule and seed: ``TINYLM`` (``tinylm-v2``, the demo's
LLaMA); ``TINYMOE`` (``tinymoe-v2``), the same hidden size and depth with each MLP replaced by 8
Mixtral experts of width 144 under top-2 routing (softmax, top 2, renormalized), trained with
a load-balancing loss per block so that every expert receives tokens; it is a bench fixture for
``bench/moe_calibration.py``, built on demand (``--moe``, ``make fixture-moe``), never by ``make test``; and
``TINYHYBRID`` (``tinyhybrid-v1``), the LLaMA's sizes as a Qwen3.5 (three Gated DeltaNet blocks, then one of gated
attention), the fixture of ``bench/hybrid_sites.py`` (``--hybrid``), also built on demand only.

The demo model is not trained where it is used: ``bench/tinylm-v2/`` holds the one this recipe trained (see its
NOTICE.md), so that the demo, the tests and the benchmarks see the same model on every machine. The corpus is what
the installed Python ships (another Python version, another corpus) and training rounds as the CPU's instruction
set does, so a build elsewhere gives another model; ``--train`` builds one here and says whether it is the shipped
one, file by file.

Training runs on ``THREADS`` (one) torch thread on every machine, whatever its core count: the
recipe, not the machine, fixes the thread count, and one thread keeps its speed when another
process competes for the cores, where OpenMP threads that wait for each other at every operation
slow each step down. Deterministic for a given Python installation (the corpus), torch build and
CPU instruction set. A build shows its steps, loss, elapsed and estimated remaining time on stderr:
a live bar on a terminal, a line every 30 seconds elsewhere.

    python bench/tinylm.py                        # the shipped demo model's figures
    python bench/tinylm.py --train [--cache-dir DIR]   # what `make fixture-train` runs
    python bench/tinylm.py --moe                  # what `make fixture-moe` runs
    python bench/tinylm.py --hybrid               # the Qwen3.5-shaped hybrid of bench/hybrid_sites.py
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THREADS = 1  # torch threads while training and evaluating, the same on every machine
SHIPPED = Path(__file__).resolve().parent / "tinylm-v2"  # the demo model as this recipe trained it (NOTICE.md there)
SHIPPED_FILES = ("model.safetensors", "tokenizer.json", "train.txt", "test.txt", "config.json")
SEED = 0
VOCAB_SIZE = 2048
EOT = "<|endoftext|>"
# v2 against v1: hidden 192 instead of 256 (0.6x the work per step) and a peak LR of 5e-3 instead of
# 3e-3, with which Wanda's edge over magnitude at 50% unstructured is clear on this model.
SEQ_LEN, BATCH, STEPS, WARMUP = 128, 16, 900, 50
LR, MIN_LR_RATIO, WEIGHT_DECAY = 5e-3, 0.05, 0.1
MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# Mixtral-shaped: LLaMA's attention, and 8 experts of width 144 with top-2 routing instead of each MLP of width
# 576 (3.9M parameters against 2.6M; the two experts a token visits have half the dense MLP's width together).
# Width 144 keeps training at about 0.4 s per step on one thread, 6 minutes in all (9 with a neighbour's load). The
# router's load-balancing loss, 0.01 x its mean over the blocks, is added to the LM loss (see `balance_loss`).
MOE_CONFIG: dict[str, Any] = dict(
    MODEL_CONFIG, intermediate_size=144, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0,
    router_aux_loss_coef=0.01, output_router_logits=False,  # the loss is asked for while training only
)


@dataclass(frozen=True)
class Recipe:
    """One cached model: its folder name, transformers classes and architecture; the corpus, tokenizer, schedule
    and seed are shared."""

    name: str
    version: str
    config_class: str  # a transformers configuration class
    model_class: str  # the transformers model class trained
    config: dict[str, Any]
    moe: bool = False  # trained with the router's load-balancing loss (config's router_aux_loss_coef)

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.version}"


TINYLM = Recipe("tinylm", "v2", "LlamaConfig", "LlamaForCausalLM", MODEL_CONFIG)
# v2 against v1: the balancing loss per block, not pooled over the blocks as transformers' load_balancing_loss_func
# computes it; v1's pooled loss ended at its ideal value (2.004) while single blocks starved experts (0.0%-0.2% of
# the routed test tokens for 4 experts of 32).
TINYMOE = Recipe("tinymoe", "v2", "MixtralConfig", "MixtralForCausalLM", MOE_CONFIG, moe=True)
# Qwen3.5-shaped (dense): the LLaMA's sizes with blocks 0-2 Gated DeltaNet linear attention (2 key heads shared by 4
# value heads of 48) and block 3 gated attention, as Qwen3.5 alternates them; for bench/hybrid_sites.py
HYBRID_CONFIG: dict[str, Any] = dict(
    MODEL_CONFIG, head_dim=48, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=48,
    linear_value_head_dim=48, linear_conv_kernel_dim=4,
)
TINYHYBRID = Recipe("tinyhybrid", "v1", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", HYBRID_CONFIG)

# Pure-Python stdlib modules whose docstrings precede the help topics (missing files are skipped).
DOC_MODULES: tuple[str, ...] = tuple("""
    argparse ast base64 bisect calendar cmd codecs collections configparser contextlib copy csv
    dataclasses datetime difflib dis doctest email.message enum fnmatch fractions ftplib
    functools getopt gettext glob gzip heapq hmac html.parser http.client http.server imaplib
    inspect ipaddress json json.decoder json.encoder locale logging mailbox mimetypes numbers
    optparse os pathlib pdb pickle platform poplib pprint profile pstats queue random re sched
    secrets selectors shelve shlex shutil smtplib socket socketserver statistics string
    subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback types typing
    unittest.case urllib.parse urllib.request uuid warnings weakref xml.dom.minidom
    xml.etree.ElementTree zipfile
""".split())


def _module_docstrings(name: str) -> list[str]:
    """Docstrings of at least 40 characters in a stdlib module's source, in source order."""
    base = Path(sysconfig.get_paths()["stdlib"]) / name.replace(".", "/")
    path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
    docs: list[str] = []

    def visit(node: Any) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 40:
            docs.append(doc)
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    if path is not None:
        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return docs


def corpus_text() -> str:
    """Stdlib docstrings, then the pydoc help topics in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    parts = [d for name in DOC_MODULES for d in _module_docstrings(name)]
    parts += [topics[key].strip("\n") for key in sorted(topics)]
    return "\n\n".join(p for p in parts if p.strip())


def split_text(text: str, train_frac: float = 0.9) -> tuple[str, str]:
    """Split at the first paragraph boundary at or after ``train_frac`` of the characters."""
    cut = text.find("\n\n", int(len(text) * train_frac))
    if cut < 0:
        raise ValueError("text has no paragraph boundary after the split point")
    return text[:cut], text[cut + 2:]


def _train_tokenizer(train: str, out_dir: Path) -> Any:
    """Train a byte-level BPE on ``train``; save tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(train.split("\n\n"), trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
              "model_max_length": MODEL_CONFIG["max_position_embeddings"],
              "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    return tok


def perplexity(model: Any, ids: Any, seqlen: int = SEQ_LEN, batch: int = 32) -> float:
    """exp(mean NLL) of a causal LM over non-overlapping ``seqlen`` windows (tail dropped), from its logits (a
    Mixtral's ``loss`` would include the router's auxiliary loss)."""
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(ids, dtype=torch.long)
    n = len(ids) // seqlen
    windows, total, was_training = ids[: n * seqlen].view(n, seqlen), 0.0, model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):  # loss is a mean over equal-length windows
            x = windows[i:i + batch]
            logits = model(input_ids=x).logits.float()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item() * len(x)
    model.train(was_training)
    return math.exp(total / n)


def unigram_perplexity(train_ids: list[int], test_ids: list[int], vocab: int,
                       seqlen: int = SEQ_LEN) -> float:
    """Add-one-smoothed unigram perplexity on the tokens that :func:`perplexity` predicts."""
    import torch

    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab).double() + 1.0
    n = len(test_ids) // seqlen
    targets = torch.tensor(test_ids[: n * seqlen]).view(n, seqlen)[:, 1:]
    return math.exp(-(counts / counts.sum()).log()[targets].mean().item())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}:{sec:02d}"


@contextlib.contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int, float], None]]:
    """Yield ``update(step, loss)``; shows steps, loss, elapsed and estimated time left on stderr.

    On a terminal a rich progress bar; elsewhere (CI logs, pipes) a plain line every 30 seconds and
    at the last step, so that a long build is never silent.
    """
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("steps  loss {task.fields[loss]:.3f} "), TimeElapsedColumn(),
                   TextColumn("elapsed, about"), TimeRemainingColumn(), TextColumn("left"))
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(label, total=total, loss=float("nan"))
            yield lambda step, loss: bar.update(task, completed=step, loss=loss)
        return
    start = last = time.perf_counter()

    def update(step: int, loss: float) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= 30 or step == total:
            last = now
            left = (now - start) / step * (total - step)
            _say(f"{label}: step {step}/{total}  loss {loss:.3f}  {_clock(now - start)} elapsed, "
                 f"about {_clock(left)} left")

    yield update


@contextlib.contextmanager
def fixed_threads() -> Iterator[None]:
    """Run torch on ``THREADS`` threads inside the block (training, and the demo's pruning runs)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def lm_loss(logits: Any, x: Any) -> Any:
    """Mean next-token cross-entropy of (B, T, vocab) logits on the (B, T) ids they were computed from."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())


def balance_loss(router_logits: Any, k: int) -> Any:
    """Mixtral's load-balancing loss, computed per MoE block and averaged over the blocks.

    Per block, E * sum_e f_e * P_e over its E experts, where f_e is the fraction of the block's tokens that have
    expert e among their top k and P_e the mean router probability of e; k when the router spreads tokens evenly.
    transformers' ``load_balancing_loss_func`` pools the tokens of every block before it counts, so a block may
    starve an expert that another block overuses while the pooled loss stays at its ideal value.
    """
    import torch

    losses = []
    for logits in router_logits:  # (tokens, E) per block
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = probs.topk(k, dim=-1).indices  # (tokens, k)
        counts = torch.bincount(chosen.flatten(), minlength=probs.shape[-1])  # (E,), no gradient
        losses.append(probs.shape[-1] * (counts / probs.shape[0] * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def _train_model(recipe: Recipe, train_ids: list[int], vocab: int, eot_id: int,
                 on_step: Callable[[int, float], None] = lambda step, loss: None,
                 ) -> tuple[Any, dict[str, Any]]:
    """Train the recipe's model on random windows of ``train_ids``; returns the model and training stats.

    ``on_step(step, loss)`` is called after each step with the mean training loss of the last 50 (the language
    model's loss: without an MoE's auxiliary loss, which is minimized with it).
    """
    import torch
    import transformers

    config = getattr(transformers, recipe.config_class)(vocab_size=vocab, bos_token_id=eot_id, eos_token_id=eot_id,
                                                         **recipe.config)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(SEED)
        model = getattr(transformers, recipe.model_class)(config).float()
    data, offsets = torch.tensor(train_ids, dtype=torch.long), torch.arange(SEQ_LEN)
    gen = torch.Generator().manual_seed(SEED)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)

    def lr_ratio(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        cos = 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, STEPS - WARMUP)))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * cos

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_ratio)
    model.train()
    coef = config.router_aux_loss_coef if recipe.moe else 0.0
    start, losses, aux_losses = time.perf_counter(), [], []
    for step in range(1, STEPS + 1):
        starts = torch.randint(0, len(data) - SEQ_LEN + 1, (BATCH,), generator=gen)
        x = data[starts[:, None] + offsets]
        if recipe.moe:  # the LM loss plus router_aux_loss_coef x the load-balancing loss
            out = model(input_ids=x, output_router_logits=True)
            balance = balance_loss(out.router_logits, config.num_experts_per_tok)
            loss = lm_loss(out.logits, x) + coef * balance
            aux = balance.item()
            aux_losses.append(aux)
        else:
            loss, aux = model(input_ids=x, labels=x).loss, 0.0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item() - coef * aux)
        on_step(step, sum(losses[-50:]) / len(losses[-50:]))
    train_time = round(time.perf_counter() - start, 1)
    stats = {"train_time_s": train_time, "final_train_loss": round(losses[-1], 4)}
    if aux_losses:  # the balancing loss is top_k (2.0) when every block's router spreads tokens evenly
        stats["final_aux_loss"] = round(sum(aux_losses[-50:]) / len(aux_losses[-50:]), 4)
    return model, stats


def expert_shares(model: Any, ids: Any, seqlen: int = SEQ_LEN, batch: int = 32) -> list[list[float]]:
    """Per MoE layer, the fraction of the routed (token, expert) pairs that went to each expert, over the same
    windows as :func:`perplexity`."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long)
    n = len(ids) // seqlen
    windows, counts, k = ids[: n * seqlen].view(n, seqlen), None, model.config.num_experts_per_tok
    with torch.no_grad():
        for i in range(0, n, batch):
            logits = model(input_ids=windows[i:i + batch], output_router_logits=True).router_logits
            per_layer = torch.stack([torch.bincount(lg.topk(k, dim=-1).indices.flatten(), minlength=lg.shape[-1])
                                     for lg in logits])  # (layers, experts)
            counts = per_layer if counts is None else counts + per_layer
    assert counts is not None
    return [[round(c / row.sum().item(), 4) for c in row.tolist()] for row in counts]


def _build_into(recipe: Recipe, out_dir: Path, label: str) -> None:
    """Write the whole checkpoint, data and ``build_info.json`` (not ``DONE``) into ``out_dir``."""
    import torch

    _say(f"{label}: corpus and tokenizer")
    train, test = split_text(corpus_text())
    (out_dir / "train.txt").write_text(train, encoding="utf-8")
    (out_dir / "test.txt").write_text(test, encoding="utf-8")
    tok = _train_tokenizer(train, out_dir)
    train_ids, test_ids, vocab = tok.encode(train).ids, tok.encode(test).ids, tok.get_vocab_size()
    if tok.decode(test_ids) != test:
        raise RuntimeError("tokenizer does not round-trip the test text")
    with fixed_threads():
        with _progress(f"{label}: training", STEPS) as on_step:
            model, stats = _train_model(recipe, train_ids, vocab, tok.token_to_id(EOT), on_step)
        test_ppl = perplexity(model, test_ids)
        if recipe.moe:
            stats["test_expert_shares"] = expert_shares(model, test_ids)
    model.save_pretrained(out_dir, safe_serialization=True)
    info = {"version": recipe.version, "params": sum(p.numel() for p in model.parameters()), **stats,
            "threads": THREADS, "steps": STEPS, "batch": BATCH, "seq_len": SEQ_LEN,
            "train_tokens": len(train_ids), "test_tokens": len(test_ids),
            "test_ppl": round(test_ppl, 3), "uniform_ppl": vocab,
            "unigram_ppl": round(unigram_perplexity(train_ids, test_ids, vocab), 3),
            "python": sys.version.split()[0], "torch": torch.__version__}
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def demo_model(cache_dir: Path | None = None) -> Path:
    """The demo model: the one shipped in ``bench/tinylm-v2``, or with `cache_dir` the one trained (once) into that
    cache on this machine."""
    return SHIPPED if cache_dir is None else build_tiny_lm(cache_dir)


def compare_with_shipped(model_dir: Path) -> list[str]:
    """The files of a trained demo model that differ from the shipped one's (empty: it is the shipped model)."""
    return [name for name in SHIPPED_FILES if _sha256(model_dir / name) != _sha256(SHIPPED / name)]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_lm_dir(cache_dir: Path | None = None, recipe: Recipe = TINYLM) -> Path:
    """Where the recipe's model is cached (complete once it holds ``DONE``)."""
    env = os.environ.get("STREAMPRUNE_CACHE")
    return Path(cache_dir or env or Path.home() / ".cache" / "streamprune").expanduser() / recipe.folder


def build_tiny_lm(cache_dir: Path | None = None, recipe: Recipe = TINYLM) -> Path:
    """Return the directory of the recipe's cached model (the demo's LLaMA by default), building it first if it
    is not complete.

    The build runs in a temporary sibling directory that is renamed into place only once it is
    complete (``DONE`` marker included). Concurrent builders wait on a lock file where ``fcntl``
    exists; elsewhere the first rename wins and the others use its result.
    """
    final, folder = tiny_lm_dir(cache_dir, recipe), recipe.folder
    root = final.parent
    if (final / "DONE").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no POSIX locks: rely on the atomic rename alone
        fcntl = None  # type: ignore[assignment]
    with open(root / f"{folder}.lock", "a+") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
            except BlockingIOError:
                _say(f"waiting for another process that is building {final}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in root.glob(f".{folder}.tmp*"):  # left by interrupted builds
                shutil.rmtree(stale, ignore_errors=True)
        if (final / "DONE").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.tmp", dir=root))
        try:
            _say(f"building {final} ({STEPS} training steps on {THREADS} thread; "
                 "a few minutes, shown as it goes)")
            _build_into(recipe, tmp, folder)
            for path in tmp.iterdir():  # mkdtemp and safetensors create owner-only modes
                path.chmod(0o644)
            tmp.chmod(0o755)
            (tmp / "DONE").write_text(recipe.version + "\n", encoding="utf-8")
            if final.exists() and not (final / "DONE").is_file():
                shutil.rmtree(final)  # not made by a completed build of this recipe
            try:
                os.rename(tmp, final)
            except OSError as exc:
                lost_race = exc.errno in (errno.EEXIST, errno.ENOTEMPTY)
                if not (lost_race and (final / "DONE").is_file()):
                    raise
                _say(f"another process completed {final} first; using it")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    """Print the shipped demo model's path, size, training time and test perplexity; with --train, build it here
    first (or find it in the cache) and compare it with the shipped one; with --moe, the same for the MoE."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true",
                        help=f"train the demo model here (once, then cached) and compare it with {SHIPPED.name}/")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root (default: $STREAMPRUNE_CACHE or ~/.cache/streamprune)")
    parser.add_argument("--moe", action="store_true",
                        help=f"the Mixtral-shaped model ({TINYMOE.folder}) instead of the LLaMA ({TINYLM.folder})")
    parser.add_argument("--hybrid", action="store_true",
                        help=f"the Qwen3.5-shaped hybrid model ({TINYHYBRID.folder}) instead of the LLaMA")
    args = parser.parse_args(argv)
    if args.moe or args.hybrid:
        model_dir = build_tiny_lm(args.cache_dir, TINYMOE if args.moe else TINYHYBRID)
    elif args.train:
        model_dir = build_tiny_lm(args.cache_dir, TINYLM)
    else:
        model_dir = SHIPPED
    info = json.loads((model_dir / "build_info.json").read_text(encoding="utf-8"))
    print(f"model dir:     {model_dir}")
    print(f"parameters:    {info['params']:,}")
    print(f"training time: {info['train_time_s']:.1f} s ({info['steps']} steps of "
          f"{info['batch']}x{info['seq_len']} tokens, {info['threads']} thread(s), Python {info['python']}, "
          f"torch {info['torch']})")
    print(f"test ppl:      {info['test_ppl']:.2f} on {info['test_tokens'] // info['seq_len']} windows of "
          f"{info['seq_len']} tokens (unigram {info['unigram_ppl']:.1f}, uniform {info['uniform_ppl']})")
    for layer, shares in enumerate(info.get("test_expert_shares", [])):
        print(f"block {layer} experts: " + " ".join(f"{s:.1%}" for s in shares) + " of the routed test tokens")
    if args.train and not (args.moe or args.hybrid):
        differ = compare_with_shipped(model_dir)
        print(f"against {SHIPPED}: " + ("the same model, byte for byte (" + ", ".join(SHIPPED_FILES) + ")"
                                        if not differ else "another model: " + ", ".join(differ) + " differ"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
