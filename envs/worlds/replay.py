"""Replay world: episodes built from recorded per-query outcomes of real LLMs.

Each step of an episode is one recorded query; the tier's executor is a recorded model,
and whether its answer was correct is what was recorded. An episode is a sequence of
``episode_length`` queries under one per-episode budget (that is what makes routing
sequential); it succeeds when at least ``success_fraction`` of its queries were answered
correctly (1.0 = all).

Cost of a step: the table's recorded cost for that model when it has a cost column, else
``count_tokens(prompt)`` input tokens and ``count_tokens(recorded response)`` output tokens
(or ``default_output_tokens`` when no response was recorded) at the tier's prices.

Tables
------
*RouteLLM* (``load_routellm``): the files of lm-sys/RouteLLM's evaluation data: MMLU
(57 CSVs: ``prompt`` and one True/False column per model) and GSM8K (also
``<model>_response`` columns).

*Generic* (``load_table``): a CSV, JSONL or parquet file with

=================  =====================================================================
column             meaning
=================  =====================================================================
``prompt``         the query text (name configurable: ``prompt_column``)
``<model>``        one outcome column per model: true/false, 1/0, yes/no
``<model>_response``  optional: the model's recorded answer (for output token counts)
``<model>_cost``   optional: the recorded dollar cost of that call
=================  =====================================================================

and the recipe maps models to tiers: ``executor: {kind: recorded, model: <model>}``.
"""

from __future__ import annotations

import ast
import csv
import glob
import json
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from envs.pool import Pool, Tier
from envs.tokens import token_counter
from envs.worlds.base import BASE_CHARSET, RouterView, StepResult, World, config_from_dict

ROUTELLM_CHEAP = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTELLM_STRONG = "gpt-4-1106-preview"
DEFAULT_EXECUTORS = {
    "small": {"kind": "recorded", "model": ROUTELLM_CHEAP},
    "large": {"kind": "recorded", "model": ROUTELLM_STRONG},
}
ROUTELLM_DIR_ENV = "RLROUTER_ROUTELLM_DIR"
_TRUE = {"true", "1", "yes", "y", "t", "1.0"}
_FALSE = {"false", "0", "no", "n", "f", "0.0", ""}


@dataclass
class RecordTable:
    """Recorded queries: prompt, per-model correctness, optional responses and costs."""

    source: str
    prompts: list[str]
    correct: dict[str, np.ndarray]  # model -> bool[n]
    responses: dict[str, list[str]] = field(default_factory=dict)
    costs: dict[str, np.ndarray] = field(default_factory=dict)
    subjects: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def models(self) -> list[str]:
        return list(self.correct)


DATA_DIR_ENVS = {"routellm": ROUTELLM_DIR_ENV, "llmrouter": "RLROUTER_LLMROUTER_DIR", "mmlu-pro": "RLROUTER_MMLU_PRO_DIR"}


def default_data_dir(name: str) -> Path:
    """The folder of a recorded dataset (``routellm``, ``llmrouter`` or ``mmlu-pro``): its
    environment variable (``DATA_DIR_ENVS``), else ``shared/data/<name>`` beside the checkout."""
    if os.environ.get(DATA_DIR_ENVS[name]):
        return Path(os.environ[DATA_DIR_ENVS[name]])
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data" / name
        if candidate.is_dir():
            return candidate
    return Path("../shared/data") / name


def default_routellm_dir() -> Path:
    """``$RLROUTER_ROUTELLM_DIR``, else ``shared/data/routellm`` beside the checkout."""
    return default_data_dir("routellm")


def _data_root(name: str, data_dir: str | Path | None, holds: str) -> Path:
    root = Path(data_dir) if data_dir else default_data_dir(name)
    if not root.is_dir():
        raise FileNotFoundError(f"{name} data folder {root} not found; set {DATA_DIR_ENVS[name]} or world.data_dir "
                                f"to the folder holding {holds}")
    return root


