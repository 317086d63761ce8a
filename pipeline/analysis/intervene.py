"""`actstore.intervene` / `actstore intervene`: push a model along stored directions (or patch, zero, mean-ablate
its hooks) over a corpus and measure the change of its next-token predictions.

The corpus is planned exactly as extraction plans it (`sharding.make_plan`: the same sequences, the same
rows), so `patch` reads the rows of a store extracted from the same tokens, and each planned shard is one
task: the local executor runs them in this process, the Ray executor on an actor pool (one model per actor).
A task returns float64 sums (NLL, KL, top-1 agreement, per-token probability change) for each
(hook, mode, scale); the driver adds them in shard order, so both executors give the same table.

Checks that need no weights (config, hooks against the model config, widths of the direction, the source
store's hooks and token layout, the output) run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.pipeline.analysis.directions import Direction
from actstore.pipeline.analysis.directions import load as load_direction
from actstore.schemas.errors import ConfigError, HookNameError
from actstore.schemas.hooks import HookSpec, parse_hooks
from actstore.schemas.jobs import DIRECTION_MODES, InterveneJob
from actstore.workers.tokenize import ShardPlan

log = logging.getLogger("actstore")
TABLE_FILE, JSON_FILE = "intervene.parquet", "intervene.json"


@dataclass
class Spec:
    """One row of the result: an edit of one hook with one mode and scale, and the tensors it needs."""

    hook: str
    mode: str
    scale: float
    vectors: np.ndarray | None = None
    basis: np.ndarray | None = None
    value: float = 0.0
    mean: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Prepared:
    """Everything checked before any model weight is loaded."""

    job: InterveneJob
    tokenizer: Any
    plan: Any
    direction: Direction | None
    specs: list[Spec] = field(default_factory=list)
    source: Any = None  # the source Store (patch / mean), opened


# ------------------------------------------------------------------------------------------------- checks


def hook_width(model_cfg: Any, spec: HookSpec) -> int | None:
    """Width of a canonical hook from the model config (None for module: hooks: known only at run time)."""
    if spec.is_module:
        return None
    d = getattr(model_cfg, "hidden_size", None) or getattr(model_cfg, "n_embd", None)
    if spec.kind == "mlp.hook_post":
        inner = getattr(model_cfg, "intermediate_size", None) or getattr(model_cfg, "n_inner", None)
        return int(inner) if inner else (4 * int(d) if d else None)
    return int(d) if d else None


def check_direction(job: InterveneJob, model_cfg: Any) -> Direction | None:
    """Load the direction file and check its width and hook against every edited hook."""
    if not job.direction:
        return None
    direction = load_direction(job.direction, job.storage_options)
    if job.components is not None:
        bad = [c for c in job.components if not 0 <= c < direction.k]
        if bad or not job.components:
            raise ConfigError(f"components: {bad or '[]'} not in [0, {direction.k}) (rows of {job.direction})")
        direction.vectors = direction.vectors[job.components]
    for spec in parse_hooks(job.hooks):
        width = hook_width(model_cfg, spec)
        if width is not None and width != direction.d:
            raise ConfigError(f"direction {job.direction!r} has width {direction.d} but hook {spec.name!r} of "
                              f"{job.model!r} has width {width}")
        if direction.hook and direction.hook != spec.name and not job.any_hook:
            raise HookNameError(f"direction {job.direction!r} was made at {direction.hook!r}, not {spec.name!r}; "
                                "intervene there, or set any_hook: true to use it at another hook of the same width")
    return direction


def _open_source(job: InterveneJob) -> Any:
    if not job.source_store:
        return None
    from actstore.pipeline.store.store import open_store

    src = open_store(job.source_store, job.storage_options)
    for h in job.hooks:
        src.manifest.hook(h)  # HookNameError naming the store's hooks
    return src


def global_rows(plan: Any) -> Any:
    """The plan with each shard's `token_start` as its row in the whole corpus (extraction plans count rows
    within each corpus part; a patch reads the source store by global row)."""
    off = 0
    shards = []
    for p in plan.shards:
        shards.append(dataclasses.replace(p, token_start=off))
        off += p.n_tokens
    return dataclasses.replace(plan, shards=shards)


def check_source_layout(src: Any, plan: Any) -> None:
    """The source store must hold the same sequences (count and lengths, in order) as this corpus' plan."""
    ours = np.array([len(s.ids) for p in plan.shards for s in p.sequences], np.int64)
    seq = np.concatenate([src.shard_tokens(i, ["seq_id"]).column("seq_id").to_numpy()
                          for i in range(len(src.manifest.shards))]) if src.manifest.shards else np.zeros(0)
    theirs = np.diff(np.flatnonzero(np.r_[True, seq[1:] != seq[:-1], True])) if len(seq) else np.zeros(0, np.int64)
    if len(ours) != len(theirs) or not np.array_equal(ours, theirs):
        diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ConfigError(f"source_store {src.url!r} holds {len(theirs)} sequences, this corpus plans {len(ours)} "
                          f"(first difference at sequence {diff}); patch needs a store extracted with the same "
                          "context_length and packing from a corpus of the same token lengths")


