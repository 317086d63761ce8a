"""One config object per analysis job: `SAEJob`, `TranscoderJob`, `CLTJob`, `ProbeJob`, `SpectrumJob`, `ReportJob`,
`InterveneJob`, `LensJob`, `EncodeJob`, `FeaturesJob`, `UncertaintyJob`, `SpectralSeriesJob`.

Each field is documented once, here (or in the settings it nests: `SAESettings`, `TrainConfig`, `ProbeConfig`).
YAML files, `--set key=value` overrides, the CLI flags (generated from these fields) and Python keywords all
build the same object, so every default is written once. A job records itself (without credentials) in every
result it writes, next to the store's URL and manifest hash.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from actstore.schemas.config import ExtractConfig
from actstore.schemas.generate import GenerateSettings
from actstore.schemas.hooks import parse_hooks
from actstore.schemas.probe import ProbeConfig
from actstore.schemas.sae import SAESettings, TrainConfig
from actstore.schemas.validation import build


class Job(BaseModel):
    """Fields every analysis job has: the store it reads, where it runs, and storage credentials."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    store: str
    """Store path or URL to read (local path, file://, s3://, memory://)."""
    scheduler: str | None = None
    """Dask scheduler address (tcp://host:8786); None = a private local cluster for the duration of the job."""
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    """fsspec options for the store and the outputs (endpoint_url, key, secret, ...). Never logged or recorded."""

    @classmethod
    def build(cls, source: Job | dict | str | Path | None = None, overrides: list[str] | None = None,
              **fields: Any) -> Any:
        """Build from a job object, dict or YAML path, then `key=value` overrides (dotted keys reach nested
        settings, e.g. `train.lr=1e-3`), then keyword fields; every mistake is a one-line ConfigError."""
        return build(cls, source, overrides, **fields)

    def public_dict(self) -> dict[str, Any]:
        """The job as results record it: everything except credentials."""
        return self.model_dump(mode="json", exclude={"storage_options"})


def _hook_list(v: list[str]) -> list[str]:
    parse_hooks(v)  # HookNameError is a ValueError: pydantic reports it against the field
    return v


def _hook(v: str) -> str:
    return _hook_list([v])[0]


Hooks = Annotated[list[str], AfterValidator(_hook_list)]
Hook = Annotated[str, AfterValidator(_hook)]


class _Trained(Job):
    """What the SAE, transcoder and cross-layer transcoder jobs share: training and evaluation settings."""

    sae: SAESettings = Field(default_factory=SAESettings)
    """The SAE's architecture and sparsity."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """How to train (batch size, learning rate, tokens, seed, checkpoints)."""
    eval_fraction: float = Field(default=0.05, gt=0, lt=1)
    """Fraction of the store's rows (the last ones, whole sequences) held out for evaluation."""
    buffer_rows: int = Field(default=1 << 17, gt=0)
    """Rows in the shuffling buffer of the training stream (memory: buffer_rows x d x 4 bytes)."""
    model: str | None = None
    """Causal LM for CE/KL scores (default: the manifest's model; skipped for encoders)."""
    n_eval_seqs: int = Field(default=16, ge=0)
    """Held-out sequences spliced through the model for CE/KL scores (0: skip)."""


class _Evaluated(_Trained):
    """What the SAE and transcoder jobs share besides training: an output of subfolders, the sweep."""

    out: str | None = None
    """Output folder or URL: one SAELens-format subfolder per (hooks, sweep point), with its checkpoints and
    metrics.json (the CLI requires it; in Python, None trains without writing anything)."""
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    """Grid over any sae/train field, e.g. {k: [32, 64], expansion: [8, 16]}: one task per combination."""

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        allowed = set(SAESettings.__dataclass_fields__) | set(TrainConfig.__dataclass_fields__)
        for key, values in v.items():
            if key not in allowed:
                raise ValueError(f"sweep key {key!r} is not an sae or train field")
            if not values:
                raise ValueError(f"sweep {key!r} has no values")
        return v


