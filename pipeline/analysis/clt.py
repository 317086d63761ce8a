"""`actstore.train_clt` / `actstore train clt`: train a cross-layer transcoder (CLT) from a store, as a `CLTJob`.

The store must hold `blocks.{l}.hook_mlp_in` (or `hook_resid_mid`, the job's `in_kind`) and
`blocks.{l}.hook_mlp_out` for every layer the CLT covers; anything missing, a gap, or layers of different widths
is refused with one line before any work. Training streams shuffled rows of all 2 L hooks at once, read aligned
by token row (`ActivationLoader` with several hooks; memory about buffer_rows x 2 L x d_model floats), over the
first (1 - eval_fraction) of the rows, epoch after epoch until `training_tokens`; the held-out rows give the
metrics: FVU, L0 and dead fraction per layer and in total (`actstore.workers.sae.metrics.evaluate_layers`).
With a causal LM (the manifest's model, or `model=`), the replacement model (every layer's MLP output replaced by
the CLT's, all layers at once, each layer's features read from the replacement run's own MLP inputs) gives the
CE-loss and KL scores. With an output the run writes the CLT (`actstore.workers.sae.clt_io`), metrics.json last
and checkpoints under `<out>/checkpoints`, so a restarted job resumes. The whole job is one Dask task.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from actstore.pipeline.analysis.results import Output, check_writable, provenance
from actstore.pipeline.analysis.sae import (
    METRICS_FILE,
    _open,
    _out_lease,
    check_eval_model,
    eval_model,
    split_row,
)
from actstore.pipeline.store.loader import ActivationLoader
from actstore.schemas.errors import AnalysisError, ConfigError
from actstore.schemas.jobs import CLT_OUTPUT_KIND, CLTJob
from actstore.schemas.sae import CLTConfig, SAESettings, TrainConfig
from actstore.workers.sae.clt import CrossLayerTranscoder
from actstore.workers.sae.metrics import evaluate_layers
from actstore.workers.sae.training import TrainResult, train

_STREAM_BATCH = 4096  # rows per loader batch; train() re-batches to TrainConfig.batch_size


def clt_layers(store: Any, job: CLTJob) -> list[int]:
    """The layers the CLT covers, checked against the store: both hooks at every layer, one width."""
    layers = job.layers if job.layers is not None else _default_layers(store, job)
    hooks_in, hooks_out = job.hooks_for(layers)
    stored = set(store.hooks)
    missing = [h for pair in zip(hooks_in, hooks_out) for h in pair if h not in stored]
    if missing:
        raise ConfigError(f"a cross-layer transcoder over layers {layers[0]}..{layers[-1]} needs {job.in_kind} and "
                          f"{CLT_OUTPUT_KIND} at every layer; the store lacks {', '.join(missing[:6])}"
                          + (f" and {len(missing) - 6} more" if len(missing) > 6 else "") + _layers_hint(store, job))
    widths = {h: store.manifest.hook(h).d for h in hooks_in + hooks_out}
    if len(set(widths.values())) != 1:
        raise ConfigError(f"a cross-layer transcoder needs one width at every layer's input and output; the "
                          f"store's hooks have widths {sorted(set(widths.values()))}")
    return layers


def _layers_hint(store: Any, job: CLTJob) -> str:
    """The longest run of consecutive layers that holds both hooks, as a --layers suggestion ("" if none)."""
    stored = set(store.hooks)
    numbers = {int(m.group(1)) for h in stored if (m := re.match(r"blocks\.(\d+)\.", h))}
    both = sorted(n for n in numbers if {f"blocks.{n}.{job.in_kind}", f"blocks.{n}.{CLT_OUTPUT_KIND}"} <= stored)
    runs: list[list[int]] = []
    for layer in both:
        if runs and runs[-1][-1] == layer - 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    best = max(runs, key=len, default=None)
    return f"; both hooks are stored at layers {best[0]}..{best[-1]}: pass --layers \"{best}\"" if best else ""


def _default_layers(store: Any, job: CLTJob) -> list[int]:
    """0..n_layers-1 of the manifest's model, else every layer holding either hook (which must start at 0)."""
    model = store.manifest.model
    if model is not None and model.n_layers:
        return list(range(model.n_layers))
    pattern = re.compile(rf"blocks\.(\d+)\.({job.in_kind}|{CLT_OUTPUT_KIND})$")
    found = sorted({int(m.group(1)) for h in store.hooks if (m := pattern.match(h))})
    if not found:
        raise ConfigError(f"the store holds no blocks.{{l}}.{job.in_kind} / blocks.{{l}}.{CLT_OUTPUT_KIND} hooks: a "
                          "cross-layer transcoder needs both at every layer")
    return list(range(found[-1] + 1))


def clt_config(store: Any, job: CLTJob, layers: list[int]) -> CLTConfig:
    """The job's settings applied to the store's width and the number of layers (k, expansion checked)."""
    d = store.manifest.hook(job.hooks_for(layers)[0][0]).d
    return CLTConfig.of(job.sae, d, len(layers))


