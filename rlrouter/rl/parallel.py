"""Data-parallel learners (Ray Train places them; ``rlrouter.distributed``): who does what
when more than one learner trains the same policy. With one learner (the default) every
function here is the identity.

The first learner plays the iteration's episodes and broadcasts them; every learner takes
every ``world``-th micro-batch of each minibatch; gradients and loss statistics are summed
before the optimizer step. Each learner's loss is already divided by the whole
minibatch's token count, so the summed gradient is the one a single learner would compute.
"""

from __future__ import annotations

import torch


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this learner: (0, 1) unless torch.distributed is set up (Ray Train)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def from_lead(value, world: int):
    """``value`` as the first learner holds it, on every learner."""
    if world == 1:
        return value
    shared = [value]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def sum_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum every learner's gradients in place."""
    if world == 1:
        return
    for p in params:
        torch.distributed.all_reduce(p.grad)


def sum_statistics(sums: dict, tokens: float, world: int) -> tuple[dict, float]:
    """Loss statistics and token counts summed over every learner's micro-batches."""
    if world == 1:
        return sums, tokens
    totals = torch.tensor([*sums.values(), tokens], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    return dict(zip(sums, totals[:-1].tolist())), float(totals[-1])
