"""`actstore demo --generate`: hallucination detection end to end on generated answers, offline.

No trained causal LM can be downloaded here, so the example makes one in seconds: a small GPT-2 (from a config)
learns two-digit addition ("37+45=82") over a character tokenizer for a few hundred steps on the CPU. It then
answers held-out sums, some right and some wrong, the way a real model answers some questions wrongly. What
follows is the workflow the research runs on real models:

1. extract with `generate`: each prompt ("37+45=") is a corpus record; the store holds prompt and answer tokens
   (`response` column), the answer text and finish reason, and per-token outputs (surprisal, entropy);
2. label the answer span of every response `correct` / `incorrect` by string match against the known sum
   (`actstore.label`, target response): a rule anyone can check;
3. token probes on the answer tokens per layer (per-token and per-answer AUROC), the output-only uncertainty
   baseline (mean surprisal of the answer) and windowed spectral descriptors, each scored by AUROC against
   the same correctness labels.

Everything is seeded; the model, the store and the scores are the same on every run of the same versions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

DIGITS = "0123456789"
VOCAB = ["<pad>", "<eos>", *DIGITS, "+", "="]
N_LAYERS = 2
ADDER_STEPS = 800  # most answers right, enough wrong ones for both classes (accuracy moves fast below)


def sum_prompts(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """`n` prompts "a+b=" (two-digit a, b) with the true sum as `answer`, drawn without repeats."""
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], n)
    return [{"text": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


def char_tokenizer() -> Any:
    """A fast tokenizer with one token per character (digits, '+', '='), so character offsets are exact."""
    import transformers as T
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                     bos_token="<eos>", unk_token="<pad>")


def train_adder(out: str | Path, steps: int = 600, seed: int = 0, exclude: set[str] | None = None) -> str:
    """Train the small GPT-2 on sums (never on the prompts in `exclude`) and save it with its tokenizer.

    Returns the model folder (a local model path for `extract`). Deterministic for a given seed and torch."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums, so the same model, on any machine
    try:
        return _train_adder(Path(out), steps, seed, exclude)
    finally:
        torch.set_num_threads(threads)


def _train_adder(out: Path, steps: int, seed: int, exclude: set[str] | None) -> str:
    import torch
    import transformers as T

    torch.manual_seed(seed)
    tok = char_tokenizer()
    cfg = T.GPT2Config(vocab_size=len(VOCAB), n_layer=N_LAYERS, n_embd=64, n_head=4, n_positions=16,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = T.GPT2LMHeadModel(cfg)
    rng = random.Random(seed)
    pool = [(a, b) for a in range(10, 100) for b in range(10, 100) if f"{a}+{b}=" not in (exclude or set())]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        ids = torch.tensor([tok.convert_tokens_to_ids(r) for r in _sum_tokens(rng.sample(pool, 64))])
        labels = ids.clone()
        labels[:, :6] = -100  # learn the answer (and its end), not the random operands
        labels[ids == tok.pad_token_id] = -100
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _sum_tokens(pairs: list[tuple[int, int]]) -> list[list[str]]:
    """"a+b=c" then the end token, one character per token, padded on the right to the longest."""
    rows = [[*f"{a}+{b}={a + b}", "<eos>"] for a, b in pairs]
    width = max(len(r) for r in rows)
    return [r + ["<pad>"] * (width - len(r)) for r in rows]


def answer_spans(store: Any) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Span labels over each response's answer (its digits before the end) and {doc_id: 1 if correct else 0}; the
    true sum is the prompt record's `answer` field, which docs.parquet keeps."""
    docs = store.docs().to_pydict()
    spans, correct = [], {}
    for doc_id, want, response in zip(docs["doc_id"], docs["answer"], docs["response"]):
        digits = len(response) - len(response.lstrip(DIGITS)) if response else 0
        ok = int(response[:digits] == want)
        correct[int(doc_id)] = ok
        if digits:
            spans.append({"doc_id": int(doc_id), "start": 0, "end": digits, "target": "response",
                          "label": "correct" if ok else "incorrect"})
    return spans, correct


def auroc(scores: dict[int, float], correct: dict[int, int]) -> float:
    """AUROC of `scores` for predicting an incorrect answer (documents with a finite score)."""
    from sklearn.metrics import roc_auc_score

    ids = [d for d, v in scores.items() if np.isfinite(v) and d in correct]
    y = [1 - correct[d] for d in ids]
    return float(roc_auc_score(y, [scores[d] for d in ids])) if len(set(y)) == 2 else float("nan")


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / "generate-summary.json").write_text(json.dumps(summary, indent=2))