def check_clt_job(store: Any, job: CLTJob) -> tuple[list[int], CLTConfig]:
    """Every check that needs only the manifest, before any cluster starts or any row is read."""
    layers = clt_layers(store, job)
    cfg = clt_config(store, job, layers)
    check_eval_model(store, job)
    if job.out:
        check_writable(job.out, job.storage_options, "output")
    rows = int(store.n_tokens * (1 - job.eval_fraction))
    if rows < job.train.batch_size:
        raise AnalysisError(f"the store has {store.n_tokens:,} rows, {rows:,} for training after the "
                            f"{job.eval_fraction:.0%} held out: fewer than one batch of {job.train.batch_size:,}; "
                            "lower batch_size or extract more tokens")
    return layers, cfg


def stream(store: Any, hooks_in: list[str], hooks_out: list[str], batch_size: int, seed: int,
           rows: tuple[int, int], buffer_rows: int, shuffle: bool = True,
           epochs: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x_in, x_out) batches of flattened rows (n, L * d), every hook read for the same token rows; endless
    (a new permutation each epoch) unless `epochs` is False."""
    for epoch in itertools.count() if epochs else [0]:
        ld = ActivationLoader(store, hooks_in + hooks_out, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                              buffer_rows=buffer_rows, skip_special=True, rows=rows)
        for b in ld:
            yield torch.cat([b[h] for h in hooks_in], 1), torch.cat([b[h] for h in hooks_out], 1)


def fit(job: CLTJob, store: Any = None, progress: Any = None, stop: threading.Event | None = None) -> TrainResult:
    """Train, evaluate and (with `job.out`) save one cross-layer transcoder; returns the TrainResult (`.sae` is
    the CrossLayerTranscoder, `.hooks` the input hooks then the output hooks)."""
    store = _open(store, job)
    layers, cfg = check_clt_job(store, job)
    hooks_in, hooks_out = job.hooks_for(layers)
    cut = split_row(store, job.eval_fraction)
    out = Output(job.out, job.storage_options) if job.out else None
    with _out_lease(out):
        batches = stream(store, hooks_in, hooks_out, _STREAM_BATCH, job.train.seed, (0, cut), job.buffer_rows)
        res = train(batches, cfg, job.train, out.url_of("checkpoints") if out else None, progress, stop,
                    job.storage_options)
        res.hooks, res.provenance = hooks_in + hooks_out, provenance(store, job, "clt")
        held = stream(store, hooks_in, hooks_out, _STREAM_BATCH, 0, (cut, store.n_tokens), job.buffer_rows,
                      shuffle=False, epochs=False)
        res.metrics.update(evaluate_layers(res.sae, held))
        res.metrics.update({"eval_tokens_from_row": cut, "layers": layers})
        _spliced_metrics(store, job, res, cut, layers)
        if out:
            save(res, out, store)
    return res


def _spliced_metrics(store: Any, job: CLTJob, res: TrainResult, cut: int, layers: list[int]) -> None:
    """Replacement-model CE/KL scores when a causal LM is available; otherwise record why not."""
    model = eval_model(store, job, res, cut)
    if model is None:
        return
    lm, seqs = model
    hooks_in, hooks_out = job.hooks_for(layers)
    res.metrics.update(replacement_scores(lm, seqs, res.sae.float().eval(), hooks_in, hooks_out))


class ReplacementSplicer:
    """Per-layer replacement functions of a CLT for `splice_scores`: the call for layer j encodes that layer's
    (spliced-run) MLP input, keeps its features, and returns layer j's output from the features of layers 0..j.
    A forward pass reaches layer 0 first, which starts a new feature list."""

    def __init__(self, clt: CrossLayerTranscoder) -> None:
        self.clt = clt
        self.features: list[torch.Tensor] = []

    def layer(self, j: int) -> Any:
        def replace(x: torch.Tensor) -> torch.Tensor:
            if j == 0:
                self.features = []
            if len(self.features) != j:
                raise AnalysisError(f"replacement model: layer {j} ran before layers 0..{j - 1}")
            self.features.append(self.clt.encode_layer(j, x.float()))
            return self.clt.decode_layer(j, self.features)
        return replace


def replacement_scores(lm: Any, seqs: list[np.ndarray], clt: CrossLayerTranscoder, hooks_in: list[str],
                       hooks_out: list[str]) -> dict[str, float]:
    """CE-loss and KL scores of the replacement model: every layer's MLP output replaced by the CLT at once."""
    from actstore.pipeline.analysis.splice import splice_scores

    splicer = ReplacementSplicer(clt)
    fns = [splicer.layer(j) for j in range(len(hooks_out))]
    return splice_scores(lm, seqs, hooks_out, fns, transcoder_in=hooks_in)


