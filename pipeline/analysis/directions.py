"""`actstore.directions`: directions in a hook's activation space, made from stored data and saved as small files.

A direction file holds one or more rows `vectors` (k, d) float32 in a safetensors file whose header metadata
(key `actstore`) is JSON: the format, the hook the vectors live in, how they were made (`method` and its
parameters), each row's L2 norm, whether rows are unit vectors, and the source (store URL, manifest SHA-256,
model id). Any safetensors reader opens it (`safe_open(path).metadata()`); there is no pickle.

Makers:
- `mean_difference(store, hook, label)`: mean of the positive class minus the mean of the others, over one
  pooled vector per document (mean/last/max of its non-special tokens, as probes pool); `whiten=True` solves
  with the pooled within-class covariance (plus a ridge), the linear discriminant direction.
- `from_probe(result)`: a linear probe's weights in raw activation units (its standardisation folded in).
- `from_sae(sae_dir, latents)`: decoder rows of chosen latents (a transcoder's live in its output hook).
- `from_spectrum(result, k)`: the top-k eigenvectors of the covariance (or correlation) a spectrum analysed,
  recomputed from the store and checked against the result's eigenvalues.

`actstore.intervene` reads these files (`direction: PATH`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from actstore.schemas.errors import AnalysisError, ConfigError
from actstore.workers import storage

FORMAT = "actstore.direction"
FORMAT_VERSION = 1
TENSOR = "vectors"
META_KEY = "actstore"
MAX_DIRECTION_BYTES = 1 << 30  # a direction file is small; refuse absurd ones before reading them


@dataclass
class Direction:
    """Rows `vectors` (k, d) in the activation space of `hook`, with how and from what they were made."""

    vectors: np.ndarray
    """(k, d) float32; one row per direction (k = 1 for a single steering vector)."""
    hook: str | None
    """The hook whose activations the rows live in (None: unknown, e.g. made by hand)."""
    method: str
    """mean_difference, probe, sae, spectrum or manual."""
    source: dict[str, Any] = field(default_factory=dict)
    """store_url, store_manifest_sha256 and model of the data the rows came from (when known)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The maker's parameters (label, classes, latents, k, whiten, ...)."""

    def __post_init__(self) -> None:
        v = np.asarray(self.vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
            raise ConfigError(f"direction vectors must be (k, d) with k, d >= 1, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise AnalysisError("direction vectors hold NaN or inf values")
        self.vectors = np.ascontiguousarray(v)

    @property
    def d(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def norms(self) -> list[float]:
        return [float(n) for n in np.linalg.norm(self.vectors.astype(np.float64), axis=1)]

    def unit(self) -> Direction:
        """The same direction(s) with each row scaled to unit L2 norm."""
        norms = np.linalg.norm(self.vectors.astype(np.float64), axis=1, keepdims=True)
        if (norms == 0).any():
            raise AnalysisError("a direction row is zero and has no unit vector")
        return replace(self, vectors=(self.vectors / norms).astype(np.float32))

    def metadata(self) -> dict[str, Any]:
        """The JSON stored in the file's header."""
        from actstore.pipeline.analysis.results import clean, version

        return clean({"format": FORMAT, "format_version": FORMAT_VERSION, "hook": self.hook, "k": self.k,
                      "d": self.d, "method": self.method, "norm": self.norms,
                      "unit": bool(np.allclose(self.norms, 1.0, atol=1e-5)), "source": self.source,
                      "params": self.params, "actstore_version": version(),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def save(self, path: str | Path, storage_options: dict[str, Any] | None = None) -> str:
        """Write the file (atomically) at a local path or fsspec URL; returns where."""
        return save(self, path, storage_options)


def save(direction: Direction, path: str | Path, storage_options: dict[str, Any] | None = None) -> str:
    """Write `direction` as a safetensors file with its JSON metadata; returns the path or URL."""
    from safetensors.numpy import save as st_save

    from actstore.pipeline.analysis.results import Output

    blob = st_save({TENSOR: direction.vectors}, metadata={META_KEY: json.dumps(direction.metadata())})
    folder, _, name = str(path).rstrip("/").rpartition("/")
    return Output(folder or ".", storage_options).put_bytes(name, blob)


def load(path: str | Path, storage_options: dict[str, Any] | None = None) -> Direction:
    """Read a direction file; a missing, foreign or damaged file is a one-line ConfigError."""
    from safetensors.numpy import load as st_load

    fs, p = storage.get_fs(str(path), storage_options)
    if not fs.exists(p) or fs.isdir(p):
        raise ConfigError(f"direction file {str(path)!r} does not exist (make one with actstore.directions)")
    try:
        raw = storage.read_bytes(fs, p, MAX_DIRECTION_BYTES)
        meta = json.loads(_header_metadata(raw).get(META_KEY, "null"))
        tensors = st_load(raw)
    except Exception as e:  # noqa: BLE001  (any decoding failure means the file is not a direction file)
        raise ConfigError(f"{str(path)!r} is not a direction file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or TENSOR not in tensors:
        raise ConfigError(f"{str(path)!r} is not an actstore direction file (no {FORMAT!r} metadata)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"{str(path)!r} has format_version {meta['format_version']}; upgrade actstore")
    return Direction(tensors[TENSOR], meta.get("hook"), str(meta.get("method", "manual")), meta.get("source") or {},
                     meta.get("params") or {})


def _header_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (an 8-byte length, then a JSON header)."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]).get("__metadata__") or {}


def _store_source(store: Any) -> dict[str, Any]:
    man = store.manifest
    return {"store_url": store.url, "store_manifest_sha256": store.manifest_sha256,
            "model": man.model.id if man.model else None}


# ------------------------------------------------------------------------------------------ mean difference


def mean_difference(store: Any, hook: str, label: str, positive: Any = None, whiten: bool = False,
                    pooling: str = "mean", exclude_special: bool = True, shrinkage: float = 0.01,
                    normalize: bool = False) -> Direction:
    """Mean pooled activation of documents whose `label` is `positive` minus that of the other documents.

    `store` is a Store or URL; `label` a docs.parquet field. `positive` defaults to the larger of two sorted
    labels (True, 1, "yes"); a label with more classes needs `positive` (one class against the rest). Each
    document is one vector (`pooling` mean/last/max over its non-special tokens), so long documents do not
    outweigh short ones. `whiten=True` returns (S_w + shrinkage * tr(S_w)/d * I)^-1 (mu_pos - mu_neg), S_w the
    pooled within-class covariance: the direction a linear discriminant reads. Unnormalised by default, so
    adding it once moves a negative mean onto the positive one (`normalize=True`: unit length).
    """
    from actstore.pipeline.analysis.pooling import doc_labels, pooled

    store = _opened(store)
    store.manifest.hook(hook)
    ids, x = pooled(store, hook, pooling, exclude_special)
    y = doc_labels(store, label, ids)
    keep = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in y], bool)
    x, y = x[keep].astype(np.float64), y[keep]
    pos = _positive_class(y, label, positive)
    mask = np.array([v == pos for v in y], bool)
    if mask.sum() < 1 or (~mask).sum() < 1:
        raise AnalysisError(f"label {label!r}: need documents on both sides of {pos!r} "
                            f"({int(mask.sum())} positive, {int((~mask).sum())} other)")
    mu_pos, mu_neg = x[mask].mean(0), x[~mask].mean(0)
    v = mu_pos - mu_neg
    if whiten:
        v = _whitened(x, mask, v, shrinkage)
    params = {"label": label, "positive": pos, "pooling": pooling, "exclude_special": exclude_special,
              "whiten": whiten, "shrinkage": shrinkage if whiten else None,
              "n_positive": int(mask.sum()), "n_negative": int((~mask).sum())}
    out = Direction(v.astype(np.float32), hook, "mean_difference", _store_source(store), params)
    return out.unit() if normalize else out


def _positive_class(y: np.ndarray, label: str, positive: Any) -> Any:
    classes = sorted({v for v in y.tolist()}, key=lambda v: (str(type(v)), v))
    if positive is not None:
        if positive not in classes:
            raise ConfigError(f"positive: {positive!r} is not a value of label {label!r} (values: {classes[:8]})")
        return positive
    if len(classes) != 2:
        raise ConfigError(f"label {label!r} has {len(classes)} classes; name the positive one (positive=...)")
    return classes[1]


def _whitened(x: np.ndarray, mask: np.ndarray, v: np.ndarray, shrinkage: float) -> np.ndarray:
    """(S_w + ridge I)^-1 v, S_w the pooled within-class covariance (float64)."""
    centred = np.concatenate([x[mask] - x[mask].mean(0), x[~mask] - x[~mask].mean(0)])
    dof = max(len(x) - 2, 1)
    s_w = centred.T @ centred / dof
    ridge = shrinkage * np.trace(s_w) / s_w.shape[0] if np.trace(s_w) > 0 else shrinkage
    return np.linalg.solve(s_w + ridge * np.eye(s_w.shape[0]), v)


# ------------------------------------------------------------------------------------------------ probes


def from_probe(result: Any, cls: Any = None, normalize: bool = True) -> Direction:
    """The weight vector of a linear probe in raw activation units (its z-scoring folded in).

    `result` is a ProbeResult (`actstore.train_probe`) or the path of a saved probe weights file
    (`probes-<label>/<hook>.safetensors`). A binary probe gives one row (towards the positive class); a
    multiclass probe gives one row per class, or the row of class `cls`. Unit length by default (a probe's
    weight scale depends on its regularisation, not on the data's geometry).
    """
    state, info, classes = _probe_parts(result)
    if "1.weight" not in state or "0.std" not in state or "2.weight" in state:
        raise ConfigError("from_probe: only a linear (logistic) probe has one direction; this is an MLP probe")
    w = np.asarray(state["1.weight"], np.float64) / np.asarray(state["0.std"], np.float64)[None]
    if cls is not None:
        names = [str(c) for c in classes]
        if str(cls) not in names or w.shape[0] == 1:
            raise ConfigError(f"cls: {cls!r} is not one of the multiclass probe's classes {names}")
        w = w[names.index(str(cls))][None]
    prov = info.get("provenance") or {}
    source = {"store_url": prov.get("store_url"), "store_manifest_sha256": prov.get("store_manifest_sha256")}
    params = {"label": info.get("label"), "classes": [c if isinstance(c, (int, float, bool)) else str(c)
                                                       for c in classes], "cls": cls, "metrics": info.get("metrics")}
    out = Direction(w.astype(np.float32), info.get("hook"), "probe", source, params)
    return out.unit() if normalize else out


def _probe_parts(result: Any) -> tuple[dict[str, np.ndarray], dict[str, Any], list[Any]]:
    """(state dict as numpy, info, classes) of a ProbeResult or a saved probe weights file."""
    if isinstance(result, (str, Path)):
        from safetensors.numpy import load as st_load

        fs, p = storage.get_fs(str(result))
        if not fs.exists(p):
            raise ConfigError(f"probe weights file {str(result)!r} does not exist")
        raw = fs.cat_file(p)
        meta = json.loads(_header_metadata(raw).get("actstore", "{}"))
        return dict(st_load(raw)), meta.get("info", {}), list(meta.get("classes", []))
    state = {k: v.detach().cpu().double().numpy() for k, v in result.model.state_dict().items()}
    info = {**result.info, "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, float)}}
    return state, info, list(np.asarray(result.classes).tolist())


# --------------------------------------------------------------------------------------------------- SAEs


def from_sae(sae_dir: str | Path, latents: int | list[int], normalize: bool = False) -> Direction:
    """Decoder rows W_dec[latents] of an SAE or transcoder directory (SAELens format, as actstore saves it).

    The hook is the SAE's (`hook_name`; a transcoder's decoder writes into `hook_name_out`). actstore's SAEs
    keep unit-norm decoder rows, so `normalize` matters only for SAEs trained elsewhere.
    """
    from actstore.workers.sae.saelens import load_saelens

    meta = sae_metadata(sae_dir)
    sae = load_saelens(sae_dir)
    ids = [int(i) for i in np.atleast_1d(np.asarray(latents)).tolist()]
    bad = [i for i in ids if not 0 <= i < sae.cfg.d_sae]
    if not ids or bad:
        raise ConfigError(f"latents: {bad or ids} not in [0, d_sae={sae.cfg.d_sae})")
    rows = sae.W_dec.detach()[ids].cpu().numpy()
    hook = meta["hook_out"] if meta["transcoder"] else meta["hook"]
    source = {"store_url": meta.get("store_url"), "store_manifest_sha256": meta.get("store_manifest_sha256"),
              "model": meta.get("model"), "sae": str(sae_dir)}
    out = Direction(rows, hook, "sae", source, {"latents": ids, "d_sae": sae.cfg.d_sae})
    return out.unit() if normalize else out


def sae_metadata(sae_dir: str | Path) -> dict[str, Any]:
    """What an SAE directory says about itself: hook(s), model, source store, whether it is a transcoder.

    Read from actstore.json / metrics.json when actstore saved it, else from SAELens' cfg.json."""
    src = Path(sae_dir)
    cfg_path, ours_path, metrics_path = src / "cfg.json", src / "actstore.json", src / "metrics.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{str(sae_dir)!r} is not an SAE directory (no cfg.json); give a folder written by "
                          "`actstore train sae` or SAELens")
    cfg = json.loads(cfg_path.read_text())
    ours = json.loads(ours_path.read_text()) if ours_path.is_file() else {}
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    meta = ours.get("metadata") or {}
    prov = metrics.get("provenance") or meta.get("provenance") or {}
    arch = str(cfg.get("architecture", ""))
    return {"hook": ours.get("hook_name") or cfg.get("hook_name"), "hook_out": meta.get("hook_name_out")
            or cfg.get("hook_name_out"), "transcoder": "transcoder" in arch, "architecture": arch,
            "model": meta.get("model_name") or cfg.get("model_name"), "d_in": cfg.get("d_in"),
            "d_sae": cfg.get("d_sae"), "k": cfg.get("k") or (ours.get("sae_config") or {}).get("k"),
            "store_url": prov.get("store_url"), "store_manifest_sha256": prov.get("store_manifest_sha256"),
            "complete": metrics_path.is_file() or not ours}


# ----------------------------------------------------------------------------------------------- spectra


def from_spectrum(result: Any, k: int = 1, store: Any = None, hook: str | None = None,
                  exclude_special: bool | None = None, max_tokens: int | None = None) -> Direction:
    """The top-k eigenvectors (unit rows, largest eigenvalue first) of the matrix a spectrum analysed.

    `result` is a SpectrumResult (then give `store` and `hook`) or the path of a saved `spectrum-<hook>.json`
    (its hook, store URL and options are read from the file). Spectra keep eigenvalues only, so the
    covariance is recomputed from the store in one pass and its top-k eigenvalues must match the result's
    (a mismatch means another store, hook or option set: an AnalysisError). In the correlation basis the
    eigenvector u of the standardised data is mapped back to activation space as D^1/2 u (D the variances),
    then normalised. Signs are fixed so each row's largest component is positive.
    """
    eig, basis, hook, store, opts = _spectrum_inputs(result, store, hook, exclude_special, max_tokens)
    if not 1 <= k <= len(eig):
        raise ConfigError(f"k: must be in [1, {len(eig)}] (the spectrum's dimension), got {k}")
    from actstore.pipeline.analysis.spectra import covariance

    _, cov, _ = covariance(store, hook, opts["exclude_special"], opts["max_tokens"], scheduler="sync")
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    mat = cov / np.outer(std, std) if basis == "correlation" else cov
    if basis == "correlation" and (std == 0).any():
        raise AnalysisError(f"hook {hook!r} has constant columns; use a covariance-basis spectrum for directions")
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2)
    vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k].T
    want = np.asarray(eig[:k], np.float64)
    if not np.allclose(vals, want, rtol=1e-4, atol=1e-6 * max(abs(float(eig[0])), 1e-30)):
        raise AnalysisError(f"the spectrum does not match store {store.url!r} hook {hook!r}: recomputed top "
                            f"eigenvalues {vals[:3].tolist()} vs the result's {want[:3].tolist()} (other store, "
                            "hook, basis or exclude_special/max_tokens?)")
    rows = vecs * std[None] if basis == "correlation" else vecs
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    rows *= np.sign(rows[np.arange(k), np.abs(rows).argmax(1)])[:, None]
    params = {"k": k, "basis": basis, "eigenvalues": vals.tolist(), **opts}
    return Direction(rows.astype(np.float32), hook, "spectrum", _store_source(store), params)


def _spectrum_inputs(result: Any, store: Any, hook: str | None, exclude_special: bool | None,
                     max_tokens: int | None) -> tuple[np.ndarray, str, str, Any, dict[str, Any]]:
    """(eigenvalues, basis, hook, opened store, covariance options) of a result object or saved file."""
    opts: dict[str, Any] = {}
    if isinstance(result, (str, Path)):
        data = _read_json(result)
        prov = data.get("provenance") or {}
        job = prov.get("job") or {}
        eig = np.array([np.nan if v is None else v for v in data.get("eigenvalues", [])], np.float64)
        basis = data.get("basis") or data.get("metrics", {}).get("basis") or job.get("basis")
        hook = hook or data.get("hook")
        store = store if store is not None else prov.get("store_url")
        opts = {k: job[k] for k in ("exclude_special", "max_tokens") if k in job}
    else:
        eig = np.asarray(getattr(result, "eigenvalues", []), np.float64)
        basis = getattr(result, "basis", None) or getattr(result, "metrics", {}).get("basis")
    if store is None or hook is None:
        raise ConfigError("from_spectrum: give store= and hook= (a SpectrumResult does not record them)")
    store = _opened(store)
    store.manifest.hook(hook)
    if exclude_special is not None:
        opts["exclude_special"] = exclude_special
    if max_tokens is not None:
        opts["max_tokens"] = max_tokens
    opts = {"exclude_special": bool(opts.get("exclude_special", True)), "max_tokens": opts.get("max_tokens")}
    if basis not in (None, "covariance", "correlation"):
        raise ConfigError(f"from_spectrum: unknown basis {basis!r}")
    return eig, basis or "covariance", hook, store, opts


def _read_json(path: str | Path) -> dict[str, Any]:
    fs, p = storage.get_fs(str(path))
    if not fs.exists(p):
        raise ConfigError(f"spectrum file {str(path)!r} does not exist")
    data = json.loads(fs.cat_file(p))
    if not isinstance(data, dict) or "eigenvalues" not in data:
        raise ConfigError(f"{str(path)!r} is not a spectrum result (no eigenvalues)")
    return data


def _opened(store: Any) -> Any:
    if isinstance(store, (str, Path)):
        from actstore.pipeline.store.store import open_store

        return open_store(str(store))
    return store
