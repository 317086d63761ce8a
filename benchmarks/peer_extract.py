"""Peer activation extractors for bench_peers_extract, run inside the peers' own venv (never imports actstore).

    /tmp/peers/bin/python benchmarks/peer_extract.py --model DIR --windows windows.npy --threads 2

The process imports SAELens / TransformerLens, builds a `HookedTransformer` from a `HookedTransformerConfig`
with the weights of the Hugging Face GPT-2 checkpoint in DIR (TransformerLens' own GPT-2 conversion, no
folding or centering: the computation is the HF model's) and an in-memory tokenized `datasets.Dataset` of the
packed windows (int64 array (n_seq, context), exactly the token rows actstore stored). It checks the model
against HF once (hidden states after every block), prints a JSON "ready" line, then serves JSON-line commands on
stdin, answering one JSON line each:

- `{"impl": "cache", "hooks": [...], "batch": B, "out": DIR}`: SAELens `CacheActivationsRunner`, one run per
  hook (its config has one `hook_name`), each writing its cache under DIR (deleted after timing).
- `{"impl": "store", ...}`: SAELens `ActivationsStore.get_raw_llm_batch` loop, one store and pass per hook
  (in memory, no disk).
- `{"impl": "store_multi", ...}`: SAELens' multi-hook store (`ActivationsStore.from_config_multi_hook` +
  `get_multi_hook_activations`), one pass for all hooks (reference; CacheActivationsRunner cannot use it).
- `{"impl": "rwc", ...}`: plain TransformerLens loop, `run_with_cache(tokens, names_filter=hooks)` per batch.
- `{"dump": FILE, "hooks": [...], "n_seq": N}`: TransformerLens activations of the first N windows -> .npz
  (for the parity check against actstore's stored rows).

Timed: from constructing the runner/store to the last activation in hand (for `cache`: on disk, consolidated);
not timed: interpreter start, imports, model build (the prebuilt model replaces SAELens' `load_model`),
dataset construction, deleting the output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONTEXT = 128


# ------------------------------------------------------------------------------------------------ model
def build_model(path: str) -> Any:
    """HookedTransformer with the HF GPT-2 weights, unprocessed (what `from_pretrained_no_processing` gives)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(path).eval()  # the checkpoint is a GPT2Model: lm_head is tied to wte
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn=c.activation_function,
        normalization_type="LN", eps=c.layer_norm_epsilon, positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False, device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval(), hf


def parity(model: Any, hf: Any, windows: np.ndarray) -> dict[str, float]:
    """Max abs difference (and relative to the activations' scale) between TL's hook_resid_post and HF's block
    outputs (forward hooks on every block: HF's last hidden_state has ln_f applied), and between the logits."""
    ids = torch.from_numpy(windows[:2]).long()
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for b in hf.transformer.h]
    with torch.no_grad():
        hf_logits = hf(input_ids=ids, use_cache=False).logits
        tl_logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    for h in handles:
        h.remove()
    diffs = [float((cache[f"blocks.{i}.hook_resid_post"] - o).abs().max()) for i, o in enumerate(outs)]
    scale = max(float(o.abs().max()) for o in outs)
    return {"resid_post_max_abs": max(diffs), "resid_post_max_rel": max(diffs) / scale,
            "logits_max_abs": float((tl_logits - hf_logits).abs().max()),
            "logits_max_rel": float((tl_logits - hf_logits).abs().max() / hf_logits.abs().max())}


