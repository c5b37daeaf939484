"""Training losses on particle logits and pixel counts for validation metrics.

Particles cover a tiny fraction of a tile, so the overlap losses (dice, Tversky) are computed over the
whole batch, summing true/false positives over the pixels of all tiles: a tile without particles then
contributes its false positives instead of an undefined ratio. All losses compute in float32, also under
fp16/bf16 autocast, where sums over millions of pixels would lose precision or overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

SMOOTH = 1e-6
"""Added to numerator and denominator of the Tversky index: a perfect empty prediction scores 1, not 0/0."""

LOSS_TYPES = ("bce", "dice", "tversky", "focal_tversky")
_DEFAULTS = {"weight": 1.0, "alpha": 0.3, "beta": 0.7, "gamma": 0.75, "pos_weight": 1.0}  # the schema's


def _float32(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.float(), target.to(dtype=torch.float32)


def tversky_index(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Soft Tversky index TP / (TP + alpha FP + beta FN) of sigmoid probabilities, summed over the batch."""
    probability, target = _float32(logits, target)
    probability = torch.sigmoid(probability)
    tp = (probability * target).sum()
    fp = (probability * (1 - target)).sum()
    fn = ((1 - probability) * target).sum()
    return (tp + SMOOTH) / (tp + alpha * fp + beta * fn + SMOOTH)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Mean binary cross-entropy on logits, positive pixels weighted by ``pos_weight``."""
    logits, target = _float32(logits, target)
    # torch.full fills on the device; torch.tensor would copy from the host and wait for the GPU every step.
    weight = torch.full((), pos_weight, dtype=torch.float32, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3,
                 beta: float = 0.7) -> torch.Tensor:
    """1 - Tversky index; alpha weighs false positives, beta false negatives."""
    return 1 - tversky_index(logits, target, alpha, beta)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft dice, i.e. the Tversky loss with alpha = beta = 0.5."""
    return tversky_loss(logits, target, 0.5, 0.5)


def focal_tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7,
                       gamma: float = 0.75) -> torch.Tensor:
    """(1 - Tversky index)^gamma; gamma < 1 keeps the gradient large as the index nears 1."""
    # The clamp keeps the power's gradient finite where the index rounds to exactly 1.
    return tversky_loss(logits, target, alpha, beta).clamp_min(1e-12) ** gamma


class WeightedLoss:
    """Weighted sum of loss terms: ``loss(logits, target) -> scalar`` (float32).

    ``terms`` is a list of ``(name, weight, function(logits, target))``; ``components(logits, target)`` gives
    each term's unweighted value, for logging.
    """

    def __init__(self, terms: list[tuple[str, float, Callable]]):
        self.terms = terms

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return {f"{index}:{name}": function(logits, target)
                    for index, (name, _, function) in enumerate(self.terms)}

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return sum(weight * function(logits, target) for _, weight, function in self.terms)

    def __repr__(self) -> str:
        return "WeightedLoss(" + " + ".join(f"{weight:g}*{name}" for name, weight, _ in self.terms) + ")"


def _term(item: dict) -> tuple[str, float, Callable]:
    kind = item.get("type")
    if kind not in LOSS_TYPES:
        raise ValueError(f"train.loss: unknown loss type {kind!r}; valid ones: {', '.join(LOSS_TYPES)}")
    unknown = set(item) - {"type", *_DEFAULTS}
    if unknown:
        raise ValueError(f"train.loss: unknown keys {sorted(unknown)} in {item}")
    p = {**_DEFAULTS, **item}
    functions = {
        "bce": lambda logits, target: bce_loss(logits, target, p["pos_weight"]),
        "dice": dice_loss,
        "tversky": lambda logits, target: tversky_loss(logits, target, p["alpha"], p["beta"]),
        "focal_tversky": lambda logits, target: focal_tversky_loss(logits, target, p["alpha"], p["beta"],
                                                                   p["gamma"]),
    }
    return kind, float(p["weight"]), functions[kind]


def build_loss(items: list[dict]) -> WeightedLoss:
    """The loss of the ``train.loss`` config list: sum of ``weight * term`` (missing keys get schema defaults).

    Terms: bce (``pos_weight``), dice, tversky (``alpha`` on FP, ``beta`` on FN), focal_tversky (also
    ``gamma``). Inputs are logits ``(N, 1, H, W)`` and a 0/1 target of the same shape.
    """
    if not items:
        raise ValueError("train.loss: needs at least one term")
    return WeightedLoss([_term(item) for item in items])


def _ratio(numerator: int, denominator: int) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


class PixelCounts:
    """Confusion counts of thresholded pixels accumulated over batches, for validation metrics.

    A pixel is predicted positive when its probability is strictly above ``threshold``, and is a particle
    when its target is above 0.5. Counts are int64 tensors on the logits' device (no per-batch sync).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._counts = None  # int64 tensor [tp, fp, fn, tn]

    @torch.no_grad()
    def add(self, logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> None:
        """Add the counts of one batch; ``logits`` and ``target`` have the same shape."""
        if logits.shape != target.shape:
            raise ValueError(f"PixelCounts: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        if not 0 < threshold < 1:
            raise ValueError(f"PixelCounts: threshold must be in (0, 1), got {threshold}")
        # sigmoid(l) > t  <=>  l > log(t / (1 - t)); compared in float32 as fp16 logits round coarsely.
        predicted = logits.float() > math.log(threshold / (1 - threshold))
        actual = target > 0.5
        tp = (predicted & actual).sum()
        fp = (predicted & ~actual).sum()
        fn = (~predicted & actual).sum()
        tn = actual.numel() - tp - fp - fn
        counts = torch.stack([tp, fp, fn, tn]).to(torch.int64)
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    def counts(self) -> dict[str, int]:
        """{"tp", "fp", "fn", "tn"} as Python ints (zeros before any add)."""
        values = [0, 0, 0, 0] if self._counts is None else self._counts.tolist()
        return dict(zip(("tp", "fp", "fn", "tn"), values))

    def metrics(self) -> dict[str, float]:
        """Pixel dice (= F1), IoU, precision and recall.

        Any 0/0 is 1.0: with no particles and no predictions every score is 1 (nothing to find, nothing
        wrongly found); precision is also 1 when nothing is predicted, recall when there is nothing to find.
        """
        c = self.counts()
        tp, fp, fn = c["tp"], c["fp"], c["fn"]
        return {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
        }
