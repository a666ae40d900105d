"""Zero-shot tasks of lm-evaluation-harness, scored one block at a time.

lm-eval builds each task's requests and computes its metrics; streamprune answers the requests. lm-eval is asked
twice with the same `StreamLM`: first it only records the token sequences of every `loglikelihood` and
`loglikelihood_rolling` request (tokenized as lm-eval's transformers backend, `HFLM`, tokenizes them: the tokenizer's
own special tokens, the context's trailing spaces moved to the continuation, the continuation split off the encoded
whole, left truncation to the model's length, rolling windows by lm-eval's own functions); then every recorded
sequence goes through the model in one pass of the block loop (`TaskStreams`: the sequences right-padded into
buckets of equal length, each bucket a `HiddenStream`), and lm-eval asks again, now answered from the scores.
Generation tasks are refused: a token at a time through a model streamed from disk is not what this is for.

This module imports lm-eval (the `tasks` extra); nothing in the core imports it unless tasks are asked for.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from streamprune.activations import make_store
from streamprune.arch.block import head
from streamprune.calib import padded
from streamprune.checkpoint import Checkpoint
from streamprune.errors import ArgumentError, DataError, StreamPruneError
from streamprune.hidden import HiddenStream
from streamprune.forward import head_weights

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import resolve_max_length
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ArgumentError("--tasks needs lm-evaluation-harness 0.4: pip install 'streamprune[tasks]'") from e

logger = logging.getLogger(__name__)

Sequence = tuple[int, ...]  # token ids


@dataclass
class TaskTokenizer:
    """The model's tokenizer as lm-eval's transformers backend uses it, from `tokenizer.json` and the special tokens
    named in `tokenizer_config.json` / `special_tokens_map.json` (not config.json's ids, which HFLM does not read)."""

    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    max_length: int

    @classmethod
    def load(cls, ckpt: Checkpoint) -> TaskTokenizer:
        path = ckpt.dir / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: missing; tasks are tokenized with the model's tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path))
        named: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (ckpt.dir / name).is_file():
                named.update(json.loads((ckpt.dir / name).read_text(encoding="utf-8")))

        def token_id(key: str) -> int | None:
            token = named.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return tokenizer.token_to_id(token) if isinstance(token, str) else None  # as transformers' tokenizer

        config = json.loads(json.dumps(ckpt.raw_config), object_hook=lambda d: SimpleNamespace(**d))
        max_length = resolve_max_length(config, SimpleNamespace(model_max_length=named.get("model_max_length")))
        return cls(tokenizer, token_id("bos_token"), token_id("eos_token"), max_length)

    @property
    def prefix_id(self) -> int:
        """The token an empty context stands for: BOS, else EOS (lm-eval's `prefix_token_id`)."""
        token = self.bos_id if self.bos_id is not None else self.eos_id
        if token is None:
            raise DataError("the tokenizer names no BOS or EOS token, which a request with an empty context (or a "
                            "rolling log-likelihood) is conditioned on")
        return token

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """`text`'s ids; by default with the tokenizer's own special tokens, unless `text` already starts with the
        prefix token's text."""
        if add_special_tokens is None:
            prefix = None if self.bos_id is None and self.eos_id is None else \
                self.tokenizer.decode([self.prefix_id], skip_special_tokens=False)
            add_special_tokens = not (prefix and text.startswith(prefix))
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


class StreamLM(TemplateLM):
    """lm-eval's model interface over recorded sequences: while `scores` is None every request's sequence is recorded
    (in `wanted`: the model's input -> the continuations scored on it) and answered with zeros; then from `scores`."""

    def __init__(self, tokenizer: TaskTokenizer) -> None:
        super().__init__()
        self.tok = tokenizer
        self.wanted: dict[Sequence, set[Sequence]] = {}
        self.scores: dict[tuple[Sequence, Sequence], tuple[float, bool]] | None = None
        self.truncated = 0

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.tok.prefix_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.prefix_id

    @property
    def max_length(self) -> int:
        return self.tok.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        ids = self.tok.encode(string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests: Iterable[tuple[Any, list[int], list[int]]],
                              **kwargs: Any) -> list[tuple[float, bool]]:
        answers = []
        for _, context, continuation in requests:
            if not continuation:
                raise DataError("a request has an empty continuation: nothing to score")
            whole = context + continuation
            if len(whole) > self.max_length + 1:  # cut from the left, as lm-eval's transformers backend does
                self.truncated += 1
            key, cont = tuple(whole[-(self.max_length + 1):][:-1]), tuple(continuation[-self.max_length:])
            if self.scores is None:
                self.wanted.setdefault(key, set()).add(cont)
                answers.append((0.0, False))
            else:
                answers.append(self.scores[(key, cont)])
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (text,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            totals.append(sum(lp for lp, _ in self._loglikelihood_tokens([(None, a, b) for a, b in windows])))
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise ArgumentError("generation tasks are not evaluated (streaming generation is not what streamprune is for)")


class TaskStreams:
    """The recorded sequences as hidden states pushed through the blocks: right-padded into buckets of equal length
    (`calib.padded`), each bucket a `HiddenStream` (`streams`, consumers of the block loop); `scores` reads each
    continuation's log-probability and greedy flag off the head once the last block is done."""

    def __init__(self, ckpt: Checkpoint, wanted: dict[Sequence, set[Sequence]], device: torch.device, batch: int,
                 placement: str, work: Path, name: str = "tasks") -> None:
        self.ckpt, self.device = ckpt, device
        self.rows: list[list[tuple[Sequence, list[Sequence]]]] = []  # per bucket: each window's input, continuations
        self.streams: list[HiddenStream] = []
        by_length: dict[int, list[Sequence]] = {}
        for key in sorted(wanted, key=lambda k: (len(k), k)):
            by_length.setdefault(padded(len(key)), []).append(key)
        buffers = 2 if ckpt.config.n_experts else 1
        for n, (length, keys) in enumerate(sorted(by_length.items())):
            windows = torch.zeros(len(keys), length, dtype=torch.long)  # padded with id 0 on the right, as HFLM pads
            for i, key in enumerate(keys):
                windows[i, :len(key)] = torch.tensor(key)
            stores = [make_store((len(keys), length, ckpt.config.hidden_size), placement, device, work,
                                 f"{name}{n}-{b}") for b in range(buffers)]
            self.streams.append(HiddenStream(ckpt, windows, device, batch, *stores))
            self.rows.append([(key, sorted(wanted[key])) for key in keys])

    def __iter__(self) -> Iterator[HiddenStream]:
        return iter(self.streams)

    @torch.no_grad()
    def scores(self) -> dict[tuple[Sequence, Sequence], tuple[float, bool]]:
        cfg, g = self.ckpt.config, head_weights(self.ckpt, self.device)
        out = {}
        for stream, rows in zip(self.streams, self.rows):
            for i, (key, conts) in enumerate(rows):
                logp = F.log_softmax(head(cfg, g, stream.x.read(i, i + 1, self.device))[0], dim=-1,
                                     dtype=torch.float32)  # (T, vocab)
                for cont in conts:
                    picked = logp[len(key) - len(cont):len(key)]  # the positions that predict the continuation
                    target = torch.tensor(cont, device=self.device)
                    greedy = bool((picked.argmax(dim=-1) == target).all())
                    out[(key, cont)] = (float(picked.gather(1, target[:, None]).sum()), greedy)
        return out

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


@dataclass
class TaskRun:
    """The tasks of one evaluation: lm-eval's task manager and arguments, and the model interface."""

    names: list[str]
    manager: Any
    lm: StreamLM
    num_fewshot: int | None
    limit: float | None

    def evaluate(self) -> dict[str, Any]:
        """lm-eval's `simple_evaluate` of the tasks with `lm` (recording, or answering once it has scores)."""
        with lm_eval_errors(self.names):
            return lm_eval.simple_evaluate(model=self.lm, tasks=self.names, task_manager=self.manager,
                                           num_fewshot=self.num_fewshot, limit=self.limit, log_samples=False,
                                           bootstrap_iters=0)

    def record(self) -> dict[Sequence, set[Sequence]]:
        """Every sequence the tasks' requests need."""
        self.evaluate()
        if self.lm.truncated:
            logger.warning("%d requests are longer than the model's %d tokens: cut from the left, as lm-eval's "
                           "transformers backend does", self.lm.truncated, self.lm.max_length)
        return self.lm.wanted

    def answer(self, scores: dict[tuple[Sequence, Sequence], tuple[float, bool]]) -> dict[str, Any]:
        self.lm.scores = scores
        return self.evaluate()


def prepare_tasks(ckpt: Checkpoint, tasks: Iterable[str], include_path: Path | None, num_fewshot: int | None,
                  limit: float | None) -> TaskRun:
    """The tasks named, checked: each known to lm-eval (else the closest names are suggested), none generating."""
    names = list(tasks)
    if limit is not None and not limit > 0:
        raise ArgumentError(f"--limit {limit!r} must be positive: a number of documents per task, or below 1 a "
                            "fraction of them")
    manager = task_manager(None if include_path is None else str(Path(include_path).resolve()))
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ArgumentError(f"unknown task {name!r} (lm-eval {lm_eval.__version__} knows {len(known)} tasks, and "
                                f"those of --include-path){hint}")
    with lm_eval_errors(names):
        loaded = manager.load(names)["tasks"]
    generating = sorted(name for name, task in loaded.items() if getattr(task, "OUTPUT_TYPE", None) == "generate_until")
    if generating:
        raise ArgumentError(f"generation tasks are not evaluated ({', '.join(generating)}): streamprune scores "
                            "log-likelihoods, streaming generation is not what it is for")
    return TaskRun(names, manager, StreamLM(TaskTokenizer.load(ckpt)), num_fewshot, limit)


@contextlib.contextmanager
def lm_eval_errors(names: list[str]) -> Iterator[None]:
    """lm-eval's own failures (a task whose data cannot be read offline, a malformed task file) as one line."""
    try:
        yield
    except StreamPruneError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever lm-eval or the datasets library raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataError(f"lm-eval could not prepare or score the tasks {', '.join(names)}: {type(e).__name__}: "
                        f"{first}") from e


@functools.cache
def task_manager(include_path: str | None) -> Any:
    """lm-eval's index of its tasks and those in `include_path` (building it reads every task file: seconds)."""
    return TaskManager(include_path=include_path)


def table(results: dict[str, Any]) -> str:
    """lm-eval's table of the results."""
    return make_table(results)


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    """The results as JSON holds them (lm-eval's own handling of what JSON does not)."""
    return json.loads(json.dumps(results, default=handle_non_serializable))

