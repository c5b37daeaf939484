"""Losses and pixel metrics against hand-computed values on small built tensors."""

import pytest
import torch
import torch.nn.functional as F

from holopipe.ml.dataset import IGNORE
from holopipe.ml.losses import ObjectCounts, PixelCounts, build_loss

SURE = 40.0  # logit whose sigmoid is 1 (or ~4e-18) in float32


def logit(probability):
    probability = torch.as_tensor(probability, dtype=torch.float64)
    return torch.log(probability / (1 - probability))


def make_target(seed=0, shape=(3, 1, 16, 16), fraction=0.2):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < fraction).float()


def hard_logits(predicted):
    """Logits that are SURE of the boolean prediction."""
    return torch.where(predicted.bool(), SURE, -SURE)


def single(kind, **params):
    return build_loss([{"type": kind, **params}])


@pytest.mark.parametrize("kind", ["dice", "tversky", "focal_tversky"])
def test_overlap_losses_are_zero_when_perfect_and_one_when_all_wrong(kind):
    target = make_target()
    assert single(kind)(hard_logits(target), target).item() == pytest.approx(0.0, abs=1e-4)
    assert single(kind)(hard_logits(1 - target), target).item() == pytest.approx(1.0, abs=1e-6)


def test_tversky_index_of_known_counts():
    # TP = 3, FP = 2, FN = 4 pixels, the rest true negatives, spread over two tiles.
    target = torch.zeros(2, 1, 4, 4)
    predicted = torch.zeros(2, 1, 4, 4)
    target[0, 0, 0, :3] = predicted[0, 0, 0, :3] = 1  # TP
    predicted[1, 0, 1, :2] = 1  # FP
    target[1, 0, 3, :4] = 1  # FN
    alpha, beta = 0.2, 0.8
    expected = 3 / (3 + alpha * 2 + beta * 4)
    loss = single("tversky", alpha=alpha, beta=beta)(hard_logits(predicted), target)
    assert loss.item() == pytest.approx(1 - expected, rel=1e-5)
    dice = single("dice")(hard_logits(predicted), target)
    assert dice.item() == pytest.approx(1 - 2 * 3 / (2 * 3 + 2 + 4), rel=1e-5)


def test_tversky_index_of_soft_probabilities():
    generator = torch.Generator().manual_seed(1)
    probability = torch.rand(2, 1, 8, 8, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    target = make_target(2, (2, 1, 8, 8), 0.3).double()
    tp = (probability * target).sum()
    fp = (probability * (1 - target)).sum()
    fn = ((1 - probability) * target).sum()
    expected = 1 - tp / (tp + 0.3 * fp + 0.7 * fn)
    loss = single("tversky", alpha=0.3, beta=0.7)(logit(probability).float(), target.float())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("gamma", [0.5, 0.75, 2.0])
def test_focal_tversky_raises_the_tversky_loss_to_gamma(gamma):
    target = make_target(3)
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    tversky = single("tversky", alpha=0.4, beta=0.6)(logits, target).item()
    focal = single("focal_tversky", alpha=0.4, beta=0.6, gamma=gamma)(logits, target).item()
    assert focal == pytest.approx(tversky**gamma, rel=1e-6)


def test_bce_matches_the_definition_with_pos_weight():
    target = make_target(4)
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(4)) * 3
    pos_weight = 10.0
    p = torch.sigmoid(logits.double())
    expected = -(pos_weight * target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    loss = single("bce", pos_weight=pos_weight)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight)).item(), rel=1e-6)


def test_weighted_sum_of_terms_with_schema_defaults():
    target = make_target(5)
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(5))
    loss = build_loss([{"type": "bce", "weight": 0.25, "pos_weight": 3.0}, {"type": "tversky"},
                       {"type": "focal_tversky", "weight": 2.0, "gamma": 1.5}])
    expected = (0.25 * single("bce", pos_weight=3.0)(logits, target)
                + single("tversky", alpha=0.3, beta=0.7)(logits, target)
                + 2.0 * single("focal_tversky", alpha=0.3, beta=0.7, gamma=1.5)(logits, target))
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    parts = loss.components(logits, target)
    assert list(parts) == ["0:bce", "1:tversky", "2:focal_tversky"]


@pytest.mark.parametrize("kind", ["bce", "dice", "tversky", "focal_tversky"])
def test_gradients_flow_and_stay_finite(kind):
    target = make_target(6)
    for logits in (torch.randn(target.shape, generator=torch.Generator().manual_seed(6)),
                   hard_logits(target)):  # also at a perfect prediction, where (1 - TI)^gamma is steep
        logits = logits.clone().requires_grad_()
        single(kind)(logits, target).backward()
        assert torch.isfinite(logits.grad).all()
    soft = torch.zeros(target.shape, requires_grad=True)
    single(kind)(soft, target).backward()
    # Raising a particle pixel's logit and lowering a background pixel's both reduce every loss.
    assert (soft.grad[target == 1] < 0).all() and (soft.grad[target == 0] > 0).all()


