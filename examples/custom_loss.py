"""Custom losses for `slmops finetune --loss examples/custom_loss.py:ClassName` (or `loss:` in a
workflow's pass). Each is an nn.Module whose forward takes slmops' LossInputs (see
docs/finetune.md, "Custom loss") and returns a scalar tensor.

    # pull same-tone phrases together, push different tones apart: a LoRA embedding adapter
    slmops finetune --data_name examples/data/tone_pairs.jsonl --train_split "train[:1000]" \
      --loss examples/custom_loss.py:CustomContrastiveLoss --loss_kwargs margin=1.0 \
      --max_steps 60 --learning_rate 5e-4 --output_path models/tone-embed
    python examples/contrastive_eval.py models/tone-embed      # held-out pairs: base vs tuned
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H): the mean over each sequence's real tokens, unit length."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


class CustomContrastiveLoss(nn.Module):
    """The contrastive loss of Hadsell et al. (2006) on pooled hidden states: similar pairs
    (label 1) pulled together, dissimilar ones (label 0) pushed at least `margin` apart.
    Distances are between unit vectors, so they lie in [0, 2]."""

    def __init__(self, margin: float = 1.0):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        self.margin = margin

    def forward(self, inputs) -> torch.Tensor:
        batch = inputs.batch
        first = mean_pool(inputs.hidden_states, batch["attention_mask"])
        second = mean_pool(inputs.encode(batch["input_ids_2"], batch["attention_mask_2"]), batch["attention_mask_2"])
        distance = (first - second).norm(dim=-1)  # (B,)
        similar = batch["label"].float()
        loss = similar * distance.pow(2) + (1 - similar) * F.relu(self.margin - distance).pow(2)
        return loss.mean()


class LabelSmoothedCrossEntropy(nn.Module):
    """Cross-entropy on the labelled tokens with label smoothing (a drop-in for the default loss)."""

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, inputs) -> torch.Tensor:
        return F.cross_entropy(inputs.logits, inputs.labels, label_smoothing=self.smoothing)