class SAEJob(_Evaluated):
    """Train sparse autoencoders on stored hooks (one Dask task per hook and sweep point)."""

    hooks: Hooks = Field(default_factory=list)
    """Hooks to train on (one SAE each); empty: the store's hook when it holds exactly one."""


class TranscoderJob(_Evaluated):
    """Train transcoders that predict one hook from another (e.g. MLP in -> MLP out)."""

    in_hook: Hook
    """Input hook, e.g. blocks.2.hook_mlp_in."""
    out_hook: Hook
    """Output hook, e.g. blocks.2.hook_mlp_out."""

    @property
    def hooks(self) -> list[str]:
        return [self.in_hook, self.out_hook]


CLT_OUTPUT_KIND = "hook_mlp_out"


class CLTJob(_Trained):
    """Train a cross-layer transcoder: each layer's MLP input encoded, each feature decoded to its own and every
    later layer's MLP output (one Dask task streaming all layers' hooks)."""

    out: str | None = None
    """Output folder or URL for the CLT (clt.json + clt_weights.safetensors), metrics.json (written last) and
    checkpoints (the CLI requires it; in Python, None trains without writing anything)."""
    layers: list[int] | None = None
    """Consecutive layers the CLT covers, e.g. [0, 1, 2, 3] (default: every layer of the model, 0..n_layers-1;
    for a store without a model, every layer that holds both hooks, which must then start at 0 and have no gap)."""
    in_kind: Literal["hook_mlp_in", "hook_resid_mid"] = "hook_mlp_in"
    """Hook each layer's encoder reads (blocks.{l}.<in_kind>); every layer's target is blocks.{l}.hook_mlp_out."""
    buffer_rows: int = Field(default=1 << 14, gt=0)
    """Rows in the shuffling buffer of the training stream (memory: buffer_rows x 2 x n_layers x d_model x 4
    bytes: 1.2 GB for GPT-2 small's 12 layers at the default)."""

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or v[0] < 0 or any(b != a + 1 for a, b in zip(v, v[1:]))):
            raise ValueError(f"layers must be consecutive ascending layer numbers >= 0, e.g. [0, 1, 2], got {v}")
        return v

    def hooks_for(self, layers: list[int]) -> tuple[list[str], list[str]]:
        """(input hooks, output hooks), one per layer."""
        return ([f"blocks.{i}.{self.in_kind}" for i in layers], [f"blocks.{i}.{CLT_OUTPUT_KIND}" for i in layers])


