"""From played episodes to the tensors the loss reads: training sequences, their per-token
targets, and the packed forward pass that scores them.

Nothing here is specific to an algorithm; it is the engineering that keeps the update
exact and fast:

- ``training_sequences``: one sequence per turn (step prompts) or per episode (episode
  prompts), the loss mask 1 exactly on the router's generated tokens, and a check that an
  episode's context extends each earlier turn token for token (token-in/token-out).
- ``build_batch``: those sequences with the log-probs they were sampled with and the route
  constraint each generated token was sampled under (``constraint_masks``), so the learner
  recomputes the log-probs of the same constrained distribution.
- ``packed_forward``: the shared prefix of a micro-batch (the system prompt: most of a step
  prompt) runs once and its key/value cache is repeated over the rows; rows are
  left-padded after it so every sequence ends in the last column, and only the last
  ``keep`` positions go through the LM head. Both savings are exact.
- ``learnable``: a sequence whose loss tokens all have advantage 0 adds exactly nothing to
  the clipped surrogate's gradient, so it can skip the forward pass (tree credit leaves
  most turns at 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rlrouter.rl.loss import token_logprobs
from rlrouter.router.episodes import Rollout
from rlrouter.router.generation import constraint_masks, think_banned_ids

MIN_SHARED_PREFIX = 16  # shorter shared prefixes are not worth a separate forward pass


def training_sequences(rollout: Rollout, prompt_mode: str) -> list[tuple[list[int], list[int], list[int]]]:
    """(input_ids, loss_mask, turn_index) sequences to train on: one per turn in step mode,
    one per episode in episode mode. ``loss_mask`` is 1 exactly on the router's generated
    tokens; ``turn_index[t]`` says which turn wrote token t (−1 for prompt/env tokens)."""
    if prompt_mode == "step":
        return [(t.prompt_ids + t.completion_ids, [0] * len(t.prompt_ids) + [1] * len(t.completion_ids),
                 [-1] * len(t.prompt_ids) + [k] * len(t.completion_ids)) for k, t in enumerate(rollout.turns)]
    last = rollout.turns[-1]
    ids = last.prompt_ids + last.completion_ids
    mask, turn_index = [0] * len(ids), [-1] * len(ids)
    for k, turn in enumerate(rollout.turns):
        start = len(turn.prompt_ids)
        if ids[start:start + len(turn.completion_ids)] != turn.completion_ids:
            raise AssertionError("episode context does not extend the previous turn (token-in/token-out broken)")
        for pos in range(start, start + len(turn.completion_ids)):
            mask[pos], turn_index[pos] = 1, k
    return [(ids, mask, turn_index)]


@dataclass
class Batch:
    """Training sequences of one iteration, with per-token targets aligned to logits
    position t (which scores token t + 1)."""

    input_ids: list[list[int]] = field(default_factory=list)
    loss_mask: list[np.ndarray] = field(default_factory=list)  # 1 on router tokens
    old_logprobs: list[np.ndarray] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # the rollout each sequence comes from
    turn_index: list[np.ndarray] = field(default_factory=list)  # the turn that wrote each token (−1: none)
    constraints: list[list[tuple[int, list[int] | None]]] = field(default_factory=list)  # (position, allowed ids)
    value_positions: list[list[tuple[int, int]]] = field(default_factory=list)  # (turn, position before it)
    advantages: list[np.ndarray] = field(default_factory=list)  # per token, from set_targets
    returns: list[list[float]] = field(default_factory=list)  # PPO, one per value position
    old_values: list[list[float]] = field(default_factory=list)

    def set_targets(self, advantages: list[np.ndarray], returns: list[np.ndarray],
                    values: list[np.ndarray] | None) -> None:
        """Spread each rollout's per-turn advantages over the tokens of its turns; with
        ``values`` (PPO), the value targets at each turn's value position too."""
        self.advantages = [np.where(t >= 0, advantages[i][np.maximum(t, 0)], 0.0)
                           for i, t in zip(self.owner, self.turn_index)]
        if values is not None:
            self.returns = [[returns[i][k] for k, _ in pos] for i, pos in zip(self.owner, self.value_positions)]
            self.old_values = [[values[i][k] for k, _ in pos] for i, pos in zip(self.owner, self.value_positions)]