def run_generate_demo(out: str | Path, quick: bool = False, executor: str = "local") -> dict[str, Any]:
    """Train the adder, extract its answers with `generate`, label them, score probes and baselines; returns the
    summary (also written to OUT/generate-summary.json) with the paths of what it wrote."""
    import time

    from actstore.pipeline.analysis.dask_client import dask_client
    from actstore.pipeline.analysis.probes import probe_sweep
    from actstore.pipeline.analysis.report import write_report
    from actstore.pipeline.analysis.spectral_series import spectral_series
    from actstore.pipeline.analysis.uncertainty import uncertainty
    from actstore.pipeline.extract.labels import label
    from actstore.pipeline.extract.run import extract

    out_dir = Path(out).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        from actstore.schemas.errors import OutputError

        raise OutputError(f"--out {out!r} is a file; the demo writes a folder (give a new or existing folder)")
    t0 = time.time()
    prompts = sum_prompts(300 if quick else 1000)
    model_dir = train_adder(out_dir / "adder-model", steps=ADDER_STEPS,
                            exclude={p["text"] for p in prompts})
    print(f"[demo] trained a {N_LAYERS}-layer GPT-2 on two-digit sums in {time.time() - t0:.0f}s -> {model_dir}")
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(N_LAYERS)]
    store = extract({"model": model_dir, "corpus": prompts, "hooks": hooks, "packing": False, "context_length": 16,
                     "generate": {"max_new_tokens": 4}, "token_outputs": {"topk": 2}, "dtype": "float32",
                     "batch_size": 64, "shard_tokens": 8192, "executor": executor,
                     "output": str(out_dir / "answers-store"), "progress": False})
    spans, correct = answer_spans(store)
    label(store, spans, "answer", overwrite=True)  # a rerun into the same folder relabels the same answers
    share = sum(correct.values()) / len(correct)
    print(f"[demo] generated {len(correct)} answers ({share:.0%} correct by string match), "
          f"{store.n_tokens:,} token rows -> {store.url}")
    summary: dict[str, Any] = {"store": store.url, "model": model_dir, "answers": len(correct),
                               "correct_fraction": share}
    with dask_client():
        sweep = probe_sweep(store, "span:answer", hooks, pooling="token", threads=1)
        sweep.save(str(out_dir))
    summary["token_probes"] = {r["hook"]: {"auroc": r["auroc"], "doc_auroc": r.get("doc_auroc")} for r in sweep.table}
    for r in sweep.table:
        print(f"[demo] token probe correct/incorrect at {r['hook']}: AUROC {r['auroc']:.3f} per token, "
              f"{r.get('doc_auroc', float('nan')):.3f} per answer")
    docs = uncertainty(store, rows="response").docs.to_pydict()
    surprisal = dict(zip(docs["doc_id"], docs["mean_surprisal"]))
    summary["uncertainty_auroc"] = auroc({d: v if v is not None else np.nan for d, v in surprisal.items()}, correct)
    print(f"[demo] output-only baseline (mean surprisal of the answer): AUROC {summary['uncertainty_auroc']:.3f}")
    series_path = out_dir / "spectral-series.parquet"
    from actstore.schemas.jobs import SpectralSeriesJob

    series = spectral_series(SpectralSeriesJob(store=store.url, hooks=[hooks[-1]], window=4, stride=2,
                                               out=str(series_path)))
    top: dict[int, float] = {}
    for d, v in zip(series.column("doc_id").to_pylist(), series.column("top_eigenvalue").to_pylist()):
        top[d] = max(top.get(d, -np.inf), v)
    summary["spectral_auroc"] = auroc(top, correct)
    print(f"[demo] spectral series ({hooks[-1]}, windows of 4 tokens): max top eigenvalue per document, "
          f"AUROC {summary['spectral_auroc']:.3f}")
    summary["report"] = write_report(store, str(out_dir / "generate-report.html"), results_dir=str(out_dir))
    write_summary(out_dir, summary)
    return summary
