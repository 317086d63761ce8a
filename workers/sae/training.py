"""Training loop for sparse autoencoders and transcoders: one process, pure torch, resumable.

`train()` consumes an iterator of activation batches (tensors for SAEs, (x_in, x_out) pairs for transcoders),
re-batches them to exactly `TrainConfig.batch_size` rows and runs Adam. Design choices (all documented so that
the defaults work at d_in = 64 as well as at d_in = 768 with only expansion, k, training_tokens and seed given):

- Input scaling ("sqrt_d"): activations are multiplied by c = sqrt(d) / E||x|| so that the mean token norm is
  sqrt(d). c is estimated from the first batches (>= `norm_estimation_tokens` rows) before training and then
  frozen; transcoders get separate factors for input and output. With this, every loss term in
  `actstore.workers.sae.model` is O(1) independent of width and of the model's activation scale. At the end the
  factors are folded back into the weights (`SparseAutoencoder.fold_scale_`) so the returned SAE reads and
  writes raw activations; the factors are also reported in the metrics.
- Learning rate: lr = 1.6e-3 / sqrt(d_sae / 16384): the 1/sqrt(n_latents) scaling of Gao et al. 2024 (as in
  EleutherAI's sparsify), at 8x their 2e-4. With Gao's constant a d_in 384 SAE needed about twice sparsify's
  tokens to reach its FVU, and an SAE exactly as wide as a planted dictionary found only 80% of it; Adam's
  per-step change of a unit-norm column is ~lr * sqrt(d_in), so the same multiple means the same relative
  step at every width (benchmarks/bench_sae_quality.py has the sweep). Linear warm-up (default min(1000, 5%
  of steps)) and linear decay to 0 over the last 20% of steps (Conerly et al.), gradient norm clipped at 1.
- Adam betas (0.8, 0.9), not torch's (0.9, 0.999): the gradients shrink fast early in training, and a
  second-moment estimate that remembers the first large ones for ~1000 steps keeps the steps small long after.
  With (0.8, 0.9) a 200-step run reached sparsify's FVU (which the old betas did not at equal tokens) on real
  MiniLM activations and on a GPT-2-small-shaped model.
- Sparsity warm-up: the L1 / L0 coefficient ramps linearly from 0 over the first 5% of steps, which keeps
  latents from dying before the decoder has found useful directions.
- Speed (topk / batchtopk): `SparseAutoencoder.training_loss` runs one dense GEMM per step and works on the
  active latents only (see `actstore.workers.sae.model`); that GEMM runs in bfloat16 where the hardware has fast
  bf16 (`select_dtype`), only to choose the active latents. Adam is torch's fused implementation.
- Dead latents: a latent is dead when it has not fired in `dead_window_tokens` tokens, by default 256 times
  its average firing interval (256 * d_sae / k tokens; at most 10M and training_tokens / 20, at least one
  batch); topk/batchtopk feed them to AuxK, weighted 1/4 (8x Gao et al.'s 1/32, on sparsify's
  variance-normalised AuxK loss). A fixed fraction of the run (the previous default, 1/20) flags latents only
  after hundreds of steps in short runs, by which time they have drifted far from the data; with the short
  window they are pulled back onto the residual early, which is what recovers the last ~10% of a planted
  dictionary at exact width.

Checkpoints (safetensors + JSON, never pickle) hold the weights, the Adam state, the dead-latent counters, the
scale factors and the step. A restarted `train()` with the same `checkpoint_dir` loads the newest one and skips
the first `step` re-batched batches of the iterator it is given, so with a deterministic iterator the result is
bit-identical to an uninterrupted run (training itself draws no random numbers after initialisation). A
checkpoint also records the values the defaults resolved to (lr, warm-up, dead window, AuxK's k), so a run
never continues under different hyperparameters: checkpoints written before that record existed (before the
issue-19 defaults) are refused with a message saying so.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from actstore.schemas.errors import ActstoreError, AnalysisError, ConfigError, OutputError
from actstore.schemas.sae import CLTConfig, SAEConfig, TrainConfig
from actstore.workers import storage
from actstore.workers.sae.clt import CrossLayerTranscoder
from actstore.workers.sae.model import SparseAutoencoder
from actstore.workers.sae.saelens import save_saelens
from actstore.workers.threads import torch_threads

Batch = Tensor | tuple[Tensor, Tensor]
Model: TypeAlias = SparseAutoencoder | CrossLayerTranscoder
ModelConfig: TypeAlias = SAEConfig | CLTConfig
Scale: TypeAlias = float | list[float]  # one factor, or one per layer (cross-layer transcoders)


class TrainingInterrupted(ActstoreError):
    """Training was asked to stop (Ctrl-C); its last checkpoint is kept, so rerunning resumes.

    An ordinary exception, not a KeyboardInterrupt: a Dask worker thread reports it as the task's result, where a
    KeyboardInterrupt would leave the task's future pending forever."""


