"""The losses: the token-level clipped policy loss shared by GRPO, BoPO and PPO, the
per-token log-probs it needs, and PPO's value head with its clipped value loss.

Only the router's own tokens count: ``loss_mask`` is 1 on generated tokens and 0 on the
prompt and on environment (feedback) tokens, so nothing the router did not write is
trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(x_t | x_<t), entropy_t) for t = 1..L−1, from logits of shape (B, L, V).

    Position t of the outputs scores token ``input_ids[:, t + 1]``. Logits set to −inf (a
    constraint mask) take no probability mass.
    """
    logits = logits[:, :-1].float()
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).nan_to_num(0.0).sum(-1)  # masked-out tokens: 0·(−inf) -> 0
    return logp, entropy


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip_eps: float, n_tokens: float, ref_logp: torch.Tensor | None = None,
                        kl_coef: float = 0.0, entropy: torch.Tensor | None = None,
                        entropy_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token, summed over the
    masked tokens and divided by ``n_tokens`` — the masked-token count of the whole batch,
    so micro-batches accumulate to exactly the full-batch gradient.

    Optional terms: ``kl_coef`` · KL(π‖π_ref) with the k3 estimator
    exp(ref − logp) − (ref − logp) − 1 (Schulman 2020), and − ``entropy_coef`` · entropy.
    Returns (loss, sums of the diagnostics over the masked tokens).
    """
    mask = mask.float()
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    per_token = -surrogate
    stats = {}
    if ref_logp is not None and kl_coef:
        kl = (ref_logp - logp).exp() - (ref_logp - logp) - 1
        per_token = per_token + kl_coef * kl
        stats["kl_ref"] = float((kl.detach() * mask).sum())
    if entropy is not None:
        stats["entropy"] = float((entropy.detach() * mask).sum())
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
    loss = (per_token * mask).sum() / n_tokens
    with torch.no_grad():
        stats["approx_kl"] = float((((ratio - 1) - log_ratio) * mask).sum())  # k3 estimate of KL(old‖new)
        stats["clipfrac"] = float((((ratio - 1).abs() > clip_eps).float() * mask).sum())
        stats["pg_loss"] = float((-surrogate * mask).sum())
    return loss, stats


class ValueHead(torch.nn.Module):
    """PPO's critic: V(state) from the last hidden state at the token before a router turn."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float,
                       n_values: float) -> torch.Tensor:
    """PPO2's clipped value loss (CleanRL ``clip_vloss``):
    ½ · max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), summed and divided by
    ``n_values``, the value positions of the whole minibatch (micro-batches accumulate exactly)."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2).sum() / n_values
