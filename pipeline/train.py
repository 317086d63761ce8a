"""`actstore.train_sae` / `train_transcoder` and the Dask sweep behind `actstore train sae|transcoder`.

Training streams shuffled batches from the store (`Store.loader`, special tokens excluded, bounded memory)
over the first (1 - eval_fraction) of its rows, epoch after epoch until `training_tokens`; evaluation uses the
held-out last rows. With the model available (manifest model id, or `model=`) the reconstruction is spliced
into the forward pass for CE/KL scores. Each run writes a SAELens-loadable directory plus `metrics.json`, and
checkpoints under `<out>/checkpoints` so a restarted task resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from actstore.pipeline.loader import ActivationLoader
from actstore.workers.sae import SAEConfig
from actstore.workers.sae_metrics import evaluate
from actstore.workers.sae_train import TrainConfig, TrainResult, train

SAE_FIELDS = {f for f in SAEConfig.__dataclass_fields__} - {"d_in", "architecture", "expansion", "k", "transcoder",
                                                               "d_out"}
CAUSAL_TYPES = {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gptj", "opt", "gemma", "gemma2", "phi"}
TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__) - {"training_tokens", "seed"}


def _open(store: Any) -> Any:
    if isinstance(store, str):
        from actstore.pipeline.store import open_store

        return open_store(store)
    return store


def split_row(store: Any, eval_fraction: float) -> int:
    """First held-out row: the start of the sequence containing row n*(1-eval_fraction)."""
    cut = int(store.n_tokens * (1 - eval_fraction))
    for i, info in enumerate(store.manifest.shards):  # read only the shard holding the cut
        if info.token_start <= cut < info.token_end:
            seq = store.shard_tokens(i).column("seq_id").to_numpy()
            local = cut - info.token_start
            return info.token_start + int(np.searchsorted(seq, seq[local], side="left"))
    return store.n_tokens


def stream(store: Any, hooks: list[str], batch_size: int, seed: int, rows: tuple[int, int],
           buffer_rows: int, paired: bool) -> Iterator[Any]:
    """Endless shuffled batches over `rows`, a new permutation each epoch (deterministic in seed)."""
    for epoch in itertools.count():
        ld = ActivationLoader(store, hooks if paired else hooks[0], batch_size, seed=seed, epoch=epoch,
                              buffer_rows=buffer_rows, skip_special=True, rows=rows)
        for b in ld:
            yield (b[hooks[0]], b[hooks[1]]) if paired else b


def _split_kwargs(more: dict[str, Any]) -> tuple[dict, dict]:
    unknown = set(more) - SAE_FIELDS - TRAIN_FIELDS
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}; SAE options: {sorted(SAE_FIELDS)}; "
                         f"training options: {sorted(TRAIN_FIELDS)}")
    return ({k: v for k, v in more.items() if k in SAE_FIELDS}, {k: v for k, v in more.items() if k in TRAIN_FIELDS})


def _fit(store: Any, hooks: list[str], sae_kw: dict, train_kw: dict, out_dir: str | None, eval_fraction: float,
         buffer_rows: int, progress: Any, eval_model: str | None, n_eval_seqs: int) -> TrainResult:
    store = _open(store)
    cut = split_row(store, eval_fraction)
    tcfg = TrainConfig(**train_kw)
    paired = len(hooks) == 2
    dims = [store.manifest.hook(h).d for h in hooks]
    scfg = SAEConfig(d_in=dims[0], d_out=dims[-1], transcoder=paired, **sae_kw)
    ckpt = os.path.join(out_dir, "checkpoints") if out_dir else None
    with _out_lease(out_dir):
        res = train(stream(store, hooks, 8192, tcfg.seed, (0, cut), buffer_rows, paired), scfg, tcfg, ckpt, progress)
        _evaluate(store, hooks, res, cut, eval_model, n_eval_seqs)
        if out_dir:
            _save(store, hooks, res, out_dir)
    return res


def _out_lease(out_dir: str | None) -> Any:
    """One training job per output directory (a second one is refused while the first heartbeats)."""
    if not out_dir:
        return contextlib.nullcontext()
    import fsspec

    from actstore.pipeline.lease import Lease

    return Lease(fsspec.filesystem("file"), os.path.abspath(out_dir), out_dir, what="training job")


def _evaluate(store: Any, hooks: list[str], res: TrainResult, cut: int, eval_model: str | None, n_eval_seqs: int) -> None:
    paired = len(hooks) == 2
    held = ActivationLoader(store, hooks if paired else hooks[0], 8192, shuffle=False, skip_special=True,
                            rows=(cut, store.n_tokens))
    batches = ((b[hooks[0]], b[hooks[1]]) for b in held) if paired else held
    res.metrics.update(evaluate(res.sae, batches))
    res.metrics["eval_tokens_from_row"] = cut
    _spliced_metrics(store, hooks, res, cut, eval_model, n_eval_seqs)


def _spliced_metrics(store: Any, hooks: list[str], res: TrainResult, cut: int, model: str | None, n: int) -> None:
    """CE/KL scores when a causal LM is available; otherwise record why not."""
    path = model or (store.manifest.model.id if store.manifest.model else None)
    if not path or n <= 0:
        res.metrics["ce_kl"] = "skipped: no model in the manifest (pass model=...)"
        return
    if store.manifest.model and store.manifest.model.model_type not in CAUSAL_TYPES and not model:
        res.metrics["ce_kl"] = f"skipped: {store.manifest.model.model_type} is not a causal LM"
        return
    from actstore.pipeline.splice import load_causal_lm, splice_scores

    try:
        lm = load_causal_lm(path, store.manifest.model.revision if store.manifest.model else None)
    except (OSError, ValueError) as e:
        res.metrics["ce_kl"] = f"skipped: {str(e).splitlines()[0][:200]}"
        return
    tok = store.tokens().slice(cut)
    seq, ids = tok.column("seq_id").to_numpy(), tok.column("token_id").to_numpy()
    seqs = [ids[seq == s] for s in np.unique(seq)[:n]]
    sae = res.sae.float().eval()

    def replace(t):
        return sae.decode(sae.encode(t.float()), t.float())

    res.metrics.update(splice_scores(lm, seqs, hooks[-1], replace, transcoder_in=hooks[0] if len(hooks) == 2 else None))


def _save(store: Any, hooks: list[str], res: TrainResult, out_dir: str) -> None:
    meta = {"store_url": store.url, "manifest_sha256": hashlib.sha256(store.manifest.to_json()).hexdigest(),
            "hooks": hooks, "model": store.manifest.model.id if store.manifest.model else None,
            "sae_config": asdict(res.sae_cfg)}
    res.save(out_dir, hook_name=hooks[-1] if len(hooks) == 1 else hooks[0], extra_metadata=meta)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({k: v for k, v in res.metrics.items()}, f, indent=1, default=float)


def train_sae(store: Any, hook: str, architecture: str = "topk", expansion: int = 8, k: int = 32,
              training_tokens: int = 2**24, seed: int = 0, out_dir: str | None = None, eval_fraction: float = 0.05,
              buffer_rows: int = 1 << 17, progress: Any = None, model: str | None = None, n_eval_seqs: int = 16,
              **more: Any) -> TrainResult:
    """Train an SAE on one hook; `more` takes any SAEConfig / TrainConfig field (batch_size, lr, aux_k, ...).

    Returns a TrainResult: `.sae` (encode/decode, W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec),
    `.metrics` (fvu, ev_legacy, ev_zero_centred, l0, dead_fraction, ... on held-out tokens; CE/KL scores when the
    model is available) and `.save(dir)` (SAELens format).
    """
    sae_kw, train_kw = _split_kwargs(more)
    return _fit(store, [hook], {"architecture": architecture, "expansion": expansion, "k": k, **sae_kw},
                {"training_tokens": training_tokens, "seed": seed, **train_kw}, out_dir, eval_fraction,
                buffer_rows, progress, model, n_eval_seqs)


def train_transcoder(store: Any, in_hook: str, out_hook: str, architecture: str = "topk", expansion: int = 8,
                     k: int = 32, training_tokens: int = 2**24, seed: int = 0, out_dir: str | None = None,
                     eval_fraction: float = 0.05, buffer_rows: int = 1 << 17, progress: Any = None,
                     model: str | None = None, n_eval_seqs: int = 16, **more: Any) -> TrainResult:
    """Train a transcoder in_hook -> out_hook (e.g. hook_mlp_in -> hook_mlp_out); `skip=True` adds W_skip."""
    sae_kw, train_kw = _split_kwargs(more)
    return _fit(store, [in_hook, out_hook], {"architecture": architecture, "expansion": expansion, "k": k, **sae_kw},
                {"training_tokens": training_tokens, "seed": seed, **train_kw}, out_dir, eval_fraction,
                buffer_rows, progress, model, n_eval_seqs)
