"""Calibration windows: drawn from a file of any size by reading and tokenizing only what they need."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from streamprune import calib
from streamprune.errors import DataError
from streamprune.job import prepare
from streamprune.options import PruneOptions
from tests import tiny
from tests.test_bad_input import assert_names, fail

SEQLEN = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny.build(tmp_path_factory.mktemp("calib") / "llama", "llama")


class CountingTokenizer:
    """The model's tokenizer, counting the characters it is asked to encode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chars = tokenizer, 0

    def encode(self, text, *args, **kwargs):
        self.chars += len(text)
        return self.tokenizer.encode(text, *args, **kwargs)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


@pytest.fixture
def tokenizer(model, monkeypatch) -> CountingTokenizer:
    counting = CountingTokenizer(calib.tokenizer_for(model))
    monkeypatch.setattr(calib, "tokenizer_for", lambda model_dir: counting)
    return counting


def bytes_read() -> int:
    """Bytes this process has read from files so far (Linux)."""
    io = Path("/proc/self/io")
    if not io.is_file():
        pytest.skip("needs /proc/self/io")
    return next(int(line.split()[1]) for line in io.read_text().splitlines() if line.startswith("rchar:"))


def draw(model: Path, data: Path, tmp_path: Path, nsamples: int = 16, seed: int = 0):
    job = prepare(model, tmp_path / "out", PruneOptions(calib=data, nsamples=nsamples, seqlen=SEQLEN, seed=seed))
    assert job.windows is not None and job.windows.shape == (nsamples, SEQLEN)
    return job


def test_a_large_text_file_is_neither_tokenized_nor_read_whole(model, tokenizer, tmp_path):
    data = tmp_path / "big.txt"
    text = tiny.sample_text(10**7)
    with open(data, "w") as f:
        for i in range(8 * 2**20 // len(text) + 1):
            f.write(f"part {i}\n{text}\n")
    size = data.stat().st_size
    before = bytes_read()
    job = draw(model, data, tmp_path)
    read = bytes_read() - before
    assert tokenizer.chars < size / 100, (tokenizer.chars, size)
    assert read < size / 20, (read, size)  # the fingerprint does not hash the whole file either
    again = draw(model, data, tmp_path)
    assert torch.equal(job.windows, again.windows) and job.fingerprint == again.fingerprint
    other = draw(model, data, tmp_path, seed=1)
    assert not torch.equal(job.windows, other.windows)
    with open(data, "a") as f:
        f.write("one more line\n")
    assert draw(model, data, tmp_path).fingerprint["calib"] != job.fingerprint["calib"]


def test_jsonl_windows_lie_inside_one_document(model, tokenizer, tmp_path):
    """Documents of one repeated letter each, neighbours differing; those shorter than a window in
    capitals, some long enough to be drawn from in chunks. No window mixes letters or holds a capital."""
    docs = []
    for i in range(300):
        if i % 3 == 2:
            docs.append(" ".join([string.ascii_uppercase[i % 26] * 3] * 8))  # 31 tokens: shorter than a window
        else:
            words = 3000 if i % 25 < 2 else 20 + i % 40  # 12,000 bytes: more than SEQLEN * MAX_BYTES_PER_TOKEN
            docs.append(" ".join([string.ascii_lowercase[i % 26] * 3] * words))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    windows = draw(model, data, tmp_path, nsamples=64).windows
    for ids in windows.tolist():
        letters = set(tokenizer.decode(ids)) - {" "}
        assert len(letters) == 1 and letters <= set(string.ascii_lowercase), tokenizer.decode(ids)


def test_jsonl_line_that_is_drawn_is_named(model, tmp_path):
    data = tmp_path / "broken.jsonl"
    lines = [json.dumps({"text": "word " * 40}) if i % 2 else '{"text": "cut short' for i in range(1, 2001)]
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="not valid JSON") as e:
        draw(model, data, tmp_path)
    lineno = int(str(e.value).split(":")[1])
    assert lines[lineno - 1] == '{"text": "cut short', str(e.value)


