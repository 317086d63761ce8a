"""Peer SAE trainers for bench_sae, run inside the peers' own virtual environment (never imports actstore).

    /tmp/peers/bin/python benchmarks/peer_sae.py --impl sparsify --train train.npy --heldout heldout.npy --threads 2

The process imports its library and loads the data once, then serves JSON-line commands on stdin
(`{"tokens": N, "batch": 4096, "k": 32, "expansion": 8, "seed": 0}`), answering one JSON line each:
steady tokens/s (steps 2..n), wall time, and FVU / L0 on the held-out rows. Batches are rows [i*B, (i+1)*B)
of the training array, cycling, exactly as bench_sae feeds actstore's trainer.

- sparsify (eai-sparsify): `SparseCoder` with the step its `Trainer.fit` runs for loss_fn="fvu" and its default
  optimizer (SignSGD in a ScheduleFree wrapper, lr 5e-3 / sqrt(n_latents / 2^14)); b_dec starts at the first
  batch's mean; decoder rows re-normalised before each forward, gradient parallel to them removed. Trainer
  defaults leave AuxK off (auxk_alpha 0).
- SAELens: `SAETrainer` with `TopKTrainingSAE` or `BatchTopKTrainingSAE` (defaults: AuxK coefficient 1,
  decoder-norm rescaling, no activation normalisation, lr 3e-4 constant, dead window 1000 steps; a command may
  set lr, warm-up, decay, dead window and AuxK weight), fed by an in-memory data provider.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def batches(x: torch.Tensor, b: int, stamps: list[float] | None = None):
    i = 0
    n = x.shape[0] // b
    while True:
        if stamps is not None:
            stamps.append(time.perf_counter())
        yield x[(i % n) * b:(i % n + 1) * b]
        i += 1


def fvu_l0(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> tuple[float, float]:
    x, x_hat = x.double(), x_hat.double()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float((f != 0).sum(-1).float().mean())


def run_sparsify(x: torch.Tensor, held: torch.Tensor, cmd: dict) -> dict:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(cmd.get("seed", 0))
    b, steps = cmd["batch"], cmd["tokens"] // cmd["batch"]
    sae = SparseCoder(x.shape[1], SparseCoderConfig(expansion_factor=cmd["expansion"], k=cmd["k"]), "cpu",
                      dtype=torch.float32)
    lr = 5e-3 / (sae.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    it = batches(x, b)
    ends = []
    t0 = time.perf_counter()
    for step in range(steps):
        xb = next(it)
        if step == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(xb, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
            did_fire[out.latent_indices.flatten()] = True
            since_fired += b
            since_fired[did_fire] = 0
        ends.append(time.perf_counter())
    wall = time.perf_counter() - t0
    opt.eval()  # ScheduleFree: evaluate at the averaged weights, as sparsify does when saving
    with torch.no_grad():
        sae.set_decoder_norm_to_unit_norm()
        enc = sae.encode(held)
        x_hat = sae.decode(enc.top_acts, enc.top_indices)
        f = torch.zeros(held.shape[0], sae.num_latents).scatter_(1, enc.top_indices, enc.top_acts)
    return _result(steps, b, ends, wall, *fvu_l0(held, x_hat, f))


def run_saelens(x: torch.Tensor, held: torch.Tensor, cmd: dict) -> dict:
    """SAETrainer on a TopK (default) or BatchTopK SAE. Optional schedule fields in `cmd`: lr, lr_end,
    warmup_steps, decay_steps, dead_window (steps), aux (AuxK coefficient), adam_beta1, adam_beta2; `save_dir`
    writes the trained SAE in SAELens' inference format (for scoring elsewhere)."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cmd.get("seed", 0))
    b, steps = cmd["batch"], cmd["tokens"] // cmd["batch"]
    d = x.shape[1]
    d_sae = cmd.get("d_sae") or d * cmd["expansion"]
    batch_topk = cmd.get("arch", "topk") == "batchtopk"
    cfg_cls, sae_cls = ((BatchTopKTrainingSAEConfig, BatchTopKTrainingSAE) if batch_topk
                        else (TopKTrainingSAEConfig, TopKTrainingSAE))
    sae = sae_cls(cfg_cls(d_in=d, d_sae=d_sae, k=cmd["k"], device="cpu", aux_loss_coefficient=cmd.get("aux", 1.0)))
    lr = cmd.get("lr", 3e-4)
    starts: list[float] = []
    trainer = SAETrainer(SAETrainerConfig(
        total_training_samples=steps * b, train_batch_size_samples=b, device="cpu", lr=lr,
        lr_end=cmd.get("lr_end", lr / 10), lr_warm_up_steps=cmd.get("warmup_steps", 0),
        lr_decay_steps=cmd.get("decay_steps", 0), dead_feature_window=cmd.get("dead_window", 1000),
        adam_beta1=cmd.get("adam_beta1", 0.9), adam_beta2=cmd.get("adam_beta2", 0.999)),
        sae, batches(x, b, starts))
    t0 = time.perf_counter()
    sae = trainer.fit()
    t_end = time.perf_counter()
    ends = starts[1:] + [t_end]  # a step ends when the next batch is requested (the last one when fit returns)
    with torch.no_grad():
        sae.eval()
        f = sae.encode(held)
        x_hat = sae.decode(f)
        if cmd.get("save_dir"):
            sae.save_inference_model(cmd["save_dir"])
    return _result(steps, b, ends, t_end - t0, *fvu_l0(held, x_hat, f))


def _result(steps: int, b: int, ends: list[float], wall: float, fvu: float, l0: float) -> dict:
    steady = (steps - 1) * b / (ends[-1] - ends[0]) if steps > 1 else steps * b / wall
    return {"tokens_per_s": steady, "wall_s": wall, "steps": steps, "fvu": fvu, "l0": l0, "s": (steps - 1) * b /
            steady if steps > 1 else wall}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["sparsify", "saelens"], required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fn = run_sparsify if args.impl == "sparsify" else run_saelens
    if args.impl == "sparsify":
        import sparsify  # noqa: F401  (import errors surface before the first command)
    else:
        import sae_lens  # noqa: F401
    x = torch.from_numpy(np.load(args.train))
    held = torch.from_numpy(np.load(args.heldout))
    versions = {"torch": torch.__version__}
    from importlib import metadata

    versions[args.impl] = metadata.version("eai-sparsify" if args.impl == "sparsify" else "sae-lens")
    print(json.dumps({"ready": True, "versions": versions}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            print(json.dumps(fn(x, held, cmd)), flush=True)
        except Exception as e:  # report, keep serving
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
