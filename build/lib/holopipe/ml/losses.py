"""Training losses on particle logits and pixel counts for validation metrics.

Particles cover a tiny fraction of a tile, so the overlap losses (dice, Tversky) are computed over the
whole batch, summing true/false positives over the pixels of all tiles: a tile without particles then
contributes its false positives instead of an undefined ratio. All losses compute in float32, also under
fp16/bf16 autocast, where sums over millions of pixels would lose precision or overflow.

A target pixel below 0 (:data:`holopipe.ml.dataset.IGNORE`: a particle in focus on another bin's plane, which
the label can neither ask for nor forbid) counts in no loss and no metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

SMOOTH = 1e-6
"""Added to numerator and denominator of the Tversky index: a perfect empty prediction scores 1, not 0/0."""

LOSS_TYPES = ("bce", "dice", "tversky", "focal_tversky")
_DEFAULTS = {"weight": 1.0, "alpha": 0.3, "beta": 0.7, "gamma": 0.75, "pos_weight": 1.0}  # the schema's


def _float32(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits and 0/1 target in float32, and the known pixels' weight (0 where the target is ignored)."""
    target = target.to(dtype=torch.float32)
    known = (target >= 0).to(torch.float32)
    return logits.float(), target * known, known


def tversky_index(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Soft Tversky index TP / (TP + alpha FP + beta FN) of sigmoid probabilities, summed over the batch."""
    probability, target, known = _float32(logits, target)
    probability = torch.sigmoid(probability) * known
    tp = (probability * target).sum()
    fp = (probability * (1 - target)).sum()
    fn = ((1 - probability) * target).sum()
    return (tp + SMOOTH) / (tp + alpha * fp + beta * fn + SMOOTH)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Mean binary cross-entropy on logits over the known pixels, positive pixels weighted by ``pos_weight``."""
    logits, target, known = _float32(logits, target)
    # torch.full fills on the device; torch.tensor would copy from the host and wait for the GPU every step.
    weight = torch.full((), pos_weight, dtype=torch.float32, device=logits.device)
    total = F.binary_cross_entropy_with_logits(logits, target, weight=known, pos_weight=weight, reduction="sum")
    return total / known.sum().clamp_min(1.0)


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
    ``gamma``). Inputs are logits ``(N, 1, H, W)`` and a 0/1 target of the same shape (negative: ignored).
    """
    if not items:
        raise ValueError("train.loss: needs at least one term")
    return WeightedLoss([_term(item) for item in items])


def _ratio(numerator: int, denominator: int) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


class PixelCounts:
    """Confusion counts of thresholded pixels accumulated over batches, for validation metrics.

    A pixel is predicted positive when its probability is strictly above ``threshold``, and is a particle
    when its target is above 0.5; ignored pixels (target below 0) count nowhere. Counts are int64 tensors
    on the logits' device (no per-batch sync).
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
        actual, known = target > 0.5, target >= 0
        tp = (predicted & actual).sum()
        fp = (predicted & ~actual & known).sum()
        fn = (~predicted & actual).sum()
        tn = known.sum() - tp - fp - fn
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


class ObjectCounts:
    """Particles found and missed in thresholded tiles, accumulated over batches: the validation metric that
    chooses the checkpoint, as the workflow scores particles, not pixels.

    Per tile, the connected regions of the target's particle pixels are the truth and those of the
    predicted pixels the detections (8-connected). A truth region touched by a detection is found, else
    missed; a detection that touches neither a particle nor an ignored pixel (the band of another bin's
    particle) is false. Counted on the host (one transfer per batch).
    """

    def __init__(self):
        self.tp = self.fp = self.fn = 0

    def add(self, logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> None:
        predicted = (logits.float() > math.log(threshold / (1 - threshold))).cpu().numpy()
        target = target.float().cpu().numpy()
        structure = np.ones((3, 3), bool)
        for found, truth_values in zip(predicted.reshape(-1, *predicted.shape[-2:]),
                                       target.reshape(-1, *target.shape[-2:])):
            truth, n_truth = ndimage.label(truth_values > 0.5, structure)
            detections, n_detections = ndimage.label(found, structure)
            touched = np.unique(truth[found & (truth > 0)])
            explained = np.unique(detections[(truth_values > 0.5) | (truth_values < 0)])
            self.tp += int(touched.size)
            self.fn += int(n_truth) - int(touched.size)
            self.fp += int(n_detections) - int(np.count_nonzero(explained))

    def metrics(self) -> dict[str, float]:
        """Object F1, precision and recall (any 0/0 is 1.0, as for :class:`PixelCounts`)."""
        return {"object_f1": float(_ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)),
                "object_precision": float(_ratio(self.tp, self.tp + self.fp)),
                "object_recall": float(_ratio(self.tp, self.tp + self.fn))}
