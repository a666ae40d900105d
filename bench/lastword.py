"""A LAMBADA-style lm-evaluation-harness task over local text, written as lm-eval reads an offline task: a YAML file
and a JSON file of documents in one folder (pass the folder as `--include-path`).

Each document is a sentence of the text of at least MIN_WORDS words; the task scores its last word (without the
sentence's closing punctuation) given the words before it: `acc` is the share of last words the model predicts
greedily token by token, `perplexity` the exponent of the mean negative log-likelihood of the last words.

    python bench/lastword.py TEXT FOLDER [--docs N] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MIN_WORDS = 8
MAX_WORDS = 60


def documents(text: str, docs: int) -> list[dict[str, str]]:
    """The first `docs` sentences of `text` with MIN_WORDS to MAX_WORDS words whose last word is alphabetic."""
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        words = sentence.rstrip(".!?").split(" ")
        if MIN_WORDS <= len(words) <= MAX_WORDS and words[-1].isalpha():
            out.append({"text": " ".join(words)})
            if len(out) == docs:
                break
    return out


def write_task(text: str, folder: Path, docs: int = 500, name: str = "lastword") -> str:
    """Write task `name` over `text` into `folder`; returns its name."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.json"
    data.write_text(json.dumps(documents(text, docs)))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' ' + text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("text", type=Path)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--name", default="lastword")
    args = ap.parse_args()
    name = write_task(args.text.read_text(encoding="utf-8"), args.folder, args.docs, args.name)
    print(f"task {name} in {args.folder} ({len(json.loads((args.folder / f'{name}.json').read_text()))} documents)")


if __name__ == "__main__":
    main()