class ProbeJob(Job):
    """Probe a document label on stored hooks (one Dask task per hook), split by document."""

    label: str
    """Document field (docs.parquet column) holding the label, or `span:NAME` for the token-aligned labels NAME
    (`actstore label`), which need pooling: token."""
    hooks: Hooks = Field(default_factory=list)
    """Hooks to probe (default: every stored hook)."""
    pooling: Literal["mean", "last", "max", "token"] = "mean"
    """How a document's token rows become one vector (mean, last, max), or `token`: one row per labelled token
    (needs a span: label; still split by document, with per-document metrics from the max over its tokens)."""
    exclude_special: bool = True
    """Leave BOS/CLS/SEP/padding tokens out of the pooling."""
    out: str | None = None
    """Output URL or directory for probes-<label>.json, the probe weights and the AUROC-by-layer plot."""
    features: str | None = None
    """sae:URL: probe the SAE latents of a feature store (`actstore encode`) instead of the stored hooks.
    uncertainty: the per-document output-uncertainty features (`actstore uncertainty`; needs token_outputs);
    spectral: per-document summaries (mean, max, last) of the hook's spectral series (`actstore spectral-series`);
    joined with + to concatenate, `hook` naming the hook's pooled rows, e.g. uncertainty+hook."""
    feature_rows: Literal["all", "response"] = "all"
    """Rows the uncertainty and spectral features read: all, or the generated response tokens only."""
    series_window: int = Field(default=16, gt=1)
    """Window (consecutive tokens) of the spectral series behind features: spectral."""
    series_stride: int | None = Field(default=None, gt=0)
    """Stride of the spectral series behind features: spectral (default: the window, no overlap)."""
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    """How to train each probe (kind, regularisation, split fractions, seed)."""

    @model_validator(mode="after")
    def _token_level(self) -> ProbeJob:
        span = self.label.startswith("span:")
        if span and len(self.label) == len("span:"):
            raise ValueError("label span: needs a label name, e.g. span:hallucinated")
        if span and self.pooling != "token":
            raise ValueError(f"label {self.label} is token-aligned: use pooling: token (--pooling token)")
        if self.pooling == "token" and not span:
            raise ValueError(f"pooling token needs token-aligned labels (label: span:NAME), not the document field "
                             f"{self.label!r}")
        if self.pooling == "token" and self.features:
            raise ValueError("pooling token probes the stored hooks; features are per-document inputs")
        return self

    @field_validator("features")
    @classmethod
    def _features(cls, v: str | None) -> str | None:
        if v is None or v.startswith("sae:"):
            return v
        parts = v.split("+")
        if any(p not in ("uncertainty", "spectral", "hook") for p in parts) or len(set(parts)) != len(parts) \
                or parts == ["hook"]:
            raise ValueError("expected sae:URL of a feature store, or a +-join of uncertainty, spectral and hook "
                             f"(e.g. uncertainty+hook), got {v!r}")
        return v


class SpectrumJob(Job):
    """Correlation (or covariance) spectra of stored hooks: Marchenko-Pastur fit, outliers against an MP or
    permutation null, entropy, ranks, massive dimensions."""

    hooks: Hooks = Field(default_factory=list)
    """Hooks to analyse (default: every stored hook)."""
    out: str | None = None
    """Output URL or directory for spectrum-<hook>.json (eigenvalues, outliers, metrics)."""
    exclude_special: bool = True
    """Leave BOS/CLS/SEP/padding tokens out (their activations are outliers of their own)."""
    max_tokens: int | None = Field(default=None, gt=1)
    """Use only the first this many rows (None: all)."""
    tw_margin: float = Field(default=4.0, ge=0)
    """Outlier margin above the null's edge, in Tracy-Widom scales of the largest bulk eigenvalue."""
    precision: Literal["float64", "float32"] = "float32"
    """Per-block products: float32 (accumulated in float64; every eigenvalue within ~1e-8 of the largest of a
    float64 reference) or float64 (~1e-14, slower)."""
    basis: Literal["correlation", "covariance"] = "correlation"
    """Matrix analysed: the correlation matrix (standardised columns, constant ones dropped), or the raw
    covariance. Real activations have a few dimensions with massive variance, and the raw covariance spectrum of
    independent columns with unequal variances is those variances, so Marchenko-Pastur flags nearly everything."""
    null: Literal["mp", "permutation"] = "mp"
    """Null for outliers: the Marchenko-Pastur edge, or the top eigenvalue of row-sample copies with every column
    permuted independently (same marginals, no correlations; robust to heavy tails). Both counts are reported."""
    permutations: int = Field(default=3, ge=1)
    """Permuted copies for the permutation null."""
    null_rows: int = Field(default=100_000, ge=2)
    """Rows sampled (whole store, seeded) for the permutation null."""
    seed: int = 0
    """Seed of the permutation null's row sample and permutations."""


class ReportJob(Job):
    """A self-contained HTML report of a store and of the results made from it."""

    out: str = "report.html"
    """Output HTML file (path or URL)."""
    results: str | None = None
    """Folder or URL searched for SAE/probe/spectra results of this store (default: the store's parent)."""
    hooks: Hooks = Field(default_factory=list)
    """Hooks to plot a spectrum for (default: up to 8)."""
    label: str | None = None
    """Document field whose classes colour the spectral series (a few documents per class); None: no classes."""