def save(res: TrainResult, out: Output, store: Any) -> None:
    """The CLT files, then metrics.json last (with provenance): its presence marks the run complete."""
    man = store.manifest
    model = getattr(man, "model", None)
    meta = {"model_name": model.id if model else None, "model_type": model.model_type if model else None,
            "n_layers": model.n_layers if model else None, "context_size": man.context_length,
            "layers": res.metrics.get("layers")}
    res.save(out.url, extra_metadata=meta, storage_options=out.storage_options)
    out.put_json(METRICS_FILE, {**res.metrics, "provenance": res.provenance, "hooks": res.hooks})


def job_of(store: Any, out_dir: str | None, settings: dict[str, Any], more: dict[str, Any]) -> CLTJob:
    """The CLTJob that the keyword form of train_clt describes (unknown keywords refused)."""
    sae_fields, train_fields = set(SAESettings.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    job_fields = set(CLTJob.model_fields) - {"sae", "train", "store", "out"}
    merged = {**settings, **more}
    unknown = set(more) - sae_fields - train_fields - job_fields
    if unknown:
        raise ConfigError(f"unknown training option(s) {sorted(unknown)}; SAE options: {sorted(sae_fields)}; "
                          f"training options: {sorted(train_fields)}; job options: {sorted(job_fields)}")
    url = store if isinstance(store, str) else store.url
    return CLTJob.build({"store": url, "out": out_dir, "sae": {k: v for k, v in merged.items() if k in sae_fields},
                         "train": {k: v for k, v in merged.items() if k in train_fields},
                         **{k: v for k, v in more.items() if k in job_fields}})


def train_clt(store: Any, layers: list[int] | None = None, architecture: str = "topk", expansion: int = 8,
              k: int = 32, training_tokens: int = 2**24, seed: int = 0, out_dir: str | None = None,
              progress: Any = None, **more: Any) -> TrainResult:
    """Train a cross-layer transcoder over `layers` of a store (a Store, a URL, or a `CLTJob` alone).

    `more` takes any `SAESettings` / `TrainConfig` / `CLTJob` field (in_kind, batch_size, lr, eval_fraction,
    model, n_eval_seqs, storage_options, ...); `k` counts one layer's active features. With `out_dir` (a folder
    or fsspec URL) the CLT is written with its metrics and checkpoints; rerunning resumes. Runs in this process;
    `actstore train clt` runs the same job as a Dask task.

    Returns a TrainResult: `.sae` (the CrossLayerTranscoder: encode, decode, encode_layer, decode_layer, W_enc
    (L, d, d_sae), W_dec[l] (d_sae, L - l, d)), `.metrics` (fvu, fvu_per_layer, l0, l0_per_layer,
    dead_fraction, layers (per-layer metric dicts); CE/KL scores of the replacement model when the model is
    available), `.hooks`, `.provenance`, `.save(dir)`.
    Raises ConfigError (bad option, hooks missing at some layer, widths differ), StoreError, LeaseError."""
    if isinstance(store, CLTJob):
        return fit(store, progress=progress)
    settings = {"architecture": architecture, "expansion": expansion, "k": k, "training_tokens": training_tokens,
                "seed": seed}
    job = job_of(store, out_dir, settings, {**more, **({"layers": layers} if layers is not None else {})})
    return fit(job, store, progress)


# ---------------------------------------------------------------------------------------------- Dask job
SUMMARY_KEYS = ("fvu", "fvu_per_layer", "l0", "dead_fraction", "ce_loss_score", "kl_score")


def _task(job_data: dict[str, Any]) -> dict[str, Any]:
    from actstore.pipeline.analysis.dask_client import task_threads
    from actstore.pipeline.analysis.sae_sweep import STOP, printer

    job = CLTJob.model_validate(job_data)
    out = Output(job.out, job.storage_options) if job.out else None
    if out is not None and out.exists(METRICS_FILE):
        return _summary(job, out.read_json(METRICS_FILE), resumed="already finished")
    task_threads(job.train.threads)
    t0 = time.time()
    res = fit(job, progress=printer("clt"), stop=STOP)
    return _summary(job, res.metrics, seconds=time.time() - t0)


def _summary(job: CLTJob, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"out_dir": job.out, "layers": metrics.get("layers"),
            **{k: metrics.get(k) for k in SUMMARY_KEYS if k in metrics}, **extra}


def run_clt_job(job: CLTJob) -> dict[str, Any]:
    """Check the job against the store, then train it as one task on the job's Dask cluster; returns a summary."""
    from dask.distributed import wait

    from actstore.pipeline.analysis.dask_client import dask_client
    from actstore.pipeline.analysis.jobs import open_job_store
    from actstore.pipeline.analysis.sae_sweep import STOP, _stop

    if not job.out:
        raise ConfigError("out: give an output folder or URL (--out DIR, or out: in the YAML config)")
    check_clt_job(open_job_store(job), job)
    with dask_client(job.scheduler) as client:
        future = client.submit(_task, job.model_dump(), pure=False, key=f"train-clt-{job.out}")
        STOP.clear()
        try:
            wait([future])
        except KeyboardInterrupt:  # the task checkpoints and stops; a rerun resumes
            _stop(client, [future])
            raise
        return client.gather(future)

