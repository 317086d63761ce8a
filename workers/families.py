"""The one table of model families: where each keeps its blocks, what each canonical hook means there, whether it
is a causal LM, and its final norm.

Hook resolution (`hookmap`), the causal/encoder checks of extraction and of CE/KL splicing, and the logit lens
all read this table, so a model type is either known here, with all its properties, or treated the same way
everywhere (only `module:` hooks; causal only if transformers has a causal-LM class for it).

What each name means per family (also in the README's hook table):

- pre-norm (GPT-2, NeoX, the Llama layout: Llama, Mistral, Qwen2/3, Gemma, Phi-3): TransformerLens' meanings;
  hook_mlp_in is the MLP's input, after the block's second norm. Gemma scales its embeddings by sqrt(d_model)
  inside the embedding module, so blocks.0.hook_resid_pre is the scaled embedding.
- sandwich norms (Gemma 2, Gemma 3): each sublayer's output is normed before the residual add; attn_out and
  mlp_out are those normed outputs (what is added to the stream, as TransformerLens has them), resid_mid the
  stream between the two adds, mlp_in the MLP input after pre_feedforward_layernorm. Pre-LN identities hold:
  resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out.
- post-sublayer norms (OLMo 2): no norm before a sublayer, one after; attn_out and mlp_out are the normed
  outputs, and resid_mid = mlp_in (the MLP reads the raw stream). The same identities hold.
- post-LN BERT/MiniLM: resid_pre is the block input (already layer-normed), attn_out the attention projection
  before the residual add and LayerNorm, resid_mid = mlp_in the normed stream entering the MLP, mlp.hook_post
  the GELU output, mlp_out the MLP projection before the residual add and LayerNorm, and resid_post the block
  output (after its LayerNorm; BERT has no final norm).

Gated MLPs (every Llama-layout, Gemma and OLMo family): mlp.hook_post is act(gate) * up, the input of down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Point = tuple[str, str]  # (module path relative to the block, "in" | "out")


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and what each canonical hook means there."""

    name: str
    blocks: str  # path of the block list, relative to the base model
    final_norm: str | None  # path of the norm applied after the last block (None: post-LN, no final norm)
    points: dict[str, Point] = field(default_factory=dict)


def _pre_ln(attn: str, mlp: str, ln_mlp: str, post: Point) -> dict[str, Point]:
    return {
        "hook_resid_pre": ("", "in"),
        "hook_attn_out": (attn, "out"),
        "hook_resid_mid": (ln_mlp, "in"),
        "hook_mlp_in": (mlp, "in"),
        "mlp.hook_post": post,
        "hook_mlp_out": (mlp, "out"),
        "hook_resid_post": ("", "out"),
    }


def _normed_outputs(pre_mlp_norm: str | None) -> dict[str, Point]:
    """Blocks whose sublayer outputs are normed before the residual add (Gemma 2/3 with a pre-MLP norm too,
    OLMo 2 without): attn_out / mlp_out are the normed outputs, so the pre-LN identities still hold."""
    return {
        "hook_resid_pre": ("", "in"),
        "hook_attn_out": ("post_attention_layernorm", "out"),
        "hook_resid_mid": (pre_mlp_norm or "mlp", "in"),
        "hook_mlp_in": ("mlp", "in"),
        "mlp.hook_post": ("mlp.down_proj", "in"),
        "hook_mlp_out": ("post_feedforward_layernorm", "out"),
        "hook_resid_post": ("", "out"),
    }


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "h", "ln_f", _pre_ln("attn", "mlp", "ln_2", ("mlp.act", "out"))),
    "gpt_neox": Family(
        "gpt_neox", "layers", "final_layer_norm",
        _pre_ln("attention", "mlp", "post_attention_layernorm", ("mlp.act", "out")),
    ),
    # Llama-style gated MLP: hook_post is act(gate) * up, the input of down_proj (as in TransformerLens).
    "llama": Family(
        "llama", "layers", "norm", _pre_ln("self_attn", "mlp", "post_attention_layernorm", ("mlp.down_proj", "in"))
    ),
    "gemma2": Family("gemma2", "layers", "norm", _normed_outputs("pre_feedforward_layernorm")),
    "olmo2": Family("olmo2", "layers", "norm", _normed_outputs(None)),
    "bert": Family(
        "bert", "encoder.layer", None,
        {
            "hook_resid_pre": ("", "in"),
            "hook_attn_out": ("attention.output.dense", "out"),
            "hook_resid_mid": ("attention", "out"),
            "hook_mlp_in": ("intermediate", "in"),
            "mlp.hook_post": ("intermediate", "out"),
            "hook_mlp_out": ("output.dense", "out"),
            "hook_resid_post": ("", "out"),
        },
    ),
}


@dataclass(frozen=True)
class ModelType:
    """What actstore knows of one transformers `model_type`."""

    family: str | None  # key of FAMILIES (canonical hooks), or None: only module: hooks
    causal: bool  # a next-token LM (token outputs, CE/KL splicing, generation); False: bidirectional encoder


MODEL_TYPES: dict[str, ModelType] = {
    "gpt2": ModelType("gpt2", True),
    "gpt_neox": ModelType("gpt_neox", True),
    "llama": ModelType("llama", True),
    "mistral": ModelType("llama", True),
    "qwen2": ModelType("llama", True),
    "qwen3": ModelType("llama", True),
    "gemma": ModelType("llama", True),
    "phi3": ModelType("llama", True),
    "gemma2": ModelType("gemma2", True),
    "gemma3_text": ModelType("gemma2", True),
    "olmo2": ModelType("olmo2", True),
    "bert": ModelType("bert", False),
    "roberta": ModelType("bert", False),
    "xlm-roberta": ModelType("bert", False),
    # Known, without a canonical hook map (module: hooks only).
    "gptj": ModelType(None, True),
    "opt": ModelType(None, True),
    "phi": ModelType(None, True),
    # Bidirectional encoders that transformers can still wrap in a *ForCausalLM class (as an untrained decoder).
    "electra": ModelType(None, False),
    "ernie": ModelType(None, False),
    "camembert": ModelType(None, False),
    "megatron-bert": ModelType(None, False),
}


def family_for(config: Any) -> Family | None:
    """The family of a transformers config, or None when only module: hooks can be used."""
    return family_of_type(getattr(config, "model_type", None))


def family_of_type(model_type: str | None) -> Family | None:
    """The family of a transformers `model_type` (as a store manifest records it), or None."""
    known = MODEL_TYPES.get(model_type or "")
    return FAMILIES[known.family] if known and known.family else None


def is_causal_lm(config: Any) -> bool:
    """Whether a model config describes a next-token LM with a causal-LM head class in transformers."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    known = MODEL_TYPES.get(getattr(config, "model_type", ""))
    if known is not None and not known.causal and not getattr(config, "is_decoder", False):
        return False
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def n_layers_of(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return None
