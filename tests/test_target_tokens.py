"""The target tokens' scores computed a chunk at a time (finetune/target_tokens.py) equal the full logits'."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from finetune import target_tokens as chunked
from finetune.target_tokens import IGNORE, target_tokens


def lora_model(config):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules="all-linear"))
    for name, parameter in model.named_parameters():  # (a fresh adapter's B is zero: its A gets no gradient)
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def batch(vocab: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :4] = IGNORE  # the prompts
    labels[2, :] = IGNORE  # a row without targets
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def by_full_logits(model, data):
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    labels = data["labels"][:, 1:]
    keep = labels != IGNORE
    return -F.cross_entropy(logits[keep], labels[keep], reduction="none"), logits[keep].argmax(-1) == labels[keep]


def vocab_means(model, data):
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    return logits[data["labels"][:, 1:] != IGNORE].log_softmax(-1).mean(-1)


LLAMA = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True)
# Gemma 2 soft-caps its logits: they are not its output layer applied to the decoder's last hidden state
GEMMA2 = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.05)


@pytest.mark.parametrize("config,head_gives_logits,train_head", [(LLAMA, True, False), (LLAMA, True, True),
                                                                 (GEMMA2, False, False)],
                         ids=["llama", "llama-trained-head", "gemma2"])
def test_chunked_scores_and_gradients_equal_the_full_logits(config, head_gives_logits, train_head, monkeypatch):
    """A frozen head's gradients come from the forward pass, a trained head's from recomputed chunks."""
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", 3 * config.vocab_size)  # chunks of 3 target positions
    model, data = lora_model(config), batch(config.vocab_size)
    model.get_output_embeddings().weight.requires_grad_(train_head)
    if not train_head and head_gives_logits:  # a frozen head's gradients come from the forward pass, not recomputed
        monkeypatch.setattr(chunked, "checkpoint", lambda *args, **kwargs: pytest.fail("recomputed a frozen head"))
    model.train()  # (the comparison of head and logits must not see dropout)
    assert chunked.head_gives_logits(model) is head_gives_logits and model.training

    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    scores = target_tokens(model.eval(), inputs, data["labels"], vocab_mean=True)
    (scores.logps.sum() + 0.3 * scores.vocab_mean_logps.sum()).backward()  # (label smoothing's term too)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logps, correct = by_full_logits(model, data)
    (logps.sum() + 0.3 * vocab_means(model, data).sum()).backward()

    assert len(scores.logps) == 13  # 8 + 5 targets, over 5 chunks
    torch.testing.assert_close(scores.logps, logps, rtol=1e-5, atol=1e-6)
    assert torch.equal(scores.correct, correct)
    assert scores.rows.tolist() == [0] * 8 + [1] * 5
    torch.testing.assert_close(scores.per_row(3), torch.stack([logps[:8].sum(), logps[8:].sum(), logps.new_zeros(())]))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_without_targets_scores_nothing_and_backpropagates():
    model, data = lora_model(LLAMA), batch(LLAMA.vocab_size)
    labels = torch.full_like(data["labels"], IGNORE)
    scores = target_tokens(model, {"input_ids": data["input_ids"]}, labels, vocab_mean=True)
    assert scores.logps.shape == scores.correct.shape == scores.vocab_mean_logps.shape == (0,)
    scores.logps.sum().backward()  # (a loss of 0 with weight 0: the step still takes part in the all-reduce)
