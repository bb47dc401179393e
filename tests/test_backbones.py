"""Any timm backbone (issue #22): the smallest model of each family the field uses for COD, built
once per module with pretrained=False (its weights loaded through --pretrained-path from a random
classification model), at 64 px: feature layout, stem/stage split, stage-1 freeze, progressive
unfreeze, a training step in each stage, and an exact resume through the command line."""

import copy
import os

import pytest
import timm
import torch
from timm.layers.norm_act import FrozenBatchNorm2d, freeze_batch_norm_2d  # torchvision's class
from torch import nn

import train_ultimate
from core.errors import UserError
from losses import build_loss
from models import build_model
from models.cod_model import _is_norm
from training.config import Config
from training.stages import unfreeze_level
from tests.helpers import assert_same_run, rows

SIZE = 64
FAMILIES = {
    "edgenext": "edgenext_xx_small",
    "resnet": "resnet10t",
    "res2net": "res2net50_48w_2s",
    "pvtv2": "pvt_v2_b0",
    "convnext": "convnext_atto",
    "swin": "swin_tiny_patch4_window7_224",   # NHWC maps, img_size at build time
    "efficientnet": "efficientnet_b0",        # nested feature modules (blocks.1), stride-2 level
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv4": "mobilenetv4_conv_small_035",
}


def classifier_key(key: str, source: dict) -> str:
    """The classification model's name of a features_only key (FeatureListNet: stages_0 -> stages.0)."""
    return key if key in source else key.replace("_", ".", 1)


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def built(request, tmp_path_factory):
    name = FAMILIES[request.param]
    torch.manual_seed(0)
    kwargs = {"img_size": SIZE} if "swin" in name else {}
    source = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    path = str(tmp_path_factory.mktemp(request.param) / "weights.pth")
    torch.save(source, path)
    model = build_model(name, num_experts=2, pretrained=False, pretrained_path=path, decoder_channels=16,
                        deep_supervision=True, img_size=SIZE)
    return model, source


def parts(model):
    enc = model.encoder
    return [("stem", enc.stem_modules)] + [(f"stage{i}", [m]) for i, m in enumerate(enc.stage_modules)]


def params_of(modules):
    return [p for m in modules for p in m.parameters()]


def step(model, opt):
    model.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    mask = (torch.rand(2, 1, SIZE, SIZE) > 0.5).float()
    total, _ = build_loss()(model(x), mask)
    opt.zero_grad()
    total.backward()
    opt.step()
    assert torch.isfinite(total)


def test_pretrained_path_loads_every_backbone_tensor(built):
    model, source = built
    for key, value in model.encoder.model.state_dict().items():
        assert torch.equal(value, source[classifier_key(key, source)]), key


def test_four_nchw_maps_at_strides_4_to_32(built):
    model, _ = built
    enc = model.encoder
    assert enc.reductions == [4, 8, 16, 32] and model.num_backbone_stages == 4
    with torch.no_grad():
        feats = enc.eval()(torch.randn(1, 3, SIZE, SIZE))
    assert [tuple(f.shape) for f in feats] == [(1, c, SIZE // s, SIZE // s)
                                              for c, s in zip(enc.channels, enc.reductions)]


def test_stem_and_stages_cover_the_backbone_and_each_stage_feeds_its_own_level(built):
    model, _ = built
    split = [params_of(mods) for _, mods in parts(model)]
    ids = [id(p) for group in split for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.encoder.parameters()))
    assert all(split), "the stem and every stage hold parameters"
    flat = [p for group in split for p in group]
    feats = model.encoder.eval()(torch.randn(1, 3, SIZE, SIZE))
    for level, feat in enumerate(feats):  # every parameter of stage i feeds level i; none deeper does
        grads = iter(torch.autograd.grad(feat.sum(), flat, allow_unused=True, retain_graph=True))
        fed = [[next(grads) is not None for _ in group] for group in split]
        assert all(fed[0]) and all(fed[1 + level]), level
        assert not any(f for group in fed[2 + level:] for f in group), level


def test_stage1_leaves_the_backbone_bit_identical_and_stage2_trains_it(built):
    model = copy.deepcopy(built[0])
    model.set_backbone_trainable(0)
    opt = torch.optim.AdamW(model.param_groups(0.01, 0.1), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, opt)
    after = model.state_dict()
    enc = [k for k in before if k.startswith("encoder.")]
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    old = {name: [p.clone() for p in params_of(mods)] for name, mods in parts(model)}
    model.set_backbone_trainable(99)
    step(model, opt)
    for name, mods in parts(model):  # the stem and every stage train
        assert any(not torch.equal(a, b) for a, b in zip(old[name], params_of(mods))), name
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in enc if k.endswith("running_mean"))


