"""The seed's method as a baseline: one `PeftModel` holding every task's adapter, `set_adapter` + `generate`, one
request at a time (PEFT cannot mix prefix adapters in one batch).

PEFT 0.21.2 predates transformers 5.24's rename of `past_key_values` to `cache`: unpatched, `PeftModel.generate`
injects its prefix under the old name, the model ignores it and the output is the base model's. An instance-level
shim makes it work again without touching either library: PEFT's `prepare_inputs_for_generation` sees the cache
under the old key it looks for, and the model gets it back under the new one. (PEFT already shifts the position
ids by V.) `tests/test_bench.py` checks the patched generate against a greedy loop over PEFT's forward.

For encoder-decoder models the same rename drops the prefix, and where the decoder is deeper than the encoder
transformers' generate itself fails (it sizes its own cache by the config's encoder depth). So the seq2seq baseline
does what PEFT's generate means to do, explicitly: the active adapter's prompt cache (`get_prompt`, PEFT's own
EncoderDecoderCache) handed to the model's `generate`; checked the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel


def load_peft_model(model: PreTrainedModel, adapters: dict[str, Path]) -> PeftModel:
    """Load every adapter into one PeftModel (names = task ids) and make its generate honour the prefix."""
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    patch_prefix_generate(peft_model)
    return peft_model.eval()


def patch_prefix_generate(peft_model: PeftModel) -> None:
    base_prepare = peft_model.base_model_prepare_inputs_for_generation
    peft_prepare = peft_model.prepare_inputs_for_generation

    def base_prepare_with_old_cache_key(*args: Any, **kwargs: Any) -> dict[str, Any]:
        model_inputs = base_prepare(*args, **kwargs)
        if "cache" in model_inputs:
            model_inputs["past_key_values"] = model_inputs.pop("cache")
        return model_inputs

    def prepare_with_new_cache_key(*args: Any, **kwargs: Any) -> dict[str, Any]:
        model_inputs = peft_prepare(*args, **kwargs)
        if "past_key_values" in model_inputs:
            model_inputs["cache"] = model_inputs.pop("past_key_values")
        return model_inputs

    peft_model.base_model_prepare_inputs_for_generation = base_prepare_with_old_cache_key
    peft_model.prepare_inputs_for_generation = prepare_with_new_cache_key


@torch.inference_mode()
def peft_generate(
    peft_model: PeftModel,
    task_id: str,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    ignore_eos: bool = False,
    streamer: Any = None,
) -> list[int]:
    """Greedy generation for one prompt under one task's prefix; with ignore_eos, exactly max_new_tokens."""
    peft_model.set_adapter(task_id)
    input_ids = torch.tensor([prompt_ids], device=peft_model.device)
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else None,
        do_sample=False,
        streamer=streamer,
    )
    base = peft_model.get_base_model()
    if base.config.is_encoder_decoder:
        output = base.generate(**kwargs, cache=peft_model.get_prompt(batch_size=1))
        return output[0, 1:].tolist()  # after the decoder start token
    output = peft_model.generate(**kwargs)
    return output[0, len(prompt_ids) :].tolist()