ProgressFn = Callable[[dict[str, Any]], None]
CHECKPOINT_FORMAT = 1
# Fields that may change between a run and its resumption without changing the result.
_RESUME_FREE_FIELDS = ("checkpoint_every", "log_every", "threads", "device")
# Fields added after CHECKPOINT_FORMAT 1, left out of the config fingerprint at their default value so that
# checkpoints written before they existed still resume.
_LATER_FIELD_DEFAULTS = {"select_dtype": "auto"}


@dataclass
class TrainResult:
    """A trained SAE, transcoder or cross-layer transcoder (operating on raw activations) plus training metrics."""

    sae: Any
    """The trained module: a SparseAutoencoder, or a CrossLayerTranscoder for a CLTConfig."""
    metrics: dict[str, Any]
    sae_cfg: Any
    """Its SAEConfig (or CLTConfig)."""
    train_cfg: TrainConfig
    hooks: list[str] = field(default_factory=list)
    """The hook(s) it was trained on: [hook] for an SAE, [in_hook, out_hook] for a transcoder."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where it came from (store URL and manifest SHA-256, job, actstore version), when trained from a store."""

    @property
    def hook_name(self) -> str:
        """SAELens' hook_name: the hook the SAE reads (a transcoder's input hook)."""
        return self.hooks[0] if self.hooks else ""

    def save(self, directory: str | os.PathLike, hook_name: str | None = None,
             extra_metadata: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None) -> str:
        """Write SAELens-loadable files (cfg.json, sae_weights.safetensors) plus actstore.json to a local folder
        or an fsspec URL (s3://...); returns where. The hook and the provenance are the result's own. A
        cross-layer transcoder is written in its own format instead (`actstore.workers.sae.clt_io`)."""
        if isinstance(self.sae, CrossLayerTranscoder):
            from actstore.workers.sae.clt_io import save_clt

            return save_clt(self, directory, extra_metadata, storage_options)
        meta = {"train_config": asdict(self.train_cfg), "train_metrics": self.metrics, "hooks": self.hooks,
                **({"provenance": self.provenance} if self.provenance else {}), **(extra_metadata or {})}
        if len(self.hooks) == 2:
            meta.setdefault("hook_name_out", self.hooks[1])
        name = self.hook_name if hook_name is None else hook_name
        fs, root = storage.get_fs(str(directory), storage_options)
        if storage.is_local(fs):
            return str(save_saelens(self.sae, root, name, extra_metadata=meta))
        with tempfile.TemporaryDirectory(prefix="actstore-sae-") as tmp:
            save_saelens(self.sae, tmp, name, extra_metadata=meta)
            storage.upload_dir(tmp, fs, root)
        return str(directory)


@dataclass
class _State:
    """Everything besides weights and Adam state that a resumed run needs to continue exactly."""

    step: int = 0
    tokens: int = 0
    scale_in: Scale = 1.0
    scale_out: Scale = 1.0
    since_fired: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # (d_sae,) tokens
    # since each latent last fired
    ema: dict[str, float] = field(default_factory=dict)  # smoothed loss statistics for progress reports


