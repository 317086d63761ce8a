"""`extract` with `append: hooks | tokens`: grow a complete store without rewriting anything it already holds.

append: hooks -- the config equals the store's except `hooks`, which lists only new hooks. The corpus is planned
again exactly as `extract` plans it, and every planned shard must match the manifest's (sequence and token ranges,
tokens.parquet SHA-256) before any forward pass. The model then runs for the new hooks only (early exit applies)
and each shard gains acts.zarr/<hook>, stats-<tag>.safetensors and, last, append-<tag>.json (the shard's commit
record for this append; see `shard_writer.append_arrays`). Finally stats/<new hook>/ is written and the manifest is
replaced: hooks, every shard's arrays and the stats extended, the recorded config's hooks the union, and the
config hash that of the union config -- the same hash a fresh extract with every hook records.

append: tokens -- the config equals the store's except the corpus (`corpus`, `max_docs`, `text_field`, `split`).
The new corpus is planned like any extract and shifted to follow the store: sequence ids, token rows and doc ids
continue from the manifest's n_sequences / n_tokens / n_docs, so the new shards' ids (their first sequence) never
collide with the old ones. New shards are ordinary shards (resume skips committed ones). Then docs.parquet is
replaced (old rows, then the new ones; new metadata columns are null for old rows), the merged statistics of
every hook are recomputed from all shards' files in shard order (exactly what one run over all shards gives), and
the manifest is replaced with the shard list extended and `corpus.parts` listing every corpus of the store.

The paragraphs above describe format v1 stores, which are grown with v1 planning (the whole corpus planned by the
driver, global ids). Format v2 stores are grown part by part (`append_parts`): hooks are checked shard by shard as
each part is re-read (a shard must match the store's before its forward pass), and a new corpus becomes new parts
numbered after the store's, so its ids never collide with the old ones.

Both hold the output's Lease, run on the local or the Ray executor, and refuse with a one-line AppendError when the
output is not a complete store or the config does not fit it. Until the new manifest is committed readers see the
old store; docs.parquet and stats/ are replaced just before it, so a reader opening the store in that instant can
see the new docs rows or statistics with the old manifest (the shard list, which addresses every array, is exact).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actstore.pipeline.extract.append_common import (
    CORPUS_FIELDS,
    append_lease,
    check_unchanged,
    normalized,
    part_config,
    parts_of,
    parts_sha256,
    progress_bar,
    store_config,
    store_docs,
)
from actstore.pipeline.extract.append_parts import append_hooks_v2, append_tokens_v2
from actstore.pipeline.extract.commit import commit_manifest, hook_infos, kind_of, store_stats, write_docs, write_stats
from actstore.pipeline.extract.executors import run_shards
from actstore.pipeline.extract.preflight import check_model
from actstore.pipeline.extract.sharding import Plan, make_plan_v1
from actstore.pipeline.store.store import Store, open_store
from actstore.schemas import layout
from actstore.schemas.config import ExtractConfig
from actstore.schemas.errors import (
    AppendError,  # noqa: F401  (defined with its siblings; raised here)
    OutputError,
)
from actstore.schemas.hooks import parse_hooks
from actstore.schemas.manifest import CorpusInfo, CorpusPart, Manifest, ShardInfo
from actstore.workers import storage
from actstore.workers.runner import load_tokenizer
from actstore.workers.shard_writer import is_appended, is_committed, read_append, read_commit, shard_path, tokens_sha256
from actstore.workers.tokenize import Sequence, ShardPlan, special_ids

log = logging.getLogger("actstore")


def append(cfg: ExtractConfig) -> Store:
    """Grow the complete store at `cfg.output` as `cfg.append` says; returns the grown Store."""
    fs, root = storage.get_fs(cfg.output, cfg.storage_options)
    append_lease(cfg, fs, root).check_free()  # a concurrent writer is refused as such, before the output's state is read
    store = _complete_store(cfg, fs, root)
    if cfg.append == "hooks":
        return _append_hooks(cfg, store, fs, root)
    return _append_tokens(cfg, store, fs, root)


def _complete_store(cfg: ExtractConfig, fs, root: str) -> Store:
    what = f"append: {cfg.append}"
    if not fs.exists(storage.join(root, layout.MANIFEST)):
        if fs.exists(storage.join(root, layout.RUN_RECORD)) or fs.exists(storage.join(root, layout.SHARDS)):
            raise AppendError(f"{what}: output {cfg.output!r} holds an interrupted extract; finish it first by "
                              "rerunning its config without append")
        raise AppendError(f"{what}: output {cfg.output!r} holds no complete store to grow; run extract without "
                          "append first")
    store = open_store(cfg.output, cfg.storage_options)
    man = store.manifest
    if not man.extract_config or not man.corpus or not man.shards:
        raise AppendError(f"{what}: the store at {cfg.output!r} was not written by `actstore extract` (no recorded "
                          "config, corpus or shards: e.g. from_arrays); only extracted stores can grow")
    if man.extract_config.get("generate") is not None or cfg.generate is not None:
        # hooks would have to be run over the stored responses, not new ones: not supported yet
        raise AppendError(f"{what}: stores of generated responses (generate) cannot grow yet; extract again with "
                          "every hook (or the new corpus) into a new output")
    return store


# ---- config checks --------------------------------------------------------------------------------------------
def _check_config(cfg: ExtractConfig, man: Manifest, free: tuple[str, ...]) -> None:
    """Every content field outside `free` must equal the store's (corpus fields: those of its first corpus)."""
    first = parts_of(man)[0]
    recorded = {**man.extract_config, **{k: getattr(first, k) for k in CORPUS_FIELDS}}
    for key, value in cfg.content_dict().items():
        if key in free:
            continue
        default = ExtractConfig.model_fields[key].default
        old = recorded.get(key, default)
        if normalized(key, old) != normalized(key, value):
            raise AppendError(f"append: {cfg.append}: {key} is {value!r} but the store at {cfg.output!r} was made "
                              f"with {old!r}; only {', '.join(free)} may differ from the store's config")


