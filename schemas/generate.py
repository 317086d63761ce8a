"""Generation settings shared by extraction (`generate:`, activations of generated responses) and interventions.

One model, so the decoding keys mean the same wherever they appear; interventions extend it with what only they
need (how many prompts).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GenerateSettings(BaseModel):
    """How responses are generated: greedy by default, or sampled with a seed (reproducible run to run)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    max_new_tokens: int = Field(default=64, gt=0)
    """Most tokens generated per prompt (the response stops earlier at EOS or a `stop` string)."""
    do_sample: bool = False
    """False: greedy decoding (exactly `model.generate`'s). True: sampling with temperature and top_p, seeded by
    `seed`."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature (do_sample only)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass (do_sample only)."""
    seed: int = Field(default=0, ge=0)
    """Seed of sampling. Extraction seeds each batch from (seed, shard id, batch), so reruns, resumes and every
    executor draw the same tokens."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template as one user message, with the generation prompt added."""
    stop: list[str] = Field(default_factory=list)
    """Extra stop strings: a response ends with the first token whose decoded text completes one of them (the
    token is kept; finish_reason `stop`)."""
