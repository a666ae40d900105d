"""lm-evaluation-harness tasks scored one block at a time: every request's log-likelihood and greedy flag against
lm-eval's own transformers backend (HFLM) on the same model and the same requests, and the tasks' metrics. The tasks
are defined here, offline: YAML files over local JSON."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import transformers
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM
from typer.testing import CliRunner

from streamprune.checkpoint import Checkpoint
from streamprune.cli import app
from streamprune.errors import StreamPruneError
from streamprune.evaluate import evaluate
from streamprune.loop import walk
from streamprune.stream import BlockStream
from streamprune.tasks import task_manager
import streamprune
from bench.tinylm import demo_model
from tests import tiny, tolerance
from tests.test_resume import fail_writes_after

TASKS = ["tiny_choice", "tiny_lastword", "tiny_rolling"]
CPU = torch.device("cpu")


def paragraphs() -> list[str]:
    text = tiny.sample_text(30000)
    return [p.strip().replace("\n", " ") for p in text.split("\n\n") if len(p.strip()) > 80]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three tasks over local JSON: multiple choice (whose choices include the true next words), a LAMBADA-style
    last word (one context longer than the models' 128 positions) and a rolling log-likelihood; and a generation
    task, to be refused."""
    folder = tmp_path_factory.mktemp("tasks")
    texts = paragraphs()
    choice, lastword = [], []
    for i, text in enumerate(texts[:12]):
        words = text.split(" ")
        cut = min(len(words) - 3, 6 + i // 2)
        truth = " ".join(words[cut:cut + 2])
        others = [" ".join(texts[(i + k) % len(texts)].split(" ")[2:4]) for k in (3, 5)]
        choices = [truth, *others]
        choice.append({"question": " ".join(words[:cut]), "choices": choices[i % 3:] + choices[:i % 3],
                       "answer": (-i) % 3})
        lastword.append({"text": " ".join(words[:8 + i // 2])})
    for text in texts[12:40]:  # ending on "the": a word a trained model often predicts (greedy flags set)
        words = text.split(" ")
        if "the" in words[3:20]:
            lastword.append({"text": " ".join(words[:words.index("the", 3) + 1])})
    lastword.append({"text": " ".join(" ".join(texts[20:26]).split(" ")[:260])})  # past the context: cut on the left
    rolling = [{"text": " ".join(texts[30 + i:32 + i])} for i in range(4)]  # a few windows each
    for name, docs in (("choice", choice), ("lastword", lastword), ("rolling", rolling)):
        (folder / f"{name}.json").write_text(json.dumps(docs))
    common = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.json\n" \
        "test_split: test\n"  # noqa: E731
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n" + common("choice") + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")
    (folder / "tiny_lastword.yaml").write_text(
        "task: tiny_lastword\n" + common("lastword") + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' ' + text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    (folder / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n" + common("rolling") + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n"
        "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n")
    (folder / "tiny_generate.yaml").write_text(
        "task: tiny_generate\n" + common("lastword") + "output_type: generate_until\ndoc_to_text: \"{{text}}\"\n"
        "doc_to_target: \"x\"\ngeneration_kwargs: {until: [\"\\n\"]}\nmetric_list:\n"
        "  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    (folder / "tiny_missing.yaml").write_text(  # its data file is not there
        "task: tiny_missing\n" + common("missing") + "output_type: loglikelihood\ndoc_to_text: \"{{text}}\"\n"
        "doc_to_target: \" x\"\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    return folder


def model_with_tokenizer(path: Path, variant: str, bos: bool) -> Path:
    """A tiny random `variant` whose tokenizer names <s> and </s> (and with `bos` puts <s> in front of each text); or
    the trained demo model ("demo"), whose tokenizer names <|endoftext|> as both and adds none."""
    if variant == "demo":
        shutil.copytree(demo_model(), path)
        return path
    tiny.build(path, variant)
    (path / "tokenizer.json").write_text(tiny.special_tokenizer_json(bos))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    return path


class Recorder(LM):
    """The requests lm-eval hands a model, by type."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: dict[str, list] = {"loglikelihood": [], "loglikelihood_rolling": []}

    def loglikelihood(self, requests, disable_tqdm=False):
        self.requests["loglikelihood"] += requests
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        self.requests["loglikelihood_rolling"] += requests
        return [0.0] * len(requests)

    def generate_until(self, requests, disable_tqdm=False):
        raise AssertionError("no generation task here")


def simple_evaluate(lm, task_dir: Path, tasks=TASKS) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(str(task_dir.resolve())),
                                   log_samples=False, bootstrap_iters=0)


def hflm(model_dir: Path) -> HFLM:
    """lm-eval's transformers backend on the model. Without its one-token logits cache: lm-eval 0.4.13 groups a
    one-token continuation with a longer request whose context plus continuation is the same token sequence, and on
    the demo model returned for 11 of 66 of these requests another log-likelihood than the model's own (which the
    request alone, a batch of one, or the cache off all give, and streamprune too)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    return HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir), batch_size=4,
                logits_cache=False)


def streamed_answers(model_dir: Path, task_dir: Path, requests: dict[str, list]) -> dict[str, list]:
    """streamprune's answers to the recorded requests: its sequences scored through the block loop."""
    from streamprune.tasks import TaskStreams, prepare_tasks

    ckpt = Checkpoint(model_dir)
    run = prepare_tasks(ckpt, TASKS, task_dir, None, None)
    streams = TaskStreams(ckpt, run.record(), CPU, 4, "device", model_dir)
    walk(BlockStream(ckpt, CPU, range(ckpt.config.n_layers)), list(streams.streams))
    run.lm.scores = streams.scores()
    return {"loglikelihood": run.lm.loglikelihood(requests["loglikelihood"]),
            "loglikelihood_rolling": run.lm.loglikelihood_rolling(requests["loglikelihood_rolling"])}


@pytest.mark.parametrize("variant,bos", [("demo", False), ("llama", True), ("llama", False), ("gemma2", True),
                                         ("mixtral", True), ("qwen2-moe", False)])
def test_every_request_matches_lm_evals_transformers_backend(tmp_path, task_dir, variant, bos):
    model = model_with_tokenizer(tmp_path / "model", variant, bos)
    recorder = Recorder()
    simple_evaluate(recorder, task_dir)
    requests = recorder.requests
    assert len(requests["loglikelihood"]) > 40 and len(requests["loglikelihood_rolling"]) == 4
    ref = hflm(model)
    theirs = {"loglikelihood": ref.loglikelihood(requests["loglikelihood"]),
              "loglikelihood_rolling": ref.loglikelihood_rolling(requests["loglikelihood_rolling"])}
    ours = streamed_answers(model, task_dir, requests)
    assert [g for _, g in ours["loglikelihood"]] == [g for _, g in theirs["loglikelihood"]]
    assert any(g for _, g in theirs["loglikelihood"]) or variant != "demo"  # a trained model gets some right
    # each a sum of float32 log-probabilities over its tokens (tests/tolerance.py)
    tols = [tolerance.logprob_sum(len(ref._encode_pair(*r.args)[1]), b)
            for r, (b, _) in zip(requests["loglikelihood"], theirs["loglikelihood"])]
    for (a, _), (b, _), tol in zip(ours["loglikelihood"], theirs["loglikelihood"], tols):
        assert a == pytest.approx(b, abs=tol)
    rolling = [tolerance.logprob_sum(len(ref.tok_encode(r.args[0])), b)
               for r, b in zip(requests["loglikelihood_rolling"], theirs["loglikelihood_rolling"])]
    for a, b, tol in zip(ours["loglikelihood_rolling"], theirs["loglikelihood_rolling"], rolling):
        assert a == pytest.approx(b, abs=tol)
    # the metrics lm-eval computes from them: accuracies exactly, the perplexities as their terms' tolerances carry
    mine = evaluate(model, tasks=TASKS, include_path=task_dir, batch=4).tasks["results"]
    other = simple_evaluate(ref, task_dir)["results"]
    docs = [r.args[0] for r in requests["loglikelihood_rolling"]]
    words, nbytes = sum(len(re.split(r"\s+", d)) for d in docs), sum(len(d.encode()) for d in docs)
    lastword = [t for r, t in zip(requests["loglikelihood"], tols) if r.task_name == "tiny_lastword"]
    rel = {"perplexity": sum(lastword) / len(lastword), "word_perplexity": sum(rolling) / words,
           "byte_perplexity": sum(rolling) / nbytes,
           "bits_per_byte": sum(rolling) / abs(sum(theirs["loglikelihood_rolling"]))}
    for task in TASKS:
        for key, value in other[task].items():
            metric = key.split(",")[0]
            if metric.startswith("acc") and isinstance(value, float):
                assert mine[task][key] == value, key
            elif metric in rel:
                assert mine[task][key] == pytest.approx(value, rel=rel[metric]), key


@pytest.mark.parametrize("variant", ["llama", "qwen2-moe"])
def test_run_eval_tasks_equals_eval_of_the_output(tmp_path, task_dir, calib, variant):
    """run --eval-tasks (and --eval-dense) in the pass that prunes: metric for metric what `eval --tasks` gives of the
    written output (and of the input); also when the run was stopped after its first blocks and resumed (the task
    streams replayed through the written shards)."""
    model = model_with_tokenizer(tmp_path / "model", variant, True)
    args = dict(calib=calib, nsamples=8, seqlen=32, eval_tasks=TASKS, include_path=task_dir, eval_dense=True)
    report = streamprune.prune(model, tmp_path / "out", **args)
    written = evaluate(tmp_path / "out", tasks=TASKS, include_path=task_dir).tasks["results"]
    dense = evaluate(model, tasks=TASKS, include_path=task_dir).tasks["results"]
    assert report.tasks["results"] == written and report.tasks["dense_results"] == dense
    assert report.tasks["sequences"] > 40 and written != dense
    with pytest.MonkeyPatch.context() as patch:
        fail_writes_after(patch, 2)
        with pytest.raises(StreamPruneError):
            streamprune.prune(model, tmp_path / "resumed", **args)
    resumed = streamprune.prune(model, tmp_path / "resumed", **args)
    assert resumed.resumed_at_block == 1 and resumed.tasks == report.tasks


def test_tasks_and_data_in_one_pass(tmp_path, task_dir, calib):
    model = model_with_tokenizer(tmp_path / "model", "qwen3-moe", True)
    both = evaluate(model, calib, tasks=["tiny_lastword"], include_path=task_dir, seqlen=64, nsamples=4)
    alone = evaluate(model, calib, seqlen=64, nsamples=4)
    tasks = evaluate(model, tasks=["tiny_lastword"], include_path=task_dir)
    assert both.perplexity == alone.perplexity
    assert both.tasks["results"]["tiny_lastword"] == tasks.tasks["results"]["tiny_lastword"]
    assert both.task_sequences == tasks.task_sequences > 0


def test_cli_prints_lm_evals_table_and_writes_json(tmp_path, task_dir):
    model = model_with_tokenizer(tmp_path / "model", "llama", True)
    out = tmp_path / "tasks.json"
    result = CliRunner().invoke(app, ["eval", str(model), "--tasks", "tiny_choice,tiny_lastword", "--include-path",
                                      str(task_dir), "--limit", "5", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "tiny_choice" in result.output and "acc" in result.output  # lm-eval's table
    saved = json.loads(out.read_text())
    assert saved["tasks"]["results"]["tiny_choice"]["sample_len"] == 5
    assert saved["peak_rss_bytes"] > 0 and saved["seconds"] > 0


def test_a_request_past_the_context_is_cut_on_the_left_and_said_once(tmp_path, task_dir, caplog):
    model = model_with_tokenizer(tmp_path / "model", "llama", True)
    with caplog.at_level(logging.WARNING, logger="streamprune.tasks"):
        evaluate(model, tasks=["tiny_lastword"], include_path=task_dir)
    said = [r for r in caplog.records if "cut from the left" in r.getMessage()]
    assert len(said) == 1 and said[0].getMessage().startswith("1 requests are longer than the model's 128 tokens")


@pytest.mark.parametrize("tasks,extra,message", [
    ("tiny_lastwrd", [], "unknown task 'tiny_lastwrd'"),
    ("tiny_generate", [], "generation tasks are not evaluated (tiny_generate)"),
    ("tiny_missing", [], "lm-eval could not prepare or score the tasks tiny_missing: "),
    ("tiny_choice", ["--limit", "0"], "--limit 0.0 must be positive"),
], ids=["unknown", "generation", "missing-data", "limit-0"])
def test_bad_tasks_are_one_line(tmp_path, task_dir, tasks, extra, message):
    model = model_with_tokenizer(tmp_path / "model", "llama", True)
    result = CliRunner().invoke(app, ["eval", str(model), "--tasks", tasks, "--include-path", str(task_dir), *extra])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    if "unknown" in message:
        assert "did you mean tiny_lastword" in lines[0]


def test_without_lm_eval_says_which_extra(tmp_path, monkeypatch):
    model = model_with_tokenizer(tmp_path / "model", "llama", True)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "streamprune.tasks", raising=False)
    with pytest.raises(StreamPruneError, match=r"pip install 'streamprune\[tasks\]'"):
        evaluate(model, tasks=["tiny_choice"])


def test_eval_needs_data_or_tasks(tmp_path):
    model = tiny.build(tmp_path / "model", "llama")
    with pytest.raises(StreamPruneError, match="--data FILE, --tasks NAMES, or both"):
        evaluate(model)
    assert math.isfinite(evaluate(model, tiny_text(tmp_path), seqlen=32).perplexity)


def tiny_text(tmp_path: Path) -> Path:
    path = tmp_path / "data.txt"
    path.write_text(tiny.sample_text(5000))
    return path
