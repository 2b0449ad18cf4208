"""Seeded, resumable instance order for training.

Each epoch is a fresh permutation of the instance indices drawn from (seed, epoch) alone, so the
order after a resume is exactly the order the uninterrupted run would have used: the whole state
is the (epoch, position) cursor, which checkpoints store.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0


class InstanceSampler:
    def __init__(self, num_instances: int, seed: int, state: SamplerState | None = None):
        if num_instances < 1:
            raise ValueError("the training data has no instances")
        self.num_instances = num_instances
        self.seed = seed
        self.state = state or SamplerState()

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.num_instances))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order(self.state.epoch)
            take = min(n - len(out), self.num_instances - self.state.position)
            out.extend(order[self.state.position:self.state.position + take])
            self.state.position += take
            if self.state.position >= self.num_instances:
                self.state = SamplerState(self.state.epoch + 1, 0)
        return out

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state)

    @classmethod
    def from_state(cls, num_instances: int, seed: int, state: dict[str, int]) -> InstanceSampler:
        return cls(num_instances, seed, SamplerState(**state))
