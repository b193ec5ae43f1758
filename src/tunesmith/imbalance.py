"""Class imbalance: how many examples each class has, the class weights, the loss that uses them,
and the per-example weights of the oversampling sampler.

One place for every task: the task says which class ids each training example holds
(task.example_classes), which ids a class name means (task.class_ids), and any loss weights of its own
(task.extra_loss_weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config
from .errors import TunesmithError
from .tasks.base import IGNORE  # label positions the loss skips (sub-tokens, padding)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_counts(task, targets, labels) -> dict[str, int]:
    """Occurrences of each class (single-label: examples; multi-label: rows holding the class; token
    classification: words per tag), as the task's example_classes count them."""
    if targets is None or not task.has_classes(labels):
        return {}
    held = task.example_classes(targets, labels)
    counts = np.bincount(np.concatenate(held or [np.zeros(0, np.int64)]).astype(np.int64), minlength=len(labels.names))
    return {name: int(c) for name, c in zip(labels.names, counts)}


def class_weights(task, cfg: Config, train_targets, labels) -> np.ndarray:
    """One weight per output class, from imbalance.weights.

    'balanced' (scikit-learn's rule): w_c = n / (classes x n_c), so every class carries the same total
    weight; e.g. 900 / 100 examples -> 0.556 / 5.0. Multi-label: pos_weight_c = negatives_c / positives_c,
    so a class's positives weigh as much as its negatives. A class absent from train gets weight 1.
    """
    counts = np.asarray(list(class_counts(task, train_targets, labels).values()), dtype=np.float64)
    spec = cfg.imbalance.weights
    if spec == "balanced":
        present = counts > 0
        if labels.problem_type == "multi_label":
            negatives = len(train_targets) - counts
            weights = np.where(present, negatives / np.maximum(counts, 1), 1.0)
        else:
            weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 1.0)
    else:
        weights = np.ones(len(labels.names))
        for name, value in spec.items():
            hits = task.class_ids(name, labels)
            if not hits:
                known = labels.types + ["O"] if hasattr(labels, "types") else labels.names
                raise TunesmithError(f"imbalance.weights: unknown class '{name}' (classes: {', '.join(known)})")
            weights[hits] = value
    return weights.astype(np.float32)


def example_weights(task, train_targets, labels, weights: np.ndarray) -> np.ndarray:
    """How likely the oversampler draws each training example: the largest weight among its classes
    (single-label: its class's, so with 'balanced' weights every class is drawn equally often; an
    example holding a rare class is drawn as often as that class asks; one without any weighs 1)."""
    held = task.example_classes(train_targets, labels)
    return np.asarray([weights[c].max() if len(c) else 1.0 for c in held], dtype=np.float64)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, multi_label: bool,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """FL = -(1 - p_t)^gamma * log p_t (Lin et al. 2017), averaged; at gamma 0 it is cross-entropy.

    Softmax over classes (single-label, tokens; IGNORE positions skipped, `weights` a weighted mean like
    cross-entropy's), or a sigmoid per class (multi-label, averaged over every row x class).
    """
    if multi_label:
        y = labels.float()
        ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * y + (1 - p) * (1 - y)
        return ((1 - p_t) ** gamma * ce).mean()
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = labels != IGNORE
    logits, labels = logits[keep], labels[keep]
    log_p = F.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]
    loss = -(1 - log_p.exp()) ** gamma * log_p
    w = torch.ones_like(loss) if weights is None else weights[labels]
    return (w * loss).sum() / w.sum().clamp_min(1e-12)


def make_loss(cfg: Config, weights: np.ndarray | None, labels) -> LossFn | None:
    """The training loss from logits and labels; None where the model's own loss is the right one."""
    method = cfg.imbalance.method
    multi_label = labels.problem_type == "multi_label"
    w = None if weights is None else torch.as_tensor(weights)
    if method == "focal":
        return lambda logits, y: focal_loss(logits.float(), y, cfg.imbalance.gamma, multi_label,
                                            None if w is None else w.to(logits.device))
    if w is None:
        return None
    if multi_label:  # pos_weight: a positive of class c counts w_c times
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits.float(), y.float(),
                                                                    pos_weight=w.to(logits.device))
    # weighted mean: sum_i w[y_i] * CE_i / sum_i w[y_i] over labelled positions
    return lambda logits, y: F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                             weight=w.to(logits.device), ignore_index=IGNORE)


@dataclass
class Balance:
    """What the training loop needs: the loss (None: the model's), the sampler's example weights
    (None: a plain shuffle), and the figures the run summary shows."""
    loss: LossFn | None
    sample_weights: np.ndarray | None
    summary: dict


def setup(task, cfg: Config, splits, labels) -> Balance:
    method = cfg.imbalance.method
    distribution = {name: class_counts(task, part.targets, labels) for name, part in
                    (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
                    if part is not None and part.targets is not None}
    summary: dict = {"method": method, "distribution": distribution}
    if not task.has_classes(labels):
        return Balance(None, None, summary)
    weights = class_weights(task, cfg, splits.train.targets, labels) if method in ("class_weights", "oversample") \
        else None
    # the loss weighs classes only with class_weights; a task's own weights (NER's o_tag_weight) apply always
    loss_weights = weights if method == "class_weights" else None
    extra = task.extra_loss_weights(cfg, labels)
    if extra is not None:
        loss_weights = extra if loss_weights is None else loss_weights * extra
        summary["loss_weights"] = {n: round(float(w), 4) for n, w in zip(labels.names, loss_weights)}
    if weights is not None:
        summary["weights"] = {n: round(float(w), 4) for n, w in zip(labels.names, weights)}
    if method == "focal":
        summary["gamma"] = cfg.imbalance.gamma
    sample_weights = example_weights(task, splits.train.targets, labels, weights) if method == "oversample" else None
    return Balance(make_loss(cfg, loss_weights, labels), sample_weights, summary)


def describe(counts: dict[str, int], limit: int = 12) -> str:
    """'120 neg, 880 pos' or, for weights, '3.0000 neg, 0.6000 pos' (the largest first when there are many)."""
    items = list(counts.items())
    shown = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    more = f", ... ({len(counts)} classes)" if len(items) > limit else ""
    if more:
        items = sorted(items, key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{shown(c)} {n}" for n, c in items) + more
