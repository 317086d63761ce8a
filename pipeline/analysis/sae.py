"""`actstore.train_sae` / `train_transcoder`: train one SAE or transcoder from a store, as an `SAEJob`.

Training streams shuffled batches from the store (`Store.loader`, special tokens excluded, bounded memory)
over the first (1 - eval_fraction) of its rows, epoch after epoch until `training_tokens`; evaluation uses the
held-out last rows. With the model available (manifest model id, or `model=`) the reconstruction is spliced
into the forward pass for CE/KL scores. With an output (`out`, a folder or fsspec URL) the run writes a
SAELens-loadable directory plus `metrics.json` (written last: its presence marks the run complete) and
checkpoints under `<out>/checkpoints`, so a restarted job resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from actstore.pipeline.analysis.results import Output, provenance
from actstore.pipeline.store.loader import ActivationLoader
from actstore.schemas.errors import ConfigError, ModelLoadError
from actstore.schemas.jobs import SAEJob, TranscoderJob
from actstore.schemas.sae import SAEConfig, SAESettings, TrainConfig
from actstore.workers.families import MODEL_TYPES
from actstore.workers.sae.metrics import evaluate
from actstore.workers.sae.training import TrainResult, train

log = logging.getLogger("actstore")
METRICS_FILE = "metrics.json"
_STREAM_BATCH = 8192  # rows per loader batch; train() re-batches to TrainConfig.batch_size


def _open(store: Any, job: SAEJob | TranscoderJob) -> Any:
    if store is not None and not isinstance(store, str):
        return store
    from actstore.pipeline.store.store import open_store

    return open_store(store or job.store, job.storage_options)


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


def sae_config(store: Any, job: SAEJob | TranscoderJob) -> SAEConfig:
    """The job's SAE settings applied to the store's widths (checked: hooks exist, k fits the width)."""
    dims = [store.manifest.hook(h).d for h in job.hooks]
    return SAEConfig.of(job.sae, dims[0], dims[-1], transcoder=isinstance(job, TranscoderJob))


def fit(job: SAEJob | TranscoderJob, store: Any = None, progress: Any = None,
        stop: threading.Event | None = None) -> TrainResult:
    """Train, evaluate and (with `job.out`) save one SAE or transcoder; returns the TrainResult."""
    store = _open(store, job)
    check_eval_model(store, job)
    if isinstance(job, SAEJob):
        job = with_default_hook(store, job)
    if isinstance(job, SAEJob) and (len(job.hooks) != 1 or job.sweep):
        raise ConfigError("train_sae trains one hook without a sweep; run several hooks or a sweep with "
                          "`actstore train sae` or actstore.pipeline.analysis.sae_sweep.train_sweep(job)")
    scfg = sae_config(store, job)
    cut = split_row(store, job.eval_fraction)
    paired = isinstance(job, TranscoderJob)
    out = Output(job.out, job.storage_options) if job.out else None
    with _out_lease(out):
        batches = stream(store, job.hooks, _STREAM_BATCH, job.train.seed, (0, cut), job.buffer_rows, paired)
        res = train(batches, scfg, job.train, out.url_of("checkpoints") if out else None, progress, stop,
                    job.storage_options)
        res.hooks, res.provenance = list(job.hooks), provenance(store, job, "sae")
        _evaluate(store, job, res, cut)
        if out:
            save(res, out, store)
    return res


def with_default_hook(store: Any, job: SAEJob) -> SAEJob:
    """The job with `hooks` filled in from a one-hook store; a ConfigError naming the hooks when there are more."""
    if job.hooks:
        return job
    names = [h.name for h in store.manifest.hooks]
    if len(names) != 1:
        raise ConfigError(f"hooks: the store holds {len(names)} hooks ({', '.join(names)}); name the ones to train "
                          "on (--hook HOOK, repeatable, or hooks: in the YAML config)")
    return job.model_copy(update={"hooks": names})


def _out_lease(out: Output | None) -> Any:
    """One training job per output (a second one is refused while the first heartbeats)."""
    if out is None:
        return contextlib.nullcontext()
    from actstore.pipeline.extract.lease import Lease

    return Lease(out.fs, out.root, out.url, what="training job")


def _evaluate(store: Any, job: SAEJob | TranscoderJob, res: TrainResult, cut: int) -> None:
    hooks, paired = job.hooks, isinstance(job, TranscoderJob)
    held = ActivationLoader(store, hooks if paired else hooks[0], _STREAM_BATCH, shuffle=False, skip_special=True,
                            rows=(cut, store.n_tokens))
    batches = ((b[hooks[0]], b[hooks[1]]) for b in held) if paired else held
    res.metrics.update(evaluate(res.sae, batches))
    res.metrics["eval_tokens_from_row"] = cut
    _spliced_metrics(store, job, res, cut)


def check_eval_model(store: Any, job: Any) -> None:
    """A `model` given for CE/KL scores must be of the store's family and shape (type, layers, width), or the
    spliced scores would measure another network: refused in one line before training, from its config alone."""
    man = store.manifest
    if not job.model or job.n_eval_seqs <= 0 or man.model is None:
        return
    from actstore.workers.families import n_layers_of
    from actstore.workers.runner import load_config

    try:
        cfg = load_config(job.model, None)
    except ModelLoadError as e:  # given by the user for these scores: refused now, not found out after training
        raise ConfigError(f"model: {e}; give the store's model for CE/KL scores, or n_eval_seqs: 0 to skip "
                          "them") from None
    theirs = (getattr(cfg, "model_type", None), n_layers_of(cfg),
              getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None))
    ours = (man.model.model_type, man.model.n_layers, man.model.d_model)
    if any(a is not None and b is not None and a != b for a, b in zip(theirs, ours)):
        raise ConfigError(f"model: {job.model!r} is a {theirs[0]} of {theirs[1]} layers of width {theirs[2]}, but "
                          f"the store was extracted from {man.model.id!r} (a {ours[0]} of {ours[1]} layers of width "
                          f"{ours[2]}); give that model for CE/KL scores, or n_eval_seqs: 0 to skip them")


def eval_model(store: Any, job: Any, res: TrainResult, cut: int) -> tuple[Any, list[np.ndarray]] | None:
    """(causal LM, held-out token sequences) for CE/KL scores, or None with the reason in `res.metrics["ce_kl"]`
    (no model, an encoder, a model that does not load, or n_eval_seqs 0)."""
    man = store.manifest
    path = job.model or (man.model.id if man.model else None)
    if not path or job.n_eval_seqs <= 0:
        res.metrics["ce_kl"] = "skipped: no model in the manifest (pass model=...)"
        return None
    known = MODEL_TYPES.get(man.model.model_type or "") if man.model else None
    if known is not None and not known.causal and not job.model:
        res.metrics["ce_kl"] = f"skipped: {man.model.model_type} is not a causal LM"
        return None
    from actstore.pipeline.analysis.splice import load_causal_lm

    try:
        lm = load_causal_lm(path, man.model.revision if man.model else None)
    except (OSError, ValueError) as e:
        res.metrics["ce_kl"] = f"skipped: {str(e).splitlines()[0][:200]}"
        return None
    tok = store.tokens().slice(cut)
    seq, ids = tok.column("seq_id").to_numpy(), tok.column("token_id").to_numpy()
    return lm, [ids[seq == s] for s in np.unique(seq)[:job.n_eval_seqs]]


def _spliced_metrics(store: Any, job: SAEJob | TranscoderJob, res: TrainResult, cut: int) -> None:
    """CE/KL scores when a causal LM is available; otherwise record why not."""
    from actstore.pipeline.analysis.splice import splice_scores

    model = eval_model(store, job, res, cut)
    if model is None:
        return
    lm, seqs = model
    sae = res.sae.float().eval()

    def replace(t: Any) -> Any:
        return sae.decode(sae.encode(t.float()), t.float())

    transcoder_in = job.hooks[0] if isinstance(job, TranscoderJob) else None
    res.metrics.update(splice_scores(lm, seqs, job.hooks[-1], replace, transcoder_in=transcoder_in))


def save(res: TrainResult, out: Output, store: Any) -> None:
    """SAELens files and actstore.json, then metrics.json last (with provenance): its presence marks it done."""
    man = store.manifest
    model = getattr(man, "model", None)
    meta = {"model_name": model.id if model else None, "model_type": model.model_type if model else None,
            "n_layers": model.n_layers if model else None,
            "context_size": man.context_length, "sae_config": dataclasses.asdict(res.sae_cfg)}
    res.save(out.url, extra_metadata=meta, storage_options=out.storage_options)
    out.put_json(METRICS_FILE, {**res.metrics, "provenance": res.provenance, "hooks": res.hooks})


def job_of(kind: type[SAEJob] | type[TranscoderJob], store: Any, hooks: dict[str, Any], out_dir: str | None,
           settings: dict[str, Any], more: dict[str, Any]) -> SAEJob | TranscoderJob:
    """The job that the keyword form of train_sae / train_transcoder describes (unknown keywords refused)."""
    sae_fields, train_fields = set(SAESettings.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    job_fields = set(kind.model_fields) - {"sae", "train", "store", "out"}
    sae_kw = {k: v for k, v in {**settings, **more}.items() if k in sae_fields}
    train_kw = {k: v for k, v in {**settings, **more}.items() if k in train_fields}
    job_kw = {k: v for k, v in more.items() if k in job_fields}
    unknown = set(more) - sae_fields - train_fields - job_fields
    if unknown:
        raise ConfigError(f"unknown training option(s) {sorted(unknown)}; SAE options: {sorted(sae_fields)}; "
                          f"training options: {sorted(train_fields)}; job options: {sorted(job_fields)}")
    url = store if isinstance(store, str) else store.url
    return kind.build({"store": url, "out": out_dir, **hooks, "sae": sae_kw, "train": train_kw, **job_kw})


def train_sae(store: Any, hook: str | None = None, architecture: str = "topk", expansion: int = 8, k: int = 32,
              training_tokens: int = 2**24, seed: int = 0, out_dir: str | None = None, progress: Any = None,
              **more: Any) -> TrainResult:
    """Train an SAE on one hook of a store (a Store, a URL, or an `SAEJob` alone).

    `more` takes any `SAESettings` / `TrainConfig` / `SAEJob` field (batch_size, lr, aux_k, eval_fraction,
    model, n_eval_seqs, storage_options, ...). With `out_dir` (a folder or fsspec URL) the SAE is written in
    SAELens' format with its metrics and checkpoints; rerunning resumes from the last checkpoint.

    Returns a TrainResult: `.sae` (encode/decode, W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec),
    `.metrics` (fvu, ev_legacy, ev_zero_centred, l0, dead_fraction, ... on held-out tokens; CE/KL scores when
    the model is available), `.hooks`, `.provenance` and `.save(dir)` (SAELens format).
    Raises ConfigError (bad option, hook not in the store), StoreError, LeaseError (output in use).
    """
    if isinstance(store, SAEJob):
        return fit(store, progress=progress)
    settings = {"architecture": architecture, "expansion": expansion, "k": k, "training_tokens": training_tokens,
                "seed": seed}
    job = job_of(SAEJob, store, {"hooks": [hook] if hook else []}, out_dir, settings, more)
    return fit(job, store, progress)


def train_transcoder(store: Any, in_hook: str | None = None, out_hook: str | None = None,
                     architecture: str = "topk", expansion: int = 8, k: int = 32, training_tokens: int = 2**24,
                     seed: int = 0, out_dir: str | None = None, progress: Any = None, **more: Any) -> TrainResult:
    """Train a transcoder in_hook -> out_hook (e.g. hook_mlp_in -> hook_mlp_out); `skip=True` adds W_skip.

    Takes a Store or URL with keywords like `train_sae`, or a `TranscoderJob` alone; returns a TrainResult.
    """
    if isinstance(store, TranscoderJob):
        return fit(store, progress=progress)
    settings = {"architecture": architecture, "expansion": expansion, "k": k, "training_tokens": training_tokens,
                "seed": seed}
    job = job_of(TranscoderJob, store, {"in_hook": in_hook, "out_hook": out_hook}, out_dir, settings, more)
    return fit(job, store, progress)
