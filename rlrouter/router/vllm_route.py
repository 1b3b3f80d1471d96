"""The route constraint inside vLLM: ``RouteConstraint``'s rule as a vLLM logits processor.

vLLM's engines (``VLLMEngine`` for RL rollouts, ``AsyncRouterEngine`` for ``rlrouter
serve``) load ``RouteLogitsProcessor`` at start. A request asks for the rule through its
sampling parameters, ``extra_args = rlrouter.router.generation.route_args(allowed,
turn_format, route_bias)``. At every decoding step the processor groups the requests by
rule and masks each group's logits with ``RouteConstraint.mask`` on the tokens each request
has generated so far — the very method transformers' engine applies, batched over the
rows — so the two engines allow the same token at every position: the tags and the tiers
are spelled as training spelled them (a regex over text would also allow ``l`` + ``arge``
or ``<think`` + ``>``), and the route bias moves the tier token in both. Requests without
the key are left as they are.

This module imports vLLM; import it only where a vLLM engine runs.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from rlrouter.router.generation import ROUTE_ARGS, RouteConstraint

TURN_FORMATS = ("think_route", "route")


class RouteLogitsProcessor(LogitsProcessor):
    """``RouteConstraint`` per request (module docstring). The tokenizer is the served
    model's own (its directory holds the router's tokenizer and the format's tags);
    ``tokenizer`` is for building one outside an engine."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool, tokenizer=None):
        if tokenizer is None:
            from transformers import AutoTokenizer

            config = vllm_config.model_config
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, revision=config.tokenizer_revision)
        self.tokenizer = tokenizer
        self.rules: dict[tuple, RouteConstraint] = {}  # (allowed, turn format, bias) -> RouteConstraint
        self.rows: dict[int, tuple[RouteConstraint, list[int]]] = {}  # batch index -> (rule, its live output ids)

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        spec = (params.extra_args or {}).get(ROUTE_ARGS)
        if spec is None:
            return
        if not isinstance(spec, dict) or not spec.get("allowed") or spec.get("turn_format") not in TURN_FORMATS:
            raise ValueError(f"extra_args[{ROUTE_ARGS!r}] must be route_args(allowed tiers, turn format in "
                             f"{TURN_FORMATS}), got {spec!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it masks tokens, so greedy decoding must see it

    def _rule(self, spec: dict) -> RouteConstraint:
        key = (tuple(spec["allowed"]), spec["turn_format"], float(spec.get("route_bias", 0.0)))
        if key not in self.rules:
            self.rules[key] = RouteConstraint(self.tokenizer, [list(key[0])], prompt_length=0, route_bias=key[2],
                                              turn_format=key[1])
        return self.rules[key]

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params: SamplingParams, _prompt_ids, output_ids: list[int]):
            spec = (params.extra_args or {}).get(ROUTE_ARGS)
            return None if spec is None else (self._rule(spec), output_ids)

        process_dict_updates(self.rows, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """One vLLM decoding step: the requests are grouped by rule, and each rule masks its
        requests' lines in one batched call (``RouteConstraint.mask``, as transformers' step)."""
        groups: dict[int, tuple[RouteConstraint, list]] = {}
        for index, (rule, generated) in self.rows.items():
            groups.setdefault(id(rule), (rule, []))[1].append((index, 0, generated))
        for rule, rows in groups.values():
            rule.mask(logits, rows)
        return logits