def _recorded_hooks(man: Manifest) -> list[str]:
    hooks = (man.extract_config or {}).get("hooks")
    return list(hooks) if isinstance(hooks, list) else [h.name for h in man.hooks]


# ---- planning -------------------------------------------------------------------------------------------------
def shifted(plan: Plan, seq0: int, tok0: int, doc0: int) -> Plan:
    """The plan placed after `seq0` sequences, `tok0` token rows and `doc0` documents (ids derive from the input)."""
    shards = [ShardPlan(f"{p.seq_start + seq0:09d}", p.seq_start + seq0, p.token_start + tok0,
                        [Sequence(s.ids, s.doc + doc0, s.special, s.chars) for s in p.sequences]) for p in plan.shards]
    i = plan.docs.schema.get_field_index("doc_id")
    docs = plan.docs.set_column(i, "doc_id", pc.add(plan.docs.column("doc_id"), pa.scalar(doc0, pa.int64())))
    return Plan(shards, docs, plan.corpus_sha256, plan.special)


def _store_plans(cfg: ExtractConfig, tok: Any, man: Manifest) -> list[ShardPlan]:
    """Plan every corpus of the store again (as extract does) and check each against its recorded hash."""
    shards: list[ShardPlan] = []
    for i, part in enumerate(parts_of(man)):
        plan = make_plan_v1(cfg if i == 0 else part_config(cfg, part, i), tok)
        if plan.corpus_sha256 != part.sha256:
            raise AppendError(f"append: hooks: the corpus differs from the store's (content hash "
                              f"{plan.corpus_sha256[:12]} != {part.sha256[:12]}); give the corpus the store was made "
                              "from")
        shards += shifted(plan, part.seq_start, part.token_start, part.doc_start).shards
    return shards


def _check_shards(plans: list[ShardPlan], man: Manifest, fs, root: str) -> None:
    """Each planned shard must be the manifest's: same ranges and the same token index bytes."""
    if len(plans) != len(man.shards):
        raise AppendError(f"append: hooks: the corpus plans {len(plans)} shards but the store has {len(man.shards)}; "
                          "the tokenizer or the planning changed since the store was written")
    for p, s in zip(plans, man.shards):
        want = (p.shard_id, p.seq_start, p.seq_start + len(p.sequences), p.token_start, p.token_start + p.n_tokens)
        have = (s.id, s.seq_start, s.seq_end, s.token_start, s.token_end)
        if want != have or not _same_tokens(p, s, fs, root):
            raise AppendError(f"append: hooks: shard {s.id} of the store does not match the corpus as planned now "
                              f"(ranges {have} vs {want}, or its token index differs); the tokenizer or the corpus "
                              "changed since the store was written")


