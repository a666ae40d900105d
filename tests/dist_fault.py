"""The command line as torchrun launches it, with one rank's solves failing from the Nth on (a fault only that
rank sees); tests/test_dist.py runs it as `torchrun --nproc-per-node 2 tests/dist_fault.py run ...`.

STREAMPRUNE_TEST_FAULT="RANK:N": on rank RANK, the Nth SparseGPT solve (counting from 1) raises StreamPruneError.
"""

from __future__ import annotations

import os

from streamprune.cli import main
from streamprune.errors import StreamPruneError
from streamprune.pruners.sparsegpt import SparseGPT

rank, nth = (int(v) for v in os.environ["STREAMPRUNE_TEST_FAULT"].split(":"))
if int(os.environ["RANK"]) == rank:
    real = SparseGPT.prune
    calls = [0]

    def failing(self, weight, *args):
        calls[0] += 1
        if calls[0] >= nth:
            raise StreamPruneError(f"injected fault in solve {calls[0]}")
        return real(self, weight, *args)

    SparseGPT.prune = failing

main()
