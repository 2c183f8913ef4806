"""The student as stage 2 runs it: its decoder and its LM head under one ``forward``.

The loss never builds the (tokens x vocab) logits of a whole batch: it takes the final hidden states of the trained
positions and the LM head's weight, and applies the head chunk by chunk (:mod:`rlkd.trainer.chunked`). So the loop
needs the hidden states and the head's *weight*, not the model's logits. :class:`StudentWithHead` runs both inside
one ``forward`` that ends in a caller-given ``head_fn``. This matters once the model is sharded: FSDP2 gathers the
root's parameters (embeddings, final norm, LM head) around the root module's forward, and DDP hooks its gradient
reduction on its forward, so the head must be used inside that forward, not beside it.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlkd.core.targets import ModelBatch


def student_hidden(model: torch.nn.Module, mb: ModelBatch) -> torch.Tensor:
    """(N, H) final hidden states of ``model`` (an HF causal LM) at the batch's target positions (the trained ones,
    in training), after the final norm."""
    base = model.get_decoder()
    hidden = base(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).last_hidden_state
    return hidden[mb.target_mask]  # (B, T, H) -> (N, H), row-major like the targets


class StudentWithHead(torch.nn.Module):
    """``forward(mb, head_fn)`` = ``head_fn(hidden (N, H), lm_head.weight (V, H), lm_head.bias (V,) | None)``.

    ``model`` is the HF causal LM; it is saved and loaded as usual (``self.model``).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, mb: ModelBatch, head_fn: Callable):
        hidden = student_hidden(self.model, mb)  # (N, H)
        head = self.model.get_output_embeddings()
        return head_fn(hidden, head.weight, head.bias)
