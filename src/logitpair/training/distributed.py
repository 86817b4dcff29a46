"""Data-parallel training with PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

The world, joining the process group and the collectives live one layer down, in
:mod:`logitpair.distributed` (sharded evaluation uses them too); they are re-exported here for
the training loop. Only rank 0 writes files.
"""

from logitpair.distributed import (
    Dist,
    all_gather,
    all_reduce_sum,
    all_true,
    barrier,
    env_world,
    same_on_all_ranks,
    setup,
    teardown,
    wait_for_all,
)

__all__ = [
    "Dist",
    "all_gather",
    "all_reduce_sum",
    "all_true",
    "barrier",
    "env_world",
    "same_on_all_ranks",
    "setup",
    "teardown",
    "wait_for_all",
]
