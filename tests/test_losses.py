"""losses/: hand-computed values, the boundary weight map, edge cases, deep supervision, named terms."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from losses import TERMS, DiceLoss, StructureLoss, WeightedBCE, WeightedIoU, build_loss
from losses import functional as LF

LOGITS = torch.tensor([[[[0.0, 2.0], [-1.0, 0.0]]]])
MASK = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])


def sig(x):
    return 1 / (1 + math.exp(-x))


def bce(x, t):
    return math.log(1 + math.exp(x)) - t * x


def hand_weights():
    # the 31x31 window with 15 px zero padding covers the whole 2x2 image: local mean = 2/961
    local = 2 / 961
    return [1 + 5 * abs(local - m) for m in (1, 1, 0, 0)]


def test_hand_computed_bce_iou_dice():
    xs, ts, ws = (0.0, 2.0, -1.0, 0.0), (1, 1, 0, 0), hand_weights()
    ps = [sig(x) for x in xs]
    want_bce = sum(w * bce(x, t) for w, x, t in zip(ws, xs, ts)) / sum(ws)
    inter = sum(w * p * t for w, p, t in zip(ws, ps, ts))
    union = sum(w * (p + t) for w, p, t in zip(ws, ps, ts)) - inter
    want_iou = 1 - (inter + 1) / (union + 1)
    want_dice = 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)

    assert torch.allclose(LF.boundary_weight(MASK).flatten(), torch.tensor(ws))
    terms = LF.segmentation_terms(LOGITS, MASK)
    assert terms["bce"].item() == pytest.approx(want_bce, rel=1e-6)
    assert terms["iou"].item() == pytest.approx(want_iou, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(want_dice, rel=1e-6)
    assert WeightedBCE()(LOGITS, MASK).item() == pytest.approx(want_bce, rel=1e-6)
    assert WeightedIoU()(LOGITS, MASK).item() == pytest.approx(want_iou, rel=1e-6)
    assert DiceLoss()(LOGITS, MASK).item() == pytest.approx(want_dice, rel=1e-6)
    assert StructureLoss()(LOGITS, MASK).item() == pytest.approx(want_bce + want_iou, rel=1e-6)
    # unweighted BCE is the plain mean
    plain = sum(bce(x, t) for x, t in zip(xs, ts)) / 4
    assert WeightedBCE(boundary=False)(LOGITS, MASK).item() == pytest.approx(plain, rel=1e-6)


def test_per_sample_mean_over_batch():
    logits = torch.cat([LOGITS, -LOGITS])
    mask = torch.cat([MASK, 1 - MASK])
    both = LF.segmentation_terms(logits, mask)
    one = [LF.segmentation_terms(logits[i:i + 1], mask[i:i + 1]) for i in range(2)]
    for k in ("bce", "iou", "dice"):
        assert both[k].item() == pytest.approx((one[0][k] + one[1][k]).item() / 2, rel=1e-6)


def test_boundary_weight_map_changes_bce():
    mask = torch.zeros(1, 1, 96, 96)
    mask[..., 16:80, 16:80] = 1
    w = LF.boundary_weight(mask)
    assert w.min() >= 1 and w.max() <= 6
    assert w[0, 0, 48, 48] == 1 and w[0, 0, 16, 16] > 4  # object centre 1, object corner ~1+5*0.72
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 96, 96) * 3
    weighted = LF.weighted_bce(logits, mask, w)
    plain = F.binary_cross_entropy_with_logits(logits, mask)
    assert not torch.isclose(weighted, plain, rtol=1e-3)
    per_pixel = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    assert torch.allclose(weighted, (w * per_pixel).sum() / w.sum())


@pytest.mark.parametrize("fill", [0.0, 1.0])
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_empty_and_full_masks_are_finite(fill, scale):
    torch.manual_seed(0)
    mask = torch.full((2, 1, 32, 32), fill)
    main = (torch.randn(2, 1, 32, 32) * scale).requires_grad_()
    aux = [torch.randn(2, 1, s, s, requires_grad=True) for s in (8, 4, 2)]
    total, terms = build_loss(label_smoothing=0.1)({"main": main, "aux": aux, "moe_aux": torch.tensor(1.0)}, mask)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    assert torch.isfinite(main.grad).all() and all(torch.isfinite(a.grad).all() for a in aux)


def test_terms_are_named_weighted_detached_and_sum_to_total():
    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float()
    main = torch.randn(2, 1, 16, 16, requires_grad=True)
    outputs = {"main": main, "aux": [], "moe_aux": torch.tensor(1.5, requires_grad=True)}
    fn = build_loss(bce_weight=2.0, iou_weight=0.5, dice_weight=3.0, moe_aux_weight=0.1)
    total, terms = fn(outputs, mask)
    assert tuple(terms) == TERMS
    assert all(v.ndim == 0 and not v.requires_grad for v in terms.values())
    raw = LF.segmentation_terms(main, mask)
    assert terms["bce"].item() == pytest.approx(2.0 * raw["bce"].item(), rel=1e-6)
    assert terms["iou"].item() == pytest.approx(0.5 * raw["iou"].item(), rel=1e-6)
    assert terms["dice"].item() == pytest.approx(3.0 * raw["dice"].item(), rel=1e-6)
    assert terms["ds"].item() == 0.0 and terms["moe_aux"].item() == pytest.approx(0.15)
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    total.backward()
    assert outputs["moe_aux"].grad.item() == pytest.approx(0.1)
    # a 3-d mask (B x H x W) is accepted too
    assert fn(outputs, mask[:, 0])[0].item() == pytest.approx(total.item(), rel=1e-6)


def test_deep_supervision_upsamples_and_weights_each_output():
    torch.manual_seed(0)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 4:20, 10:30] = 1
    aux = [torch.randn(2, 1, s, s, requires_grad=True) for s in (8, 4, 2)]
    outputs = {"main": torch.randn(2, 1, 32, 32), "aux": aux, "moe_aux": torch.tensor(0.0)}
    fn = build_loss(ds_weights=(0.5, 0.3, 0.2), dice_weight=2.0)
    total, terms = fn(outputs, mask)
    want = 0.0
    for w, a in zip((0.5, 0.3, 0.2), aux):
        up = F.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)
        t = LF.segmentation_terms(up, mask)
        want += w * (t["bce"] + t["iou"] + 2.0 * t["dice"]).item()
    assert terms["ds"].item() == pytest.approx(want, rel=1e-5)
    total.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in aux)
    with pytest.raises(UserError, match="--ds-weights"):
        build_loss(ds_weights=(1.0, 1.0))(outputs, mask)


def test_label_smoothing_changes_only_bce():
    torch.manual_seed(0)
    mask = (torch.rand(1, 1, 16, 16) > 0.5).float()
    outputs = {"main": (mask * 2 - 1) * 8, "aux": [], "moe_aux": torch.tensor(0.0)}  # confident, right
    _, plain = build_loss()(outputs, mask)
    _, smooth = build_loss(label_smoothing=0.2)(outputs, mask)
    assert smooth["bce"] > plain["bce"] + 0.05
    assert smooth["iou"] == plain["iou"] and smooth["dice"] == plain["dice"]
    assert torch.allclose(LF.smooth_targets(torch.tensor([0.0, 1.0]), 0.2), torch.tensor([0.1, 0.9]))


def test_low_precision_logits_give_float32_loss():
    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float()
    main = torch.randn(2, 1, 16, 16)
    ref, _ = build_loss()({"main": main}, mask)
    low, _ = build_loss()({"main": main.bfloat16()}, mask)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=1e-2)


def test_bad_weights_are_user_errors():
    with pytest.raises(UserError, match="--dice-weight"):
        build_loss(dice_weight=-1)
    with pytest.raises(UserError, match="--label-smoothing"):
        build_loss(label_smoothing=1.0)


def test_separable_boundary_weight_equals_the_square_box_mean():
    """The two 1-D passes give the F3Net 31 x 31 zero-padded box mean of the definition."""
    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 70, 53) > 0.6).float()
    local = torch.nn.functional.avg_pool2d(mask, 31, stride=1, padding=15)
    torch.testing.assert_close(LF.boundary_weight(mask), 1.0 + 5.0 * (local - mask).abs(), rtol=0, atol=1e-5)