def _same_tokens(p: ShardPlan, s: ShardInfo, fs, root: str) -> bool:
    table = p.tokens_table()
    if tokens_sha256(table) == s.tokens_sha256:
        return True
    # Another pyarrow may encode the same table differently: then compare the stored (checksummed) rows. A store
    # written before tokens had character spans lacks those columns: compare the columns it has.
    raw = fs.cat_file(layout.shard_file(root, s.id, layout.TOKENS))
    stored = pq.read_table(pa.BufferReader(raw))
    table = table.select([c for c in table.column_names if c in stored.column_names])
    return hashlib.sha256(raw).hexdigest() == s.tokens_sha256 and stored.equals(table)


# ---- append: hooks --------------------------------------------------------------------------------------------
def _append_hooks(cfg: ExtractConfig, store: Store, fs, root: str) -> Store:
    man = store.manifest
    new = [s.name for s in parse_hooks(cfg.hooks)]
    have = [h for h in new if h in store.hooks]
    if have:
        raise AppendError(f"append: hooks: {', '.join(have)} already in the store at {cfg.output!r}; list only "
                          "hooks it does not hold")
    _check_config(cfg, man, free=("hooks",))
    check_model(cfg)
    tok = load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    tag = hashlib.sha256(json.dumps([man.config_hash, man.corpus.sha256, new]).encode()).hexdigest()[:16]
    union = cfg.model_copy(update={"hooks": _recorded_hooks(man) + list(cfg.hooks), "append": None})
    if man.parts is not None:  # format v2: streamed part by part

        append_hooks_v2(cfg, man, tok, tag, fs, root, lambda: _finish_hooks(union, man, new, tag, fs, root))
        return open_store(cfg.output, cfg.storage_options)
    plans = _store_plans(cfg, tok, man)
    _check_shards(plans, man, fs, root)
    with append_lease(cfg, fs, root):
        check_unchanged(cfg, man)
        todo = [p for p in plans if not is_appended(fs, root, p.shard_id, tag)]
        with progress_bar(cfg, man.n_tokens, man.n_tokens - sum(p.n_tokens for p in todo)) as bar:
            run_shards(cfg, todo, special_ids(tok).pad, fs, root, bar.update, append_tag=tag)
        _finish_hooks(union, man, new, tag, fs, root)
    return open_store(cfg.output, cfg.storage_options)


def _finish_hooks(union: ExtractConfig, man: Manifest, new: list[str], tag: str, fs, root: str) -> Manifest:
    shards = []
    for s in man.shards:
        rec = storage.with_retries(lambda s=s: read_append(fs, root, s.id, tag), f"reading the append of {s.id}")
        if rec.get("hooks") != new:
            raise AppendError(f"append: hooks: shard {s.id} holds an append record for {rec.get('hooks')}, not {new}")
        shards.append(s.model_copy(update={"arrays": {**s.arrays, **rec["arrays"]}}))
    stats = store_stats(fs, root, man.shards, new)
    write_stats(fs, root, stats, atomic=True)
    recorded, config_hash = store_config(union, parts_of(man) if man.corpus.parts else [])
    manifest = Manifest.model_validate({
        **man.model_dump(), "config_hash": config_hash, "extract_config": recorded,
        "hooks": [*man.hooks, *hook_infos(fs, root, man.shards[0].id, new)], "shards": shards,
        "stats": {**man.stats, **{h: stats[h].summary(kind_of(h)) for h in new}},
    })
    commit_manifest(fs, root, manifest)
    return manifest


