"""Run an analysis job end to end: check its inputs, start (or join) the Dask cluster, run, write results.

Every check that needs only the store's manifest and docs (hooks exist, labels usable, enough rows, output
writable) runs before the cluster starts, so a mistake costs a second and prints one line, never a Dask
traceback. Results go to the job's output (any fsspec URL) with their provenance.
"""

from __future__ import annotations

import logging
from typing import Any

from actstore.pipeline.analysis.dask_client import dask_client
from actstore.pipeline.analysis.results import Output, check_writable
from actstore.schemas.errors import AnalysisError, ConfigError, OutputError
from actstore.schemas.jobs import FeaturesJob, Job, ProbeJob, ReportJob, SAEJob, SpectrumJob, TranscoderJob
from actstore.workers import storage

log = logging.getLogger("actstore")
SPECTRUM_KEYS = ("basis", "null", "n_samples", "d", "n_outliers", "n_outliers_mp", "n_outliers_permutation",
                 "sigma2", "lambda_plus", "ks", "spectral_entropy", "effective_rank", "participation_ratio", "alpha")


def open_job_store(job: Job) -> Any:
    from actstore.pipeline.store.store import open_store

    return open_store(job.store, job.storage_options)


def check_hooks(store: Any, hooks: list[str]) -> None:
    for h in hooks:
        store.manifest.hook(h)  # HookNameError listing the store's hooks


def check_sae_job(store: Any, job: SAEJob | TranscoderJob) -> None:
    """Hooks, widths, output and the number of passes over the store, before any cluster starts."""
    from actstore.pipeline.analysis.sae import check_eval_model, sae_config
    from actstore.pipeline.analysis.sae_sweep import point_jobs

    if not job.out:
        raise ConfigError("out: give an output folder or URL (--out DIR, or out: in the YAML config)")
    check_hooks(store, job.hooks)
    check_eval_model(store, job)
    check_writable(job.out, job.storage_options, "output")
    for _, point in point_jobs(job):
        sae_config(store, point)  # k, expansion and widths fit
    rows = int(store.n_tokens * (1 - job.eval_fraction))
    if rows < job.train.batch_size:
        raise AnalysisError(f"the store has {store.n_tokens:,} rows, {rows:,} for training after the "
                            f"{job.eval_fraction:.0%} held out: fewer than one batch of {job.train.batch_size:,}; "
                            "lower batch_size or extract more tokens")
    passes = job.train.training_tokens / rows
    if passes > 1:
        log.warning("training_tokens=%s is %.1fx the store's %s training rows: each SAE will loop over the "
                    "store %d times (each pass in a new order)", f"{job.train.training_tokens:,}", passes,
                    f"{rows:,}", int(-(-job.train.training_tokens // rows)))


def run_sae_job(job: SAEJob | TranscoderJob) -> list[dict[str, Any]]:
    """Train every (hook, sweep point) of the job; returns one summary row per task."""
    from actstore.pipeline.analysis.sae import with_default_hook
    from actstore.pipeline.analysis.sae_sweep import train_sweep

    store = open_job_store(job)
    if isinstance(job, SAEJob):
        job = with_default_hook(store, job)
    check_sae_job(store, job)
    with dask_client(job.scheduler):
        return train_sweep(job)


def run_probe_job(job: ProbeJob) -> Any:
    """Probe every hook; writes probes-<label>.json, the plot and the weights when the job has an output."""
    from actstore.pipeline.analysis.probes import check_labels, probe_sweep

    store = open_job_store(job)
    check_hooks(store, job.hooks)
    check_labels(store, job)
    if job.features and job.features.startswith("sae:"):
        from actstore.pipeline.analysis.features import feature_store_for

        feature_store_for(store, job.features, job.storage_options)
    elif job.features:
        from actstore.pipeline.analysis.probe_inputs import check_inputs

        check_inputs(store, job)
    if job.out:
        check_writable(job.out, job.storage_options, "output")
    with dask_client(job.scheduler):
        sweep = probe_sweep(job)
    if job.out:
        sweep.save(job.out, storage_options=job.storage_options)
        sweep.plot(job.out, storage_options=job.storage_options)
    return sweep


def run_spectrum_job(job: SpectrumJob) -> list[dict[str, Any]]:
    """Spectrum of every hook; writes spectrum-<hook>.json (with provenance) when the job has an output."""
    from actstore.pipeline.analysis.spectra import save_spectrum, spectrum

    store = open_job_store(job)
    hooks = job.hooks or store.hooks
    check_hooks(store, hooks)
    if store.n_tokens < 2:
        raise AnalysisError(f"store {job.store!r} has {store.n_tokens} rows; a spectrum needs at least 2")
    out = Output(job.out, job.storage_options) if job.out else None
    if job.out:
        check_writable(job.out, job.storage_options, "output")
    rows = []
    with dask_client(job.scheduler):
        for h in hooks:
            res = spectrum(store, h, **spectrum_options(job))
            if out is not None:
                save_spectrum(res, out.url_of(f"spectrum-{h}.json"), h, store, job, job.storage_options)
            rows.append({"hook": h, **{k: res.metrics[k] for k in SPECTRUM_KEYS if k in res.metrics}})
    return rows


def spectrum_options(job: SpectrumJob) -> dict[str, Any]:
    """The keyword arguments of `spectrum()` that a SpectrumJob sets."""
    skip = set(Job.model_fields) | {"hooks", "out"}
    return {k: v for k, v in job.model_dump().items() if k not in skip}


def run_report_job(job: ReportJob) -> str:
    """Write the HTML report; returns where."""
    from actstore.pipeline.analysis.report import write_report

    store = open_job_store(job)
    check_hooks(store, job.hooks)
    if job.label is not None and job.label not in store.docs().column_names:
        raise ConfigError(f"label {job.label!r} is not a document field of this store "
                          f"(fields: {', '.join(store.docs().column_names)})")
    folder, _, name = job.out.rstrip("/").rpartition("/")
    check_writable(folder or ".", job.storage_options, "the report's folder")
    fs, path = storage.get_fs(job.out, job.storage_options)
    if fs.isdir(path):
        raise OutputError(f"-o {job.out!r} is a folder; give the report's file name, e.g. {job.out}/report.html")
    with dask_client(job.scheduler):
        return str(write_report(store, job.out, results_dir=job.results, spectra_hooks=job.hooks or None,
                                storage_options=job.storage_options, label=job.label))


def run_features_job(job: FeaturesJob) -> Any:
    """Per-latent statistics and top contexts of a feature store, written to `out` (default: its summary/)."""
    from actstore.pipeline.analysis.feature_stats import check_features_job, default_out, features

    fstore = check_features_job(job)
    return features(fstore, **{**job.model_dump(exclude={"store", "scheduler"}), "out": job.out or default_out(fstore)})
