"""Tiny random models and a tokenizer built in code: the whole pipeline in seconds, with no download.

Used by the tests and by `model.name: tiny` (a Llama) or `tiny-<family>` (`tiny-qwen2`, `tiny-phi3`, ... see
`TINY_FAMILIES`) for smoke runs: each family's own modelling code (fused projections, soft-capping, sliding
window caches) at a few thousand parameters. The tokenizer is a byte-level BPE trained in a few
milliseconds on the prompt templates plus some English, so prompts tokenize into realistic multi-character
tokens and any text (any title, any script) still encodes through the byte alphabet.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from evolora.errors import EvoloraError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\nGiven the user's preference and unpreference, identify whether the user will like "
    'the target movie by answering "Yes." or "No.".',
    "### Input:\nUser Preference: \nUser Unpreference: \nWhether the user will like the target movie ?",
    "### Response:\nYes.",
    "### Response:\nNo.",
    "The user has interacted with items in chronological order. Can you predict the next possible item "
    "that the user may expect?",
    "the a of and to in is was for on that with as by at from his her they this which one all two three",
    "Toy Story GoldenEye Four Rooms Get Shorty Copycat Star Wars Fargo Contact Scream Titanic Liar English",
    "book movie song album item product game user likes dislikes",
    "0 1 2 3 4 5 6 7 8 9 (1995) (1996) (1997) (1998) 19 20",
]


def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="right"
    )


#: family -> (transformers config class, its extra settings); a family whose class the installed transformers
#: lacks is left out of `available_families()`
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {}),
    # Logit soft-capping (final and attention) and alternating sliding-window layers, as the real models.
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "gemma3": ("Gemma3TextConfig", {}),
    # Fused `qkv_proj` and `gate_up_proj`: no q_proj/v_proj for the default LoRA targets.
    "phi3": ("Phi3Config", {}),
}


def available_families() -> list[str]:
    """The tiny families the installed transformers can build."""
    import transformers

    return [f for f, (config, _) in TINY_FAMILIES.items() if hasattr(transformers, config)]


def build_tiny(
    family: str = "llama",
    dtype: torch.dtype = torch.float32,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    tied: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model, tokenizer): a randomly initialised causal LM of `family` with a few thousand parameters;
    `tied`: its output layer shares the input embedding's weights (SmolLM2's layout; larger models, e.g.
    Llama-3-8B, have their own)."""
    import transformers
    from transformers import AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise EvoloraError(f"no tiny model of family {family!r}; available: {', '.join(TINY_FAMILIES)}")
    config_name, extra = TINY_FAMILIES[family]
    config_class = getattr(transformers, config_name, None)
    if config_class is None:
        raise EvoloraError(
            f"tiny-{family} needs transformers' {config_name}, which transformers "
            f"{transformers.__version__} lacks; available: {', '.join(available_families())}"
        )
    tok = build_tiny_tokenizer()
    sizes: dict[str, Any] = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 2048,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": tied,
    }
    # Families whose default head size is not hidden / heads (Gemma's is 256).
    if "head_dim" in inspect.signature(config_class.__init__).parameters:
        sizes["head_dim"] = hidden // heads
    if family in ("gemma2", "gemma3"):
        sizes["query_pre_attn_scalar"] = hidden // heads
    config = config_class(**sizes, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.eval()
    return model, tok


def build_tiny_llama(
    dtype: torch.dtype = torch.float32,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    tied: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model, tokenizer): a randomly initialised `LlamaForCausalLM` with a few thousand parameters."""
    return build_tiny("llama", dtype, hidden, layers, heads, seed, tied)