def test_text_with_a_bad_byte_names_its_offset(model, tmp_path):
    data = tmp_path / "latin.txt"
    raw = "".join(f"line {i} caf\xe9 au lait\n" for i in range(20000)).encode("latin-1")
    data.write_bytes(raw)
    with pytest.raises(DataError, match="not UTF-8") as e:
        draw(model, data, tmp_path)
    offset = int(str(e.value).rsplit(" ", 1)[1].rstrip(")"))
    assert raw[offset] == 0xE9 and offset > 1000, str(e.value)  # where a window was drawn, not the first one


def test_npy_windows_are_drawn_as_before(model, tmp_path):
    data = tmp_path / "ids.npy"
    ids = np.random.default_rng(0).integers(0, tiny.VOCAB, (40, 250)).astype(np.int32)
    np.save(data, ids)
    windows = draw(model, data, tmp_path, seed=3).windows
    flat = torch.from_numpy(ids.astype(np.int64).reshape(-1))
    starts = torch.randint(0, flat.numel() - SEQLEN + 1, (16,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(windows, torch.stack([flat[s : s + SEQLEN] for s in starts.tolist()]))
    np.save(data, np.asfortranarray(ids))  # flattened in C order all the same
    assert torch.equal(draw(model, data, tmp_path, seed=3).windows, windows)


@pytest.mark.parametrize("name,content,expected", [
    ("empty.txt", b"", ["contains no text"]),
    ("blank.txt", b"  \n\t\r\n  \n", ["contains no text"]),
    ("latin.txt", b"\xff\xfe\x00bad", ["not UTF-8", "offset 0"]),
    ("short.txt", b"one two three four five", ["shorter than one calibration window of 64"]),
    ("notext.jsonl", b'{"text": "hello"}\n\n{"title": "no text here"}\n', [":3:", '"text" field']),
    ("broken.jsonl", b'{"text": "hello"}\n{"text": \n', [":2:", "not valid JSON"]),
    ("short.jsonl", b'{"text": "hello"}\n' * 50, ["0 of 1600 documents drawn", "one calibration window of 64"]),
    ("ids.npy", np.arange(400) % 300, ["outside the vocabulary 0..255"]),
    ("float.npy", np.array([1.5, 2.0]), ["must be integers", "float64"]),
    ("garbage.npy", b"not a numpy file", ["not a readable .npy"]),
    ("empty.npy", b"", ["not a readable .npy"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_calibration_data_through_the_cli(model, tmp_path, name, content, expected):
    data = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(data, content)
    else:
        data.write_bytes(content)
    msg = fail("run", model, tmp_path / "out", "--calib", data, "--seqlen", SEQLEN, "--nsamples", 16)
    assert_names(msg, data, *expected)
    assert not (tmp_path / "out").exists()


def test_plan_counts_calibration_data(model):
    from streamprune.plan import HOST_OVERHEAD, plan

    result = plan(model, nsamples=16, seqlen=SEQLEN, device="cpu")
    consumers = {what: nbytes for what, nbytes, _ in result.consumers}
    assert consumers["calibration token ids"] == 16 * SEQLEN * 8
    assert result.host_peak >= HOST_OVERHEAD + 16 * SEQLEN * 8 + calib.read_workspace(SEQLEN)
    without = plan(model, nsamples=16, seqlen=SEQLEN, device="cpu", method="magnitude")  # no statistics: no calibration
    assert {what: nbytes for what, nbytes, _ in without.consumers}["calibration token ids"] == 0


def cli_run(model: Path, out: Path, *args: object) -> None:
    from typer.testing import CliRunner

    from streamprune.cli import app

    result = CliRunner().invoke(app, ["run", str(model), str(out), "--seqlen", str(SEQLEN), "--device", "cpu",
                                      *map(str, args)])
    assert result.exit_code == 0, result.output


def test_a_count_after_the_file_is_nsamples(model, tmp_path):
    """--calib A:8 is --calib A --nsamples 8: the same checkpoint and report, byte for byte, but for the timings."""
    data = tmp_path / "a.txt"
    data.write_text(tiny.sample_text(20000))
    cli_run(model, tmp_path / "counted", "--calib", f"{data}:8")
    cli_run(model, tmp_path / "nsamples", "--calib", data, "--nsamples", 8)
    files = sorted(p.name for p in (tmp_path / "counted").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "nsamples").iterdir())
    for name in files:
        if name.endswith(".safetensors") or name.endswith(".json") and name != "streamprune_report.json":
            assert (tmp_path / "counted" / name).read_bytes() == (tmp_path / "nsamples" / name).read_bytes(), name
    reports = [json.loads((tmp_path / d / "streamprune_report.json").read_text()) for d in ("counted", "nsamples")]
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"] and reports[0]["args"] == reports[1]["args"]
    assert reports[0]["args"]["calib"] == [{"file": str(data), "windows": 8}] and reports[0]["args"]["nsamples"] == 8


def test_two_sources_are_named_with_their_counts(model, tmp_path):
    """Windows from each file, in the order given (the first as it alone draws them); the report and the
    fingerprint name both with their counts; plan counts their windows."""
    from streamprune.plan import plan

    a, b = tmp_path / "a.txt", tmp_path / "b.npy"
    a.write_text(tiny.sample_text(20000))
    np.save(b, np.random.default_rng(0).integers(0, tiny.VOCAB, 5000))
    job = prepare(model, tmp_path / "out", PruneOptions(calib=(f"{a}:6", str(b)), nsamples=4, seqlen=SEQLEN, seed=2))
    assert job.windows is not None and job.windows.shape == (10, SEQLEN)
    assert torch.equal(job.windows[:6], calib.calib_windows(a, model, tiny.VOCAB, SEQLEN, 6, 2))
    assert torch.equal(job.windows[6:], calib.calib_windows(b, model, tiny.VOCAB, SEQLEN, 4, 3))
    assert job.args["calib"] == [{"file": str(a), "windows": 6}, {"file": str(b), "windows": 4}]
    assert job.args["nsamples"] == 10
    assert [(s["file"], s["windows"]) for s in job.fingerprint["calib"]] == [("a.txt", 6), ("b.npy", 4)]
    cli_run(model, tmp_path / "run", "--calib", f"{a}:6", "--calib", b, "--nsamples", 4, "--seed", 2)
    report = json.loads((tmp_path / "run" / "streamprune_report.json").read_text())
    assert report["args"]["calib"] == job.args["calib"] and report["fingerprint"] == job.fingerprint
    one = {what: n for what, n, _ in plan(model, calib=[f"{a}:6", str(b)], nsamples=4, seqlen=SEQLEN).consumers}
    assert one["calibration token ids"] == 10 * SEQLEN * 8


@pytest.mark.parametrize("given,expected", [
    ("{a}:0", "--calib '{a}:0': the count of windows must be at least 1"),
    ("{a}:-3", "--calib '{a}:-3': the count of windows must be at least 1"),
])
def test_a_count_below_one_is_refused(model, tmp_path, given, expected):
    a = tmp_path / "a.txt"
    a.write_text(tiny.sample_text(20000))
    msg = fail("run", model, tmp_path / "out", "--calib", given.format(a=a), "--seqlen", SEQLEN)
    assert expected.format(a=a) in msg
    assert not (tmp_path / "out").exists()
    msg = fail("run", model, tmp_path / "out", "--calib", a, "--calib", f"{a}:4", "--seqlen", SEQLEN)
    assert f"--calib {str(a)!r} is given twice" in msg
    assert not (tmp_path / "out").exists()
