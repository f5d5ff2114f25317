"""Every start-up check of a model, in one place, run explicitly where the service is built.

`check_model` is called by `build_state` (service.api.app), the Ray replica (service.scaleout.replica), the bench and
the tests' engine helper, before the engine is built; it returns the layout the engine is then given. The checks run
forwards (and the slot check switches the model's `config._attn_implementation` to slot attention), so no
constructor runs them: `ContinuousBatchingEngine(...)` does no forward.

The checks themselves stay beside the code they check (moving them here would make import circles):
  - `service.batch.verify_prefix_support`: the model attends to a prefix of the geometry's shape (encoder-decoder
    models: `service.seq2seq.verify_seq2seq_support`, which it calls);
  - `service.slots.slot_layout_supported`: the slot layout gives the padded layout's logits (then the model runs
    slot attention), else the padded fallback.
"""

from __future__ import annotations

from typing import Literal

from service.batch import verify_prefix_support
from service.scheduling.base import BatchingPolicy, Layout
from service.geometry import PrefixGeometry
from service.runner import ModelRunner
from service.slots import slot_layout_supported


def choose_layout(
    runner: ModelRunner, policy: BatchingPolicy = "mixed", layout: Layout | Literal["auto"] = "auto"
) -> Layout:
    """The slot layout where the policy is `mixed` and the model passes the slot check (run once per model), else the
    padded one. Asking for `slots` where it cannot run raises ValueError; asking for `padded` runs no check."""
    if layout == "padded":
        return "padded"
    supported = policy == "mixed" and slot_layout_supported(runner)
    if layout == "slots" and not supported:
        raise ValueError("the slots layout needs the mixed policy and a model whose attention it can serve")
    return "slots" if supported else "padded"


def check_model(
    runner: ModelRunner,
    geometry: PrefixGeometry,
    policy: BatchingPolicy = "mixed",
    layout: Layout | Literal["auto"] = "auto",
) -> Layout:
    """Run every start-up check (UnsupportedModelError when the model cannot serve prefixes) and return the layout
    to build the engine with."""
    verify_prefix_support(runner, geometry)
    return choose_layout(runner, policy, layout)
