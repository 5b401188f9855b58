"""Neuron windowing (LLM in a Flash): the down-projection neuron groups the last W tokens used, held decoded.

Under a memory budget a decoded token reads the groups of down it needs from the file. Consecutive
tokens of a sparse (ReLU) MLP need largely the same groups, so one op keeps each group it read for
as long as one of the last W tokens used it: a new token reads only the groups it needs that the
window does not hold. The window lives beside the chunk cache, not in it (the cache's LRU order knows
nothing of tokens, and a window's blocks must not be evicted by other layers' traffic); its bytes are
reported (`ffn_window_bytes`), so what it holds is visible next to the budget.

Which token used a group is counted over the positions of each call, in order: a prefill of P
positions is P tokens, a group's last use its last position needing it.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np


class NeuronWindow:
    def __init__(self, tokens: int):
        self.tokens = tokens  # W
        self.blocks: dict[int, np.ndarray] = {}  # group id -> decoded block
        self.last: dict[int, int] = {}  # group id -> the token that last used it
        self.seen = 0  # tokens counted so far
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(b.nbytes for b in self.blocks.values())

    def take(self, need: np.ndarray, ids: np.ndarray, read: Callable[[list[int]], list[np.ndarray]]):
        """The blocks of groups `ids` and how many of them were read: held ones from the window, the others
        by `read(missing ids)`. `need` [positions, groups]: which position of this call uses which group.
        Afterwards the window holds exactly the groups one of the last W tokens used."""
        with self.lock:
            missing = [int(i) for i in ids if int(i) not in self.blocks]
            for i, b in zip(missing, read(missing) if missing else []):
                self.blocks[i] = b
            out = [self.blocks[int(i)] for i in ids]
            P = need.shape[0]
            if len(ids):
                last = P - 1 - np.argmax(need[::-1][:, ids], axis=0)  # each group's last position using it
                for i, p in zip(ids, last):
                    self.last[int(i)] = self.seen + int(p)
            self.seen += P
            for i in [i for i, t in self.last.items() if t < self.seen - self.tokens]:
                del self.blocks[i], self.last[i]
            return out, len(missing)
