"""`actstore.logit_lens` / `actstore lens`: what each stored residual-stream hook already predicts.

The model named in the store's manifest (id and revision; `model=` overrides) is loaded as a causal LM; its final
norm (from the family table) and unembedding turn each stored residual row into next-token logits. The final
distribution is the same lens applied to the last block's `hook_resid_post`, captured by re-running the base
model over the store's sequences in extraction's own batches, so for a float32 store holding that hook the
last row reproduces the model exactly: kl_to_final 0 and top1_agreement 1. Every token with a next token in
its sequence counts (special tokens included, as in the model's own loss).

Per hook: loss (mean next-token NLL), top1_agreement (with the final argmax), kl_to_final (mean
KL(final || lens)), entropy (mean, nats). With `per_token`, lens-tokens.parquet holds, row-aligned with the
store's `tokens()`, the rank of the true next token at each hook (0 = top; null at a sequence's last token).
Results go to `out` (lens.json with provenance, which `actstore report` plots, and the per-token table).
The work runs in this process, shard by shard; memory: the shard's rows plus batch_rows x vocabulary floats.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.schemas.errors import ConfigError, HookNameError
from actstore.schemas.hooks import BLOCK_KINDS, parse_hook
from actstore.schemas.jobs import LensJob
from actstore.workers.lens import RESIDUAL_KINDS, check_lens_applies
from actstore.workers.tokenize import Sequence, ShardPlan

JSON_FILE, TOKENS_FILE = "lens.json", "lens-tokens.parquet"


def residual_hooks(store: Any, hooks: list[str] | None) -> list[str]:
    """The hooks to read, in layer order; a non-residual or absent hook is a one-line error."""
    if not hooks:
        hooks = [h for h in store.hooks if not parse_hook(h).is_module and parse_hook(h).kind in RESIDUAL_KINDS]
        if not hooks:
            raise HookNameError(f"store {store.url!r} holds no residual-stream hook (hook_resid_pre/mid/post) for "
                                "the logit lens")
    for h in hooks:
        spec = parse_hook(h)
        if spec.is_module or spec.kind not in RESIDUAL_KINDS:
            raise HookNameError(f"hook {h!r} is not a residual-stream hook; the logit lens reads hook_resid_pre, "
                                "hook_resid_mid and hook_resid_post")
        store.manifest.hook(h)
    return sorted(hooks, key=lambda h: (parse_hook(h).layer, BLOCK_KINDS.index(parse_hook(h).kind)))


def check_lens_job(store: Any, job: LensJob) -> list[str]:
    """Everything checked before the model loads: model type, hooks, output."""
    from actstore.pipeline.analysis.results import check_writable

    man = store.manifest
    if man.model is None and not job.model:
        raise ConfigError(f"store {store.url!r} names no model (imported arrays); give model: PATH")
    check_lens_applies(man.model.model_type if man.model else None)
    hooks = residual_hooks(store, job.hooks)
    if job.per_token and not job.out:
        raise ConfigError("per_token writes lens-tokens.parquet: give out (a folder or URL)")
    if job.out:
        check_writable(job.out, job.storage_options, "output")
    return hooks


def _shard_plan(store: Any, i: int, limit: int | None) -> ShardPlan:
    """A shard's sequences rebuilt from its token index (only whole sequences below row `limit`)."""
    info = store.manifest.shards[i]
    tok = store.shard_tokens(i, ["token_id", "doc_id", "seq_id", "special"])
    seq = tok.column("seq_id").to_numpy()
    ids, docs = np.array(tok.column("token_id").to_numpy()), np.array(tok.column("doc_id").to_numpy())
    special = tok.column("special").to_numpy(zero_copy_only=False).astype(bool)
    cuts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1], True])
    seqs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if limit is not None and info.token_start + b > limit:
            break
        seqs.append(Sequence(ids[a:b], docs[a:b], special[a:b]))
    return ShardPlan(info.id, info.seq_start, info.token_start, seqs)


class _Model:
    """The causal LM's lens and a base-model runner capturing the last block's residual (float32)."""

    def __init__(self, store: Any, job: LensJob) -> None:
        from actstore.workers.lens import Lens
        from actstore.workers.runner import ModelRunner

        man = store.manifest
        path = job.model or man.model.id
        revision = None if job.model else man.model.revision
        lm = ModelRunner._load(path, revision, "float32", False, causal_lm=True)
        n_layers = man.model.n_layers if man.model and man.model.n_layers else lm.config.num_hidden_layers
        self.final_hook = f"blocks.{n_layers - 1}.hook_resid_post"
        self.runner = ModelRunner(lm.base_model, [self.final_hook], device=job.device)
        self.lens = Lens(lm).to(self.runner.device)
        cfg = man.extract_config or {}
        self.batch_size = int(cfg.get("batch_size") or 32)

    def final_rows(self, plan: ShardPlan) -> np.ndarray:
        """The last block's resid_post over the plan, batched as extraction batches (the same bytes)."""
        from actstore.workers.shard_task import TaskOptions, forward_shard

        arrays, _ = forward_shard(self.runner, plan, TaskOptions("float32", self.batch_size, "inf", "none"))
        return arrays[self.final_hook]


