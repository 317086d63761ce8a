"""The family table: every mapped model type resolves every hook kind on a real (meta-device) model of its
class, and an unmapped family's error lists module: paths that work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from actstore.schemas.hooks import BLOCK_KINDS, HookNameError, parse_hook, parse_hooks
from actstore.workers import hookmap
from actstore.workers.families import FAMILIES, MODEL_TYPES, family_for, is_causal_lm
from actstore.workers.runner import ModelRunner

MAPPED = sorted(t for t, known in MODEL_TYPES.items() if known.family)
SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             head_dim=8, n_layer=2, n_embd=32, n_head=4)


def _meta_model(model_type: str) -> torch.nn.Module:
    cfg = T.AutoConfig.for_model(model_type)
    for key, value in SMALL.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    with torch.device("meta"):
        return T.AutoModel.from_config(cfg)


def test_table_is_consistent():
    assert {known.family for known in MODEL_TYPES.values() if known.family} <= set(FAMILIES)
    for fam in FAMILIES.values():
        assert set(fam.points) == set(BLOCK_KINDS), fam.name


@pytest.mark.parametrize("model_type", MAPPED)
def test_every_kind_resolves(model_type):
    """Module paths of the table exist in transformers' classes (the oracle tests check their meaning)."""
    model = _meta_model(model_type)
    fam = family_for(model.config)
    assert fam is not None and len(hookmap.blocks_of(model)) == 2
    final = fam.final_norm
    assert final is None or isinstance(model.get_submodule(final), torch.nn.Module)
    for kind in hookmap.available_kinds(model.config):
        module, where, layer = hookmap.resolve(model, parse_hook(f"blocks.1.{kind}"))
        assert where in ("in", "out") and layer == 1 and isinstance(module, torch.nn.Module)
    assert is_causal_lm(model.config) == MODEL_TYPES[model_type].causal


def test_unmapped_family_lists_module_paths_that_work():
    cfg = T.GPTJConfig(n_layer=2, n_embd=16, n_head=2, vocab_size=50, rotary_dim=4)
    with pytest.raises(HookNameError) as err:
        hookmap.check_hooks(parse_hooks(["blocks.0.hook_resid_post"]), cfg)
    msg = str(err.value)
    assert "\n" not in msg and "module:h.0 .. module:h.1" in msg and "module:h.0.mlp" in msg
    paths = [p.strip(" ,") for p in msg.split("inside a block:")[1].split(",")]
    torch.manual_seed(0)
    runner = ModelRunner(T.AutoModel.from_config(cfg), ["module:h.1", *paths], device="cpu")
    out = runner.capture([np.arange(7), np.arange(5)])
    assert out["module:h.1"].shape == (12, 16) and all(out[p].shape[0] == 12 for p in paths)
    assert hookmap.valid_names_text(cfg).startswith("only module:<dotted.path> hooks, e.g. module:h.0")
