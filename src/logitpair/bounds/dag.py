"""A model as a DAG of :mod:`~logitpair.bounds.ops`: nodes in topological order, each with its inputs.

Node ``k`` applies ``ops[k]`` to the outputs of the nodes ``inputs[k]`` (:data:`INPUT`, -1, is the
model's input); the last node is the model's output and every other node is used by a later
one. A chain of layers is the DAG with ``inputs[k] == (k - 1,)``; a residual connection is an
:class:`~logitpair.bounds.ops.Add` node with two inputs, the output of a node read by two later
nodes (the block's input: by its first layer and by the addition).

Forward sweeps (the model itself, IBP) keep each node's value until its last consumer has read
it (:meth:`Dag.evaluate`, :meth:`Dag.release`); backward sweeps (CROWN,
:func:`~logitpair.bounds.propagate.backward`) visit the nodes in reverse order and add the
coefficients each consumer pulls back to a node before pulling them back through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from logitpair.bounds.ops import Op

INPUT = -1
V = TypeVar("V")


@dataclass(eq=False)
class Dag:
    """``ops[k]`` reads the outputs of the nodes ``inputs[k]`` (earlier nodes or :data:`INPUT`);
    ``names[k]`` is the node's name in the traced graph (for messages)."""

    ops: list[Op]
    inputs: list[tuple[int, ...]]
    names: list[str] = field(default_factory=list)
    consumers: dict[int, list[int]] = field(init=False)
    last_use: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.consumers = {k: [] for k in range(INPUT, len(self.ops))}
        for k, ins in enumerate(self.inputs):
            for j in dict.fromkeys(ins):
                self.consumers[j].append(k)
        self.last_use = {j: users[-1] for j, users in self.consumers.items() if users}

    @classmethod
    def chain(cls, ops: Sequence[Op]) -> Dag:
        """The chain ``ops[-1](...ops[0](x))``."""
        return cls(list(ops), [(k - 1,) for k in range(len(ops))])

    @property
    def output(self) -> int:
        """The output node (:data:`INPUT` for an empty model)."""
        return len(self.ops) - 1

    def release(self, values: dict[int, V], k: int) -> None:
        """Forget the values that node ``k`` was the last to read."""
        for j in dict.fromkeys(self.inputs[k]):
            if self.last_use[j] == k:
                del values[j]

    def evaluate(self, x: V, step: Callable[[int, list[V]], V], node: int | None = None) -> V:
        """The value of ``node`` (default: the output): ``step(k, values of inputs[k])`` for every
        node up to it, ``x`` the input's value."""
        node = self.output if node is None else node
        values = {INPUT: x}
        for k in range(node + 1):
            values[k] = step(k, [values[j] for j in self.inputs[k]])
            self.release(values, k)
        return values[node]