def prepare(job: InterveneJob) -> Prepared:
    """Every check that needs no model weights, then the plan (the corpus tokenized as extraction does)."""
    from actstore.pipeline.analysis.results import check_writable
    from actstore.pipeline.extract.preflight import check_causal, check_model, check_vocab
    from actstore.pipeline.extract.sharding import make_plan
    from actstore.workers.runner import load_tokenizer

    cfg = job.extract_config()
    model_cfg = check_model(cfg)
    check_causal(model_cfg, "intervene", "next-token loss and KL need one")
    direction = check_direction(job, model_cfg)
    source = _open_source(job)
    if source is not None:
        for spec in parse_hooks(job.hooks):
            width = hook_width(model_cfg, spec)
            if width is not None and source.manifest.hook(spec.name).d != width:
                raise ConfigError(f"source_store hook {spec.name!r} has width {source.manifest.hook(spec.name).d}, "
                                  f"the model's {width}")
    if job.out:
        check_writable(job.out, job.storage_options, "output")
    tok = load_tokenizer(job.model, job.revision, job.trust_remote_code)
    check_vocab(tok, model_cfg, job.model)
    plan = global_rows(make_plan(cfg, tok))
    if source is not None and "patch" in job.mode:
        check_source_layout(source, plan)
    return Prepared(job, tok, plan, direction, source=source)


def make_specs(prep: Prepared, means: dict[str, np.ndarray]) -> list[Spec]:
    """One Spec per (hook, mode, scale), in that order."""
    from actstore.workers.interventions import orthonormal

    job, d = prep.job, prep.direction
    basis = orthonormal(d.vectors).numpy() if d is not None else None
    out = []
    for hook in job.hooks:
        for mode in job.mode:
            for scale in job.scales:
                s = Spec(hook, mode, float(scale), value=job.value)
                if d is not None and (mode in DIRECTION_MODES or mode == "patch"):
                    s.vectors = d.vectors if mode == "add" else None
                    s.basis = basis if mode != "add" else None
                if mode == "mean":
                    s.mean = means[hook]
                out.append(s)
    return out


# ------------------------------------------------------------------------------------------- the worker