def test_progressive_unfreeze_reaches_every_stage_deepest_first_and_the_stem_last(built):
    model = copy.deepcopy(built[0])
    n = model.num_backbone_stages
    cfg = Config(epochs=1 + n + 2, stage1_epochs=1, progressive_unfreeze=True, unfreeze_interval=1)
    first = {}
    for epoch in range(cfg.epochs):
        model.set_backbone_trainable(unfreeze_level(cfg, epoch, n))
        model.train()
        for name, mods in parts(model):
            flags = {p.requires_grad for p in params_of(mods)}
            assert len(flags) == 1, name
            trainable = flags.pop()
            norms = [m.training for mod in mods for m in mod.modules() if _is_norm(m)]
            assert all(t == trainable for t in norms), name  # frozen parts' norms in eval mode
            if trainable:
                first.setdefault(name, epoch)
    assert sorted(first, key=first.get) == ["stage3", "stage2", "stage1", "stage0", "stem"]
    assert list(first.values()) == sorted(set(first.values())) and first["stage3"] == 1


NORMS = {  # timm's EfficientNet with other norm layers, and ResNet with FrozenBatchNorm2d and more
    "groupnorm": "test_efficientnet_gn", "layernorm2d": "test_efficientnet_ln",
    "evonorm": "test_efficientnet_evos", "mixed": "resnet10t"}


class StatsNamedOtherwise(nn.Module):
    """A norm keeping running statistics whose class does not say so (e.g. InPlaceABN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(x.mean((0, 2, 3)), 0.1)
        return (x - self.running_mean[:, None, None]) * self.weight


@pytest.mark.parametrize("kind", list(NORMS))
def test_frozen_norms_stay_frozen_whatever_their_type(kind):
    torch.manual_seed(0)
    model = build_model(NORMS[kind], num_experts=2, pretrained=False, decoder_channels=16, img_size=SIZE)
    if kind == "mixed":
        net = model.encoder.model
        net.layer1 = freeze_batch_norm_2d(net.layer1)
        net.layer2[0].bn1 = nn.GroupNorm(4, net.layer2[0].bn1.num_features)
        net.layer3[0].bn1 = timm.layers.LayerNorm2d(net.layer3[0].bn1.num_features)
        net.layer4[0].bn1 = StatsNamedOtherwise(net.layer4[0].bn1.num_features)
        model.encoder.stem_modules, model.encoder.stage_modules = model.encoder._split_stages()
        assert any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    model.set_backbone_trainable(0)
    model.train()
    norms = [m for m in model.encoder.modules() if _is_norm(m)]
    kinds = {type(m).__name__ for m in norms}
    assert len(kinds) >= (5 if kind == "mixed" else 1) and not any(m.training for m in norms), kinds
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())


def test_unknown_names_and_unusable_models_are_one_line_errors(monkeypatch):
    with pytest.raises(UserError, match=r"not a timm model; close matches: .*resnet18"):
        build_model("resnet_18", pretrained=False)
    with pytest.raises(UserError, match=r"unknown pretrained tag; timm has resnet10t.c3_in1k"):
        build_model("resnet10t.nope", pretrained=False)
    with pytest.raises(UserError, match=r"strides 16, 16, 16; the decoder needs 4, 8, 16 and 32"):
        build_model("test_vit", pretrained=False, img_size=SIZE)
    with pytest.raises(UserError, match=r"cannot take --img-size 100 \(AssertionError: .*window"):
        build_model("test_maxvit", pretrained=False, img_size=100)

    def no_features(*args, **kwargs):
        raise RuntimeError("features_only not implemented for Foo")

    monkeypatch.setattr(timm, "create_model", no_features)
    with pytest.raises(UserError, match=r"does not build as a features_only backbone \(RuntimeError"):
        build_model("resnet10t", pretrained=False)


RESUME_FLAGS = ["--no-pretrained", "--img-size", str(SIZE), "--num-workers", "0", "--no-progress",
                "--num-experts", "2", "--batch-size", "2", "--limit-batches", "2", "--epochs", "3",
                "--stage1-epochs", "1", "--scheduler", "cosine", "--lr", "1e-3", "--progressive-unfreeze",
                "--unfreeze-interval", "1", "--ema", "--drop-path", "0.1", "--seed", "3", "--no-curves"]


@pytest.mark.e2e
@pytest.mark.parametrize("backbone", ["resnet10t", "mobilenetv4_conv_small_035"])
def test_resume_in_progressive_stage2_continues_exactly(backbone, demo, tmp_path):
    """Stopped after a stage-1 and a stage-2 epoch (BatchNorm statistics of the unfrozen stage have
    moved), resumed for the last epoch with one more stage unfrozen: the same run as straight."""
    root = demo(n_train=10, n_test=2, size=SIZE, seed=2)
    args = ["train", "--dataset-path", root, "--backbone", backbone, *RESUME_FLAGS]
    straight, pieces = str(tmp_path / "straight"), str(tmp_path / "pieces")
    assert train_ultimate.main([*args, "--checkpoint-dir", straight]) == 0
    assert train_ultimate.main([*args, "--checkpoint-dir", pieces, "--run-epochs", "2"]) == 0
    assert train_ultimate.main([*args, "--checkpoint-dir", pieces,
                                "--resume-from", os.path.join(pieces, "last.pth")]) == 0
    assert [r["stage"] for r in rows(pieces)] == ["1", "2", "2"]
    assert_same_run(straight, pieces)
