"""Models built on several threads at once (Dask tasks in one worker process) keep transformers working: its
process-wide no-op swaps during a build are never left in place, and a tied LM head loads tied afterwards."""

from __future__ import annotations

import threading

import torch
import transformers as T
from transformers.modeling_utils import PreTrainedModel

from actstore.workers.runner import ModelRunner


def test_concurrent_loads_leave_tie_weights_working(tiny_lm):
    path = tiny_lm("gpt2")
    genuine = PreTrainedModel.tie_weights
    errors: list[BaseException] = []

    def load_many() -> None:
        try:
            for _ in range(8):
                lm = ModelRunner._load(path, None, "float32", False, causal_lm=True)
                assert lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr()
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=load_many) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert PreTrainedModel.tie_weights is genuine  # unserialized builds restore transformers' no-op here
        # A plain transformers load after them (what a user's own code does) still ties the head.
        lm = T.AutoModelForCausalLM.from_pretrained(path)
        assert lm.lm_head.weight.device != torch.device("meta")
        assert lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr()
    finally:
        PreTrainedModel.tie_weights = genuine  # a failure here must not break every later test of the session
