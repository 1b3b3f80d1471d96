"""Router models: any causal LM via ``from_pretrained``, or the embedded tiny default.

The embedded default needs no download: a byte-level BPE tokenizer is trained locally on
text from the recipe's world (router conversations), and a small Qwen2-architecture model
is built from a config (head_dim 64, which vLLM's CPU backend requires). Both are saved as
a normal Hugging Face directory and loaded back with ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained`` — the same code path as a hub model on a GPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from rlrouter.router.prompt import FORMAT_TAGS

# The assistant turn (its content and its end-of-turn token) sits inside
# {% generation %} so that TRL's assistant_only_loss trains on exactly the router's tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyRouterConfig:
    """Size of the embedded router (recipe ``router:`` section).

    Attributes:
        vocab_size: BPE vocabulary trained on the world's text.
        hidden_size / num_hidden_layers / num_attention_heads / num_key_value_heads:
            the Qwen2 shape; hidden_size / num_attention_heads must be 64.
        intermediate_size: MLP width.
        max_position_embeddings: longest conversation (tokens).
        tokenizer_texts: router conversations rendered to train the tokenizer.
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    intermediate_size: int = 384
    max_position_embeddings: int = 4096
    tokenizer_texts: int = 400

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads or self.hidden_size // self.num_attention_heads != 64:
            raise ValueError(
                f"router: hidden_size / num_attention_heads must be 64 (vLLM's CPU backend needs head_dim 64), "
                f"got {self.hidden_size} / {self.num_attention_heads}"
            )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on ``texts``, with the router's tags as single tokens.

    It splits text exactly as transformers' ``Qwen2Tokenizer`` does (NFC, then Qwen2's
    pre-tokenizer regex, one token per digit, then byte-level): a saved router has a Qwen2
    config, so ``AutoTokenizer.from_pretrained`` (and vLLM) load its tokenizer as a
    ``Qwen2Tokenizer``, which rebuilds that normalizer and pre-tokenizer around the saved
    vocabulary and merges. A tokenizer trained with any other split would tokenize numbers
    differently once reloaded than during SFT (tested: the round trip gives the same ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=TinyRouterConfig.max_position_embeddings,
    )
    # Format tags are atomic tokens but not "special": decoding keeps them.
    fast.add_tokens(list(FORMAT_TAGS))
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_router(tokenizer, config: TinyRouterConfig | None = None, seed: int = 0):
    """A freshly initialized Qwen2 causal LM sized by ``config`` for ``tokenizer``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = config or TinyRouterConfig()
    torch.manual_seed(seed)
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(model_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def default_device() -> str:
    """``"cuda"`` when a GPU is available, else ``"cpu"``: where routers train and run by default."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def as_router(model, tokenizer):
    """A pretrained chat model made ready to route: the format tags (``FORMAT_TAGS``) become
    single tokens, their new embedding rows start at the mean embedding of the pieces their
    text had before (so ``<route>`` starts near what the model read as "<route>"), and the
    chat template becomes the router's ChatML template with ``{% generation %}`` marks (SFT
    trains the assistant turns only). The base must speak ChatML (``<|im_start|>`` /
    ``<|im_end|>``, as SmolLM2 and Qwen2.5 do). Returns (model, tokenizer), changed in place."""
    import torch

    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"router.base: its tokenizer has no {' / '.join(missing)}; the router's chat format is "
                         "ChatML (bases such as SmolLM2 or Qwen2.5 have it)")
    new = [t for t in FORMAT_TAGS if t not in tokenizer.get_vocab()]
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in new}
    if new:
        tokenizer.add_tokens(new)  # atomic tags, not "special": decoding keeps them
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():
            for tag in new:
                embeddings[tokenizer.convert_tokens_to_ids(tag)] = embeddings[pieces[tag]].mean(dim=0)
            output = model.get_output_embeddings()
            if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
                for tag in new:
                    output.weight[tokenizer.convert_tokens_to_ids(tag)] = output.weight[pieces[tag]].mean(dim=0)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def keep_first_layers(model, base_layers: int | None):
    """Keep the first ``base_layers`` transformer layers of ``model`` and drop the rest: the
    final norm and the LM head then read the output of layer ``base_layers``. A shallower
    router is faster in every stage, and probes of a pretrained base's hidden states often
    find the features a router needs at mid depth rather than at the top
    (``benchmarks/label_probe.py --layers``). The config's ``num_hidden_layers`` follows, so
    a saved checkpoint loads with ``from_pretrained`` and with vLLM as it is. ``None``:
    unchanged. Returns the model, changed in place."""
    if base_layers is None:
        return model
    layers = model.get_decoder().layers
    if not 1 <= base_layers <= len(layers):
        raise ValueError(f"router.base_layers = {base_layers}, but the base has {len(layers)} layers; "
                         f"choose 1..{len(layers)} or null (all)")
    del layers[base_layers:]
    model.config.num_hidden_layers = base_layers
    if getattr(model.config, "layer_types", None):  # models that mix attention kinds list one per layer
        model.config.layer_types = model.config.layer_types[:base_layers]
    return model


def freeze_below(model, train_layers: int | None) -> int:
    """Train only the top ``train_layers`` transformer layers (with the final norm, and the LM
    head when it is not tied to the input embeddings); every weight below is frozen. With
    the embeddings frozen nothing below the first trainable layer needs a gradient, so
    autograd records nothing there: the frozen layers run as without grad. ``None``: all
    weights train. Returns the number of trainable parameters."""
    if train_layers is None:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = model.get_decoder().layers
    if not 1 <= train_layers <= len(layers):
        raise ValueError(f"router.train_layers = {train_layers}, but the router has {len(layers)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*layers[len(layers) - train_layers:], model.get_decoder().norm]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        trainable.append(output)
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
