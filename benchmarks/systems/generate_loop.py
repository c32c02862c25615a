"""`model.generate` called directly on batches of prompts: left-padded as finetune pads them for generation,
decoded after the prompt."""

from __future__ import annotations

from typing import Any

from benchmarks.meter import GenerationMeter


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], batches: list[list[int]],
             settings: dict[str, Any], meter: GenerationMeter) -> list[str]:
    """The reply to every prompt (token ids), generating for the given batches of prompt indices in turn."""
    import torch

    texts = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    meter.start(model, tokenizer)
    with torch.inference_mode():
        for batch in batches:
            longest = max(len(prompts[i]) for i in batch)
            input_ids = torch.tensor([[pad_id] * (longest - len(prompts[i])) + prompts[i] for i in batch])
            attention_mask = torch.tensor([[0] * (longest - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings,
                                    eos_token_id=meter.stop_ids, pad_token_id=pad_id)
            for i, text in zip(batch, tokenizer.batch_decode(output[:, longest:], skip_special_tokens=True)):
                texts[i] = text.strip()
    meter.stop()
    return texts