def build_batch(rollouts: list[Rollout], tokenizer, prompt_mode: str, loss_tokens: str = "all") -> Batch:
    """The training sequences of ``rollouts`` (targets are set afterwards). ``loss_tokens``
    ``route``: think text is masked out of the loss (generated, not trained)."""
    batch = Batch()
    for i, rollout in enumerate(rollouts):
        for ids, mask, turn_index in training_sequences(rollout, prompt_mode):
            mask = np.asarray(mask[1:], dtype=np.float32)
            turn_index = np.asarray(turn_index[1:])
            old = np.zeros(len(ids) - 1, dtype=np.float32)
            positions, constraints = [], []
            for k, turn in enumerate(rollout.turns):
                where = np.flatnonzero(turn_index == k)
                if len(where):
                    old[where] = turn.logprobs
                    positions.append((k, int(where[0])))  # logits position before the turn's first token
                    for pos, allowed in zip(where, constraint_masks(tokenizer, turn)):
                        if allowed is None and loss_tokens == "route":
                            mask[pos] = 0.0  # think text: generated, but no gradient (and not scored)
                        elif allowed != []:
                            constraints.append((int(pos), allowed))
            batch.input_ids.append(ids)
            batch.loss_mask.append(mask)
            batch.old_logprobs.append(old)
            batch.owner.append(i)
            batch.turn_index.append(turn_index)
            batch.value_positions.append(positions)
            batch.constraints.append(constraints)
    return batch


def learnable(batch: Batch) -> np.ndarray:
    """Which sequences have a loss token with a non-zero advantage (the others add nothing
    to the policy gradient; the loss is still divided by the whole minibatch's token count,
    so skipping them leaves the gradient unchanged)."""
    return np.array([bool(np.any(adv[mask > 0] != 0)) for adv, mask in zip(batch.advantages, batch.loss_mask)],
                    dtype=bool)


def scored_positions(loss_masks: list[np.ndarray]) -> int:
    """``keep``: positions the LM head must score, from the first router token of any row to the end."""
    return max(len(m) - int(np.flatnonzero(m)[0]) for m in loss_masks) + 1


def tail(arrays: list[np.ndarray], keep: int, device) -> torch.Tensor:
    """The last ``keep`` − 1 entries of per-position arrays, left-padded with zeros."""
    out = torch.zeros((len(arrays), keep - 1), dtype=torch.float32)
    for row, a in enumerate(arrays):
        a = np.asarray(a[-(keep - 1):], dtype=np.float32)
        out[row, keep - 1 - len(a):] = torch.from_numpy(a)
    return out.to(device)


def _shared_prefix(ids_list: list[list[int]], keep: int) -> int:
    """Length of the prefix every row shares, kept outside the scored positions."""
    limit = min(len(ids) for ids in ids_list) - keep
    first, shared = ids_list[0], 0
    while shared < limit and all(ids[shared] == first[shared] for ids in ids_list):
        shared += 1
    return 0 if shared < MIN_SHARED_PREFIX or len(ids_list) == 1 else shared


def _constrain(logits: torch.Tensor, tokenizer, constraints, offsets: list[int], first_col: int) -> torch.Tensor:
    """Mask ``logits`` with the route constraint each token was sampled under
    (``constraints[row]``: (logits position, allowed ids or None = think text))."""
    banned = torch.zeros(logits.shape, dtype=torch.bool)
    think_banned = think_banned_ids(tokenizer)
    for row, row_constraints in enumerate(constraints):
        for pos, allowed in row_constraints:
            col = pos + offsets[row] - first_col
            if allowed is None:
                banned[row, col, think_banned] = True
            else:
                banned[row, col, :] = True
                banned[row, col, allowed] = False
    return logits.masked_fill(banned.to(logits.device), float("-inf"))


def packed_forward(model, tokenizer, ids_list: list[list[int]], keep: int, temperature: float, device,
                   want_hidden: bool = False, constraints: list | None = None):
    """Log-probs and entropies of the last ``keep`` − 1 tokens of each row (see the module
    docstring for the shared prefix and left padding), under ``constraints`` when given.

    Returns (logp, entropy, hidden, offsets): ``hidden`` is the last hidden state of the
    non-shared part (PPO reads values from it) and row position p is at column
    p + ``offsets[row]``.
    """
    shared = _shared_prefix(ids_list, keep)
    cache = None
    if shared:
        cache = model(input_ids=torch.tensor([ids_list[0][:shared]], device=device), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(ids_list))
    width = max(len(ids) for ids in ids_list) - shared
    input_ids = torch.full((len(ids_list), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(ids_list), shared + width), dtype=torch.long)
    attention[:, :shared] = 1
    offsets = []
    for row, ids in enumerate(ids_list):
        n = len(ids) - shared
        input_ids[row, width - n:] = torch.tensor(ids[shared:])
        attention[row, shared + width - n:] = 1
        offsets.append(width - len(ids))
    # positions count real tokens only (pads between the prefix and the row do not advance them)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    input_ids, attention, positions = (t.to(device) for t in (input_ids, attention, positions))
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                logits_to_keep=keep, output_hidden_states=want_hidden, use_cache=False)
    logits = out.logits / temperature
    if constraints:
        logits = _constrain(logits, tokenizer, constraints, offsets, width - keep)
    logp, entropy = token_logprobs(logits, input_ids[:, width - keep:])
    return logp, entropy, (out.hidden_states[-1] if want_hidden else None), offsets
