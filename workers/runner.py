"""Model runner: load a Hugging Face model, capture hook points with forward hooks, stop after the deepest block.

The runner is what a worker (Ray actor or the local executor) holds: it turns batches of token-id sequences into
per-hook rows in the storage dtype, one row per non-padding token, in (sequence, position) order.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from actstore.schemas.errors import (
    HookNameError,
    ModelLoadError,  # noqa: F401  (defined with its siblings; raised here)
)
from actstore.schemas.hooks import HookSpec, parse_hooks
from actstore.workers import hookmap, token_outputs
from actstore.workers.dtypes import TORCH_DTYPES, to_storage
from actstore.workers.model_build import build_model


class _StopForward(Exception):
    """Raised from the deepest hooked block to skip the rest of the forward pass."""


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1] or os.path.exists(model)


def load_config(model: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """Read only the model config (cheap), with a one-line error for missing paths or unreachable hubs."""
    from transformers import AutoConfig

    if _looks_local(model) and not os.path.isdir(os.path.expanduser(model)):
        raise ModelLoadError(f"model path {model!r} does not exist (give a local HF model directory or a hub id)")
    try:
        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError/ValueError with multi-line text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model config {model!r}: {first}") from None


# Files any Hugging Face tokenizer is saved as; a model folder holding none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "merges.txt", "sentencepiece.bpe.model")


def load_tokenizer(model: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; a local folder without tokenizer files is an error (transformers would otherwise
    build an empty tokenizer that turns every document into zero tokens)."""
    from transformers import AutoTokenizer

    local = os.path.expanduser(model)
    if os.path.isdir(local) and not any(os.path.exists(os.path.join(local, f)) for f in TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer in {model!r} (none of {', '.join(TOKENIZER_FILES[:4])}, ...); save it "
                             "there with tokenizer.save_pretrained(DIR), or point model: at a folder that has one")
    try:
        return AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load tokenizer of {model!r}: {first}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def max_context(config: Any) -> int | None:
    """Longest sequence the model's position embeddings allow, if the config says."""
    for attr in ("n_positions", "max_position_embeddings"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class ModelRunner:
    """Holds one model with hooks registered; `run` maps token sequences to stored rows per hook."""

    def __init__(
        self,
        model: str | nn.Module,
        hooks: list[str],
        revision: str | None = None,
        model_dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
        pad_id: int = 0,
        outputs_topk: int | None = None,
        causal_lm: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.outputs_topk = outputs_topk  # None: no per-token outputs (and early exit allowed)
        self.outputs: dict[str, np.ndarray] = {}  # per-token outputs of the last captured batch
        causal_lm = causal_lm or outputs_topk is not None  # generation and per-token outputs need the LM head
        lm = model if isinstance(model, nn.Module) else self._load(
            model, revision, model_dtype, trust_remote_code, causal_lm=causal_lm)
        # Hooks live on the base model; with outputs the forward runs through the LM wrapper to get logits.
        self.lm = lm.to(self.device).eval()
        self.model = lm.base_model if causal_lm else lm
        self._capturing = False  # hooks record (and may stop the forward) only inside `capture`, not `generate`
        self.specs: list[HookSpec] = parse_hooks(hooks)
        hookmap.check_hooks(self.specs, self.model.config)
        self.pad_id = pad_id
        self._captured: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._handles = [self._register(s) for s in self.specs]
        self._handles += self._register_stop()

    @staticmethod
    def _load(model: str, revision: str | None, model_dtype: str, trust_remote_code: bool,
              causal_lm: bool = False) -> nn.Module:
        from transformers import AutoModel, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        load_config(model, revision, trust_remote_code)  # one-line errors for bad paths first
        hf_logging.disable_progress_bar()  # our own bar reports tokens; HF's per-file bars are noise here
        kw = dict(revision=revision, dtype=TORCH_DTYPES[model_dtype], trust_remote_code=trust_remote_code)
        if not causal_lm:
            return build_model(AutoModel.from_pretrained, model, **kw)
        lm, info = build_model(AutoModelForCausalLM.from_pretrained, model, output_loading_info=True, **kw)
        # A checkpoint of the base model alone loads with a freshly *random* head: its "outputs" would be noise.
        head = [k for k in info.get("missing_keys", []) if not k.startswith(lm.base_model_prefix + ".")]
        if head and _tie_head(lm):
            head = []
        if head:
            raise ModelLoadError(f"token_outputs: {model!r} has no trained LM head (missing {head[0]!r}); give a "
                                 "*ForCausalLM checkpoint or remove token_outputs")
        return lm

    def _register(self, spec: HookSpec) -> Any:
        module, where, _ = hookmap.resolve(self.model, spec)
        name = spec.name

        def keep(t: torch.Tensor) -> None:
            if not self._capturing:
                return
            # Index with the padding mask right away: this copies just the stored rows, so later in-place
            # updates of the same tensor inside the model cannot change what we captured.
            self._captured[name] = t[self._mask] if self._mask is not None else t.reshape(-1, t.shape[-1]).clone()

        if where == "in":
            def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                keep(args[0] if args else _first_tensor(kwargs.get("hidden_states", kwargs)))
            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(mod: nn.Module, args: tuple, out: Any) -> None:
            keep(_first_tensor(out))
        return module.register_forward_hook(post)

    def _register_stop(self) -> list[Any]:
        """Hook the deepest needed block to raise _StopForward once it has run (all hooks captured by then)."""
        if self.outputs_topk is not None:
            return []  # per-token outputs need the logits, so the whole model runs
        blocks = hookmap.blocks_of(self.model)
        depths = [hookmap.resolve(self.model, s)[2] for s in self.specs]
        if blocks is None or any(d is None for d in depths):
            return []  # a hook outside the blocks (or an unmapped family): run the whole model
        deepest = max(depths)
        if deepest >= len(blocks) - 1 and hookmap.family_for(self.model.config).final_norm is None:
            return []  # nothing after the last block worth skipping

        def stop(mod: nn.Module, args: tuple, out: Any) -> None:
            if self._capturing:
                raise _StopForward

        self.deepest_block = deepest
        return [blocks[deepest].register_forward_hook(stop)]

    @torch.inference_mode()
    def capture(self, sequences: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Forward one batch; return {hook: (n_tokens, d) tensor} over non-padding tokens, on the device."""
        lengths = [len(s) for s in sequences]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        ids = ids.to(self.device)
        mask = None
        if min(lengths) != width:  # right padding; without padding pass no mask so fast kernels are used
            mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(self.device)
        self._mask, self._captured, self._capturing = mask, {}, True
        # without per-token outputs the base model suffices: no LM head over every position
        fwd = self.lm if self.outputs_topk is not None else self.model
        try:
            out = fwd(input_ids=ids, attention_mask=mask.long() if mask is not None else None, use_cache=False)
            if self.outputs_topk is not None:
                self.outputs = token_outputs.from_logits(out.logits, ids, lengths, self.outputs_topk)
        except _StopForward:
            pass
        finally:
            self._mask, self._capturing = None, False
        return {s.name: self._captured[s.name] for s in self.specs}

    @torch.inference_mode()
    def generate(self, prompts: list[np.ndarray], g: Any, eos: list[int], seed: int) -> list[np.ndarray]:
        """`model.generate` over one batch of prompts (left-padded, with their attention mask and the KV cache):
        the new token ids of each row, max_new_tokens of them (rows that ended early are padded after their EOS).
        `g` holds the GenerateSettings; sampling draws from a forked RNG seeded with `seed`."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        kw: dict[str, Any] = dict(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, pad_token_id=self.pad_id,
                                  eos_token_id=eos or None)
        if g.do_sample:  # temperature and nucleus only (HF's default top_k=50 would be a hidden third filter)
            kw.update(temperature=g.temperature, top_p=g.top_p, top_k=0)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        from transformers import GenerationConfig

        # Decoding is what the config says and nothing else: a model folder's generation_config.json (repetition
        # penalty, top_k, min_p, ...) would otherwise fill every setting not passed here, unrecorded.
        shipped, self.lm.generation_config = self.lm.generation_config, GenerationConfig()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = self.lm.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw)
        finally:
            self.lm.generation_config = shipped
        new = out[:, width:].cpu().numpy().astype(np.int32)
        return [row for row in new]

    def run(self, sequences: list[np.ndarray], dtype: str) -> dict[str, tuple[np.ndarray, int]]:
        """capture() and convert to the storage dtype: {hook: (stored rows, float16 overflow count)}."""
        return {h: to_storage(t, dtype) for h, t in self.capture(sequences).items()}

    def hook_dims(self) -> dict[str, int]:
        """Width of every hook, found by one forward pass over a 2-token sequence."""
        out = self.capture([np.array([self.pad_id, self.pad_id])])
        return {h: int(t.shape[-1]) for h, t in out.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _tie_head(lm: nn.Module) -> bool:
    """Whether the LM head of a checkpoint that ties it to the input embedding (config `tie_word_embeddings`, the
    head not saved) is that embedding, tying it when loading left it apart. transformers leaves it apart (and
    reports it missing) in a process where some other code built two models at once on different threads: see
    `model_build`. Our own builds are serialized; this keeps a model loaded after someone else's race correct."""
    if not getattr(lm.config, "tie_word_embeddings", False):
        return False
    out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
    if out is None or inp is None or out.weight.shape != inp.weight.shape:
        return False
    if out.weight.data_ptr() != inp.weight.data_ptr():
        out.weight = inp.weight
    return True


def _first_tensor(out: Any) -> torch.Tensor:
    """Blocks return a tensor (transformers 5) or a tuple/ModelOutput whose first item is the hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
    raise HookNameError(f"hooked module returned no tensor ({type(out).__name__})")