# --------------------------------------------------------------------------------------------- variants
def store_for(model: Any, ds: Any, hook: str, batch: int, n_tokens: int) -> Any:
    """An ActivationsStore configured as CacheActivationsRunner configures its own (_mk_activations_store)."""
    from sae_lens.training.activations_store import ActivationsStore

    return ActivationsStore(
        model=model, dataset=ds, streaming=False, hook_name=hook, hook_head_index=None, context_size=CONTEXT,
        d_in=model.cfg.d_model, n_batches_in_buffer=1, total_training_tokens=n_tokens,
        store_batch_size_prompts=batch, train_batch_size_tokens=-1, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32")


def run_store(model: Any, ds: Any, cmd: dict, n_seq: int) -> list[Any]:
    out = []
    for hook in cmd["hooks"]:
        store = store_for(model, ds, hook, cmd["batch"], n_seq * CONTEXT)
        out += [store.get_raw_llm_batch(raise_on_epoch_end=False)[0] for _ in range(n_seq // cmd["batch"])]
    return out


def run_store_multi(model: Any, ds: Any, cmd: dict, n_seq: int) -> list[Any]:
    from sae_lens.training.activations_store import ActivationsStore

    d = model.cfg.d_model
    store = ActivationsStore.from_config_multi_hook(
        model, dataset=ds, hook_names=cmd["hooks"], hook_d_ins={h: d for h in cmd["hooks"]}, streaming=False,
        context_size=CONTEXT, n_batches_in_buffer=1, total_training_tokens=n_seq * CONTEXT,
        store_batch_size_prompts=cmd["batch"], prepend_bos=False, device="cpu", dtype="float32")
    return [store.get_multi_hook_activations(store.get_batch_tokens()) for _ in range(n_seq // cmd["batch"])]


def run_cache(model: Any, ds: Any, cmd: dict, n_seq: int) -> list[Any]:
    """One CacheActivationsRunner per hook; the buffer holds the whole corpus (one shard per hook), sized so that
    SAELens computes exactly n_seq windows (its default 2 GB buffer would cycle the dataset ~80 times)."""
    import sae_lens.cache_activations_runner as car
    from sae_lens.config import CacheActivationsRunnerConfig

    car.load_model = lambda *a, **kw: model  # no hub: hand it the prebuilt model (model build is not timed)
    n_tokens, d = n_seq * CONTEXT, model.cfg.d_model
    out = []
    for hook in cmd["hooks"]:
        path = Path(cmd["out"]) / hook
        cfg = CacheActivationsRunnerConfig(
            dataset_path="in-memory", model_name="gpt2-small-random", model_batch_size=cmd["batch"],
            hook_name=hook, d_in=d, training_tokens=n_tokens, context_size=CONTEXT,
            new_cached_activations_path=str(path), shuffle=False, dtype="float32", device="cpu",
            buffer_size_gb=(n_tokens * d * 4 + 0.5) / 1e9, prepend_bos=False, streaming=False)
        assert cfg.n_buffers == 1 and cfg.n_batches_in_buffer * cmd["batch"] == n_seq, (cfg.n_buffers,
                                                                                         cfg.n_batches_in_buffer)
        out.append(car.CacheActivationsRunner(cfg, override_dataset=ds).run())
    return out


def run_rwc(model: Any, ds: Any, cmd: dict, n_seq: int, windows: torch.Tensor) -> list[Any]:
    """The loop most notebooks write: run_with_cache per batch (whole model: no stop_at_layer), keep the acts."""
    out = []
    with torch.no_grad():
        for b in range(0, n_seq, cmd["batch"]):
            _, cache = model.run_with_cache(windows[b:b + cmd["batch"]], names_filter=cmd["hooks"])
            out.append({h: cache[h].reshape(-1, cache[h].shape[-1]) for h in cmd["hooks"]})
    return out


IMPLS = {"cache": run_cache, "store": run_store, "store_multi": run_store_multi}


def serve(model: Any, ds: Any, windows: np.ndarray, cmd: dict) -> dict:
    n_seq = len(windows)
    if "dump" in cmd:
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.from_numpy(windows[:cmd["n_seq"]]).long(), names_filter=cmd["hooks"])
        np.savez(cmd["dump"], **{h: cache[h].reshape(-1, cache[h].shape[-1]).numpy() for h in cmd["hooks"]})
        return {"dumped": cmd["dump"]}
    tokens = torch.from_numpy(windows).long()
    t0 = time.perf_counter()
    if cmd["impl"] == "rwc":
        res = run_rwc(model, ds, cmd, n_seq, tokens)
    else:
        res = IMPLS[cmd["impl"]](model, ds, cmd, n_seq)
    dt = time.perf_counter() - t0
    del res
    if cmd.get("out"):
        shutil.rmtree(cmd["out"], ignore_errors=True)
    n = n_seq * CONTEXT
    return {"s": dt, "tokens": n, "hook_tokens": n * len(cmd["hooks"])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # deprecation of HookedTransformer, "fewer samples than tokens", ...
    import datasets
    import sae_lens  # noqa: F401  (import errors surface before the ready line)

    datasets.disable_progress_bars()
    windows = np.load(args.windows).astype(np.int64)
    model, hf = build_model(args.model)
    check = parity(model, hf, windows)
    del hf
    ds = datasets.Dataset.from_dict({"input_ids": windows.tolist()})
    from importlib import metadata

    versions = {p: metadata.version(p) for p in ("sae-lens", "transformer-lens", "torch", "transformers",
                                                 "datasets")}
    print(json.dumps({"ready": True, "versions": versions, "parity_hf": check}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            print(json.dumps(serve(model, ds, windows, json.loads(line))), flush=True)
        except Exception as e:  # report, keep serving
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