class LensJob(Job):
    """Logit lens: the model's final norm and unembedding applied to stored residual-stream hooks."""

    hooks: Hooks = Field(default_factory=list)
    """Residual-stream hooks to read (default: every stored hook_resid_pre/mid/post)."""
    out: str | None = None
    """Output URL or directory for lens.json (per layer) and, with per_token, lens-tokens.parquet."""
    per_token: bool = False
    """Also write lens-tokens.parquet: per stored token row, the rank of the true next token at each hook."""
    model: str | None = None
    """Causal LM to take the final norm and unembedding from (default: the manifest's model id and revision)."""
    device: str = "auto"
    """Torch device for the unembedding: auto (cuda when available), cpu, cuda, ..."""
    batch_rows: int = Field(default=512, gt=0)
    """Token rows unembedded at a time (memory: batch_rows x vocabulary x 8 bytes)."""
    max_tokens: int | None = Field(default=None, gt=1)
    """Use only the sequences within the first this many rows (None: all)."""


class EncodeJob(Job):
    """Encode a stored hook with an SAE into a sparse feature store (top-k latent ids and values per token)."""

    sae: str
    """SAE directory (SAELens format, e.g. written by `actstore train sae`)."""
    out: str
    """Feature store path or URL to write (resumable: rerunning skips committed shards)."""
    hook: Hook | None = None
    """Stored hook to encode (default: the SAE's own hook; another one is refused)."""
    k: int | None = Field(default=None, gt=0)
    """Latents kept per token, largest first (default: the SAE's k for TopK SAEs, else 64)."""
    batch_rows: int = Field(default=8192, gt=0)
    """Rows encoded at a time (memory: batch_rows x d_sae x 4 bytes)."""
    device: str = "cpu"
    """Torch device for encoding."""
    overwrite: bool = False
    """Replace a feature store (or an interrupted encode of another SAE) already at `out`."""


class FeaturesJob(Job):
    """Per-latent density, mean and max activation and top contexts of a feature store, in one streaming pass."""

    out: str | None = None
    """Output folder or URL (default: `summary/` inside the feature store)."""
    top_n: int = Field(default=20, gt=0)
    """Top-activating contexts kept per latent (memory: top_n x d_sae values)."""
    window: int = Field(default=8, ge=0)
    """Tokens of context on each side of a top-activating token."""
    label: str | None = None
    """Document field (docs.parquet) to correlate each latent's per-document mean activation with."""
    exclude_special: bool = True
    """Leave BOS/CLS/SEP/padding tokens out of densities, means and contexts."""
    doc_counts: bool = True
    """Also write doc_counts.parquet: per (document, latent) the number of tokens it fired on and its sum."""


class UncertaintyJob(Job):
    """Per-token and per-document uncertainty of the model's own next-token predictions (from token_outputs)."""

    scheduler: str | None = None
    """Unused: uncertainty only reads the store's Parquet tables (kept so that every job takes the same keys)."""

    out: str | None = None
    """Output Parquet file (path or URL) for the table chosen by `level` (provenance in its metadata)."""
    level: Literal["document", "token"] = "document"
    """Table written to `out`: one row per document (mean/max surprisal and entropy, mean top-1/top-2 margin), or
    one row per token row (row-aligned with tokens())."""
    rows: Literal["all", "response"] = "all"
    """Predictions the document features aggregate: of every token of the document, or of its generated response
    tokens only (needs a store with a `response` token column)."""


