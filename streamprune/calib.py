"""Token windows for calibration and evaluation, from local files only.

Accepted data: plain UTF-8 text, JSON Lines with a "text" field per line, or token ids in a
.npy array. Text is tokenized with the model's own tokenizer.json. Evaluation reads the whole
file; calibration reads only the windows it draws (the rule is in docs/commands.md, "Data formats").
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from streamprune.errors import ArgumentError, DataError

logger = logging.getLogger(__name__)

# Drawing calibration windows from text: a chunk of seqlen * CHUNK_BYTES_PER_TOKEN bytes is read at a drawn
# offset and doubled while it holds too few tokens, up to seqlen * MAX_BYTES_PER_TOKEN.
CHUNK_BYTES_PER_TOKEN = 6  # English is 3.5-4.5 bytes per token for BPE vocabularies of 32k-128k
MAX_BYTES_PER_TOKEN = 64
MAX_LINE_BYTES = 8 * 2**20  # a longer .jsonl line (one document) is refused
DRAWS_PER_WINDOW = 100  # draws that find no window (too near the end, a short document) before giving up
ENCODE_BYTES_PER_BYTE = 320  # peak memory of encoding with tokenizers 0.23, per byte of text (measured: 40-310)

Window = tuple[list[int], int]  # token ids, and the bytes of text they cover (for the overlap warning)


def read_workspace(seqlen: int) -> int:
    """Host bytes that drawing calibration windows from text may hold at once: a .jsonl line three times
    (as read, decoded, parsed) and the largest chunk with its tokenization."""
    return 3 * MAX_LINE_BYTES + seqlen * MAX_BYTES_PER_TOKEN * (1 + ENCODE_BYTES_PER_BYTE)


def record_text(line: str) -> str:
    """The "text" field of one JSON Lines record; a ValueError says what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError('expected an object with a string "text" field')
    return record["text"]


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
                parts.append(record_text(line))
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from e
        text = "\n\n".join(parts)
    if not text.strip():
        raise DataError(f"{path}: contains no text")
    return text


def check_vocabulary(ids: Tensor, vocab_size: int, path: Path) -> None:
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise DataError(
            f"{path}: token ids span {int(ids.min())}..{int(ids.max())}, outside the vocabulary 0..{vocab_size - 1}"
        )


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
    check_vocabulary(ids, vocab_size, path)
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


@dataclass(frozen=True)
class CalibSource:
    """One calibration file and the number of windows drawn from it."""

    path: Path
    windows: int

    def to_dict(self) -> dict[str, object]:
        return {"file": str(self.path), "windows": self.windows}


COUNT = re.compile(r"(.+):(-?\d+)")  # FILE:N, N a whole number (a negative one is refused, not read as a path)


def calib_sources(given: str | Path | CalibSource | Iterable[str | Path | CalibSource] | None,
                  nsamples: int) -> tuple[CalibSource, ...]:
    """The calibration sources of --calib as given (once or repeated, FILE or FILE:N): N windows from each FILE:N,
    `nsamples` from a FILE without a count. None: no calibration data."""
    if given is None:
        return ()
    items = [given] if isinstance(given, (str, Path, CalibSource)) else list(given)
    sources = []
    for item in items:
        if isinstance(item, CalibSource):
            sources.append(item)
            continue
        match = COUNT.fullmatch(str(item)) if isinstance(item, str) else None
        path, count = (Path(match.group(1)), int(match.group(2))) if match else (Path(item), nsamples)
        if count < 1:
            raise ArgumentError(f"--calib {str(item)!r}: the count of windows must be at least 1")
        sources.append(CalibSource(path, count))
    names = [s.path.resolve() for s in sources]
    twice = next((s for s, name in zip(sources, names) if names.count(name) > 1), None)
    if twice is not None:
        raise ArgumentError(f"--calib {str(twice.path)!r} is given twice; give it once, with the count of windows "
                            "wanted (FILE:N)")
    return tuple(sources)


def source_windows(sources: tuple[CalibSource, ...], model_dir: str | Path, vocab_size: int, seqlen: int,
                   seed: int) -> Tensor:
    """The windows of every source, in the order given: source k's drawn with seed `seed + k` (so one source is
    drawn as `calib_windows` draws it), joined into (sum of the counts, seqlen)."""
    return torch.cat([calib_windows(s.path, model_dir, vocab_size, seqlen, s.windows, seed + k)
                      for k, s in enumerate(sources)])


