"""A causal LM's log-probabilities of its target tokens, computed a chunk of positions at a time.

The logits of every position over a 49k-token vocabulary are a decoder's largest activation (batch 16 x 512
tokens: 1.6 GB in fp32, held a second time by the softmax and a third by its gradient), yet a loss needs
them only at target positions (`labels != IGNORE`: a reply, a completion) and only one target at a time.
`target_tokens` runs the decoder, then the output layer on chunks of target positions: no more than one chunk's
logits exist at once. Prompt positions never reach the output layer at all. A frozen output layer (LoRA: the
adapter leaves it alone) has what the backward pass needs, the gradient of each score with respect to its
hidden state, computed with the chunk's forward pass (as Liger-Kernel's fused linear cross-entropy), so the
backward pass only scales it; a trained one runs each chunk under activation checkpointing (its logits
recomputed in the backward pass).

Models whose logits are not their output layer applied to the decoder's last hidden state (Gemma 2 soft-caps
them, Cohere and Granite scale them, ...) are found by comparing the two on a few tokens, once per model;
they get the full logits, and the same results.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label id that the loss skips
CHUNK_LOGITS = 2**24  # logits per chunk (64 MB in fp32: 341 positions of a 49k vocabulary)

_head_gives_logits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> bool


@dataclass
class TargetTokens:
    """Per target token of a batch (`labels[:, 1:] != IGNORE`: position t predicts token t + 1), row by row."""

    logps: torch.Tensor  # its log-probability (differentiable)
    correct: torch.Tensor  # whether it is the greedy prediction
    rows: torch.Tensor  # the batch row it belongs to
    vocab_mean_logps: Optional[torch.Tensor] = None  # the mean log-probability over the vocabulary there

    def per_row(self, batch_size: int) -> torch.Tensor:
        """Each row's summed log-probability of its target tokens."""
        return self.logps.new_zeros(batch_size).index_add(0, self.rows, self.logps)


def target_tokens(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                  vocab_mean: bool = False) -> TargetTokens:
    """`model(**inputs)`'s scores of the tokens of `labels` that are targets; `vocab_mean` adds the mean
    log-probability over the vocabulary (what label smoothing needs)."""
    keep = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep]
    if head_gives_logits(model):
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1][keep]
        head = model.get_output_embeddings()
        size = max(1, CHUNK_LOGITS // head.weight.shape[0])
        if not (torch.is_grad_enabled() and hidden.requires_grad):
            chunk_scores = head_scores
        elif any(p.requires_grad for p in head.parameters()):  # (its weights' gradients need the whole chunk)
            chunk_scores = functools.partial(checkpoint, head_scores, use_reentrant=False)
        else:
            chunk_scores = FrozenHeadScores.apply
        parts = [chunk_scores(head, hidden[i:i + size], targets[i:i + size], vocab_mean)
                 for i in range(0, max(len(targets), 1), size)]
    else:
        parts = [scores(model(**inputs).logits[:, :-1][keep].float().log_softmax(-1), targets, vocab_mean)]
    logps, correct, means = zip(*parts)
    return TargetTokens(torch.cat(logps), torch.cat(correct), keep.nonzero()[:, 0],
                        torch.cat(means) if vocab_mean else None)


def head_scores(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_mean: bool):
    return scores(head(hidden).float().log_softmax(-1), targets, vocab_mean)


class FrozenHeadScores(torch.autograd.Function):
    """`head_scores` of a head without trainable weights, differentiable with respect to the hidden states only:
    the forward pass also computes each score's gradient with respect to its own hidden state (a row's scores
    depend on that row alone), and frees the chunk's logits; the backward pass scales those gradients."""

    @staticmethod
    def forward(ctx: Any, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_mean: bool):
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_()
            target_logps, correct, means = head_scores(head, leaf, targets, vocab_mean)
            outputs = [target_logps, means] if vocab_mean else [target_logps]
            grads = [torch.autograd.grad(output.sum(), leaf, retain_graph=i + 1 < len(outputs))[0]
                     for i, output in enumerate(outputs)]
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(correct)
        return target_logps.detach(), correct, means.detach() if vocab_mean else None

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, grad_correct: Any, grad_means: Optional[torch.Tensor]):
        grads = ctx.saved_tensors
        grad_hidden = grad_logps.unsqueeze(1).to(grads[0].dtype) * grads[0]
        if len(grads) == 2 and grad_means is not None:
            grad_hidden = grad_hidden + grad_means.unsqueeze(1).to(grads[1].dtype) * grads[1]
        return None, grad_hidden, None, None


def scores(logps: torch.Tensor, targets: torch.Tensor, vocab_mean: bool):
    """(target log-probabilities, greedy prediction is the target, vocabulary mean or None) of log-softmaxes."""
    target_logps = logps.gather(1, targets.unsqueeze(1)).squeeze(1)
    return target_logps, logps.argmax(-1) == targets, logps.mean(-1) if vocab_mean else None


def head_gives_logits(model: Any) -> bool:
    """Whether `model`'s logits are its output layer applied to its decoder's last hidden state."""
    known = _head_gives_logits.get(model)
    if known is None:
        known = _head_gives_logits[model] = compare_head_and_logits(model)
    return known


def compare_head_and_logits(model: Any) -> bool:
    if model.get_output_embeddings() is None or model.get_decoder() is model:
        return False
    device = model.get_output_embeddings().weight.device
    ids = torch.arange(1, 9, device=device).unsqueeze(0)
    training = model.training
    model.eval()  # (dropout would make the two differ)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            from_head = model.get_output_embeddings()(model.get_decoder()(input_ids=ids, use_cache=False)
                                                      .last_hidden_state).float()
    finally:
        model.train(training)
    return logits.shape == from_head.shape and torch.allclose(logits, from_head, rtol=1e-4, atol=1e-5)
