"""streamprune: one-shot pruning of language models too large for memory, one block at a time."""

from __future__ import annotations

from streamprune.errors import StreamPruneError
from streamprune.evaluate import EvalResult, evaluate
from streamprune.pipeline import PruneOptions, prune
from streamprune.report import Report

__version__ = "0.1.0"

__all__ = ["EvalResult", "PruneOptions", "Report", "StreamPruneError", "__version__", "evaluate", "prune"]