def logit_lens(store: Any, hooks: list[str] | None = None, **more: Any) -> pa.Table:
    """Per residual hook: loss, top1_agreement, kl_to_final, entropy (see the module docstring); a pyarrow.Table.

    `store` is a Store, a URL or a LensJob; `more` takes LensJob fields (out, per_token, model, device,
    batch_rows, max_tokens, storage_options). Raises AnalysisError for encoders (post-LN: the lens does not
    apply) and HookNameError for a hook that is not a stored residual-stream hook.
    """
    if isinstance(store, LensJob):
        job, opened = store, _open(store)
    else:
        url = store if isinstance(store, str) else store.url
        job = LensJob.build({"store": url, "hooks": hooks or [], **more})
        opened = _open(job) if isinstance(store, str) else store
    hooks = check_lens_job(opened, job)
    model = _Model(opened, job)
    sums, ranks = _run(opened, job, hooks, model)
    table = _table(hooks, sums)
    if job.out:
        save(table, opened, job, ranks)
    return table


def _open(job: LensJob) -> Any:
    from actstore.pipeline.store.store import open_store

    return open_store(job.store, job.storage_options)


def _run(store: Any, job: LensJob, hooks: list[str], model: _Model) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray] | None]:
    """Sums per hook over every shard; with per_token, the rank per stored row (-1: no next token)."""
    from actstore.workers.lens import chunk_stats

    sums = {h: {"nll": 0.0, "kl": 0.0, "agree": 0.0, "entropy": 0.0, "n": 0.0} for h in hooks}
    ranks = {h: np.full(store.n_tokens, -1, np.int32) for h in hooks} if job.per_token else None
    for i, info in enumerate(store.manifest.shards):
        if job.max_tokens is not None and info.token_start >= job.max_tokens:
            break
        plan = _shard_plan(store, i, job.max_tokens)
        if not plan.sequences:
            continue
        final = model.final_rows(plan)
        rows = {h: store.read_rows(h, i, 0, plan.n_tokens) for h in hooks}
        ids = np.concatenate([s.ids for s in plan.sequences])
        has_next = np.ones(plan.n_tokens, bool)
        has_next[np.cumsum([len(s.ids) for s in plan.sequences]) - 1] = False
        pos = np.flatnonzero(has_next)
        for a in range(0, len(pos), job.batch_rows):
            sel = pos[a:a + job.batch_rows]
            out = chunk_stats(model.lens, final[sel], {h: rows[h][sel] for h in hooks}, ids[sel + 1])
            for h, (part, r) in out.items():
                for k, v in part.items():
                    sums[h][k] += v
                if ranks is not None:
                    ranks[h][info.token_start + sel] = r
    return sums, ranks


def _table(hooks: list[str], sums: dict[str, dict[str, float]]) -> pa.Table:
    rows = []
    for h in hooks:
        s, n = sums[h], max(sums[h]["n"], 1.0)
        rows.append({"hook": h, "layer": parse_hook(h).layer, "loss": s["nll"] / n, "top1_agreement": s["agree"] / n,
                     "kl_to_final": s["kl"] / n, "entropy": s["entropy"] / n, "n_tokens": int(s["n"])})
    return pa.Table.from_pylist(rows)


def save(table: pa.Table, store: Any, job: LensJob, ranks: dict[str, np.ndarray] | None) -> list[str]:
    """lens.json (rows + provenance) and, with ranks, lens-tokens.parquet (row-aligned with tokens())."""
    import pyarrow.parquet as pq

    from actstore.pipeline.analysis.results import Output, provenance

    out = Output(str(job.out), job.storage_options)
    written = [out.put_json(JSON_FILE, {"rows": table.to_pylist(), "provenance": provenance(store, job, "lens")})]
    if ranks is not None:
        cols = {f"rank/{h}": pa.array(r, type=pa.int32(), mask=r < 0) for h, r in ranks.items()}
        buf = io.BytesIO()
        pq.write_table(pa.table(cols), buf, compression="zstd")
        written.append(out.put_bytes(TOKENS_FILE, buf.getvalue()))
    return written
