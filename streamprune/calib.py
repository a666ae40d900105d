"""Token windows for calibration and evaluation, from local files only.

Accepted data: plain UTF-8 text, JSON Lines with a "text" field per line, or token ids in a
.npy array. Text is tokenized with the model's own tokenizer.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from streamprune.errors import DataError

logger = logging.getLogger(__name__)


def read_text(path: Path) -> str:
    """Plain text, or the "text" fields of a .jsonl file joined by blank lines."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from e
    if path.suffix == ".jsonl":
        parts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{lineno}: expected an object with a string "text" field')
            parts.append(record["text"])
        text = "\n\n".join(parts)
    if not text.strip():
        raise DataError(f"{path}: contains no text")
    return text


def load_tokens(path: str | Path, model_dir: str | Path, vocab_size: int) -> Tensor:
    """All token ids of a data file as a 1-D int64 tensor."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npy array ({e})") from e
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
        ids = torch.from_numpy(arr.astype(np.int64).reshape(-1))
    else:
        ids = torch.tensor(tokenizer_for(Path(model_dir)).encode(read_text(path)).ids, dtype=torch.int64)
    if ids.numel() == 0:
        raise DataError(f"{path}: contains no tokens")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise DataError(
            f"{path}: token ids span {int(ids.min())}..{int(ids.max())}, outside the vocabulary 0..{vocab_size - 1}"
        )
    return ids


def tokenizer_for(model_dir: Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; text data needs the model's tokenizer.json (or pass token ids as .npy)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises bare Exception subclasses
        raise DataError(f"{path}: cannot be loaded ({e})") from e


def eval_windows(tokens: Tensor, seqlen: int, nsamples: int | None = None, source: str = "data") -> Tensor:
    """Consecutive non-overlapping windows (K, seqlen) from the start; the tail is dropped."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise DataError(f"{source}: {tokens.numel()} tokens, shorter than one window of {seqlen}")
    if nsamples is not None:
        if nsamples < 1:
            raise DataError(f"nsamples {nsamples!r} must be at least 1")
        count = min(count, nsamples)
    return tokens[: count * seqlen].view(count, seqlen)


def calib_windows(tokens: Tensor, seqlen: int, nsamples: int, seed: int, source: str = "data") -> Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets drawn with `seed`."""
    if nsamples < 1:
        raise DataError(f"nsamples {nsamples!r} must be at least 1")
    n = tokens.numel()
    if n < seqlen:
        raise DataError(f"{source}: {n} tokens, shorter than one calibration window of {seqlen}")
    if n < nsamples * seqlen:
        logger.warning(
            "%s: %d tokens for %d windows of %d: windows will overlap", source, n, nsamples, seqlen
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