class InterveneWorker:
    """What one executor slot holds: the model with its hooks; runs one planned shard per call."""

    def __init__(self, job_data: dict[str, Any], pad_id: int, threads: int | None = None) -> None:
        import torch

        from actstore.workers.interventions import Intervener
        from actstore.workers.runner import ModelRunner, resolve_device

        if threads is not None:
            import os

            torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)) if threads > 0 else os.cpu_count() or 1)
        self.job = InterveneJob.model_validate(job_data)
        self.device = resolve_device(self.job.device)
        lm = ModelRunner._load(self.job.model, self.job.revision, self.job.model_dtype, self.job.trust_remote_code,
                               causal_lm=True)
        self.iv = Intervener(lm.to(self.device), self.job.hooks)
        self.pad_id = pad_id
        self._source: Any = None

    def _batches(self, plan: Any) -> Iterator[tuple[np.ndarray, list[int], list[int], Any, Any]]:
        """(sequence indices, their lengths, their first rows in the shard, ids, mask) per batch."""
        from actstore.workers.interventions import batches, padded

        plan = _plan_of(plan)
        seqs = [s.ids for s in plan.sequences]
        starts = np.concatenate([[0], np.cumsum([len(s) for s in seqs])[:-1]]).astype(np.int64)
        for idx in batches(seqs, self.job.batch_size):
            chosen = [seqs[i] for i in idx]
            ids, mask = padded(chosen, self.pad_id, self.device)
            yield idx, [len(s) for s in chosen], [int(starts[i]) for i in idx], ids, mask

    def means(self, plan: Any) -> dict[str, np.ndarray]:
        """Sums and counts of every hook's clean activations over the shard's non-special tokens."""
        import torch

        plan = _plan_of(plan)
        special = [s.special for s in plan.sequences]
        sums: dict[str, np.ndarray] = {}
        keep: dict[str, Any] = {}

        def observe(name: str, t: Any) -> None:
            rows = t.float()[keep["mask"].to(t.device)].double().sum(0).cpu().numpy()
            sums[f"{name}/sum"] = sums.get(f"{name}/sum", 0) + rows
            sums[f"{name}/n"] = sums.get(f"{name}/n", 0) + np.array(float(keep["mask"].sum()))

        self.iv.observe = observe
        try:
            for idx, lengths, _, ids, mask in self._batches(plan):
                m = torch.zeros(ids.shape, dtype=torch.bool)
                for j, i in enumerate(idx):
                    m[j, :lengths[j]] = torch.as_tensor(~special[i])
                keep["mask"] = m
                self.iv.logits(ids, mask)
        finally:
            self.iv.observe = None
        return sums

    def effects(self, plan: Any, specs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Partial sums of the clean run and of every spec over one planned shard."""
        from actstore.workers.interventions import add_sums, clean_sums, effect_sums, next_token_rows

        plan = _plan_of(plan)
        patch_rows = self._patch_rows(plan, specs)
        total: dict[str, np.ndarray] = {}
        for _, lengths, starts, ids, mask in self._batches(plan):
            clean = self.iv.logits(ids, mask)
            rows, nxt = next_token_rows(ids, lengths)
            base = clean_sums(clean, rows, nxt)
            total = add_sums(total, {f"clean/{k}": v for k, v in base.items()})
            for j, spec in enumerate(specs):
                if spec["scale"] == 0:  # the edit is the identity: the clean logits, bit for bit
                    part = {"nll": base["nll"], "kl": np.array(0.0), "agree": base["n"], "n": base["n"]}
                else:
                    edit = self._edit(spec, lengths, starts, ids.shape[1], patch_rows.get(spec["hook"]))
                    part = effect_sums(clean, self.iv.logits(ids, mask, {spec["hook"]: edit}), rows, nxt,
                                       dprob=self.job.topk > 0)
                total = add_sums(total, {f"{j}/{k}": v for k, v in part.items()})
        return total

    def _edit(self, spec: dict[str, Any], lengths: list[int], starts: list[int], width: int, rows: Any) -> Any:
        import torch

        from actstore.workers.interventions import Edit, position_mask, scatter_rows

        t = (lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32))
        src = scatter_rows(rows, starts, lengths, width) if spec["mode"] == "patch" else None
        return Edit(spec["mode"], spec["scale"], vectors=t(spec["vectors"]), basis=t(spec["basis"]),
                    value=spec["value"], mean=t(spec["mean"]), source=src,
                    where=position_mask(lengths, self.job.positions, width))

    def _patch_rows(self, plan: ShardPlan, specs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """The source store's rows of this shard, per hook that a patch spec edits."""
        hooks = sorted({s["hook"] for s in specs if s["mode"] == "patch"})
        if not hooks:
            return {}
        if self._source is None:
            from actstore.pipeline.store.store import open_store

            self._source = open_store(str(self.job.source_store), self.job.storage_options)
        a = plan.token_start
        return {h: read_global_rows(self._source, h, a, a + plan.n_tokens) for h in hooks}

    def generations(self, prompts: list[np.ndarray], specs: list[dict[str, Any]], stop_ids: frozenset[int]) -> list[list[list[int]]]:
        """Per spec, the new token ids of every prompt."""
        from actstore.workers.interventions import generate

        g = self.job.generate
        assert g is not None
        out = []
        for spec in specs:
            texts = []
            for i, p in enumerate(prompts):
                edit = self._edit(spec, [len(p)], [0], len(p), None) if spec["scale"] != 0 else None
                texts.append(generate(self.iv, p, {spec["hook"]: edit} if edit else None, g.max_new_tokens,
                                      g.do_sample, g.temperature, g.top_p, g.seed + i, stop_ids, self.device))
            out.append(texts)
        return out

    def close(self) -> None:
        self.iv.close()


def _plan_of(plan: Any) -> ShardPlan:
    if isinstance(plan, ShardPlan):
        return plan
    from actstore.workers.part_task import decode_plan

    return decode_plan(plan)


def read_global_rows(store: Any, hook: str, a: int, b: int) -> np.ndarray:
    """Decoded rows [a, b) of a hook by global row index (across shard boundaries)."""
    parts = []
    for i, s in enumerate(store.manifest.shards):
        lo, hi = max(a, s.token_start), min(b, s.token_end)
        if lo < hi:
            parts.append(store.read_rows(hook, i, lo - s.token_start, hi - s.token_start))
    return np.concatenate(parts) if parts else np.zeros((0, store.manifest.hook(hook).d), np.float32)


# ------------------------------------------------------------------------------------------------ running


class _Executor:
    """Runs worker methods over plans: in this process (local) or on a Ray actor pool (ray)."""

    def __init__(self, job: InterveneJob, pad_id: int, n_plans: int) -> None:
        self.job, self.pad_id, self.n_plans = job, pad_id, n_plans
        self.local: InterveneWorker | None = None
        self.pool: Any = None

    def __enter__(self) -> _Executor:
        if self.job.executor == "local":
            self.local = InterveneWorker(self.job.model_dump(), self.pad_id)
            return self
        import ray
        from ray.util import ActorPool

        from actstore.pipeline.extract.executors import ray_address
        from actstore.pipeline.extract.executors.ray_pool import pool_shape, ray_session

        cfg = self.job.extract_config()
        self._session = ray_session(ray_address(cfg))
        self._session.__enter__()
        n, res, threads = pool_shape(cfg, same_node=ray_address(cfg) is None)
        actor = ray.remote(**res)(InterveneWorker)
        self.pool = ActorPool([actor.remote(self.job.model_dump(), self.pad_id, threads)
                               for _ in range(max(1, min(n, self.n_plans)))])
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.local is not None:
            self.local.close()
        if self.pool is not None:
            self._session.__exit__(*exc)

    def map(self, method: str, plans: list[ShardPlan], *args: Any) -> Iterator[Any]:
        """Results of `method(plan, *args)` for every plan, in plan order."""
        if self.local is not None:
            for p in plans:
                yield getattr(self.local, method)(p, *args)
            return
        from actstore.pipeline.extract.executors.ray_pool import _own_error
        from actstore.workers.part_task import encode_plan

        try:
            yield from self.pool.map(lambda a, p: getattr(a, method).remote(p, *args), [encode_plan(p) for p in plans])
        except Exception as e:
            cause = _own_error(e)
            if cause is e:
                raise
            raise cause from None

    def call(self, method: str, *args: Any) -> Any:
        """One call on one worker (generation)."""
        if self.local is not None:
            return getattr(self.local, method)(*args)
        self.pool.submit(lambda a, _: getattr(a, method).remote(*args), None)
        return self.pool.get_next()


def intervene(config: InterveneJob | dict | str | Path, overrides: list[str] | None = None) -> pa.Table:
    """Run the interventions a config describes; returns a pyarrow.Table, one row per (hook, mode, scale).

    Columns: hook, mode, scale, loss (mean next-token NLL over every token with a next token in its sequence),
    delta_loss (minus the clean run's), kl (mean KL(clean || edited) of the next-token distributions over the
    same tokens), top1_agreement (with the clean argmax), n_tokens, top_increased / top_decreased (the `topk`
    tokens whose mean probability rose / fell most: token_id, token, delta_prob) and, with `generate`,
    generations (one continuation per prompt; the prompts are in the table's metadata). With `out`, writes
    intervene.parquet and intervene.json (with provenance) there.
    """
    job = InterveneJob.build(config, overrides)
    prep = prepare(job)
    shards = prep.plan.shards
    with _Executor(job, prep.plan.special.pad, len(shards)) as ex:
        means = _means(job, prep, ex)
        specs = make_specs(prep, means)
        total = _effects(job, ex, shards, [s.to_dict() for s in specs])
        gens = _generations(prep, ex, specs) if job.generate is not None else None
    table = result_table(prep, specs, total, gens)
    if job.out:
        save(table, prep, job.out)
    return table


def _progress(job: InterveneJob, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, disable=not job.progress, desc=desc, dynamic_ncols=True)


def _means(job: InterveneJob, prep: Prepared, ex: _Executor) -> dict[str, np.ndarray]:
    """Each hook's mean for mode mean: the source store's statistics, or a clean pass over this corpus."""
    if "mean" not in job.mode:
        return {}
    if prep.source is not None:
        return {h: np.asarray(prep.source.stats(h).mean, np.float32) for h in job.hooks}
    total: dict[str, np.ndarray] = {}
    with _progress(job, prep.plan.n_tokens, "means") as bar:
        for plan, part in zip(prep.plan.shards, ex.map("means", prep.plan.shards)):
            for k, v in part.items():
                total[k] = total[k] + v if k in total else v
            bar.update(plan.n_tokens)
    return {h: (total[f"{h}/sum"] / max(float(total[f"{h}/n"]), 1.0)).astype(np.float32) for h in job.hooks}


def _effects(job: InterveneJob, ex: _Executor, shards: list[ShardPlan], specs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    from actstore.workers.interventions import add_sums

    total: dict[str, np.ndarray] = {}
    with _progress(job, sum(p.n_tokens for p in shards), "intervene") as bar:
        for plan, part in zip(shards, ex.map("effects", shards, specs)):
            total = add_sums(total, part)  # in shard order: the same sums for every executor
            bar.update(plan.n_tokens)
    return total


def _generations(prep: Prepared, ex: _Executor, specs: list[Spec]) -> dict[str, Any]:
    """Prompts (the first documents' sequences, shortened to leave room for the new tokens) and texts per spec."""
    from actstore.workers.runner import max_context

    g, tok = prep.job.generate, prep.tokenizer
    assert g is not None
    seqs = [s.ids for p in prep.plan.shards for s in p.sequences][:g.n_prompts]
    room = (max_context(_model_config(prep.job)) or 10**9) - g.max_new_tokens
    if room < 1:
        raise ConfigError(f"generate.max_new_tokens: {g.max_new_tokens} leaves no room for a prompt in the "
                          "model's positions")
    prompts = [np.asarray(s[:room]) for s in seqs]
    stop = frozenset(int(t) for t in (tok.eos_token_id,) if t is not None)
    new = ex.call("generations", prompts, [s.to_dict() for s in specs], stop)
    return {"prompts": [tok.decode(p) for p in prompts], "texts": [[tok.decode(t) for t in row] for row in new]}


def _model_config(job: InterveneJob) -> Any:
    from actstore.workers.runner import load_config

    return load_config(job.model, job.revision, job.trust_remote_code)


# ------------------------------------------------------------------------------------------------- results


_SHIFT = pa.list_(pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("delta_prob", pa.float64())]))