class SpectralSeriesJob(Job):
    """Spectral descriptors of sliding windows of consecutive tokens, per document and hook (EigenTrack-style)."""

    hooks: Hooks = Field(default_factory=list)
    """Hooks to analyse (default: every stored hook)."""
    window: int = Field(gt=1)
    """Consecutive tokens per window (windows shorter than this, at a document's end, are not reported)."""
    stride: int | None = Field(default=None, gt=0)
    """Tokens between window starts (default: the window, no overlap)."""
    rows: Literal["all", "response"] = "all"
    """Tokens windowed: all of each document, or its generated response tokens only (needs a `response` column)."""
    basis: Literal["correlation", "covariance"] = "correlation"
    """Matrix each window's descriptors come from: the correlation matrix (constant columns dropped) or covariance."""
    exclude_special: bool = True
    """Leave BOS/CLS/SEP/padding tokens out of the windows."""
    tw_margin: float = Field(default=4.0, ge=0)
    """Outlier margin above the MP edge, in Tracy-Widom scales (for n_outliers)."""
    out: str | None = None
    """Output Parquet file (path or URL) for the series (provenance in its metadata)."""
    scheduler: str | None = None
    """Dask scheduler address (tcp://host:8786) to run one task per hook on; None: local threads."""


# ---- interventions: an extraction's inputs plus what to do to the hooks -----------------------------------

def _extract_field(name: str) -> Any:
    """ExtractConfig's field (default, constraints and docstring), so each shared key is documented once."""
    return copy.deepcopy(ExtractConfig.model_fields[name])


class InterveneGenerate(GenerateSettings):
    """Greedy (or seeded sampled) continuations of the first documents, once per intervention."""

    max_new_tokens: int = Field(default=32, gt=0)
    """Tokens generated per prompt."""
    n_prompts: int = Field(default=4, gt=0)
    """The first this many documents of the corpus are the prompts (truncated to context_length)."""
    seed: int = 0
    """Seed of prompt i is seed + i, the same for every intervention (so texts differ only by the edit)."""

    @model_validator(mode="after")
    def _unsupported(self) -> InterveneGenerate:
        if self.chat_template or self.stop:
            raise ValueError("generate.chat_template and generate.stop are extraction settings; intervene "
                             "continues the documents as they are and stops at EOS")
        return self


Mode = Literal["add", "ablate", "clamp", "patch", "zero", "mean"]
DIRECTION_MODES = ("add", "ablate", "clamp")


