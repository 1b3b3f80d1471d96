"""Shared by the benchmark scripts: the router checkpoint to measure with, and the
router base's pooled hidden states for the linear probes."""

from __future__ import annotations

import tempfile
from pathlib import Path


def router_checkpoint(recipe, checkpoint: str | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """``checkpoint``, else the recipe's SFT checkpoint if it exists, else an untrained tiny
    router built and saved to a temp dir (returned so the caller can clean it up)."""
    path = Path(checkpoint) if checkpoint else recipe.sft_dir()
    if (path / "rlrouter.json").is_file():
        return path, None
    from rlrouter.router.checkpoint import save_checkpoint
    from rlrouter.router.model import build_tiny_router, train_tokenizer
    from rlrouter.router.prompt import step_user_message, system_message

    env = recipe.make_env("train")
    texts = []
    for task in env.task_ids[:200]:
        env.reset(seed=0, options={"task_id": task})
        texts.append(system_message(env.pool.describe()) + "\n" + step_user_message(env.view()))
    tok = train_tokenizer(texts, 1024)
    tmp = tempfile.TemporaryDirectory()
    path = save_checkpoint(build_tiny_router(tok), tok, Path(tmp.name) / "router",
                           {"pool": recipe.pool.describe(), "router": {"prompt_mode": "step"}})
    print(f"no trained checkpoint found: using an untrained tiny router ({path})")
    return path, tmp


def pooled_hidden_states(model, tokenizer, texts: list[str], layers: list[int], limit: int | None,
                         head_share: float, label: str = "texts") -> dict[int, "np.ndarray"]:
    """Each text's hidden states at each of ``layers`` (0 = embeddings), mean-pooled over
    its tokens, with the text alone cut to ``limit`` tokens (head and tail kept,
    ``rlrouter.router.prompt.cut_middle``). The router's own limit also holds its system
    message and chat template, so under the same ``router.max_prompt_tokens`` the router
    reads fewer of the text's tokens than a probe does (``RouterFormat.cut_report``)."""
    import numpy as np
    import torch

    from rlrouter.router.prompt import cut_middle

    limit = limit or 10 ** 9
    ids = []
    for text in texts:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            text = cut_middle(tokenizer, text, n - limit + 16, head_share)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][:limit])
    out = {layer: [None] * len(ids) for layer in layers}
    order = np.argsort([len(x) for x in ids])
    for start in range(0, len(order), 16):  # batches of similar lengths: little padding
        batch = order[start:start + 16]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, i in enumerate(batch):
            input_ids[j, :len(ids[i])] = torch.tensor(ids[i])
            mask[j, :len(ids[i])] = 1
        with torch.no_grad():
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in layers:
            mean = (hidden[layer] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            for j, i in enumerate(batch):
                out[layer][i] = mean[j].float().numpy()
        print(f"\rbase forward: {min(start + 16, len(order))}/{len(order)} {label}", end="", flush=True)
    print()
    return {layer: np.stack(out[layer]) for layer in layers}
