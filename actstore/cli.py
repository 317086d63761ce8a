"""`actstore` command line: extract, inspect, verify, demo (and the analysis verbs as they land).

Every failure prints one line `actstore: error: <cause>` on stderr and exits non-zero; `--json` prints
machine-readable output on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_ERROR, EXIT_DAMAGED = 2, 1


def _extract(args: argparse.Namespace) -> int:
    from actstore.pipeline.extract import extract

    if args.help_config:
        print(config_help())
        return 0
    if args.config is None:
        raise SystemExit("actstore extract: give a YAML config (actstore extract --help-config lists its keys)")
    store = extract(args.config, overrides=args.set)
    _print({"url": store.url, "n_tokens": store.n_tokens, "hooks": store.hooks,
            "shards": len(store.manifest.shards)} if args.json else f"wrote {store!r}", args.json)
    return 0


def config_help() -> str:
    """Every ExtractConfig key (and nested key) with its type, default and docstring, as the README shows them."""
    from actstore.schemas.config import ExtractConfig, TokenOutputs

    lines = []
    for model, prefix in ((ExtractConfig, ""), (TokenOutputs, "token_outputs.")):
        for name, f in model.model_fields.items():
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            ann = f.annotation
            kind = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "").replace(
                "actstore.schemas.config.", "")
            lines.append(f"{prefix}{name}: {kind} ({default})")
            lines += [f"    {line.strip()}" for line in (f.description or "").splitlines()]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from actstore.pipeline.store import open_store

    store = open_store(args.url, _storage_options(args))
    man = store.manifest
    if args.json:
        _print(json.loads(man.to_json()) if args.full else _summary(store), True)
        return 0
    print(_inspect_text(store))
    return 0


def _summary(store: Any) -> dict:
    man = store.manifest
    return {
        "url": store.url, "model": man.model.model_dump() if man.model else None, "n_tokens": man.n_tokens,
        "n_sequences": man.n_sequences, "n_docs": man.n_docs, "shards": len(man.shards),
        "context_length": man.context_length, "packing": man.packing,
        "hooks": [{"name": h.name, "shape": [man.n_tokens, h.d], "dtype": h.dtype} for h in man.hooks],
        "stats": man.stats,
    }


def _inspect_text(store: Any) -> str:
    man = store.manifest
    model = f"{man.model.id} ({man.model.model_type}, {man.model.n_layers} layers)" if man.model else "(imported)"
    lines = [f"store      {store.url}", f"model      {model}",
             f"tokens     {man.n_tokens:,} in {man.n_sequences:,} sequences from {man.n_docs:,} documents, "
             f"{len(man.shards)} shards", f"context    {man.context_length} (packing={man.packing})", "hooks"]
    for h in man.hooks:
        st = man.stats.get(h.name, {})
        lines.append(f"  {h.name:34s} ({man.n_tokens}, {h.d}) {h.dtype:8s} mean|x|={_f(st.get('mean_norm'))} "
                     f"p99|x|={_f(st.get('norm_p99'))} max|x_i|={_f(st.get('max_abs'))} "
                     f"zero={_f(st.get('zero_fraction'))} massive={st.get('n_massive', '-')}")
    if store.has_token_outputs:
        import math

        import pyarrow.compute as pc

        outs = store.token_outputs()
        loss = outs.column("loss")
        mean = pc.mean(loss).as_py()
        lines.append(f"outputs    next-token loss {_f(mean)} (perplexity {_f(math.exp(mean))}) over "
                     f"{len(loss) - loss.null_count:,} predictions; columns {outs.column_names}")
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _verify(args: argparse.Namespace) -> int:
    from actstore.pipeline.store import open_store

    report = open_store(args.url, _storage_options(args)).verify()
    if args.json:
        _print(report.to_dict(), True)
    else:
        print(f"{'OK' if report.ok else 'DAMAGED'}: {report.shards_checked} shards, {report.arrays_checked} arrays, "
              f"{report.bytes_read / 1e6:.1f} MB read")
        for p in report.problems:
            print(f"  {p}")
    return 0 if report.ok else EXIT_DAMAGED


def _spectra(args: argparse.Namespace) -> int:
    from actstore.pipeline.dask_jobs import dask_client
    from actstore.pipeline.spectra import save_spectrum, spectrum
    from actstore.pipeline.store import open_store

    store = open_store(args.url, _storage_options(args))
    hooks = args.hook or store.hooks
    rows = []
    with dask_client(args.scheduler):
        for h in hooks:
            res = spectrum(store, h, exclude_special=not args.include_special, tw_margin=args.tw_margin,
                           precision=args.precision)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                save_spectrum(res, os.path.join(args.out, f"spectrum-{h}.json"), h)
            rows.append({"hook": h, **{k: res.metrics[k] for k in SPECTRUM_KEYS}})
    if args.json:
        _print(rows, True)
    else:
        for r in rows:
            print(" ".join(f"{k}={_f(v) if isinstance(v, float) else v}" for k, v in r.items()))
    return 0


SPECTRUM_KEYS = ("n_samples", "d", "sigma2", "lambda_plus", "n_outliers", "ks", "spectral_entropy",
                 "effective_rank", "participation_ratio", "alpha")


def _train_probe(args: argparse.Namespace) -> int:
    from actstore.pipeline.dask_jobs import dask_client
    from actstore.pipeline.probes import probe_sweep
    from actstore.pipeline.store import open_store

    store = open_store(args.store, _storage_options(args))
    with dask_client(args.scheduler):
        sweep = probe_sweep(store, args.label, args.hook or None, args.pooling, args.kind, args.seed)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        sweep.save(os.path.join(args.out, f"probes-{args.label}.json"))
        sweep.plot(os.path.join(args.out, f"probes-{args.label}.png"))
    _print(sweep.table if args.json else "\n".join(
        f"{r['hook']:34s} auroc={r['auroc']:.4f} acc={r['accuracy']:.4f} f1={r['f1']:.4f} "
        f"r@1%fpr={r['recall_at_1pct_fpr']:.3f} r@5%fpr={r['recall_at_5pct_fpr']:.3f}" for r in sweep.table), args.json)
    return 0


def _report(args: argparse.Namespace) -> int:
    from actstore.pipeline.dask_jobs import dask_client
    from actstore.pipeline.report import write_report
    from actstore.pipeline.store import open_store

    store = open_store(args.url, _storage_options(args))
    with dask_client(args.scheduler):
        path = write_report(store, args.out, results_dir=args.results, spectra_hooks=args.hook or None)
    _print({"report": str(path)} if args.json else f"wrote {path}", args.json)
    return 0


def _export(args: argparse.Namespace) -> int:
    from actstore.pipeline.export import export_slice, parse_rows
    from actstore.pipeline.store import open_store

    store = open_store(args.url, _storage_options(args))
    info = export_slice(store, args.hook, parse_rows(args.rows, store.n_tokens), args.format, args.out)
    _print(info if args.json else (
        f"wrote {info['path']}: rows {info['rows'][0]}:{info['rows'][1]} of {info['hook']} "
        f"({info['shape'][0]} x {info['shape'][1]} {info['dtype']}, {info['bytes'] / 1e6:.1f} MB)"), args.json)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from actstore.pipeline.planner import format_plan, plan

    res = plan(args.config, gpus=args.gpus, calibrate=not args.no_calibrate, overrides=args.set)
    _print(res if args.json else format_plan(res), args.json)
    if not res["ok"]:
        print(f"actstore: error: {res['reason']}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _demo(args: argparse.Namespace) -> int:
    from actstore.pipeline.demo import run_demo

    run_demo(args.out, quick=args.quick, executor=args.executor)
    return 0


def _storage_options(args: argparse.Namespace) -> dict | None:
    return json.loads(args.storage_options) if getattr(args, "storage_options", None) else None


def _print(obj: Any, as_json: bool) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else obj)


def _add_train_sae(tsub: Any) -> None:
    """`train sae` and `train transcoder`: one Dask task per (hook, sweep point)."""
    for what, text in (("sae", "train sparse autoencoders on hooks"),
                       ("transcoder", "train transcoders from --in-hook to --out-hook")):
        c = tsub.add_parser(what, help=text)
        c.add_argument("--store", required=True, help="store path or URL")
        if what == "sae":
            c.add_argument("--hook", action="append", required=True, help="hook (repeatable: one task each)")
        else:
            c.add_argument("--in-hook", required=True, help="input hook, e.g. blocks.2.hook_mlp_in")
            c.add_argument("--out-hook", required=True, help="output hook, e.g. blocks.2.hook_mlp_out")
            c.add_argument("--skip", action="store_true", help="add a linear skip path (skip transcoder)")
        c.add_argument("--architecture", choices=["topk", "batchtopk", "relu", "jumprelu"], default="topk")
        c.add_argument("--expansion", type=int, default=8)
        c.add_argument("--k", type=int, default=32)
        c.add_argument("--training-tokens", type=int, default=2**24)
        c.add_argument("--batch-size", type=int, default=4096)
        c.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2", help="grid over options, e.g. k=32,64 expansion=8,16")
        c.add_argument("--out", required=True, help="directory: one SAELens-format subdirectory per task")
        c.add_argument("--model", help="causal LM path for CE/KL scores (default: the manifest's model)")
        c.add_argument("--threads", type=int, help="torch threads per task (default: all cores)")
        c.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
        c.add_argument("--storage-options", help="fsspec options as JSON")
        c.add_argument("--json", action="store_true", help="print JSON")
        c.set_defaults(fn=_train_sae)


def _train_sae(args: argparse.Namespace) -> int:
    from actstore.pipeline.dask_jobs import dask_client
    from actstore.pipeline.store import open_store
    from actstore.pipeline.train_jobs import parse_sweep, train_sweep

    store = open_store(args.store, _storage_options(args))
    base = {"architecture": args.architecture, "expansion": args.expansion, "k": args.k, "seed": args.seed,
            "training_tokens": args.training_tokens, "batch_size": args.batch_size,
            "checkpoint_every": args.checkpoint_every}
    if args.model:
        base["model"] = args.model
    if args.what == "transcoder":
        hook_sets, base["skip"] = [[args.in_hook, args.out_hook]], args.skip
    else:
        hook_sets = [[h] for h in args.hook]
    grid = [{**base, **point} for point in parse_sweep(args.sweep)]
    with dask_client(args.scheduler):
        rows = train_sweep(store, args.what, hook_sets, grid, args.out, args.threads)
    _print(rows if args.json else "\n".join(
        f"{r['out_dir']}: fvu={_f(r.get('fvu'))} l0={_f(r.get('l0'))} dead={_f(r.get('dead_fraction'))}"
        for r in rows), args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actstore", description="Transformer activation datasets and their analyses.")
    p.add_argument("--version", action="version", version=f"actstore {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_verb in (_add_extract, _add_readers, _add_spectra, _add_train, _add_report, _add_export, _add_plan, _add_demo):
        add_verb(sub.add_parser)
    return p


def _add_extract(add: Callable[..., argparse.ArgumentParser]) -> None:
    e = add("extract", help="extract activations described by a YAML config into a store")
    e.add_argument("config", nargs="?", help="YAML config (keys: --help-config)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    e.add_argument("--json", action="store_true", help="print a JSON summary")
    e.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    e.set_defaults(fn=_extract)


def _add_readers(add: Callable[..., argparse.ArgumentParser]) -> None:
    for name, fn, text in (("inspect", _inspect, "show model, hooks, shapes, dtypes, token counts and statistics"),
                           ("verify", _verify, "re-read every shard and check it against the manifest (exit 1 on damage)")):
        c = add(name, help=text)
        c.add_argument("url", help="store path or URL (file://, memory://, s3://)")
        c.add_argument("--storage-options", help="fsspec options as JSON (e.g. endpoint_url)")
        c.add_argument("--json", action="store_true", help="print JSON")
        if name == "inspect":
            c.add_argument("--full", action="store_true", help="with --json: the whole manifest")
        c.set_defaults(fn=fn)


def _add_spectra(add: Callable[..., argparse.ArgumentParser]) -> None:
    s = add("spectra", help="covariance spectra (Marchenko-Pastur fit, outliers, entropy, rank) as a Dask job")
    s.add_argument("url", help="store path or URL")
    s.add_argument("--hook", action="append", help="hook to analyse (repeatable; default: all)")
    s.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    s.add_argument("--out", help="directory for spectrum-<hook>.json (eigenvalues, outliers, metrics)")
    s.add_argument("--tw-margin", type=float, default=4.0, help="outlier margin in Tracy-Widom scales")
    s.add_argument("--include-special", action="store_true", help="keep BOS/CLS/SEP tokens")
    s.add_argument("--precision", choices=("float64", "float32"), default="float64",
                   help="per-block products: float64 (eigenvalues to ~1e-13) or float32 (faster; ~1e-5 per "
                        "eigenvalue, ~4e-8 of the largest)")
    s.add_argument("--storage-options", help="fsspec options as JSON")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_spectra)


def _add_train(add: Callable[..., argparse.ArgumentParser]) -> None:
    t = add("train", help="train probes (and SAEs/transcoders) from a store as Dask jobs")
    tsub = t.add_subparsers(dest="what", required=True, metavar="WHAT")
    tp = tsub.add_parser("probe", help="probe a document label on every hook (one Dask task per hook)")
    tp.add_argument("--store", required=True, help="store path or URL")
    tp.add_argument("--label", required=True, help="document field holding the label (docs.parquet column)")
    tp.add_argument("--hook", action="append", help="hook (repeatable; default: every stored hook)")
    tp.add_argument("--pooling", choices=["mean", "last", "max"], default="mean")
    tp.add_argument("--kind", choices=["logistic", "mlp"], default="logistic")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--out", help="directory for probes-<label>.json and the AUROC-by-layer plot")
    tp.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    tp.add_argument("--storage-options", help="fsspec options as JSON")
    tp.add_argument("--json", action="store_true", help="print JSON")
    tp.set_defaults(fn=_train_probe)
    _add_train_sae(tsub)


def _add_report(add: Callable[..., argparse.ArgumentParser]) -> None:
    r = add("report", help="self-contained HTML report: summary, spectra with MP fits, layer curves, SAE/probe results")
    r.add_argument("url", help="store path or URL")
    r.add_argument("-o", "--out", default="report.html", help="output HTML file")
    r.add_argument("--results", help="directory with SAE/probe/spectra results (default: the store's parent)")
    r.add_argument("--hook", action="append", help="hook to plot a spectrum for (repeatable; default: up to 8)")
    r.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    r.add_argument("--storage-options", help="fsspec options as JSON")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(fn=_report)


def _add_export(add: Callable[..., argparse.ArgumentParser]) -> None:
    x = add("export", help="write a row slice of one hook to .npy, .safetensors or Parquet")
    x.add_argument("url", help="store path or URL")
    x.add_argument("--hook", required=True, help="hook to export")
    x.add_argument("--rows", default=":", metavar="A:B",
                   help="global rows A:B, Python slice rules (default: all; negative start: --rows=-100:)")
    x.add_argument("--format", choices=["npy", "safetensors", "parquet"], default="npy")
    x.add_argument("-o", "--out", required=True, help="output file")
    x.add_argument("--storage-options", help="fsspec options as JSON")
    x.add_argument("--json", action="store_true", help="print JSON")
    x.set_defaults(fn=_export)


def _add_plan(add: Callable[..., argparse.ArgumentParser]) -> None:
    pl = add("plan", help="estimate tokens, bytes, shards, object-store rates, wall time and disk before extracting")
    pl.add_argument("config", help="YAML config (the same file `extract` takes)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pl.add_argument("--gpus", type=int, help="GPUs (one model worker each) the run will use; scales the measured tokens/s")
    pl.add_argument("--no-calibrate", action="store_true", help="skip the timed calibration forward (no wall time)")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(fn=_plan)


def _add_demo(add: Callable[..., argparse.ArgumentParser]) -> None:
    d = add("demo", help="offline end-to-end demo on MiniLM-L6 and the stdlib pydoc corpus")
    d.add_argument("--out", default="demo-output", help="output directory")
    d.add_argument("--quick", action="store_true", help="smaller corpus")
    d.add_argument("--executor", choices=["ray", "local"], default="ray", help="extraction executor")
    d.set_defaults(fn=_demo)


def _version() -> str:
    from actstore import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("actstore: interrupted (committed shards are kept; rerun to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # every failure becomes one line; -v re-raises for the traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, (ValueError, OSError, RuntimeError, KeyError)):
            msg = f"{type(e).__name__}: {msg}"
        print(f"actstore: error: {msg}", file=sys.stderr)
        if args.verbose:
            raise
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