def train(batches: Iterable[Batch], sae_cfg: ModelConfig, train_cfg: TrainConfig | None = None,
          checkpoint_dir: str | os.PathLike | None = None, progress: ProgressFn | None = None,
          stop: threading.Event | None = None, storage_options: dict[str, Any] | None = None) -> TrainResult:
    """Train an SAE (batches of x), a transcoder (batches of (x_in, x_out)) or, for a `CLTConfig`, a cross-layer
    transcoder (batches of (x_in, x_out), every layer flattened into one row); see the module docstring.

    `progress(info)` gets a dict (step, total_steps, tokens, tokens_per_s, eta_s, lr, loss, fvu, l0,
    dead_fraction) every `log_every` steps; an exception it raises aborts training (checkpoints survive).
    `checkpoint_dir` may be a local folder or an fsspec URL (with `storage_options`). When `stop` is set, the
    current step finishes, a checkpoint is written and `TrainingInterrupted` is raised."""
    train_cfg = train_cfg or TrainConfig()
    device = torch.device(train_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch_threads(train_cfg.threads):
        sae = new_model(sae_cfg, train_cfg.seed).to(device)
        # fused: one pass over each parameter instead of ~10 (the single-tensor loop is ~5x slower on CPU,
        # a sizeable part of a sparse TopK step); same maths, state_dict and checkpoint format.
        opt = torch.optim.Adam(sae.parameters(), lr=train_cfg.resolved_lr(sae_cfg.d_sae),
                               betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), fused=device.type in ("cpu", "cuda"))
        stream = _rebatch(iter(batches), train_cfg.batch_size, sae_cfg.transcoder)
        ckpt = Checkpoints(checkpoint_dir, storage_options) if checkpoint_dir else None
        state = _load_checkpoint(ckpt, sae, opt, sae_cfg, train_cfg) if ckpt else None
        if state is None:
            state, stream = _start(sae, stream, sae_cfg, train_cfg, device)
        elif state.step < train_cfg.total_steps:
            _skip(stream, state.step)
        ended_early = _loop(sae, opt, stream, state, train_cfg, device, ckpt, progress, stop)
        result_sae = copy.deepcopy(sae).eval()
        result_sae.fold_scale_(state.scale_in, state.scale_out)
    return TrainResult(result_sae, _final_metrics(state, sae_cfg, train_cfg, ended_early), sae_cfg, train_cfg)


def new_model(cfg: ModelConfig, seed: int = 0) -> Model:
    """A freshly initialised SAE / transcoder, or cross-layer transcoder for a CLTConfig."""
    if isinstance(cfg, CLTConfig):
        return CrossLayerTranscoder(cfg, seed=seed)
    return SparseAutoencoder(cfg, seed=seed)


