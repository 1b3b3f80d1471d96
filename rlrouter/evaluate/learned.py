"""Learned routers on sentence embeddings — what RouteLLM and LLMRouter ship — as
evaluation policies: ``knn``, ``mlp`` and ``mf``.

Each predicts, for every tier, the probability that the next step succeeds if that tier
takes it, from what the router sees at that step: the sentence embedding of the step text
(the query, on replay) concatenated with the standardized numeric state
(``rlrouter.boundary.steps.NUMERIC_STATE``). They are fit on the per-step outcomes of the
boundary runs of the training split (``boundary_steps``):

- ``knn``: the k nearest training steps (cosine similarity of the embeddings minus a
  small penalty on the numeric distance) that have an outcome for the tier; the
  prediction is their success rate (LLMRouter's KNN router, per tier).
- ``mlp``: one hidden layer, one sigmoid output per tier, masked binary cross-entropy.
- ``mf``: RouteLLM's matrix factorization (``routellm/routers/matrix_factorization/
  model.py``): a learned embedding per tier (L2-normalized) scored against a projection of
  the step features, ``w · (v_tier ⊙ W x)``, plus a per-tier bias because it is fit to
  each tier's own success instead of to pairwise wins.

Decision (``EmbeddingRouterPolicy``): the cheapest tier whose predicted success is within
``threshold`` of the best tier's; sweeping the threshold gives the family's curve. Under a
cap on a tier (calls or dollars) it rations: with ``a`` affordable calls of that tier and
``r`` sub-goals left, it takes the tier only when the predicted gain over the cheapest
tier is in the top ``a / r`` of the gains seen in training — it spends where the
predicted gain is largest instead of on the first steps that ask.

A fitted router is saved as ``<dir>/<kind>.pt`` (tensors) + ``<dir>/<kind>.json``
(settings, feature standardization, thresholds, fit statistics) and reloaded with
``LearnedRouter.load``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from envs.routing import RoutingEnv
from rlrouter.boundary.steps import NUMERIC_STATE, StepTable, numeric_state
from rlrouter.evaluate.baselines import respect_mask

ROUTERS = ("knn", "mlp", "mf")
FORMAT_VERSION = 1


class KNNScorer:
    def __init__(self, features: np.ndarray, success: np.ndarray, known: np.ndarray, k: int = 25,
                 numeric_weight: float = 0.1, text_dim: int = 384):
        self.features, self.success, self.known = features.astype(np.float32), success.astype(np.float32), known
        self.k, self.numeric_weight, self.text_dim = int(k), float(numeric_weight), int(text_dim)
        self._text_similarity: dict[bytes, np.ndarray] = {}  # per distinct embedding: the same at every step

    def fit(self, **_) -> dict:
        return {}

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), self.success.shape[1]), dtype=np.float32)
        for i, row in enumerate(x):
            text, numeric = row[: self.text_dim], row[self.text_dim:]
            key = text.tobytes()
            if key not in self._text_similarity:
                self._text_similarity[key] = self.features[:, : self.text_dim] @ text
            score = self._text_similarity[key] - self.numeric_weight * ((self.features[:, self.text_dim:] - numeric) ** 2).mean(1)
            for t in range(self.success.shape[1]):
                candidates = np.flatnonzero(self.known[:, t])
                k = min(self.k, len(candidates))
                nearest = candidates[np.argpartition(-score[candidates], k - 1)[:k]]
                out[i, t] = self.success[nearest, t].mean()
        return out

    def tensors(self) -> dict:
        return {"features": torch.from_numpy(self.features), "success": torch.from_numpy(self.success),
                "known": torch.from_numpy(self.known)}

    @classmethod
    def from_tensors(cls, tensors: dict, settings: dict) -> "KNNScorer":
        return cls(tensors["features"].numpy(), tensors["success"].numpy(), tensors["known"].numpy(),
                   k=settings["knn_k"], numeric_weight=settings["knn_numeric_weight"], text_dim=settings["text_dim"])


class MLPHead(torch.nn.Module):
    def __init__(self, in_dim: int, n_tiers: int, hidden: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_tiers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MFHead(torch.nn.Module):
    """RouteLLM's MFModel with absolute per-tier targets: logit_t = w·(norm(P_t) ⊙ W x) + b_t."""

    def __init__(self, in_dim: int, n_tiers: int, dim: int = 128):
        super().__init__()
        self.P = torch.nn.Embedding(n_tiers, dim)
        self.text_proj = torch.nn.Linear(in_dim, dim, bias=False)
        self.classifier = torch.nn.Linear(dim, 1, bias=False)
        self.bias = torch.nn.Parameter(torch.zeros(n_tiers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiers = torch.nn.functional.normalize(self.P.weight, p=2, dim=1)  # [T, dim]
        projected = self.text_proj(x)  # [n, dim]
        return self.classifier(projected[:, None, :] * tiers[None]).squeeze(-1) + self.bias


class NeuralScorer:
    """An ``MLPHead`` or ``MFHead`` fit with masked binary cross-entropy on each tier's outcome."""

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def fit(self, x: np.ndarray, success: np.ndarray, known: np.ndarray, epochs: int, learning_rate: float,
            batch_size: int, seed: int) -> dict:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        x, y, m = (torch.from_numpy(np.ascontiguousarray(a)).float() for a in (x, success, known))
        optimizer = torch.optim.AdamW(self.head.parameters(), lr=learning_rate, weight_decay=1e-4)
        self.head.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self.head(x[batch]), y[batch],
                                                                            weight=m[batch], reduction="sum")
                optimizer.zero_grad()
                (loss / m[batch].sum().clamp(min=1)).backward()
                optimizer.step()
        self.head.eval()
        with torch.no_grad():
            final = torch.nn.functional.binary_cross_entropy_with_logits(self.head(x), y, weight=m, reduction="sum")
        return {"train_log_loss": float(final / m.sum().clamp(min=1))}

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return torch.sigmoid(self.head(torch.from_numpy(np.ascontiguousarray(x)).float())).numpy()

    def tensors(self) -> dict:
        return dict(self.head.state_dict())


def _new_scorer(kind: str, in_dim: int, n_tiers: int, settings: dict, table=None, x=None):
    if kind == "knn":
        return KNNScorer(x, table.success, table.known, k=settings["knn_k"],
                         numeric_weight=settings["knn_numeric_weight"], text_dim=settings["text_dim"])
    if kind == "mlp":
        return NeuralScorer(MLPHead(in_dim, n_tiers, settings["hidden"]))
    if kind == "mf":
        return NeuralScorer(MFHead(in_dim, n_tiers, settings["mf_dim"]))
    raise ValueError(f"unknown embedding router {kind!r}; choose from {list(ROUTERS)}")


class LearnedRouter:
    """A fitted per-tier success predictor on (step embedding, numeric state)."""

    def __init__(self, kind: str, tiers: list[str], scorer, settings: dict, numeric_mean: np.ndarray,
                 numeric_std: np.ndarray, gains: np.ndarray, step_cost: np.ndarray, thresholds: list[float],
                 fit: dict):
        self.kind, self.tiers, self.scorer, self.settings = kind, list(tiers), scorer, dict(settings)
        self.numeric_mean, self.numeric_std = numeric_mean.astype(np.float32), numeric_std.astype(np.float32)
        self.gains = np.asarray(gains, dtype=np.float32)  # [T, m] sorted predicted gains over the cheapest tier
        self.step_cost = np.asarray(step_cost, dtype=np.float64)  # mean step cost per tier in training
        self.thresholds = [float(t) for t in thresholds]
        self.fit_stats = dict(fit)

    def features(self, embeddings: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        z = (np.asarray(numeric, dtype=np.float32) - self.numeric_mean) / self.numeric_std
        return np.concatenate([embeddings.astype(np.float32), z.astype(np.float32)], axis=1)

    def predict(self, embeddings: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        return self.scorer.predict(self.features(embeddings, numeric))

    @classmethod
    def fit(cls, kind: str, table: StepTable, embeddings: np.ndarray, settings: dict, seed: int = 0) -> "LearnedRouter":
        """Fit on a step table; ``settings``: knn_k, knn_numeric_weight, hidden, mf_dim, epochs,
        learning_rate, batch_size, thresholds (a list or ``auto``), auto_thresholds, max_rows."""
        start = time.perf_counter()
        settings = {**settings, "text_dim": int(embeddings.shape[1])}
        mean = table.numeric.mean(0)
        std = np.where(table.numeric.std(0) > 1e-8, table.numeric.std(0), 1.0)
        rows = np.arange(len(table))
        if len(rows) > settings["max_rows"]:
            rows = np.sort(np.random.default_rng(seed).choice(rows, settings["max_rows"], replace=False))
        router = cls(kind, table.tiers, None, settings, mean, std, np.zeros((len(table.tiers), 1)),
                     np.nanmean(np.where(table.known, table.cost_usd, np.nan), axis=0), [], {})
        x = router.features(embeddings[rows], table.numeric[rows])
        torch.manual_seed(seed)  # the heads' initial weights: independent of what ran before in the process
        router.scorer = _new_scorer(kind, x.shape[1], len(table.tiers), settings, table=_rows(table, rows), x=x)
        stats = router.scorer.fit(x=x, success=table.success[rows], known=table.known[rows], epochs=settings["epochs"],
                                  learning_rate=settings["learning_rate"], batch_size=settings["batch_size"], seed=seed)
        probe = rows[np.random.default_rng(seed + 1).permutation(len(rows))[:2000]]
        p = router.predict(embeddings[probe], table.numeric[probe])
        router.gains = np.sort(p - p[:, :1], axis=0).T  # [T, m]; row 0 is all zeros
        known = table.known[probe]
        router.fit_stats = {**stats, "rows": int(len(rows)), "seconds": time.perf_counter() - start,
                            "train_accuracy": {t: float(((p[:, i] > 0.5) == table.success[probe, i])[known[:, i]].mean())
                                               if known[:, i].any() else None for i, t in enumerate(table.tiers)}}
        router.thresholds = router._thresholds(settings["thresholds"], settings["auto_thresholds"])
        return router

    def _thresholds(self, spec, points: int) -> list[float]:
        if spec != "auto":
            return [float(t) for t in spec]
        # quantiles of the predicted gain of the priciest tier: its call share sweeps ~evenly
        quantiles = np.quantile(self.gains[-1], np.linspace(0, 1, points + 2)[1:-1])
        return sorted({round(float(max(0.0, q)), 4) for q in quantiles})

    # -- save / load ---------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"numeric_mean": torch.from_numpy(self.numeric_mean), "numeric_std": torch.from_numpy(self.numeric_std),
                   "gains": torch.from_numpy(self.gains), "step_cost": torch.from_numpy(self.step_cost),
                   **{f"scorer.{k}": v.detach().clone() for k, v in self.scorer.tensors().items()}}
        torch.save(tensors, folder / f"{self.kind}.pt")
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "tiers": self.tiers, "settings": self.settings,
                "numeric_state": list(NUMERIC_STATE), "thresholds": self.thresholds, "fit": self.fit_stats}
        (folder / f"{self.kind}.json").write_text(json.dumps(meta, indent=1))
        return folder / f"{self.kind}.pt"

    @classmethod
    def load(cls, folder: str | Path, kind: str) -> "LearnedRouter":
        folder = Path(folder)
        meta_path, tensor_path = folder / f"{kind}.json", folder / f"{kind}.pt"
        for path in (meta_path, tensor_path):
            if not path.is_file():
                raise FileNotFoundError(f"embedding router {kind!r}: {path} not found (written by `rlrouter eval` "
                                        "into <eval out>/routers)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != kind:
            raise ValueError(f"{meta_path}: not a {kind} router of format {FORMAT_VERSION}")
        tensors = torch.load(tensor_path, weights_only=True)
        settings = meta["settings"]
        scorer_tensors = {k.removeprefix("scorer."): v for k, v in tensors.items() if k.startswith("scorer.")}
        n_tiers = len(meta["tiers"])
        in_dim = settings["text_dim"] + len(meta["numeric_state"])
        if kind == "knn":
            scorer = KNNScorer.from_tensors(scorer_tensors, settings)
        else:
            scorer = _new_scorer(kind, in_dim, n_tiers, settings)
            scorer.head.load_state_dict(scorer_tensors)
            scorer.head.eval()
        return cls(kind, meta["tiers"], scorer, settings, tensors["numeric_mean"].numpy(),
                   tensors["numeric_std"].numpy(), tensors["gains"].numpy(), tensors["step_cost"].numpy(),
                   meta["thresholds"], meta["fit"])


def _rows(table: StepTable, rows: np.ndarray) -> StepTable:
    return StepTable(table.tiers, [table.task_ids[i] for i in rows], [table.texts[i] for i in rows],
                     table.numeric[rows], table.success[rows], table.known[rows], table.cost_usd[rows],
                     table.counterfactual)


class EmbeddingRouterPolicy:
    """A fitted ``LearnedRouter`` at one threshold, as an evaluation policy (``begin`` / ``act``)."""

    def __init__(self, router: LearnedRouter, encoder, threshold: float, ration: bool = True, name: str | None = None):
        self.router, self.encoder = router, encoder
        self.threshold = float(threshold)
        self.ration = ration
        self.name = name or f"{router.kind}(t={self.threshold:.3g})"
        self.env: RoutingEnv | None = None

    def begin(self, env: RoutingEnv, seed: int) -> None:
        self.env = env

    def act(self, obs, info) -> int:
        view = self.env.view()
        p = self.router.predict(self.encoder.encode([view["step_text"]]), [numeric_state(view)])[0]
        return respect_mask(self.decide(p, view), info)

    def decide(self, p: np.ndarray, view: dict) -> int:
        choice = int(np.flatnonzero(p >= p.max() - self.threshold)[0])  # the cheapest within the threshold
        while self.ration and choice > 0 and not self._affordable(choice, p, view):
            choice -= 1
        return choice

    def _affordable(self, tier: int, p: np.ndarray, view: dict) -> bool:
        """Whether the cap lets ``tier`` take this step: its predicted gain must be in the top
        ``a / r`` of the training gains (``a`` calls of it affordable, ``r`` sub-goals left)."""
        allowance = self._allowance(tier, view)
        remaining = max(1, view["length"] - view["position"])
        if allowance is None or allowance >= remaining:
            return True
        if allowance < 1:
            return False
        gain = p[tier] - p[0]
        return bool(gain >= np.quantile(self.router.gains[tier], 1 - allowance / remaining))

    def _allowance(self, tier: int, view: dict) -> float | None:
        name = self.router.tiers[tier]
        limits = []
        if name in view["calls_left"]:
            limits.append(view["calls_left"][name])
        if view["usd_left"] is not None:
            remaining = max(1, view["length"] - view["position"])
            cheapest, this = self.router.step_cost[0], self.router.step_cost[tier]
            limits.append((view["usd_left"] - remaining * cheapest) / max(this - cheapest, 1e-12))
        return min(limits) if limits else None
