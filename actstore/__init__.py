"""actstore: transformer activation datasets (Zarr v3 + Parquet) and the analyses built on them.

    store = actstore.extract("config.yaml")          # or a dict / ExtractConfig; returns a Store
    store = actstore.open_store("s3://bucket/run1")  # any fsspec URL or local path
    x = store.activations("blocks.2.hook_resid_post")
    sae = actstore.train_sae(store, "blocks.2.hook_resid_post", expansion=8, k=32)

Heavy entry points are imported on first use, so `import actstore` (and `actstore.workers` / `actstore.schemas`,
which worker processes import) never pulls in Ray or Dask. Every error raised on purpose derives from
`ActstoreError`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from actstore.schemas.errors import (
    ActstoreError,
    AnalysisError,
    AppendError,
    ConfigError,
    CorpusError,
    Float16OverflowError,
    HookNameError,
    LabelError,
    LeaseError,
    ManifestError,
    ModelLoadError,
    OutputError,
    StorageError,
    StoreError,
)
from actstore.version import __version__

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "extract": "actstore.pipeline.extract.run",
    "from_arrays": "actstore.pipeline.extract.from_arrays",
    "open_store": "actstore.pipeline.store.store",
    "Store": "actstore.pipeline.store.store",
    "open_stores": "actstore.pipeline.store.multistore",
    "MultiStore": "actstore.pipeline.store.multistore",
    "VerifyReport": "actstore.pipeline.store.verify",
    "export_slice": "actstore.pipeline.store.export",
    "export_saelens_cache": "actstore.pipeline.store.adapters",
    "saelens_data_provider": "actstore.pipeline.store.adapters",
    "export_transcoders": "actstore.pipeline.analysis.transcoder_export",
    "ExtractConfig": "actstore.schemas.config",
    "Manifest": "actstore.schemas.manifest",
    "train_sae": "actstore.pipeline.analysis.sae",
    "train_transcoder": "actstore.pipeline.analysis.sae",
    "train_clt": "actstore.pipeline.analysis.clt",
    "CLTJob": "actstore.schemas.jobs",
    "CLTConfig": "actstore.schemas.sae",
    "CrossLayerTranscoder": "actstore.workers.sae.clt",
    "load_clt": "actstore.workers.sae.clt_io",
    "train_probe": "actstore.pipeline.analysis.probes",
    "spectrum": "actstore.pipeline.analysis.spectra",
    "layer_statistics": "actstore.pipeline.analysis.layer_stats",
    "write_report": "actstore.pipeline.analysis.report",
    "SAEConfig": "actstore.schemas.sae",
    "TrainConfig": "actstore.schemas.sae",
    "TrainResult": "actstore.workers.sae.training",
    "ProbeConfig": "actstore.schemas.probe",
    "ProbeResult": "actstore.workers.probe",
    "SpectrumResult": "actstore.workers.spectra",
    "SAEJob": "actstore.schemas.jobs",
    "TranscoderJob": "actstore.schemas.jobs",
    "ProbeJob": "actstore.schemas.jobs",
    "SpectrumJob": "actstore.schemas.jobs",
    "ReportJob": "actstore.schemas.jobs",
    "SAESettings": "actstore.schemas.sae",
    "train_sweep": "actstore.pipeline.analysis.sae_sweep",
    "intervene": "actstore.pipeline.analysis.intervene",
    "logit_lens": "actstore.pipeline.analysis.lens",
    "encode": "actstore.pipeline.analysis.features",
    "open_features": "actstore.pipeline.analysis.features",
    "FeatureStore": "actstore.pipeline.analysis.features",
    "features": "actstore.pipeline.analysis.feature_stats",
    "FeaturesResult": "actstore.pipeline.analysis.feature_stats",
    "Direction": "actstore.pipeline.analysis.directions",
    "InterveneJob": "actstore.schemas.jobs",
    "uncertainty": "actstore.pipeline.analysis.uncertainty",
    "UncertaintyResult": "actstore.pipeline.analysis.uncertainty",
    "UncertaintyJob": "actstore.schemas.jobs",
    "spectral_series": "actstore.pipeline.analysis.spectral_series",
    "label": "actstore.pipeline.extract.labels",
    "SpectralSeriesJob": "actstore.schemas.jobs",
}
# public name -> module exported as a whole (e.g. actstore.directions.mean_difference)
_LAZY_MODULES = {"directions": "actstore.pipeline.analysis.directions"}

__all__ = [
    "ActstoreError",
    "AnalysisError",
    "AppendError",
    "CLTConfig",
    "CLTJob",
    "CrossLayerTranscoder",
    "ConfigError",
    "CorpusError",
    "Direction",
    "ExtractConfig",
    "FeatureStore",
    "FeaturesResult",
    "Float16OverflowError",
    "HookNameError",
    "InterveneJob",
    "LabelError",
    "LeaseError",
    "Manifest",
    "ManifestError",
    "ModelLoadError",
    "MultiStore",
    "OutputError",
    "ProbeConfig",
    "ProbeJob",
    "ProbeResult",
    "ReportJob",
    "SAEConfig",
    "SAEJob",
    "SAESettings",
    "SpectralSeriesJob",
    "SpectrumJob",
    "SpectrumResult",
    "StorageError",
    "Store",
    "StoreError",
    "TrainConfig",
    "TrainResult",
    "TranscoderJob",
    "UncertaintyJob",
    "UncertaintyResult",
    "VerifyReport",
    "__version__",
    "export_saelens_cache",
    "directions",
    "encode",
    "export_slice",
    "label",
    "export_transcoders",
    "extract",
    "features",
    "from_arrays",
    "intervene",
    "layer_statistics",
    "logit_lens",
    "open_features",
    "open_store",
    "open_stores",
    "saelens_data_provider",
    "spectral_series",
    "spectrum",
    "load_clt",
    "train_clt",
    "train_probe",
    "train_sae",
    "train_sweep",
    "train_transcoder",
    "uncertainty",
    "write_report",
]

if TYPE_CHECKING:  # type checkers and IDEs see the real objects; at run time they load lazily
    from actstore.pipeline.analysis import directions
    from actstore.pipeline.analysis.clt import train_clt
    from actstore.pipeline.analysis.directions import Direction
    from actstore.pipeline.analysis.feature_stats import FeaturesResult, features
    from actstore.pipeline.analysis.features import FeatureStore, encode, open_features
    from actstore.pipeline.analysis.intervene import intervene
    from actstore.pipeline.analysis.layer_stats import layer_statistics
    from actstore.pipeline.analysis.lens import logit_lens
    from actstore.pipeline.analysis.probes import train_probe
    from actstore.pipeline.analysis.report import write_report
    from actstore.pipeline.analysis.sae import train_sae, train_transcoder
    from actstore.pipeline.analysis.sae_sweep import train_sweep
    from actstore.pipeline.analysis.spectra import spectrum
    from actstore.pipeline.analysis.spectral_series import spectral_series
    from actstore.pipeline.analysis.transcoder_export import export_transcoders
    from actstore.pipeline.analysis.uncertainty import UncertaintyResult, uncertainty
    from actstore.pipeline.extract.from_arrays import from_arrays
    from actstore.pipeline.extract.run import extract
    from actstore.pipeline.store.adapters import export_saelens_cache, saelens_data_provider
    from actstore.pipeline.store.export import export_slice
    from actstore.pipeline.store.multistore import MultiStore, open_stores
    from actstore.pipeline.store.store import Store, open_store
    from actstore.pipeline.store.verify import VerifyReport
    from actstore.schemas.config import ExtractConfig
    from actstore.schemas.jobs import (
        CLTJob,
        InterveneJob,
        ProbeJob,
        ReportJob,
        SAEJob,
        SpectralSeriesJob,
        SpectrumJob,
        TranscoderJob,
        UncertaintyJob,
    )
    from actstore.schemas.manifest import Manifest
    from actstore.schemas.probe import ProbeConfig
    from actstore.schemas.sae import CLTConfig, SAEConfig, SAESettings, TrainConfig
    from actstore.workers.probe import ProbeResult
    from actstore.workers.sae.clt import CrossLayerTranscoder
    from actstore.workers.sae.clt_io import load_clt
    from actstore.workers.sae.training import TrainResult
    from actstore.workers.spectra import SpectrumResult


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        value = import_module(_LAZY_MODULES[name])
        globals()[name] = value
        return value
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'actstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