def result_table(prep: Prepared, specs: list[Spec], total: dict[str, np.ndarray], gens: dict[str, Any] | None) -> pa.Table:
    """The result table (see `intervene`), its metadata holding the clean loss, the job and the prompts."""
    clean = float(total["clean/nll"] / total["clean/n"])
    cols: dict[str, list[Any]] = {k: [] for k in ("hook", "mode", "scale", "loss", "delta_loss", "kl",
                                                   "top1_agreement", "n_tokens", "top_increased", "top_decreased")}
    for j, s in enumerate(specs):
        n = float(total[f"{j}/n"])
        loss = float(total[f"{j}/nll"]) / n
        up, down = _shifts(prep.tokenizer, total.get(f"{j}/dprob"), n, prep.job.topk)
        for k, v in (("hook", s.hook), ("mode", s.mode), ("scale", s.scale), ("loss", loss),
                     ("delta_loss", loss - clean), ("kl", float(total[f"{j}/kl"]) / n),
                     ("top1_agreement", float(total[f"{j}/agree"]) / n), ("n_tokens", int(n)),
                     ("top_increased", up), ("top_decreased", down)):
            cols[k].append(v)
    arrays = {k: pa.array(v, type=_SHIFT) if k.startswith("top_") and k != "top1_agreement" else pa.array(v)
              for k, v in cols.items()}
    arrays["n_tokens"] = arrays["n_tokens"].cast(pa.int64())
    if gens is not None:
        arrays["generations"] = pa.array(gens["texts"], type=pa.list_(pa.string()))
    meta = {"clean_loss": clean, "job": prep.job.public_dict(), "prompts": (gens or {}).get("prompts"),
            "direction": _direction_info(prep.direction)}
    return pa.table(arrays).replace_schema_metadata({"actstore": json.dumps(meta, default=str)})