# ------------------------------------------------------------------------------------------- the loop
def _loop(sae: Model, opt: torch.optim.Optimizer, stream: Iterator[tuple[Tensor, Tensor]],
          state: _State, cfg: TrainConfig, device: torch.device, ckpt_dir: Checkpoints | None,
          progress: ProgressFn | None, stop: threading.Event | None = None) -> bool:
    """Run the remaining steps; returns True when the iterator ran dry before training_tokens."""
    sae.train()
    base_lr = cfg.resolved_lr(sae.cfg.d_sae)
    window = cfg.resolved_dead_window(sae.cfg.d_sae, sae.cfg.k)
    t0, tokens0 = time.perf_counter(), state.tokens
    s_in, s_out = _factor(state.scale_in, sae.cfg.d_in, device), _factor(state.scale_out, sae.cfg.d_target, device)
    while state.step < cfg.total_steps:
        batch = next(stream, None)
        if batch is None:  # ran dry: keep what was learned so far resumable, then report it
            if ckpt_dir and state.step > 0:
                _save_checkpoint(ckpt_dir, sae, opt, state, cfg)
            break
        x_in = batch[0].to(device, torch.float32, non_blocking=True) * s_in
        # SAEs: the target is the input itself (same scale), so no second copy is made.
        x_out = x_in if batch[1] is batch[0] else batch[1].to(device, torch.float32) * s_out
        stats = _step(sae, opt, x_in, x_out, state, cfg, base_lr, window)
        _update_state(state, stats, x_in.shape[0])
        last = state.step == cfg.total_steps
        if ckpt_dir and ((cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or last):
            _save_checkpoint(ckpt_dir, sae, opt, state, cfg)
        if progress and (state.step % cfg.log_every == 0 or last):
            progress(_progress_info(state, cfg, base_lr, time.perf_counter() - t0, state.tokens - tokens0,
                                    window))
        if stop is not None and stop.is_set() and not last:
            if ckpt_dir:
                _save_checkpoint(ckpt_dir, sae, opt, state, cfg)
            raise TrainingInterrupted(f"training stopped at step {state.step} of {cfg.total_steps}"
                                      + ("; the checkpoint is kept: rerun to resume" if ckpt_dir else ""))
    return state.step < cfg.total_steps


def _factor(scale: Scale, width: int, device: torch.device) -> float | Tensor:
    """A scale as a multiplier of (n, width) rows: the float itself, or per-layer factors repeated per column."""
    if isinstance(scale, float | int):
        return float(scale)
    return torch.tensor(scale, dtype=torch.float32).repeat_interleave(width // len(scale)).to(device)


def _step(sae: Model, opt: torch.optim.Optimizer, x_in: Tensor, x_out: Tensor, state: _State,
          cfg: TrainConfig, base_lr: float, dead_window: int) -> dict[str, Tensor]:
    """One Adam step with the decoder-norm constraint applied around it."""
    lr = cfg.lr_at(state.step, base_lr)
    for group in opt.param_groups:
        group["lr"] = lr
    dead = state.since_fired >= dead_window
    loss, stats = sae.training_loss(x_in, x_out, cfg.sparsity_scale_at(state.step), dead,
                                    select_dtype=select_dtype(cfg, x_in.device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sae.cfg.unit_norm_decoder:
        sae.remove_parallel_grad_()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.max_grad_norm)
    opt.step()
    if sae.cfg.unit_norm_decoder:
        sae.normalize_decoder_()
    stats["loss"] = loss.detach()
    stats["fvu"] = (stats["rec"] * x_out.shape[-1] * x_out.shape[0]
                    / (x_out - x_out.mean(0)).pow(2).sum().clamp_min(1e-12))
    return stats


def select_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype of the latent-selection GEMM that `cfg.select_dtype` asks for on this device."""
    if cfg.select_dtype == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and _cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16 if cfg.select_dtype == "bfloat16" else torch.float32


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """Whether the CPU has native bf16 dot products (Linux /proc/cpuinfo flags; False where unreadable)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _update_state(state: _State, stats: dict[str, Tensor], n_tokens: int) -> None:
    state.step += 1
    state.tokens += n_tokens
    state.since_fired += n_tokens
    state.since_fired[stats["fired"].to(state.since_fired.device)] = 0
    for key in ("loss", "fvu", "l0", "aux"):
        value = float(stats[key])
        # Plain mean for the first 100 steps, then an EMA: early reports are not dominated by step 1.
        rate = max(1.0 / state.step, 0.01)
        state.ema[key] = value if key not in state.ema else state.ema[key] + rate * (value - state.ema[key])


def _start(sae: Model, stream: Iterator[tuple[Tensor, Tensor]], sae_cfg: ModelConfig,
           cfg: TrainConfig, device: torch.device) -> tuple[_State, Iterator[tuple[Tensor, Tensor]]]:
    """Fresh run: estimate the scale factors and init b_dec from the first batches, then replay them."""
    head: list[tuple[Tensor, Tensor]] = []
    while sum(b[0].shape[0] for b in head) < cfg.norm_estimation_tokens:
        batch = next(stream, None)
        if batch is None:
            break
        head.append(batch)
    if not head:
        raise AnalysisError(f"train(): the batch iterator yielded fewer than batch_size={cfg.batch_size} rows")
    x_in = torch.cat([b[0] for b in head]).to(device, torch.float32)
    x_out = torch.cat([b[1] for b in head]).to(device, torch.float32) if sae_cfg.transcoder else x_in
    state = _State(since_fired=torch.zeros(sae_cfg.n_latents, dtype=torch.int64, device=device))
    groups = sae_cfg.n_layers if isinstance(sae_cfg, CLTConfig) else None
    if cfg.normalize_to == "sqrt_d":
        state.scale_in, state.scale_out = _sqrt_d_scale(x_in, groups), _sqrt_d_scale(x_out, groups)
    sae.init_b_dec(x_out * _factor(state.scale_out, sae_cfg.d_target, device))
    return state, itertools.chain(head, stream)


def _sqrt_d_scale(x: Tensor, groups: int | None = None) -> Scale:
    """c such that the mean L2 norm of c * x is sqrt(d); with `groups` (layers side by side in each row), one
    such c per group, so that every layer of a cross-layer transcoder weighs the same in the loss."""
    if groups is not None:
        return [_one_scale(part) for part in x.chunk(groups, dim=1)]
    return _one_scale(x)


def _one_scale(x: Tensor) -> float:
    mean_norm = float(x.double().norm(dim=1).mean())
    return math.sqrt(x.shape[1]) / mean_norm if mean_norm > 0 else 1.0


def _rebatch(it: Iterator[Batch], batch_size: int, paired: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x_in, x_out) chunks of exactly batch_size rows (the ragged tail is dropped).

    For SAEs x_out is x_in itself (no copy)."""
    buf_in: list[Tensor] = []
    buf_out: list[Tensor] = []
    n = 0
    for item in it:
        if paired != isinstance(item, (tuple, list)):
            kind = "(x_in, x_out) pairs" if paired else "tensors"
            raise ConfigError(f"train(): expected batches of {kind} for this config, got {type(item).__name__}")
        first = item[0] if isinstance(item, (tuple, list)) else item
        x_in = first.reshape(-1, first.shape[-1])
        buf_in.append(x_in)
        if paired:
            buf_out.append(item[1].reshape(-1, item[1].shape[-1]))
            if buf_out[-1].shape[0] != x_in.shape[0]:
                raise AnalysisError(f"train(): x_in has {x_in.shape[0]} rows but x_out has {buf_out[-1].shape[0]}")
        n += x_in.shape[0]
        while n >= batch_size:
            cat_in = torch.cat(buf_in)
            cat_out = torch.cat(buf_out) if paired else cat_in
            chunk = cat_in[:batch_size]
            yield chunk, (cat_out[:batch_size] if paired else chunk)
            buf_in, buf_out, n = [cat_in[batch_size:]], [cat_out[batch_size:]] if paired else [], n - batch_size


def _skip(stream: Iterator[tuple[Tensor, Tensor]], n: int) -> None:
    """Discard the batches a resumed run has already trained on."""
    for i in range(n):
        if next(stream, None) is None:
            raise AnalysisError(f"train(): resuming at step {n}, but the iterator ran dry after {i} batches; "
                             "pass the same (deterministic) batches as the interrupted run")


# ------------------------------------------------------------------------------------- reporting
def _progress_info(state: _State, cfg: TrainConfig, base_lr: float, elapsed: float,
                   tokens_done: int, dead_window: int) -> dict[str, Any]:
    rate = tokens_done / elapsed if elapsed > 0 else 0.0
    remaining = (cfg.total_steps - state.step) * cfg.batch_size
    dead = state.since_fired >= dead_window
    return {"step": state.step, "total_steps": cfg.total_steps, "tokens": state.tokens,
            "tokens_per_s": rate, "eta_s": remaining / rate if rate > 0 else float("inf"),
            "lr": cfg.lr_at(state.step - 1, base_lr), "dead_fraction": float(dead.float().mean()),
            **state.ema}


def _final_metrics(state: _State, sae_cfg: ModelConfig, cfg: TrainConfig, ended_early: bool) -> dict[str, Any]:
    dead = state.since_fired >= cfg.resolved_dead_window(sae_cfg.d_sae, sae_cfg.k)
    return {"steps": state.step, "tokens": state.tokens, "ended_early": ended_early,
            "lr": cfg.resolved_lr(sae_cfg.d_sae), "scale_in": state.scale_in, "scale_out": state.scale_out,
            "dead_fraction_train": float(dead.float().mean()),
            **{f"{k}_train": v for k, v in state.ema.items()}}


# ----------------------------------------------------------------------------------- checkpoints
def _config_fingerprint(sae_cfg: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to resume: the configs, plus the values their defaults resolve to (so that
    a new version of the defaults never silently continues a run under different hyperparameters)."""
    train = {k: v for k, v in asdict(cfg).items()
             if k not in _RESUME_FREE_FIELDS and _LATER_FIELD_DEFAULTS.get(k, ...) != v}
    resolved = {"lr": cfg.resolved_lr(sae_cfg.d_sae), "warmup_steps": cfg.resolved_warmup(),
                "dead_window_tokens": cfg.resolved_dead_window(sae_cfg.d_sae, sae_cfg.k), "aux_k": sae_cfg.aux_k_resolved}
    return {"sae_config": asdict(sae_cfg), "train_config": train, "resolved": resolved}


def _save_checkpoint(ckpt: Checkpoints, sae: Model, opt: torch.optim.Optimizer, state: _State,
                     cfg: TrainConfig) -> None:
    """Write ckpt-<step>/ (tensors + json), then point latest.json at it.

    latest.json is replaced atomically and written last (on object stores too: a PUT is atomic), so a crash at
    any moment leaves the previous checkpoint intact and loadable; older checkpoints are removed after."""
    name = f"ckpt-{state.step:09d}"
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    for idx, pstate in opt.state_dict()["state"].items():
        tensors.update({f"optim.{idx}.{k}": v.detach().cpu().contiguous() for k, v in pstate.items()})
    tensors["since_fired"] = state.since_fired.cpu()
    meta = {"format": CHECKPOINT_FORMAT, "step": state.step, "tokens": state.tokens,
            "scale_in": state.scale_in, "scale_out": state.scale_out, "ema": state.ema,
            **_config_fingerprint(sae.cfg, cfg)}
    ckpt.put(f"{name}/state.safetensors", st_save(tensors))
    ckpt.put(f"{name}/state.json", json.dumps(meta, indent=1).encode())
    ckpt.put("latest.json", json.dumps({"checkpoint": name, "step": state.step}).encode())
    ckpt.drop_others(name)


class Checkpoints:
    """A checkpoint folder on any fsspec filesystem (local disk, S3, ...)."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self.fs, self.root = storage.get_fs(self.url, storage_options)

    def put(self, name: str, data: bytes) -> None:
        path = storage.join(self.root, name)
        storage.with_retries(lambda: storage.put_atomic(self.fs, path, data), f"writing checkpoint {name}")

    def get(self, name: str) -> bytes:
        path = storage.join(self.root, name)
        return storage.with_retries(lambda: self.fs.cat_file(path), f"reading checkpoint {name}")

    def latest(self) -> str | None:
        if not self.fs.exists(storage.join(self.root, "latest.json")):
            return None
        return json.loads(self.get("latest.json"))["checkpoint"]

    def drop_others(self, keep: str) -> None:
        for path in self.fs.ls(self.root, detail=False):
            base = path.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("ckpt-") and base != keep:
                self.fs.rm(path, recursive=True)


def _load_checkpoint(ckpt: Checkpoints, sae: Model, opt: torch.optim.Optimizer,
                     sae_cfg: ModelConfig, cfg: TrainConfig) -> _State | None:
    """Restore weights, Adam state and counters from the newest checkpoint; None when there is none."""
    name = ckpt.latest()
    if name is None:
        return None
    meta = json.loads(ckpt.get(f"{name}/state.json"))
    if "resolved" not in meta:
        raise OutputError(f"checkpoint folder {ckpt.url} was written by an earlier actstore whose training "
                          "defaults (lr, AuxK weight, dead-latent window) differ; it cannot resume: use a new output")
    fingerprint = _config_fingerprint(sae_cfg, cfg)
    if fingerprint != {k: meta[k] for k in fingerprint}:
        raise OutputError(f"checkpoint folder {ckpt.url} holds a run with a different SAE/training config; "
                          "use a new output or the original config")
    # Loaded on CPU: Adam keeps its step counters there and load_state_dict moves the rest to the params.
    tensors = st_load(ckpt.get(f"{name}/state.safetensors"))
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    params = [p for group in opt.param_groups for p in group["params"]]
    opt.load_state_dict({"state": _optim_state(tensors, params), "param_groups": opt.state_dict()["param_groups"]})
    return _State(step=meta["step"], tokens=meta["tokens"], scale_in=meta["scale_in"],
                  scale_out=meta["scale_out"], since_fired=tensors["since_fired"].to(sae.W_enc.device),
                  ema=meta["ema"])


def _optim_state(tensors: dict[str, Tensor], params: list[Tensor]) -> dict[int, dict[str, Tensor]]:
    out: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            param = params[int(idx)]
            # Laid out like the parameter (fresh storage): the fused Adam kernel rounds an element differently
            # in its vectorised body and its scalar tail, so state in another memory order would make a
            # resumed run differ from an uninterrupted one in the last bit.
            if value.shape == param.shape:
                value = torch.empty_like(param).copy_(value)
            out.setdefault(int(idx), {})[name] = value
    return out