class InterveneJob(BaseModel):
    """Run a causal LM over a corpus with hooks edited (add/ablate/clamp a direction, patch, zero or mean)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    model: str = _extract_field("model")
    revision: str | None = _extract_field("revision")
    model_dtype: Literal["float32", "float16", "bfloat16"] = _extract_field("model_dtype")
    device: str = _extract_field("device")
    trust_remote_code: bool = _extract_field("trust_remote_code")
    corpus: str | list[str] | list[dict[str, Any]] = _extract_field("corpus")
    text_field: str = _extract_field("text_field")
    split: Literal["document", "lines"] = _extract_field("split")
    extensions: list[str] | None = _extract_field("extensions")
    max_docs: int | None = _extract_field("max_docs")
    hooks: list[str] = _extract_field("hooks")
    context_length: int = _extract_field("context_length")
    packing: bool = _extract_field("packing")
    batch_size: int = _extract_field("batch_size")
    shard_tokens: int = _extract_field("shard_tokens")
    executor: Literal["ray", "local"] = _extract_field("executor")
    ray_address: str | None = _extract_field("ray_address")
    num_workers: int | None = _extract_field("num_workers")
    storage_options: dict[str, Any] = _extract_field("storage_options")
    progress: bool = _extract_field("progress")

    mode: list[Mode] = Field(min_length=1)
    """Intervention(s), each applied alone to each hook: add (h + s*v), ablate (remove s times the component
    along the direction), clamp (move the component s of the way to `value`), patch (move h s of the way to
    source_store's rows for the same tokens), zero (s of the way to 0), mean (s of the way to the hook's mean)."""
    scales: list[float]
    """Strengths s; 0 is the clean forward (bit for bit), 1 the full edit (zero with s=1 gives exact zeros)."""
    direction: str | None = None
    """Direction file (actstore.directions) for add, ablate and clamp; also restricts patch to its span."""
    components: list[int] | None = None
    """Rows of the direction file to use (default: all; ablate removes their span, add adds their sum)."""
    value: float = 0.0
    """clamp: the value the component along each (unit) direction row is set to."""
    source_store: str | None = None
    """Store holding the hooks for the same token rows (patch), whose stored mean mode mean uses (default for
    mean: the hook's mean over this corpus, from an extra clean pass)."""
    positions: list[int] | None = None
    """Edit only these positions of each sequence (negative: from its end, e.g. [-1]); None: every position."""
    any_hook: bool = False
    """Allow a direction made at another hook than the one edited (the widths must still agree)."""
    topk: int = Field(default=10, ge=0)
    """Tokens listed per row whose mean next-token probability rose (top_increased) or fell (top_decreased) most."""
    generate: InterveneGenerate | None = None
    """Also generate continuations per row (needs packing: false; not with patch), e.g. {max_new_tokens: 20}."""
    out: str | None = None
    """Output folder or URL for intervene.parquet and intervene.json (with the job and the direction's source)."""

    @field_validator("mode", mode="before")
    @classmethod
    def _one_mode(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("hooks", "corpus", "extensions")
    @classmethod
    def _extract_checks(cls, v: Any, info: ValidationInfo) -> Any:
        """The same checks as ExtractConfig's for the keys they share."""
        for dec in ExtractConfig.__pydantic_decorators__.field_validators.values():
            if info.field_name in dec.info.fields:
                v = dec.func(v)
        return v

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one scale, e.g. [0, 1, 4] (0 is the clean run)")
        if any(s != s or s in (float("inf"), float("-inf")) for s in v):
            raise ValueError("scales must be finite numbers")
        return v

    @model_validator(mode="after")
    def _needs(self) -> InterveneJob:
        need_dir = [m for m in self.mode if m in DIRECTION_MODES]
        if need_dir and not self.direction:
            raise ValueError(f"mode {need_dir[0]} needs a direction file (direction: PATH)")
        if "patch" in self.mode and not self.source_store:
            raise ValueError("mode patch needs source_store: a store of the same hooks for the same tokens")
        if self.generate is not None and self.packing:
            raise ValueError("generate needs packing: false (one prompt per document)")
        if self.generate is not None and "patch" in self.mode:
            raise ValueError("generate cannot patch: stored activations exist only for the stored tokens")
        return self

    @classmethod
    def build(cls, source: Any = None, overrides: list[str] | None = None, **fields: Any) -> Any:
        """Build from a job object, dict or YAML path, then `key=value` overrides, then keyword fields."""
        return build(cls, source, overrides, **fields)

    def public_dict(self) -> dict[str, Any]:
        """The job as results record it: no credentials, in-memory corpora summarised."""
        data = self.model_dump(mode="json", exclude={"storage_options"})
        if not isinstance(self.corpus, str):
            data["corpus"] = f"<in-memory list of {len(self.corpus)} documents>"
        return data

    def extract_config(self) -> ExtractConfig:
        """The extraction config with the same inputs (planning reuses extraction's: same sequences, same rows)."""
        # `generate` differs: here it continues the planned documents, in extraction it makes them prompts
        shared = {k: getattr(self, k) for k in ExtractConfig.model_fields
                  if k in type(self).model_fields and k != "generate"}
        return ExtractConfig.model_validate({**shared, "output": "actstore-intervene-writes-no-store"})


JOBS: dict[str, type[Any]] = {"sae": SAEJob, "transcoder": TranscoderJob, "clt": CLTJob, "probe": ProbeJob,
                              "spectra": SpectrumJob, "report": ReportJob, "intervene": InterveneJob,
                              "lens": LensJob, "encode": EncodeJob, "features": FeaturesJob,
                              "uncertainty": UncertaintyJob, "spectral-series": SpectralSeriesJob}