def load_llmrouter(data_dir: str | Path | None = None) -> RecordTable:
    """LLMRouter's recorded 0/1 scores of 9 models on 6,108 queries of 14 tasks
    (``dcrouter_train.json`` then ``dcrouter_test.json``; the subject of a query is its
    ``task_name`` from ``default_query_*.jsonl``). A score is 0 or 1, except commongen's
    coverage (a fraction in [0, 1]): a call is correct when its score is 1 (full coverage).
    No responses or costs are recorded: a call is priced from the query's tokens and
    ``default_output_tokens`` at the tier's prices."""
    root = _data_root("llmrouter", data_dir, "dcrouter_train.json and dcrouter_test.json")
    rows, task_of = [], {}
    for split in ("train", "test"):
        path = root / f"dcrouter_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (the LLMRouter files: dcrouter_{{train,test}}.json)")
        rows += json.loads(path.read_text(encoding="utf-8"))
        queries = root / f"default_query_{split}.jsonl"
        if queries.is_file():
            with open(queries, encoding="utf-8") as handle:
                task_of.update((q["query"], q["task_name"]) for q in map(json.loads, handle) if q.get("query"))
    models = list(rows[0]["scores"])
    correct = {}
    for model in models:
        values = []
        for i, row in enumerate(rows):
            score = row["scores"].get(model)
            if not isinstance(score, (int, float)) or not 0 <= score <= 1:
                raise ValueError(f"{root}: query {i} has no score in [0, 1] for {model!r} (got {score!r})")
            values.append(score >= 1)
        correct[model] = np.array(values, dtype=bool)
    prompts = [row["question"] for row in rows]
    return RecordTable("llmrouter", prompts, correct, subjects=[task_of.get(p, "unknown") for p in prompts])


def mmlu_pro_prompt(record: dict) -> str:
    """The question with its lettered options, as the models were asked it (without the shots)."""
    options = record["options"]
    if isinstance(options, str):
        options = ast.literal_eval(options)
    letters = "ABCDEFGHIJKLMNOP"
    return record["question"] + "\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))


def load_mmlu_pro(data_dir: str | Path | None = None) -> RecordTable:
    """TIGER-AI-Lab's recorded MMLU-Pro answers of 5 models, joined on ``question_id`` (the
    questions every model answered, in question-id order). Correct: ``pred == answer`` (no
    extracted answer is wrong). Responses are kept, so calls are priced from their tokens.
    Models are named by their file: ``model_outputs_<model>_5shots.zip``."""
    root = _data_root("mmlu-pro", data_dir, "the model_outputs_*_5shots.zip files")
    files = sorted(root.glob("model_outputs_*_5shots.zip"))
    if not files:
        raise FileNotFoundError(f"no model_outputs_*_5shots.zip files under {root}")
    records = {}
    for path in files:
        model = path.name[len("model_outputs_"):-len("_5shots.zip")]
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".json")]
            if len(names) != 1:
                raise ValueError(f"{path}: expected one JSON file inside, found {names}")
            records[model] = {str(r["question_id"]): r for r in json.loads(archive.read(names[0]))}
    shared = sorted(set.intersection(*(set(r) for r in records.values())), key=int)
    first = records[next(iter(records))]
    prompts = [mmlu_pro_prompt(first[q]) for q in shared]
    correct = {m: np.array([r[q]["pred"] is not None and r[q]["pred"] == r[q]["answer"] for q in shared])
               for m, r in records.items()}
    responses = {m: [str(r[q].get("generated_text") or r[q].get("model_outputs") or "") for q in shared]
                 for m, r in records.items()}
    return RecordTable("mmlu-pro", prompts, correct, responses, subjects=[first[q]["category"] for q in shared])


