"""Token counting for worlds that replay text (prompts and recorded responses).

The default counter needs no download: it counts the pieces of the GPT-2 / tiktoken
pre-tokenization pattern (words with their leading space, digit runs of up to three,
punctuation runs, whitespace runs). BPE never merges across those pieces, so this is a
lower bound close to real BPE counts for English text (within ~10-25% on the RouteLLM
prompts). Users with a real tokenizer on disk or on a hub pass ``hf:<path-or-id>`` and the
counter becomes ``len(tokenizer(text).input_ids)``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable

# The tiktoken cl100k pattern, with \p{L}/\p{N} written for Python's re module.
_PRETOKEN = re.compile(
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def count_tokens(text: str) -> int:
    """Number of pre-tokenizer pieces in ``text`` (see module docstring)."""
    return len(_PRETOKEN.findall(text))


@lru_cache(maxsize=8)
def token_counter(spec: str = "regex") -> Callable[[str], int]:
    """``"regex"`` (default, offline) or ``"hf:<path-or-hub-id>"`` (a transformers tokenizer)."""
    if spec == "regex":
        return count_tokens
    if spec.startswith("hf:"):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(spec[3:])
        except OSError as err:
            raise ValueError(
                f"token_counter {spec!r}: cannot load that tokenizer ({err}). "
                "Give a local directory, or use token_counter: regex offline."
            ) from None
        return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)
    raise ValueError(f"token_counter {spec!r} is unknown; use 'regex' or 'hf:<path-or-hub-id>'")