def calib_windows(path: str | Path, model_dir: str | Path, vocab_size: int, seqlen: int, nsamples: int,
                  seed: int) -> Tensor:
    """`nsamples` windows (nsamples, seqlen) of int64 token ids drawn with `seed`, reading only what they need."""
    if nsamples < 1:
        raise DataError(f"nsamples {nsamples!r} must be at least 1")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        windows = npy_windows(path, seqlen, nsamples, seed)
    else:
        windows = TextDraw(path, tokenizer_for(Path(model_dir)), seqlen, seed).windows(nsamples)
    check_vocabulary(windows, vocab_size, path)
    return windows


def npy_windows(path: Path, seqlen: int, nsamples: int, seed: int) -> Tensor:
    """Windows at token offsets drawn uniformly, read from a memory map of the array (flattened in C order)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from e
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    n = arr.size
    if n == 0:
        raise DataError(f"{path}: contains no tokens")
    if n < seqlen:
        raise DataError(f"{path}: {n} tokens, shorter than one calibration window of {seqlen}")
    if n < nsamples * seqlen:
        logger.warning("%s: %d tokens for %d windows of %d: windows will overlap", path, n, nsamples, seqlen)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    rows = [arr[np.unravel_index(np.arange(s, s + seqlen), arr.shape)] for s in starts.tolist()]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def line_start(chunk: bytes) -> int:
    """Where a window starts in `chunk`, read from one byte before the drawn offset: after the first newline,
    else at the first space, else at the first character boundary from the drawn byte on."""
    i = chunk.find(b"\n")
    if i >= 0:
        return i + 1
    i = chunk.find(b" ", 1)
    if i >= 0:
        return i
    return next((i for i in range(1, len(chunk)) if chunk[i] & 0xC0 != 0x80), len(chunk))


def line_end(chunk: bytes, start: int) -> int:
    """Where to cut a chunk that stops short of the end of the file: after its last newline, else before its
    last space, else before its last character (which may be incomplete)."""
    i = chunk.rfind(b"\n", start)
    if i >= 0:
        return i + 1
    i = chunk.rfind(b" ", start + 1)
    if i >= 0:
        return i
    i = len(chunk) - 1
    while i > start and chunk[i] & 0xC0 == 0x80:
        i -= 1
    return max(i, start)


class TextDraw:
    """Calibration windows drawn from a text or .jsonl file, reading and tokenizing only around each draw."""

    def __init__(self, path: Path, tokenizer, seqlen: int, seed: int) -> None:
        self.path, self.tokenizer, self.seqlen = path, tokenizer, seqlen
        self.gen = torch.Generator().manual_seed(seed)
        self.size = path.stat().st_size
        self.chars = 0  # characters tokenized, for the log

    def windows(self, nsamples: int) -> Tensor:
        if self.size == 0:
            raise DataError(f"{self.path}: contains no text")
        jsonl = self.path.suffix == ".jsonl"
        found: list[Window] = []
        draws = 0
        try:
            with open(self.path, "rb") as f:
                self.file = f
                if not jsonl and self.size <= self.seqlen * MAX_BYTES_PER_TOKEN:
                    self.check_length()
                while len(found) < nsamples:
                    if draws == DRAWS_PER_WINDOW * nsamples:
                        raise DataError(self.too_few(jsonl, len(found), draws, nsamples))
                    draws += 1
                    window = self.document_window() if jsonl else self.text_window(self.read, self.size)
                    if window is not None:
                        found.append(window)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read: {e.strerror or e}") from e
        if sum(nbytes for _, nbytes in found) > self.size:
            logger.warning("%s: %d windows of %d tokens cover more text than the file's %d bytes: windows overlap",
                           self.path, nsamples, self.seqlen, self.size)
        logger.info("%s: %d windows from %d draws, %d characters tokenized (the file has %d bytes)",
                    self.path, nsamples, draws, self.chars, self.size)
        return torch.tensor([ids for ids, _ in found], dtype=torch.int64)

    def too_few(self, jsonl: bool, found: int, draws: int, nsamples: int) -> str:
        if jsonl:
            return (f"{self.path}: {found} of {draws} documents drawn hold {self.seqlen} tokens, {nsamples} windows "
                    f"wanted: too few documents are as long as one calibration window of {self.seqlen}")
        return (f"{self.path}: {found} of {draws} offsets drawn lie {self.seqlen} tokens before the end, {nsamples} "
                f"windows wanted: the text is barely longer than one calibration window of {self.seqlen}")

    def uniform(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.gen))

    def read(self, pos: int, n: int) -> bytes:
        self.file.seek(pos)
        return self.file.read(n)

    def decode(self, data: bytes, offset: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not UTF-8 text (invalid byte at offset {offset + e.start})") from e

    def encode(self, text: str):  # -> tokenizers.Encoding
        self.chars += len(text)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_length(self) -> None:
        """A small file is read whole once, so that one shorter than a window is named as such."""
        text = self.decode(self.read(0, self.size), 0)
        if not text.strip():
            raise DataError(f"{self.path}: contains no text")
        n = len(self.encode(text).ids)
        if n < self.seqlen:
            raise DataError(f"{self.path}: {n} tokens, shorter than one calibration window of {self.seqlen}")

    def text_window(self, read: Callable[[int, int], bytes], size: int) -> Window | None:
        """The first seqlen tokens of the text from the line start at or after a byte offset drawn uniformly
        in [0, size), or None when the text ends first (or seqlen * MAX_BYTES_PER_TOKEN bytes hold fewer)."""
        drawn = self.uniform(size)
        lo = max(drawn - 1, 0)  # the drawn byte starts a line if the byte before it is a newline
        n = self.seqlen * CHUNK_BYTES_PER_TOKEN
        while True:
            chunk = read(lo, n)
            end = lo + len(chunk) >= size
            start = 0 if drawn == 0 else line_start(chunk)
            text = self.decode(chunk[start : len(chunk) if end else line_end(chunk, start)], lo + start)
            enc = self.encode(text)
            if len(enc.ids) > self.seqlen or (end and len(enc.ids) == self.seqlen):  # a token to spare at a cut
                return enc.ids[: self.seqlen], len(text[: enc.offsets[self.seqlen - 1][1]].encode())
            if end or n >= self.seqlen * MAX_BYTES_PER_TOKEN:
                return None
            n = min(2 * n, self.seqlen * MAX_BYTES_PER_TOKEN)

    def document_window(self) -> Window | None:
        """seqlen tokens at a uniform token offset in the document whose line starts at or after a byte offset
        drawn uniformly, or None when there is no such line or its document is shorter."""
        drawn = self.uniform(self.size)
        self.file.seek(max(drawn - 1, 0))
        while drawn > 0 and (part := self.file.readline(2**20)) and not part.endswith(b"\n"):
            pass  # skip the rest of the line the drawn byte falls in
        pos = self.file.tell()
        line = self.file.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"{self.path}:{self.line_number(pos)}: a document longer than "
                            f"{MAX_LINE_BYTES // 2**20} MiB; split it over several lines")
        if not line.strip():
            return None  # past the last line, or a blank one
        try:
            text = record_text(self.decode(line, pos))
        except ValueError as e:
            raise DataError(f"{self.path}:{self.line_number(pos)}: {e}") from e
        del line
        data = text.encode()
        if len(data) > self.seqlen * MAX_BYTES_PER_TOKEN:  # a long document: drawn from like a text file
            return self.text_window(lambda p, n: data[p : p + n], len(data))
        enc = self.encode(text)
        if len(enc.ids) < self.seqlen:
            return None
        k = self.uniform(len(enc.ids) - self.seqlen + 1)
        first, last = enc.offsets[k][0], enc.offsets[k + self.seqlen - 1][1]
        return enc.ids[k : k + self.seqlen], len(text[first:last].encode())

    def line_number(self, pos: int) -> int:
        """The number of the line starting at byte `pos` (counted only for an error message)."""
        self.file.seek(0)
        count = sum(self.file.read(min(2**20, pos - i)).count(b"\n") for i in range(0, pos, 2**20))
        return count + 1


BUCKET = 16  # a task's token sequence is right-padded to a multiple of this: buckets of few shapes, little padding


def padded(length: int) -> int:
    """A task sequence's length in its bucket (see `tasks.TaskStreams`)."""
    return -(-length // BUCKET) * BUCKET