def _parse_bool(value, where: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{where}: cannot read {value!r} as an outcome; use true/false, 1/0 or yes/no")


def load_routellm(data_dir: str | Path | None = None, dataset: str = "mmlu") -> RecordTable:
    """Load RouteLLM's recorded MMLU or GSM8K outcomes (read-only; nothing is copied)."""
    root = _data_root("routellm", data_dir, "mmlu/ and gsm8k_responses.csv")
    csv.field_size_limit(1 << 30)
    if dataset == "mmlu":
        files = sorted(glob.glob(str(root / "mmlu" / "mmlu_*.csv")))
        if not files:
            raise FileNotFoundError(f"no mmlu/mmlu_*.csv files under {root}")
        prompts, subjects, outcomes = [], [], {ROUTELLM_CHEAP: [], ROUTELLM_STRONG: []}
        for path in files:
            subject = Path(path).stem[len("mmlu_"):]
            with open(path, newline="", encoding="utf-8") as handle:
                for i, row in enumerate(csv.DictReader(handle)):
                    prompts.append(row["prompt"])
                    subjects.append(subject)
                    for model in outcomes:
                        outcomes[model].append(_parse_bool(row[model], f"{path} row {i + 2} column {model}"))
        return RecordTable(
            "routellm-mmlu", prompts, {m: np.array(v, dtype=bool) for m, v in outcomes.items()}, subjects=subjects
        )
    if dataset == "gsm8k":
        path = root / "gsm8k_responses.csv"
        return load_table(path, source="routellm-gsm8k")
    raise ValueError(f"unknown RouteLLM dataset {dataset!r}; use 'mmlu' or 'gsm8k'")


def load_table(path: str | Path, prompt_column: str = "prompt", models: list[str] | None = None,
               source: str | None = None) -> RecordTable:
    """Load a generic recorded-outcome table (CSV / JSONL / parquet; see module docstring).

    ``models`` lists the outcome columns; by default every column that is not the prompt
    and does not end in ``_response`` or ``_cost``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"replay table {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        csv.field_size_limit(1 << 30)
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"replay table {path}: unsupported format {suffix!r}; use .csv, .jsonl or .parquet")
    if not rows:
        raise ValueError(f"replay table {path} has no rows")
    columns = list(rows[0])
    if prompt_column not in columns:
        raise ValueError(f"replay table {path}: no prompt column {prompt_column!r}; columns are {columns}")
    if models is None:
        models = [c for c in columns if c != prompt_column and not c.endswith(("_response", "_cost"))]
    for model in models:
        if model not in columns:
            raise ValueError(f"replay table {path}: no outcome column {model!r}; columns are {columns}")
    correct = {m: np.array([_parse_bool(r[m], f"{path} row {i + 1} column {m}") for i, r in enumerate(rows)])
               for m in models}
    responses = {m: [str(r[f"{m}_response"] or "") for r in rows] for m in models if f"{m}_response" in columns}
    costs = {m: np.array([float(r[f"{m}_cost"]) for r in rows]) for m in models if f"{m}_cost" in columns}
    return RecordTable(source or path.stem, [str(r[prompt_column]) for r in rows], correct, responses, costs)


@dataclass(frozen=True)
class ReplayConfig:
    """Recipe ``world:`` section of a replay world.

    Attributes:
        source: ``routellm-mmlu``, ``routellm-gsm8k``, ``llmrouter`` (9 models, 14 tasks),
            ``mmlu-pro`` (5 models, with responses) or ``table``.
        data_dir: folder of the recorded files (default: the source's environment variable,
            ``DATA_DIR_ENVS``, or ``shared/data/<routellm|llmrouter|mmlu-pro>`` beside the checkout).
        table / prompt_column / models: the generic table (source ``table``).
        episode_length: recorded queries per episode.
        success_fraction: fraction of queries that must be correct for success.
        test_fraction: share of the queries held out for the test split.
        n_train / n_test: episodes per split.
        seed: seed of the split and of episode composition.
        default_output_tokens: output tokens of a call whose response was not recorded.
        token_counter: ``regex`` (offline) or ``hf:<tokenizer path or id>``.
        prompt_chars: characters of each query shown to the router.
    """

    source: str = "routellm-mmlu"
    data_dir: str | None = None
    table: str | None = None
    prompt_column: str = "prompt"
    models: tuple[str, ...] | None = None
    episode_length: int = 5
    success_fraction: float = 0.8
    test_fraction: float = 0.2
    n_train: int = 1000
    n_test: int = 200
    seed: int = 0
    default_output_tokens: int = 1
    token_counter: str = "regex"
    prompt_chars: int = 400

    @classmethod
    def from_dict(cls, data: dict, where: str = "world") -> "ReplayConfig":
        config = config_from_dict(cls, data, where, "replay-world")
        if config.source not in SOURCES:
            raise ValueError(f"{where}.source {config.source!r} is unknown; use one of {', '.join(SOURCES)}")
        if config.source == "table" and not config.table:
            raise ValueError(f"{where}.table: give the path of the CSV / JSONL / parquet table")
        if not 0 < config.success_fraction <= 1:
            raise ValueError(f"{where}.success_fraction must be in (0, 1], got {config.success_fraction}")
        if config.episode_length < 1:
            raise ValueError(f"{where}.episode_length must be >= 1, got {config.episode_length}")
        return config

    def load(self) -> RecordTable:
        if self.source == "table":
            return load_table(self.table, self.prompt_column, list(self.models) if self.models else None)
        if self.source == "llmrouter":
            return load_llmrouter(self.data_dir)
        if self.source == "mmlu-pro":
            return load_mmlu_pro(self.data_dir)
        return load_routellm(self.data_dir, self.source.split("-", 1)[1])


SOURCES = ("routellm-mmlu", "routellm-gsm8k", "llmrouter", "mmlu-pro", "table")


@dataclass
class ReplayState:
    task_id: str
    rows: tuple[int, ...]
    position: int = 0
    n_correct: int = 0
    done: bool = False
    success: bool = False


class ReplayWorld(World):
    """Sequences of recorded queries; tiers are recorded models (``rlrouter/RouteLLM-MMLU-v0``,
    ``rlrouter/RouteLLM-GSM8K-v0``, ``rlrouter/Replay-v0``).

    ## Description
    Each step is one recorded query; routing it to a tier replays what that tier's model
    answered (correct or not) and charges its recorded cost, or its prompt and response
    tokens at the tier's prices (module docstring).

    ## Action Space
    Through ``RoutingEnv``: ``Discrete(n_tiers)``, the recorded model that answers the query.

    ## Observation Space
    ``router_view``: the episode's task line, the query text, position and step limit;
    ``RoutingEnv`` adds budget, cost and history.

    ## Rewards
    ``StepResult.success`` when the episode ends with at least ``success_fraction`` of its
    queries answered correctly.

    ## Starting State
    ``reset(task_id, seed)``: the task's ``episode_length`` queries are a pure function of
    ``(world seed, task_id)``, drawn from the split's disjoint rows.

    ## Episode End
    Termination: every query answered. Truncation (``RoutingEnv``): the budget cannot pay
    for the next query.

    ## Arguments
    ``ReplayConfig`` (recipe ``world:`` with ``kind: replay``): ``source`` (``routellm-mmlu``,
    ``routellm-gsm8k`` or ``table`` with ``table``), ``data_dir``, ``episode_length``,
    ``success_fraction``, ``test_fraction``, ``n_train`` / ``n_test``. Tiers map to models with
    ``executor: {kind: recorded, model: <column>}``.

    ## Example
    >>> import gymnasium as gym, envs
    >>> env = gym.make("rlrouter/RouteLLM-MMLU-v0")  # reads $RLROUTER_ROUTELLM_DIR  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
    """

    name = "replay"

    def __init__(self, pool: Pool, config: ReplayConfig | None = None, table: RecordTable | None = None):
        super().__init__(pool)
        self.config = config or ReplayConfig()
        self.table = table if table is not None else self.config.load()
        self.count = token_counter(self.config.token_counter)
        self.models = {}
        for tier in pool.tiers:
            spec = self.executor_config(tier, DEFAULT_EXECUTORS)
            model = spec.get("model")
            if spec.get("kind", "recorded") != "recorded" or model not in self.table.correct:
                raise ValueError(
                    f"pool tier {tier.name!r}: the replay world needs executor: {{kind: recorded, model: M}} "
                    f"with M one of the table's models {self.table.models}, got {dict(tier.executor) or None}"
                )
            self.models[tier.name] = model
        n = len(self.table)
        order = np.random.default_rng([self.config.seed, 7]).permutation(n)
        n_test = int(round(self.config.test_fraction * n))
        self._rows = {"test": np.sort(order[:n_test]), "train": np.sort(order[n_test:])}
        if min(len(r) for r in self._rows.values()) < self.config.episode_length:
            sizes = {split: len(rows) for split, rows in self._rows.items()}
            raise ValueError(
                f"replay table {self.table.source}: split sizes {sizes} are too small for episodes of "
                f"{self.config.episode_length} queries; lower episode_length or change test_fraction"
            )
        self._input_tokens = {}
        self._output_tokens = {}
        self._max_output = {m: self._output_bound(m) for m in set(self.models.values())}

    def _output_bound(self, model: str) -> int:
        if model in self.table.responses:
            return max(self.count(r) for r in self.table.responses[model])
        return self.config.default_output_tokens

    def input_tokens(self, row: int) -> int:
        if row not in self._input_tokens:
            self._input_tokens[row] = self.count(self.table.prompts[row])
        return self._input_tokens[row]

    def output_tokens(self, row: int, model: str) -> int:
        key = (row, model)
        if key not in self._output_tokens:
            responses = self.table.responses.get(model)
            self._output_tokens[key] = self.count(responses[row]) if responses else self.config.default_output_tokens
        return self._output_tokens[key]

    def task_ids(self, split: str) -> list[str]:
        n = {"train": self.config.n_train, "test": self.config.n_test}.get(split)
        if n is None:
            raise ValueError(f"unknown split {split!r}; the replay world has 'train' and 'test'")
        return [f"{split}-{i}" for i in range(n)]

    def split_rows(self, split: str) -> np.ndarray:
        """The table rows a split's episodes draw their queries from (sorted; disjoint splits)."""
        if split not in self._rows:
            raise ValueError(f"unknown split {split!r}; the replay world has 'train' and 'test'")
        return self._rows[split]

    def rows_of(self, task_id: str) -> tuple[int, ...]:
        split, _, index = task_id.partition("-")
        if split not in self._rows or not index.isdigit():
            raise ValueError(f"task id {task_id!r} is not of the form train-N or test-N")
        rng = np.random.default_rng([self.config.seed, 0 if split == "train" else 1, int(index)])
        pool = self._rows[split]
        return tuple(int(r) for r in rng.choice(pool, size=self.config.episode_length, replace=False))

    def reset(self, task_id: str, seed: int) -> ReplayState:
        # Recorded outcomes are fixed: the seed has nothing left to decide.
        return ReplayState(task_id, self.rows_of(task_id))

    def router_view(self, state: ReplayState) -> RouterView:
        n = len(state.rows)
        row = state.rows[min(state.position, n - 1)]
        prompt = self.table.prompts[row]
        shown = prompt if len(prompt) <= self.config.prompt_chars else prompt[: self.config.prompt_chars] + "…"
        subject = f" ({self.table.subjects[row].replace('_', ' ')})" if self.table.subjects else ""
        task = (f"Answer {n} questions{subject}; the task succeeds if at least "
                f"{int(np.ceil(self.config.success_fraction * n - 1e-9))} are correct.")
        return RouterView(task, shown, state.position, state.position, n, n)

    def worst_case_tokens(self, state: ReplayState, tier: Tier) -> tuple[int, int]:
        return self.input_tokens(state.rows[state.position]), self._max_output[self.models[tier.name]]

    def worst_case_cost_usd(self, state: ReplayState, tier: Tier) -> float:
        model = self.models[tier.name]
        if model in self.table.costs:
            return float(self.table.costs[model].max())
        return super().worst_case_cost_usd(state, tier)

    def step(self, state: ReplayState, tier: Tier) -> StepResult:
        if state.done:
            raise RuntimeError("step() called on a finished episode; reset first")
        model = self.models[tier.name]
        row = state.rows[state.position]
        ok = bool(self.table.correct[model][row])
        recorded_cost = float(self.table.costs[model][row]) if model in self.table.costs else None
        state.position += 1
        state.n_correct += ok
        n = len(state.rows)
        needed = int(np.ceil(self.config.success_fraction * n - 1e-9))
        state.done = state.position == n
        state.success = state.done and state.n_correct >= needed
        return StepResult(
            observation=f"answer {'correct' if ok else 'wrong'} ({state.n_correct}/{state.position} correct so far).",
            input_tokens=self.input_tokens(row),
            output_tokens=self.output_tokens(row, model),
            step_ok=ok,
            event="ok" if ok else "wrong",
            progress=state.position / n,
            done=state.done,
            success=state.success,
            cost_usd=recorded_cost,
        )

    def call_cost_usd(self, row: int, tier: Tier) -> float:
        """Exact cost of answering query ``row`` with ``tier`` (recorded or from tokens)."""
        model = self.models[tier.name]
        if model in self.table.costs:
            return float(self.table.costs[model][row])
        return tier.cost_usd(self.input_tokens(row), self.output_tokens(row, model))

    def cost_to_go_lower_bound(self, state: ReplayState) -> float:
        # Every query left is answered by some tier: at least its cheapest call.
        return sum(min(self.call_cost_usd(row, tier) for tier in self.pool.tiers)
                   for row in state.rows[state.position:])

    def copy_state(self, state: ReplayState) -> ReplayState:
        return replace(state)

    def search_key(self, state: ReplayState):
        return (state.position, state.n_correct)

    def charset(self) -> str:
        if not hasattr(self, "_charset"):
            chars = set(BASE_CHARSET) | {"…"}
            for text in self.table.prompts:
                chars.update(text)
            if self.table.subjects:
                for text in set(self.table.subjects):
                    chars.update(text)
            self._charset = "".join(sorted(chars))
        return self._charset
