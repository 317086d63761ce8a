"""Generated responses: `actstore.extract` with `generate` (responses + their activations) vs `model.generate` alone.

Model: a GPT-2-shaped causal LM with random weights and MiniLM's WordPiece tokenizer (quick: 4 layers x 256
wide; full: GPT-2 small, 12 x 768), built once and cached. Prompts: the first characters (quick 160, full 320)
of `pydoc_data.topics` documents (quick 16, full 64), greedy, max_new_tokens quick 32 / full 64, batches of 8.
Variants per round, both from a cold start in this process (model and tokenizer loaded, prompts tokenized):

- generate: `AutoModelForCausalLM.generate` over the prompts in batches of 8 (sorted by length, left-padded with
  an attention mask, KV cache), the baseline the issue names;
- capture: `actstore.extract` with `generate:` on the local executor: the same generation inside the model
  worker, then one teacher-forced forward over prompt + response capturing two residual hooks, written as a
  committed store (tokens, arrays, statistics, docs with responses, manifest).

Figure: capture time / generate time per round (< 1.1 is the goal: the teacher-forced pass over prompt +
response costs far less than the token-by-token generation).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Ctx,
    best_ratio,
    fmt_ratio,
    fmt_x,
    goal_status,
    interleave,
    md_table,
    median_of,
    per_round,
    random_gpt2,
)

NAME = "generate"
TITLE = "11. Generated responses: capture vs model.generate alone"
GOAL = 1.1
BATCH = 8


def _sizes(quick: bool) -> dict[str, int]:
    return ({"layers": 4, "width": 256, "prompts": 16, "chars": 160, "new": 32} if quick else
            {"layers": 12, "width": 768, "prompts": 64, "chars": 320, "new": 64})


def lm_path(layers: int, width: int) -> str:
    """A GPT-2-shaped causal LM (random weights, MiniLM's tokenizer), built once and cached."""
    return random_gpt2(f"gpt2-lm-random-{layers}x{width}", layers, width, max(4, width // 64), lm_head=True)


def prompts(n: int, chars: int) -> list[str]:
    from actstore.demo import demo_corpus

    return [d["text"][:chars] for d in demo_corpus()[:n]]


def hf_generate(path: str, texts: list[str], new: int) -> dict[str, Any]:
    """The baseline: load, tokenize, `model.generate` in length-sorted left-padded batches."""
    import torch
    import transformers as T

    start = time.perf_counter()
    tok = T.AutoTokenizer.from_pretrained(path)
    lm = T.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(texts)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.sep_token_id
    n_new = 0
    for b in range(0, len(order), BATCH):
        batch = [ids[i] for i in order[b:b + BATCH]]
        width = max(len(x) for x in batch)
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            x[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = lm.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              pad_token_id=pad, eos_token_id=tok.sep_token_id)
        n_new += int((out[:, width:] != pad).sum())
    return {"s": time.perf_counter() - start, "new_tokens": n_new}


def capture(path: str, texts: list[str], new: int, layers: int, out: Path) -> dict[str, Any]:
    import actstore

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    store = actstore.extract({
        "model": path, "corpus": texts, "output": str(out), "executor": "local", "progress": False,
        "hooks": [f"blocks.{layers // 2}.hook_resid_post", f"blocks.{layers - 1}.hook_resid_post"],
        "packing": False, "context_length": 512, "shard_tokens": 1 << 20, "batch_size": BATCH,
        "generate": {"max_new_tokens": new}})
    s = time.perf_counter() - start
    n_resp = int(store.tokens().column("response").to_numpy(zero_copy_only=False).sum())
    return {"s": s, "rows": store.n_tokens, "response_rows": n_resp}


def run(ctx: Ctx) -> dict[str, Any]:
    import torch

    torch.set_num_threads(ctx.threads)
    z = _sizes(ctx.quick)
    path = lm_path(z["layers"], z["width"])
    texts = prompts(z["prompts"], z["chars"])
    variants = [("generate", lambda: hf_generate(path, texts, z["new"])),
                ("capture", lambda: capture(path, texts, z["new"], z["layers"], ctx.tmp / "store"))]
    results = interleave(variants, ctx.rounds, ctx.extra.get("meter"), warmup=True)
    speed = lambda r: 1.0 / r["s"]  # noqa: E731
    # time ratio capture / generate = speed(generate) / speed(capture)
    return {**z, "batch": BATCH, "results": results, "ratio": per_round(results, "generate", "capture", speed),
            "best": best_ratio(results, "generate", "capture", speed)}


def render(result: dict[str, Any]) -> str:
    res = result["results"]
    rows = [[f"{result['layers']} x {result['width']}", result["prompts"], result["new"],
             f"{median_of(res['generate'], 's'):.3g}", f"{median_of(res['capture'], 's'):.3g}",
             fmt_ratio(result["ratio"]), fmt_x(result["best"]), goal_status(result["ratio"], GOAL, False)]]
    return ("Seconds per run (median over rounds) and capture / generate time per round (< 1 would be faster "
            f"than generating alone; goal <= {GOAL}x), greedy, batches of {result['batch']}:\n\n"
            + md_table(["layers x width", "prompts", "max_new_tokens", "generate (s)", "capture (s)",
                        "capture / generate", "best/best", "goal"], rows))


def headline(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("generate + capture vs `model.generate` alone (time)", fmt_ratio(result["ratio"]), f"<= {GOAL}x",
             goal_status(result["ratio"], GOAL, False))]