# ---- append: tokens -------------------------------------------------------------------------------------------
def _append_tokens(cfg: ExtractConfig, store: Store, fs, root: str) -> Store:
    man = store.manifest
    if cfg.span_field:
        raise AppendError("append: tokens does not take span_field; label the grown store with `actstore label`")
    if man.labels:
        raise AppendError(f"append: tokens: the store at {cfg.output!r} has token labels "
                          f"({', '.join(lab.name for lab in man.labels)}), which new rows would leave misaligned; "
                          "append to a copy without labels/ and label it again")
    _check_config(cfg, man, free=CORPUS_FIELDS)
    hooks = _recorded_hooks(man)
    cfg = cfg.model_copy(update={"hooks": hooks})  # the store's hook order (the sets are equal)
    check_model(cfg)
    tok = load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)
    if man.parts is not None:  # format v2: streamed part by part

        append_tokens_v2(cfg, man, tok, fs, root)
        return open_store(cfg.output, cfg.storage_options)
    part_plan = make_plan_v1(cfg, tok)
    parts = parts_of(man)
    for i, p in enumerate(parts):
        if p.sha256 == part_plan.corpus_sha256:
            raise AppendError(f"append: tokens: this corpus is already in the store at {cfg.output!r} (corpus {i}, "
                              f"content hash {p.sha256[:12]}); nothing to append")
    plan = shifted(part_plan, man.n_sequences, man.n_tokens, man.n_docs)
    part = CorpusPart(**{k: getattr(cfg, k) for k in ("text_field", "split", "max_docs")},
                      corpus=str(cfg.public_dict()["corpus"]), sha256=plan.corpus_sha256, n_docs=plan.docs.num_rows,
                      doc_start=man.n_docs, seq_start=man.n_sequences, token_start=man.n_tokens)
    with append_lease(cfg, fs, root):
        check_unchanged(cfg, man)
        docs = _grown_docs(fs, root, man, plan.docs)  # fails on clashing metadata before any forward pass
        _drop_foreign(fs, root, plan.shards, hooks)
        todo = [p for p in plan.shards if not is_committed(fs, root, p.shard_id)]
        with progress_bar(cfg, plan.n_tokens, plan.n_tokens - sum(p.n_tokens for p in todo)) as bar:
            run_shards(cfg, todo, plan.special.pad, fs, root, bar.update)
        _finish_tokens(cfg.model_copy(update={"append": None}), man, plan, [*parts, part], docs, fs, root)
    return open_store(cfg.output, cfg.storage_options)


def _grown_docs(fs, root: str, man: Manifest, new_docs: pa.Table) -> pa.Table:
    """The store's docs.parquet rows followed by the new ones (new columns null for old rows, and vice versa)."""
    old = store_docs(fs, root, man)
    try:
        return pa.concat_tables([old, new_docs], promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise AppendError(f"append: tokens: the new corpus' metadata does not fit docs.parquet: {e}") from None


def _drop_foreign(fs, root: str, plans: list[ShardPlan], hooks: list[str]) -> None:
    """Committed shards at the new ids that are not this plan's came from another interrupted append: drop them."""
    for p in plans:
        if not is_committed(fs, root, p.shard_id):
            continue
        info = read_commit(fs, root, p.shard_id)
        same = (info.seq_start, info.token_start, info.n_tokens, sorted(info.arrays)) == (
            p.seq_start, p.token_start, p.n_tokens, sorted(hooks)) and info.tokens_sha256 == tokens_sha256(
            p.tokens_table())
        if not same:
            log.info("dropping shard %s left by an earlier, different append", p.shard_id)
            fs.rm(shard_path(root, p.shard_id), recursive=True)


def _finish_tokens(cfg: ExtractConfig, man: Manifest, plan: Plan, parts: list[CorpusPart], docs: pa.Table,
                   fs, root: str) -> Manifest:
    new = [storage.with_retries(lambda p=p: read_commit(fs, root, p.shard_id), f"reading shard {p.shard_id}")
           for p in plan.shards]
    for info, p in zip(new, plan.shards):
        if (info.seq_start, info.token_start, info.n_tokens) != (p.seq_start, p.token_start, p.n_tokens):
            raise OutputError(f"committed shard {info.id} does not match the plan; another run wrote it")
    shards = [*man.shards, *new]
    hooks = [h.name for h in man.hooks]
    stats = store_stats(fs, root, shards, hooks)
    write_docs(fs, root, docs)
    write_stats(fs, root, stats, atomic=True)
    recorded, config_hash = store_config(cfg, parts)
    n_docs = man.n_docs + plan.docs.num_rows
    manifest = Manifest.model_validate({
        **man.model_dump(), "config_hash": config_hash, "extract_config": recorded, "shards": shards,
        "n_tokens": man.n_tokens + plan.n_tokens, "n_sequences": man.n_sequences + plan.n_sequences,
        "n_docs": n_docs, "corpus": CorpusInfo(sha256=parts_sha256(parts), n_docs=n_docs, parts=parts),
        "stats": {h: stats[h].summary(kind_of(h)) for h in hooks},
    })
    commit_manifest(fs, root, manifest)
    return manifest