def _shifts(tok: Any, dprob: np.ndarray | None, n: float, k: int) -> tuple[list[dict], list[dict]]:
    """The k tokens with the largest mean probability gain and loss."""
    if dprob is None or k == 0:
        return [], []
    mean = dprob / n
    order = np.argsort(mean, kind="stable")
    def rows(idx: np.ndarray) -> list[dict]:
        return [{"token_id": int(i), "token": tok.decode([int(i)]), "delta_prob": float(mean[i])} for i in idx]
    return rows(order[::-1][:k]), rows(order[:k])


def _direction_info(d: Direction | None) -> dict[str, Any] | None:
    return None if d is None else {"hook": d.hook, "method": d.method, "k": d.k, "d": d.d, "norm": d.norms,
                                   "source": d.source}


def save(table: pa.Table, prep: Prepared, out: str) -> list[str]:
    """intervene.parquet (the table) and intervene.json (its rows and provenance) under the folder/URL `out`."""
    import io

    import pyarrow.parquet as pq

    from actstore.pipeline.analysis.results import Output, version

    o = Output(out, prep.job.storage_options)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    src = prep.source
    prov = {"kind": "intervene", "job_type": "InterveneJob", "job": prep.job.public_dict(),
            "store_url": src.url if src is not None else None,
            "store_manifest_sha256": src.manifest_sha256 if src is not None else None,
            "direction": _direction_info(prep.direction), "actstore_version": version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    meta = json.loads(table.schema.metadata[b"actstore"])
    return [o.put_bytes(TABLE_FILE, buf.getvalue()),
            o.put_json(JSON_FILE, {"clean_loss": meta["clean_loss"], "prompts": meta["prompts"],
                                   "rows": table.to_pylist(), "provenance": prov})]
