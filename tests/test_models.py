"""models/: shapes, routing, balance loss, freezing, parameter groups, weight loading."""

import time

import pytest
import timm
import torch
from torch import nn

from core.errors import UserError
from models import build_model
from models.experts import MoEBlock, load_balance_loss, top_k_weights

TINY = "edgenext_xx_small"


def tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_experts", 4)
    return build_model(TINY, pretrained=False, decoder_channels=16, **kw)


@pytest.mark.parametrize("backbone", ["edgenext_xx_small", "edgenext_x_small", "edgenext_small", "edgenext_base"])
def test_output_shapes_all_variants(backbone):
    model = build_model(backbone, num_experts=3, moe_top_k=2, deep_supervision=True, pretrained=False,
                        decoder_channels=16).eval()
    assert model.num_backbone_stages == 4
    with torch.no_grad():
        for h, w in [(64, 64), (72, 88)]:
            out = model(torch.randn(1, 3, h, w))
            assert out["main"].shape == (1, 1, h, w)
            # strides 8, 16, 32, not upsampled (EdgeNeXt floors each downsampling)
            assert [tuple(a.shape[-2:]) for a in out["aux"]] == [(h // 8, w // 8), (h // 16, w // 16),
                                                                 (h // 32, w // 32)]
            assert out["moe_aux"].ndim == 0 and out["expert_usage"].shape == (3,)
            assert torch.isfinite(out["main"]).all()


def test_num_experts_rule_is_the_flags_rule():
    with pytest.raises(UserError, match=r"--num-experts must be >= 1, 1 = no mixture of experts"):
        tiny(num_experts=0)


@pytest.mark.parametrize("num_experts", [1])
def test_without_experts_plain_block_and_zero_aux(num_experts):
    model = tiny(num_experts=num_experts)
    out = model(torch.randn(2, 3, 40, 56))
    assert out["main"].shape == (2, 1, 40, 56) and out["aux"] == []
    assert out["moe_aux"].ndim == 0 and out["moe_aux"].item() == 0.0
    assert out["expert_usage"].shape == (num_experts,)
    assert model.param_counts()["experts"] == 0


def test_router_gets_gradient_from_the_prediction():
    model = tiny(num_experts=4, moe_top_k=2)
    out = model(torch.randn(2, 3, 64, 64))
    out["main"].square().mean().backward()  # no balance loss: the gradient comes through the weights
    for block in model.decoder.blocks:
        assert block.router.fc.weight.grad is not None and block.router.fc.weight.grad.abs().sum() > 0


def test_top_k_uses_exactly_k_experts_per_sample():
    torch.manual_seed(0)
    block = MoEBlock(8, num_experts=5, top_k=2)
    with torch.no_grad():
        block.router.fc.weight.normal_(std=1.0)  # make samples route differently
    x = torch.randn(6, 8, 9, 7)
    probs, weights, keep = block.route(x)
    assert ((weights > 0).sum(1) == 2).all() and (keep.sum(1) == 2).all()
    assert torch.allclose(weights.sum(1), torch.ones(6))
    top2 = probs.topk(2, dim=1).indices
    assert torch.equal(keep.gather(1, top2), torch.ones(6, 2))
    out, aux, usage = block(x)
    expected = x + sum(weights[:, e, None, None, None] * block.experts[e](x) for e in range(5))
    assert torch.allclose(out, expected, atol=1e-6)
    assert aux.ndim == 0 and torch.allclose(usage.sum(), torch.tensor(1.0))
    # k >= E: dense softmax weights
    _, dense, _ = MoEBlock(8, num_experts=3, top_k=7).route(x)
    assert (dense > 0).all() and torch.allclose(dense.sum(1), torch.ones(6))


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_collapsed():
    e, b = 4, 8
    uniform = torch.full((b, e), 1 / e)
    keep = torch.zeros(b, e)
    keep[torch.arange(b), torch.arange(b) % e] = 1  # balanced top-1 selections
    assert load_balance_loss(uniform, keep).item() == pytest.approx(1.0)

    logits = torch.tensor([4.0, 0.0, 0.0, 0.0]).repeat(b, 1).requires_grad_()
    probs = logits.softmax(1)
    _, keep = top_k_weights(probs, 1)  # everyone picks expert 0
    loss = load_balance_loss(probs, keep)
    assert loss.item() > 3.0  # close to E = 4 for a certain, collapsed router
    loss.backward()
    assert (logits.grad[:, 0] > 0).all()  # descending lowers the favoured expert's logit


def _bn_model():
    """Tiny EdgeNeXt has only LayerNorms (no running stats): swap two for BatchNorms to test them."""
    model = tiny(num_experts=2)
    enc = model.encoder.model
    enc.stem_1 = nn.BatchNorm2d(24)
    enc.stages_1.downsample[0] = nn.BatchNorm2d(24)
    model.encoder.stem_modules, model.encoder.stage_modules = model.encoder._split_stages()
    return model


def _train_step(model):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    (out["main"].mean() + out["moe_aux"]).backward()
    opt.step()


def test_level0_freezes_backbone_weights_and_norm_statistics_through_train():
    model = _bn_model()
    model.set_backbone_trainable(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # must not wake the frozen norms
    assert not model.encoder.model.stem_1.training and not model.encoder.model.stages_1.downsample[0].training
    _train_step(model)
    after = model.state_dict()
    enc = [k for k in before if k.startswith("encoder.")]
    assert any("running_mean" in k for k in enc)
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert all(not p.requires_grad for p in model.encoder.parameters())
    # sanity: unfrozen, the same step does move the statistics
    model.set_backbone_trainable(99)
    _train_step(model)
    assert not torch.equal(before["encoder.model.stem_1.running_mean"],
                           model.state_dict()["encoder.model.stem_1.running_mean"])


def test_level_k_unfreezes_the_k_deepest_stages():
    model = tiny()
    enc = model.encoder.model
    parts = [("stem", [enc.stem_0, enc.stem_1])] + [(f"stages_{i}", [getattr(enc, f"stages_{i}")])
                                                  for i in range(4)]

    def trainable(mods):
        flags = {p.requires_grad for m in mods for p in m.parameters()}
        assert len(flags) == 1
        return flags.pop()

    expected = {0: [], 1: ["stages_3"], 2: ["stages_3", "stages_2"],
                3: ["stages_3", "stages_2", "stages_1"], 4: ["stages_3", "stages_2", "stages_1", "stages_0"]}
    for level in range(7):
        model.set_backbone_trainable(level)
        model.train()
        on = {name for name, mods in parts if trainable(mods)}
        assert on == (set(expected[level]) if level in expected else {n for n, _ in parts}), level
        assert all(p.requires_grad for p in model.decoder.parameters())
        assert all(p.requires_grad for p in model.heads.parameters())
        # norm modes follow: frozen parts' norms in eval
        assert enc.stem_1.training == (level >= 5)
        assert enc.stages_3.downsample[0].training == (level >= 1)


def test_param_groups_cover_every_parameter_once():
    model = tiny(deep_supervision=True)
    model.set_backbone_trainable(0)  # frozen parameters are included too
    groups = model.param_groups(weight_decay=0.05, backbone_lr_mult=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_wd", "decoder", "decoder_no_wd"}
    assert by_name["backbone"]["lr_scale"] == 0.1 and by_name["decoder"]["lr_scale"] == 1.0
    assert by_name["backbone_no_wd"]["weight_decay"] == 0.0 and by_name["decoder"]["weight_decay"] == 0.05
    no_wd = {id(p) for g in groups if g["name"].endswith("_no_wd") for p in g["params"]}
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias"):
            assert id(p) in no_wd, name
    assert id(model.encoder.model.stem_1.weight) in no_wd  # a LayerNorm2d weight
    assert id(model.heads.main.weight) not in no_wd
    counts = model.param_counts()
    assert counts["total"] == counts["backbone"] + counts["decoder"] + counts["heads"]
    assert 0 < counts["experts"] < counts["decoder"]
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_path_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model(TINY, pretrained=False)  # a classification model, head included
    sd = source.state_dict()
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".pth":  # wrapped and prefixed, as training scripts save them
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, path)
    model = build_model(TINY, num_experts=2, pretrained=True, pretrained_path=path, decoder_channels=16)
    enc = model.encoder.model
    assert torch.equal(enc.stem_0.weight, source.stem[0].weight)
    assert torch.equal(enc.stages_3.blocks[-1].mlp.fc2.weight, source.stages[3].blocks[-1].mlp.fc2.weight)
    loaded = enc.state_dict()
    assert all(torch.equal(v, sd[k.replace("stem_", "stem.").replace("stages_", "stages.", 1)])
               for k, v in loaded.items())


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_model(TINY, pretrained_path=str(tmp_path / "missing.pth"))
    path = str(tmp_path / "other.pth")
    torch.save({"stem.0.weight": torch.zeros(7, 3, 4, 4)}, path)
    with pytest.raises(UserError, match="wrong shape"):
        build_model(TINY, pretrained_path=path)


def test_offline_pretrained_fails_fast_with_user_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    t0 = time.time()
    with pytest.raises(UserError, match="--pretrained-path FILE .* or --no-pretrained"):
        build_model(TINY, pretrained=True)
    assert time.time() - t0 < 5


def test_pretrained_from_local_hub_cache_needs_no_network(monkeypatch, tmp_path):
    import models.encoder as encoder_mod
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = timm.create_model(TINY, pretrained=False)
    path = str(tmp_path / "model.safetensors")
    save_file(source.state_dict(), path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(encoder_mod, "cached_hub_file", lambda backbone: path)
    model = build_model(TINY, pretrained=True, num_experts=2, decoder_channels=16)
    assert torch.equal(model.encoder.model.stem_0.weight, source.stem[0].weight)


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="not a timm model; close matches: edgenext_xx_small"):
        build_model("edgenext_xx_smal", pretrained=False)
    with pytest.raises(UserError, match="--num-experts"):
        build_model(TINY, num_experts=-1, pretrained=False)
    with pytest.raises(UserError, match="--moe-top-k"):
        build_model(TINY, moe_top_k=0, pretrained=False)


def test_training_step_with_loss_is_finite_and_balanced_terms():
    from losses import build_loss

    model = tiny(num_experts=4, moe_top_k=2, deep_supervision=True, dropout=0.1, drop_path=0.1)
    loss_fn = build_loss()
    x = torch.randn(2, 3, 64, 64)
    mask = (torch.rand(2, 1, 64, 64) > 0.5).float()
    total, terms = loss_fn(model(x), mask)
    total.backward()
    assert torch.isfinite(total) and terms["ds"] > 0 and terms["moe_aux"] > 0
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_forward_has_no_graph_breaks():
    """Under torch.compile the MoE blocks take their dense path, and dynamo traces the decoder and
    heads as one graph: no host syncs (.item(), bool(tensor), per-sample loops over data). The
    eager sparse path's one sync per block: tests/test_experts.py."""
    model = tiny(num_experts=4, moe_top_k=2, deep_supervision=True)
    feats = model.encoder(torch.randn(2, 3, 64, 64))

    def head_part(feats):
        dec, aux, usage = model.decoder(feats)
        return model.heads(dec), aux, usage

    explained = torch._dynamo.explain(head_part)(feats)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


def test_autocast_routes_in_float32():
    model = tiny(num_experts=3, deep_supervision=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert out["moe_aux"].dtype == torch.float32 and out["expert_usage"].dtype == torch.float32
    assert torch.isfinite(out["main"].float()).all()


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model = tiny(num_experts=3, deep_supervision=True).train()
        model.set_grad_checkpointing(enable)
        assert model.encoder.model.grad_checkpointing is enable
        model(x)["main"].square().mean().backward()
        grads.append([p.grad for p in model.encoder.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