def test_losses_compute_in_float32_under_autocast():
    target = make_target(7, (4, 1, 64, 64), 0.05)
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(7)).bfloat16()
    loss = build_loss([{"type": "bce", "pos_weight": 10.0}, {"type": "focal_tversky"}])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, target.bfloat16())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(loss(logits.float(), target).item(), rel=1e-6)
    # fp16 logits over many pixels: the sums would overflow fp16 (max 65504) if not done in float32.
    big_target = torch.ones(2, 1, 256, 256)
    half = torch.full(big_target.shape, SURE, dtype=torch.float16)
    assert single("dice")(half, big_target).item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="hinge.*bce"):
        build_loss([{"type": "hinge"}])
    with pytest.raises(ValueError, match="delta"):
        build_loss([{"type": "bce", "delta": 1.0}])


def test_pixel_counts_of_a_known_case():
    # Probabilities 0.9 (particle), 0.6 (background), 0.3 (particle), 0.1 (background) four times over.
    probability = torch.tensor([0.9, 0.6, 0.3, 0.1]).repeat(4).reshape(1, 1, 4, 4)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(4).reshape(1, 1, 4, 4)
    counts = PixelCounts()
    counts.add(logit(probability).float(), target, threshold=0.5)
    assert counts.counts() == {"tp": 4, "fp": 4, "fn": 4, "tn": 4}
    assert counts.metrics() == pytest.approx({"dice": 0.5, "iou": 1 / 3, "precision": 0.5, "recall": 0.5})
    counts.reset()
    counts.add(logit(probability).float(), target, threshold=0.8)  # strictly above: only the 0.9 pixels
    assert counts.counts() == {"tp": 4, "fp": 0, "fn": 4, "tn": 8}
    assert counts.metrics() == pytest.approx({"dice": 8 / 12, "iou": 0.5, "precision": 1.0, "recall": 0.5})


def test_pixel_counts_accumulate_like_one_batch():
    target = make_target(8, (5, 1, 16, 16), 0.3)
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(8))
    combined, split = PixelCounts(), PixelCounts()
    combined.add(logits, target, 0.4)
    split.add(logits[:2], target[:2], 0.4)
    split.add(logits[2:], target[2:], 0.4)
    assert split.counts() == combined.counts()
    assert split.metrics() == combined.metrics()
    assert sum(combined.counts().values()) == target.numel()
    predicted = torch.sigmoid(logits) > 0.4
    assert combined.counts()["tp"] == int((predicted & (target == 1)).sum())


def test_pixel_metrics_define_empty_cases_as_one():
    counts = PixelCounts()
    assert counts.metrics() == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    empty = torch.zeros(1, 1, 8, 8)
    counts.add(torch.full(empty.shape, -SURE), empty)  # nothing to find, nothing found
    assert counts.metrics() == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    counts.add(torch.full(empty.shape, SURE), empty)  # everything wrongly found
    assert counts.metrics() == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 1.0}
    assert sum(counts.counts().values()) == 128
    with pytest.raises(ValueError, match="differ"):
        counts.add(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("kind", ["bce", "dice", "tversky", "focal_tversky"])
def test_ignored_pixels_count_in_no_loss(kind):
    """The band (a particle in focus on another bin's plane): whatever the model says there, the loss is the
    one of the known pixels alone, and no gradient reaches it."""
    target = make_target(3, (2, 1, 16, 16), 0.2)
    ignored = make_target(4, target.shape, 0.3).bool() & (target == 0)
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(5))
    loss = build_loss([{"type": kind}])
    banded = torch.where(ignored, torch.full_like(target, IGNORE), target)
    other = torch.where(ignored, logits + 7.0, logits).requires_grad_()
    assert loss(other, banded).item() == pytest.approx(loss(logits, banded).item(), rel=1e-6)
    loss(other, banded).backward()
    assert torch.all(other.grad[ignored] == 0) and torch.any(other.grad[~ignored] != 0)
    if kind == "bce":  # the mean over the known pixels
        known = ~ignored
        expected = F.binary_cross_entropy_with_logits(logits[known], target[known])
        assert loss(logits, banded).item() == pytest.approx(expected.item(), rel=1e-6)


def test_pixel_counts_leave_ignored_pixels_out():
    target = torch.tensor([1.0, 0.0, IGNORE, IGNORE]).repeat(4).reshape(1, 1, 4, 4)
    counts = PixelCounts()
    counts.add(torch.full(target.shape, SURE), target)
    assert counts.counts() == {"tp": 4, "fp": 4, "fn": 0, "tn": 0}


def test_object_counts_score_particles_not_pixels():
    """Two droplets (one found by a single pixel, one missed), a false detection, and a detection on the band
    of another bin's droplet, which is not false."""
    target = torch.zeros(1, 1, 32, 40)
    target[..., 2:8, 2:8] = 1  # found
    target[..., 20:26, 30:36] = 1  # missed
    target[..., 12:18, 12:18] = IGNORE  # band
    logits = torch.full(target.shape, -SURE)
    logits[..., 5, 5] = SURE
    logits[..., 13:16, 13:20] = SURE  # on the band, spilling over its edge
    logits[..., 28:31, 2:5] = SURE  # false
    counts = ObjectCounts()
    counts.add(logits, target)
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 1)
    assert counts.metrics() == pytest.approx({"object_f1": 0.5, "object_precision": 0.5, "object_recall": 0.5})
    counts.add(logits[..., :10, :10], target[..., :10, :10])  # accumulates over batches
    assert (counts.tp, counts.fp, counts.fn) == (2, 1, 1)
