"""streamprune: one-shot pruning of language models too large for memory, one block at a time."""

from __future__ import annotations

from streamprune.errors import StreamPruneError
from streamprune.evaluate import EvalResult, evaluate

__version__ = "0.1.0"

__all__ = ["EvalResult", "StreamPruneError", "__version__", "evaluate"]
