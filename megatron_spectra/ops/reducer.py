"""How the clip operators combine what several holders of one matrix computed.

A matrix whose columns are spread over processes is clipped through its k x k Gram, a sum
over the column blocks: each holder computes its share and a reducer sums them. The
distributed engine passes its own (`engine/clip.py`); in one process nothing is summed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class Reducer:
    """Sums (or maxes) per-process partial results in place; a no-op in one process.

    `share_` hands every process the tensors that one process each computed (the others
    pass zeros): the k x k factors of `clip_wide(..., roots=...)`. `meanwhile` is local work
    to run before the first share (once; `catch_up` runs it if no share came): the caller's
    other clips, so that no process idles at the exchange while the roots are computed.
    `local`: every matrix is whole in this process (nothing to sum, no other holder to agree
    with)."""

    local = True

    def __init__(self, meanwhile: Callable[[], None] | None = None):
        self._meanwhile = meanwhile

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def max_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def share_(self, tensors: Sequence[torch.Tensor]) -> None:
        self.catch_up()
        self.sum_(tensors)  # x + 0 + ... + 0 = x exactly

    def catch_up(self) -> None:
        work, self._meanwhile = self._meanwhile, None
        if work is not None:
            work()


LOCAL = Reducer()
