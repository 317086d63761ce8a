"""`actstore` command line: extract, inspect, verify, label, demo (and the analysis verbs as they land).

Every failure prints one line `actstore: error: <cause>` on stderr and exits non-zero; `--json` prints
machine-readable output on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

EXIT_ERROR, EXIT_DAMAGED, EXIT_INTERRUPTED = 2, 1, 130


def _extract(args: argparse.Namespace) -> int:
    from actstore.pipeline.extract.run import extract
    from actstore.schemas.config import ExtractConfig

    if args.help_config:
        print(config_help())
        return 0
    if args.config is None:
        raise SystemExit("actstore extract: give a YAML config (actstore extract --help-config lists its keys)")
    cfg = ExtractConfig.build(args.config, args.set + (["overwrite=true"] if args.overwrite else []))
    try:
        store = extract(cfg)
    except KeyboardInterrupt:
        store = _committed(cfg)  # Ctrl-C after the manifest was committed: the store is complete
        if store is None:
            raise
    _print({"url": store.url, "n_tokens": store.n_tokens, "hooks": store.hooks,
            "shards": len(store.manifest.shards)} if args.json else f"wrote {store!r}", args.json)
    return 0


def _committed(cfg: Any) -> Any:
    """The store at the config's output if its manifest is this config's, else None."""
    from actstore.pipeline.store.store import open_store

    try:
        store = open_store(cfg.output, cfg.storage_options)
    except Exception:
        return None
    return store if store.manifest.config_hash == cfg.config_hash() else None


def config_help() -> str:
    """Every ExtractConfig key (and nested key) with its type, default and docstring, as the README shows them."""
    from actstore.schemas.config import ExtractConfig, TokenOutputs
    from actstore.schemas.generate import GenerateSettings

    lines = []
    for model, prefix in ((ExtractConfig, ""), (TokenOutputs, "token_outputs."), (GenerateSettings, "generate.")):
        for name, f in model.model_fields.items():
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            ann = f.annotation
            kind = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "").replace(
                "actstore.schemas.config.", "").replace("actstore.schemas.generate.", "")
            lines.append(f"{prefix}{name}: {kind} ({default})")
            lines += [f"    {line.strip()}" for line in (f.description or "").splitlines()]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from actstore.pipeline.store.store import open_store

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
    from actstore.pipeline.store.store import open_store

    report = open_store(args.url, _storage_options(args)).verify()
    if args.json:
        _print(report.to_dict(), True)
    else:
        print(f"{'OK' if report.ok else 'DAMAGED'}: {report.shards_checked} shards, {report.arrays_checked} arrays, "
              f"{report.bytes_read / 1e6:.1f} MB read")
        for p in report.problems:
            print(f"  {p}")
    return 0 if report.ok else EXIT_DAMAGED


def _label(args: argparse.Namespace) -> int:
    from actstore.pipeline.extract.labels import label

    info = label(args.url, args.spans, args.name, overwrite=args.overwrite, storage_options=_storage_options(args))
    _print(info.model_dump() if args.json else f"wrote labels/{info.name}.parquet: {info.n_labelled} of "
           f"{info.n_rows} token rows labelled", args.json)
    return 0


def _job(args: argparse.Namespace, job_cls: Any, skip: tuple[str, ...] = ()) -> Any:
    """The job a verb describes: its YAML config (if given), then --set overrides, then the flags given."""
    from actstore.cli_options import job_fields

    fields = job_fields(args, job_cls, skip)
    if getattr(args, "url", None):
        fields["store"] = args.url
    if "store" in job_cls.model_fields and "store" not in fields:
        _check_config_path(args.config)
    return job_cls.build(args.config, args.set, **fields)


def _check_config_path(config: str | None) -> None:
    """A missing config file that is a store (or a store URL) was meant as --store: say so."""
    from pathlib import Path

    from actstore.schemas.errors import ConfigError
    from actstore.schemas.layout import MANIFEST

    if config is None or Path(config).is_file():
        return
    if Path(config, MANIFEST).is_file() or not config.lower().endswith((".yaml", ".yml")):
        raise ConfigError(f"config file {config!r} does not exist; the positional argument is a YAML config: to "
                          f"read the store at {config!r}, pass --store {config}")


def _train_sae(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.jobs import run_sae_job
    from actstore.schemas.jobs import SAEJob, TranscoderJob

    job = _job(args, SAEJob if args.what == "sae" else TranscoderJob)
    rows = run_sae_job(job)
    _print(rows if args.json else "\n".join(
        f"{r['out_dir']}: fvu={_f(r.get('fvu'))} l0={_f(r.get('l0'))} dead={_f(r.get('dead_fraction'))}"
        + (f" ({r['resumed']})" if r.get("resumed") else "") for r in rows), args.json)
    return 0


def _train_clt(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.clt import run_clt_job
    from actstore.schemas.jobs import CLTJob

    row = run_clt_job(_job(args, CLTJob))
    per_layer = " ".join(_f(v) for v in row.get("fvu_per_layer") or [])
    _print(row if args.json else f"{row['out_dir']}: layers {row['layers'][0]}..{row['layers'][-1]} "
           f"fvu={_f(row.get('fvu'))} (per layer: {per_layer}) l0={_f(row.get('l0'))} "
           f"dead={_f(row.get('dead_fraction'))}" + (f" ce_loss_score={_f(row['ce_loss_score'])} "
                                                      f"kl_score={_f(row.get('kl_score'))}" if "ce_loss_score" in row
                                                      else "") + (f" ({row['resumed']})" if row.get("resumed") else ""),
           args.json)
    return 0


def _train_probe(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.jobs import run_probe_job
    from actstore.schemas.jobs import ProbeJob

    sweep = run_probe_job(_job(args, ProbeJob))
    _print(sweep.table if args.json else "\n".join(
        f"{r['hook']:34s} auroc={r['auroc']:.4f} acc={r['accuracy']:.4f} f1={r['f1']:.4f} "
        f"r@1%fpr={r['recall_at_1pct_fpr']:.3f}{'' if r.get('recall_at_1pct_fpr_reliable') else '?'} "
        f"r@5%fpr={r['recall_at_5pct_fpr']:.3f}{'' if r.get('recall_at_5pct_fpr_reliable') else '?'} "
        f"test docs={r['n_test_docs']}" + (f" doc_auroc={r['doc_auroc']:.4f} doc_f1={r['doc_f1']:.4f} tokens="
                                            f"{r['n_tokens']}" if "doc_auroc" in r else "") for r in sweep.table)
        + ("\n(? = fewer than 10/FPR test negatives: that recall is mostly noise)"
           if any(not r.get("recall_at_1pct_fpr_reliable") for r in sweep.table) else ""), args.json)
    return 0


def _spectra(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.jobs import run_spectrum_job
    from actstore.schemas.jobs import SpectrumJob

    rows = run_spectrum_job(_job(args, SpectrumJob))
    if args.json:
        _print(rows, True)
    else:
        for r in rows:
            print(" ".join(f"{k}={_f(v) if isinstance(v, float) else v}" for k, v in r.items()))
    return 0


def _uncertainty(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.uncertainty import uncertainty
    from actstore.schemas.jobs import UncertaintyJob

    job = _job(args, UncertaintyJob)
    res = uncertainty(job)
    if args.json:
        _print(res.docs.to_pylist() if job.level == "document" else {"written": res.info.get("written"),
                                                                      "n_rows": res.tokens.num_rows}, True)
        return 0
    docs = res.docs
    cols = [c for c in docs.column_names if c not in ("doc_id", "n_predictions")]
    means = " ".join(f"{c}={_f(_pc_mean(docs.column(c)))}" for c in cols)
    print(f"{docs.num_rows} documents, {int(sum(docs.column('n_predictions').to_pylist()))} predictions; "
          f"mean over documents: {means}" + (f"; wrote {res.info['written']}" if res.info.get("written") else ""))
    return 0


def _spectral_series(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.spectral_series import spectral_series
    from actstore.schemas.jobs import SpectralSeriesJob

    job = _job(args, SpectralSeriesJob)
    table = spectral_series(job)
    if args.json:
        _print(table.to_pylist(), True)
        return 0
    for hook in dict.fromkeys(table.column("hook").to_pylist()):
        t = table.filter(_pc_equal(table.column("hook"), hook))
        print(f"{hook:34s} {t.num_rows} windows over {len(set(t.column('doc_id').to_pylist()))} documents; mean "
              f"spectral_entropy={_f(_pc_mean(t.column('spectral_entropy')))} "
              f"top_eigenvalue={_f(_pc_mean(t.column('top_eigenvalue')))} ks={_f(_pc_mean(t.column('ks')))}")
    if job.out:
        print(f"wrote {job.out}")
    return 0


def _pc_mean(col: Any) -> Any:
    import pyarrow.compute as pc

    return pc.mean(col).as_py()


def _pc_equal(col: Any, value: Any) -> Any:
    import pyarrow.compute as pc

    return pc.equal(col, value)


def _report(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.jobs import run_report_job
    from actstore.schemas.jobs import ReportJob

    path = run_report_job(_job(args, ReportJob))
    _print({"report": str(path)} if args.json else f"wrote {path}", args.json)
    return 0


def _intervene(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.intervene import intervene
    from actstore.schemas.jobs import InterveneJob

    table = intervene(_job(args, InterveneJob))
    rows = table.to_pylist()
    if args.json:
        _print(rows, True)
        return 0
    for r in rows:
        up = ", ".join(f"{t['token']!r}{t['delta_prob']:+.3g}" for t in r["top_increased"][:3])
        print(f"{r['hook']:30s} {r['mode']:6s} scale={r['scale']:<6g} loss={r['loss']:.4f} "
              f"delta={r['delta_loss']:+.4f} kl={r['kl']:.4g} top1={r['top1_agreement']:.3f}  up: {up}")
        for text in r.get("generations") or []:
            print(f"    -> {text!r}")
    return 0


def _lens(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.lens import logit_lens
    from actstore.schemas.jobs import LensJob

    rows = logit_lens(_job(args, LensJob)).to_pylist()
    _print(rows if args.json else "\n".join(
        f"{r['hook']:30s} loss={r['loss']:.4f} top1_agreement={r['top1_agreement']:.3f} "
        f"kl_to_final={r['kl_to_final']:.4g} entropy={r['entropy']:.3f}" for r in rows), args.json)
    return 0


def _encode(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.features import run_encode_job
    from actstore.schemas.jobs import EncodeJob

    fstore = run_encode_job(_job(args, EncodeJob))
    _print({"url": fstore.url, "hook": fstore.hook, "k": fstore.k, "d_sae": fstore.d_sae,
            "n_tokens": fstore.n_tokens} if args.json else f"wrote {fstore!r}", args.json)
    return 0


def _features(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.jobs import run_features_job
    from actstore.schemas.jobs import FeaturesJob

    res = run_features_job(_job(args, FeaturesJob))
    lat = res.latents
    alive = int((lat.column("count").to_numpy() > 0).sum())
    _print(res.summary()["lists"] if args.json else
           f"{lat.num_rows} latents ({alive} fire) over {res.info['n_tokens']:,} tokens; most frequent: "
           f"{res.top('count')[:8]}" + (f"; most label-correlated: {res.top('label_correlation')[:8]}"
                                        if "label_correlation" in lat.column_names else ""), args.json)
    return 0


def _export(args: argparse.Namespace) -> int:
    from actstore.pipeline.store.export import export_slice, parse_rows
    from actstore.pipeline.store.store import open_store

    store = open_store(args.url, _storage_options(args))
    info = export_slice(store, args.hook, parse_rows(args.rows, store.n_tokens), args.format, args.out,
                        overwrite=args.overwrite)
    _print(info if args.json else (
        f"wrote {info['path']}: rows {info['rows'][0]}:{info['rows'][1]} of {info['hook']} "
        f"({info['shape'][0]} x {info['shape'][1]} {info['dtype']}, {info['bytes'] / 1e6:.1f} MB)"), args.json)
    return 0


def _export_transcoders(args: argparse.Namespace) -> int:
    from actstore.pipeline.analysis.transcoder_export import export_transcoders

    info = export_transcoders(args.dirs, args.out, args.format, overwrite=args.overwrite, scan=args.scan,
                              storage_options=_storage_options(args))
    for note in info["notes"]:
        print(f"actstore: note: {note}", file=sys.stderr)
    _print(info if args.json else (
        f"wrote {info['out']}: {info['n_layers']} layers, {info['feature_input_hook']} -> "
        f"{info['feature_output_hook']}, "
        + (f"activation {info['activation']}" if "activation" in info else info["model_kind"])), args.json)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from actstore.pipeline.extract.estimate import format_plan, plan

    res = plan(args.config, gpus=args.gpus, calibrate=not args.no_calibrate, overrides=args.set)
    _print(res if args.json else format_plan(res), args.json)
    if not res["ok"]:
        print(f"actstore: error: {res['reason']}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.generate:
        from actstore.demo_generate import run_generate_demo

        run_generate_demo(args.out, quick=args.quick, executor=args.executor)
        return 0
    from actstore.demo import run_demo

    run_demo(args.out, quick=args.quick, executor=args.executor)
    return 0


def _storage_options(args: argparse.Namespace) -> dict | None:
    from actstore.cli_options import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None))


def _print(obj: Any, as_json: bool) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else obj)


class _Parser(argparse.ArgumentParser):
    """argparse with actstore's one-line errors: `actstore: error: <cause> (see actstore <verb> --help)`, exit 2."""

    def error(self, message: str) -> Any:
        print(f"actstore: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="actstore", description="Transformer activation datasets and their analyses.")
    p.add_argument("--version", action="version", version=f"actstore {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add_verb in (_add_extract, _add_readers, _add_spectra, _add_train, _add_report, _add_causal,
                     _add_hallucination, _add_export, _add_export_transcoders, _add_plan, _add_demo):
        add_verb(sub.add_parser)
    return p


def _add_extract(add: Callable[..., argparse.ArgumentParser]) -> None:
    e = add("extract", help="extract activations described by a YAML config into a store")
    e.add_argument("config", nargs="?", help="YAML config (keys: --help-config)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    e.add_argument("--json", action="store_true", help="print a JSON summary")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an actstore store or interrupted run at the output (never other files)")
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
    c = add("label", help="add token-aligned labels from character spans (labels/NAME.parquet)",
            description="Map character spans of documents onto the store's tokens: each line of FILE.jsonl is "
            '{"doc_id": 3, "start": 10, "end": 25, "label": "false"} (character offsets into the document text, '
            'or with "target": "response" into the generated response of a store written with generate). A token '
            "is labelled when its character span overlaps a span; the table "
            "has one row per token row (null where unlabelled) and is read by `train probe --label span:NAME`.")
    c.add_argument("url", help="store path or URL (file://, memory://, s3://)")
    c.add_argument("--spans", required=True, metavar="FILE.jsonl", help="span labels, one JSON object per line")
    c.add_argument("--name", required=True, help="label name (letters, digits, _ . -)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing label of that name")
    c.add_argument("--storage-options", help="fsspec options as JSON (e.g. endpoint_url)")
    c.add_argument("--json", action="store_true", help="print the manifest's record of the label as JSON")
    c.set_defaults(fn=_label)


CLT_REFUSED = ("sae.skip", "sae.matryoshka_widths")  # SAE settings a cross-layer transcoder has no use for


def _job_parser(add: Callable[..., argparse.ArgumentParser], name: str, job_cls: Any, text: str,
                positional_url: bool = False, aliases: dict[str, str] | None = None,
                skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A verb whose options are the fields of `job_cls` (generated), plus a YAML config and --set overrides."""
    from actstore.cli_options import add_job_flags

    c = add(name, help=text, description=f"{text}. Options can also come from a YAML config (same keys; nested "
            "settings as sae:, train:, probe:) and --set key=value; flags win over both.")
    if positional_url:
        c.add_argument("url", nargs="?", help="store path or URL (or store: in the config)")
        c.add_argument("--config", help="YAML file with the job's fields")
    else:
        c.add_argument("config", nargs="?", help="YAML file with the job's fields (optional: flags alone work)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field (dotted for nested settings, e.g. train.lr=0.001)")
    c.add_argument("--json", action="store_true", help="print JSON")
    add_job_flags(c, job_cls, skip, aliases=aliases)
    return c


def _add_spectra(add: Callable[..., argparse.ArgumentParser]) -> None:
    from actstore.schemas.jobs import SpectrumJob

    s = _job_parser(add, "spectra", SpectrumJob, "correlation/covariance spectra of stored hooks (Marchenko-Pastur "
                    "fit, outliers, entropy, ranks) as a Dask job", positional_url=True)
    s.set_defaults(fn=_spectra)


def _add_train(add: Callable[..., argparse.ArgumentParser]) -> None:
    from actstore.cli_options import narrow_choices
    from actstore.schemas.jobs import CLTJob, ProbeJob, SAEJob, TranscoderJob
    from actstore.schemas.sae import CLT_ARCHITECTURES

    t = add("train", help="train SAEs, transcoders, cross-layer transcoders or probes from a store as Dask jobs")
    tsub = t.add_subparsers(dest="what", required=True, metavar="WHAT", parser_class=_Parser)
    _job_parser(tsub.add_parser, "sae", SAEJob, "train sparse autoencoders (one Dask task per hook and sweep "
                "point)").set_defaults(fn=_train_sae)
    _job_parser(tsub.add_parser, "transcoder", TranscoderJob, "train transcoders from --in-hook to "
                "--out-hook").set_defaults(fn=_train_sae)
    clt = _job_parser(tsub.add_parser, "clt", CLTJob, "train a cross-layer transcoder: every layer's MLP input "
                      "encoded, each feature decoded to its own and every later layer's MLP output (one Dask task)",
                      skip=CLT_REFUSED)
    narrow_choices(clt, "sae.architecture", CLT_ARCHITECTURES, "the activations a cross-layer transcoder supports")
    clt.set_defaults(fn=_train_clt)
    _job_parser(tsub.add_parser, "probe", ProbeJob, "probe a document label on every hook (one Dask task per "
                "hook), or token-aligned span labels with --label span:NAME --pooling token").set_defaults(
        fn=_train_probe)


def _add_report(add: Callable[..., argparse.ArgumentParser]) -> None:
    from actstore.schemas.jobs import ReportJob

    r = _job_parser(add, "report", ReportJob, "self-contained HTML report: summary, spectra with their fits, layer "
                    "curves, and the SAE/probe/spectra results made from this store", positional_url=True,
                    aliases={"out": "-o"})
    r.set_defaults(fn=_report)


def _add_causal(add: Callable[..., argparse.ArgumentParser]) -> None:
    from actstore.schemas.jobs import EncodeJob, FeaturesJob, InterveneJob, LensJob

    _job_parser(add, "intervene", InterveneJob, "run a model over a corpus with hooks edited (add/ablate/clamp a "
                "direction, patch, zero, mean) and report loss, KL and token shifts per scale").set_defaults(
                    fn=_intervene)
    _job_parser(add, "lens", LensJob, "logit lens: each stored residual hook through the final norm and "
                "unembedding (loss, top-1 agreement, KL to the final layer, entropy)", positional_url=True,
                aliases={"out": "-o"}).set_defaults(fn=_lens)
    _job_parser(add, "encode", EncodeJob, "encode a stored hook with an SAE into a sparse feature store (top-k "
                "latent ids and values per token)", positional_url=True, aliases={"out": "-o"}).set_defaults(
                    fn=_encode)
    _job_parser(add, "features", FeaturesJob, "per-latent density, activations and top contexts of a feature "
                "store", positional_url=True, aliases={"out": "-o"}).set_defaults(fn=_features)


def _add_hallucination(add: Callable[..., argparse.ArgumentParser]) -> None:
    from actstore.schemas.jobs import SpectralSeriesJob, UncertaintyJob

    _job_parser(add, "uncertainty", UncertaintyJob, "per-token and per-document uncertainty of the model's "
                "predictions (surprisal, entropy, top-1/top-2 margin) from token_outputs", positional_url=True,
                aliases={"out": "-o"}).set_defaults(fn=_uncertainty)
    _job_parser(add, "spectral-series", SpectralSeriesJob, "spectral descriptors (entropy, top eigenvalue, "
                "effective rank, MP deviation) of sliding token windows per document and hook",
                positional_url=True, aliases={"out": "-o"}).set_defaults(fn=_spectral_series)


def _add_export(add: Callable[..., argparse.ArgumentParser]) -> None:
    x = add("export", help="write a row slice of one hook to .npy, .safetensors or Parquet")
    x.add_argument("url", help="store path or URL")
    x.add_argument("--hook", required=True, help="hook to export")
    x.add_argument("--rows", default=":", metavar="A:B",
                   help="global rows A:B, Python slice rules (default: all; negative start: --rows=-100:)")
    x.add_argument("--format", choices=["npy", "safetensors", "parquet"], default="npy")
    x.add_argument("-o", "--out", required=True, help="output file (refused if it exists, unless --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    x.add_argument("--storage-options", help="fsspec options as JSON")
    x.add_argument("--json", action="store_true", help="print JSON")
    x.set_defaults(fn=_export)


def _add_export_transcoders(add: Callable[..., argparse.ArgumentParser]) -> None:
    x = add("export-transcoders", help="write trained per-layer transcoders, or one cross-layer transcoder, as a "
            "circuit-tracer folder")
    x.add_argument("dirs", nargs="+", metavar="DIR",
                   help="transcoder folders (one per layer), or folders holding them (`train transcoder --out`), or "
                   "one cross-layer transcoder folder (`train clt --out`)")
    x.add_argument("--format", choices=["circuit-tracer"], default="circuit-tracer")
    x.add_argument("-o", "--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export at the output")
    x.add_argument("--scan", help="circuit-tracer's scan name for feature pages (default: the output folder name)")
    x.add_argument("--storage-options", help="fsspec options as JSON")
    x.add_argument("--json", action="store_true", help="print JSON")
    x.set_defaults(fn=_export_transcoders)


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
    d.add_argument("--generate", action="store_true",
                   help="instead: hallucination detection on generated answers (a small GPT-2 trained on sums in "
                        "seconds, answers labelled correct/incorrect by rule; token probes, uncertainty, spectral "
                        "series; about a minute on 2 cores)")
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
        print(f"actstore: interrupted{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # every failure becomes one line; -v re-raises for the traceback
        print(f"actstore: error: {_one_line(e)}", file=sys.stderr)
        if args.verbose:
            raise
        return EXIT_ERROR


def _one_line(e: BaseException) -> str:
    """The cause in one line: our own errors speak for themselves; anything else names its type."""
    from actstore.schemas.errors import ActstoreError

    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    if not isinstance(e, ActstoreError):
        msg = f"{type(e).__name__}: {msg} (run with -v for the traceback)"
    return msg


def _resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted verb left behind, so the user knows what rerunning does."""
    if args.command == "extract":
        return " (shards committed so far are kept; rerun the same command to resume)"
    if args.command == "train" and getattr(args, "what", None) in ("sae", "transcoder", "clt"):
        return " (the last checkpoint is kept; rerun the same command to resume)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
