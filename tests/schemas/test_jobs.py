"""Job configs: YAML, --set overrides and CLI flags build the same object; defaults live in one place."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

import actstore
from actstore.cli import _job, build_parser
from actstore.cli_options import flags_of
from actstore.schemas.jobs import JOBS, ProbeJob, SAEJob, SpectrumJob, TranscoderJob
from actstore.schemas.probe import ProbeConfig
from actstore.schemas.sae import SAESettings, TrainConfig

HOOK = "blocks.1.hook_resid_post"


def _yaml(tmp_path, data) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_yaml_set_and_flags_build_the_same_job(tmp_path):
    cfg = _yaml(tmp_path, {"store": "runs/s", "hooks": [HOOK], "out": "runs/sae", "sae": {"k": 16},
                           "train": {"lr": 1e-3, "training_tokens": 65536}})
    args = build_parser().parse_args(["train", "sae", cfg, "--set", "train.seed=3", "--set", "expansion=4",
                                      "--k", "8", "--batch-size", "2048"])
    job = _job(args, SAEJob)
    assert job.sae.k == 8  # the flag wins over the YAML
    assert job.sae.expansion == 4  # a bare --set key lands in the nested settings that hold it
    assert (job.train.lr, job.train.seed, job.train.batch_size, job.train.training_tokens) == (1e-3, 3, 2048, 65536)
    same = SAEJob.build({"store": "runs/s", "hooks": [HOOK], "out": "runs/sae",
                         "sae": {"k": 8, "expansion": 4},
                         "train": {"lr": 1e-3, "seed": 3, "batch_size": 2048, "training_tokens": 65536}})
    assert job == same


def test_flags_alone_build_a_job_and_defaults_are_the_settings_defaults():
    args = build_parser().parse_args(["train", "sae", "--store", "s", "--hook", HOOK, "--hook",
                                      "blocks.0.hook_resid_post", "--out", "o"])
    job = _job(args, SAEJob)
    assert job.hooks == [HOOK, "blocks.0.hook_resid_post"]
    assert job.sae == SAESettings() and job.train == TrainConfig()
    assert TrainConfig().checkpoint_every == 500  # one default for Python, YAML and CLI


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_field_has_a_documented_flag(name):
    job_cls = JOBS[name]
    flags = flags_of(job_cls)
    paths = {f.path for f in flags}
    for fname, info in job_cls.model_fields.items():
        ann = info.annotation
        if dataclasses.is_dataclass(ann):
            assert {f"{fname}.{f.name}" for f in dataclasses.fields(ann)} <= paths
        else:
            assert fname in paths
    assert all(f.doc for f in flags), [f.path for f in flags if not f.doc]
    assert len({f.flag for f in flags}) == len(flags)  # no two fields share a flag


def test_help_shows_each_default_from_the_settings(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "sae", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Write a checkpoint every this many steps" in text and "(default: 500)" in text
    assert "(default: 4096)" in text and "(default: 16777216)" in text


@pytest.mark.parametrize("data, pattern", [
    ({"sae": {"kk": 3}}, "unknown config key 'sae.kk' \\(did you mean 'sae.k'\\?\\)"),
    ({"trian": {}}, "unknown config key 'trian' \\(did you mean 'train'\\?\\)"),
    ({"sae": {"k": 0}}, "SAESettings.k: must be >= 1"),
    ({"sweep": {"kx": [1, 2]}}, "sweep key 'kx' is not an sae or train field"),
    ({"hooks": ["blocks.1/../x"]}, "hooks: unknown hook name 'blocks.1/../x'"),
    ({"train": {"normalize_to": "l2"}}, "train.normalize_to: Input should be 'sqrt_d' or 'none'"),
])
def test_mistakes_are_one_line_config_errors(data, pattern):
    base = {"store": "s", "hooks": [HOOK], "out": "o"}
    with pytest.raises(actstore.ConfigError, match=pattern) as e:
        SAEJob.build({**base, **data})
    assert "\n" not in str(e.value)


def test_set_needs_key_equals_value():
    with pytest.raises(actstore.ConfigError, match="expected key=value"):
        SAEJob.build({"store": "s", "hooks": [HOOK]}, ["k 8"])


def test_probe_and_spectrum_jobs_nest_their_settings(tmp_path):
    job = ProbeJob.build({"store": "s", "label": "y"}, ["kind=mlp", "l2=[0.1, 1.0]", "multiclass=true"])
    assert job.probe == ProbeConfig(kind="mlp", l2=(0.1, 1.0), multiclass=True)
    args = build_parser().parse_args(["spectra", "runs/s", "--hook", HOOK, "--include-special",
                                      "--precision", "float32"])
    spec = _job(args, SpectrumJob)
    assert (spec.store, spec.hooks, spec.exclude_special, spec.precision) == ("runs/s", [HOOK], False, "float32")


def test_public_dict_never_holds_credentials():
    job = TranscoderJob.build({"store": "s3://b/s", "in_hook": "blocks.0.hook_mlp_in",
                               "out_hook": "blocks.0.hook_mlp_out", "storage_options": {"secret": "PLANTED"}})
    assert "PLANTED" not in str(job.public_dict()) and "PLANTED" not in repr(job)
    assert job.hooks == ["blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"]
