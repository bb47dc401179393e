"""models/experts.py: the sparse top-k dispatch computes what every-expert-on-every-sample did."""

import copy
import types

import pytest
import torch

from models import build_model
from models.experts import MoEBlock, load_balance_loss, top_k_weights

E = 5


def dense_reference(block: MoEBlock, x: torch.Tensor):
    """The MoE forward before sparse dispatch: every expert on the whole batch, masked by weights
    that are zero outside each sample's top-k (kept as the reference; the one change since is
    that top-1 combines with the raw probability, as in Switch Transformer)."""
    probs, weights, keep = block.route(x)
    out = x
    w = (probs * keep if block.top_k == 1 else weights).to(x.dtype)
    for e, expert in enumerate(block.experts):
        out = out + w[:, e, None, None, None] * expert(x)
    aux = load_balance_loss(probs, keep)
    return out, aux, weights.detach().mean(0)


def make_block(k):
    torch.manual_seed(0)
    block = MoEBlock(8, num_experts=E, top_k=k)
    with torch.no_grad():
        block.router.fc.weight.normal_(std=2.0)  # samples route differently; some experts get none
    return block


def run(block, forward, x, g):
    """Outputs, and the gradients of a loss using all three outputs, for the block and the input."""
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, aux, usage = forward(x)
    ((out * g).sum() + 3.0 * aux).backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    return out.detach(), aux.detach(), usage, x.grad, grads


@pytest.mark.parametrize("k", [1, 2, E])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("train", [True, False])
def test_sparse_dispatch_equals_dense_reference(k, batch, train):
    block = make_block(k).train(train)
    torch.manual_seed(1)
    x = torch.randn(batch, 8, 9, 7)
    g = torch.randn(batch, 8, 9, 7)
    sparse = run(block, block, x, g)
    dense = run(block, lambda t: dense_reference(block, t), x, g)
    for a, b in zip(sparse[:4], dense[:4]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert sparse[4].keys() == dense[4].keys()
    for name in dense[4]:
        if name.endswith("kernels"):
            continue
        a, b = sparse[4][name], dense[4][name]
        assert a is not None and b is not None, name  # unpicked experts: zero gradients, not none
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
    assert sparse[4]["router.fc.weight"].abs().sum() > 0


def test_unpicked_expert_gets_zero_gradient_not_none():
    block = make_block(1)
    x = torch.randn(1, 8, 9, 7)
    out, aux, usage = block(x)
    out.sum().backward()
    picked = int(usage.argmax())
    for e, expert in enumerate(block.experts):
        for p in expert.parameters():
            assert p.grad is not None
            assert (p.grad.abs().sum() > 0) == (e == picked)


def test_whole_model_sparse_equals_dense_reference():
    torch.manual_seed(0)
    sparse = build_model("edgenext_xx_small", num_experts=E, moe_top_k=2, deep_supervision=True,
                         pretrained=False, decoder_channels=16).train()
    for block in sparse.decoder.blocks:
        with torch.no_grad():
            block.router.fc.weight.normal_(std=2.0)
    dense = copy.deepcopy(sparse)
    for block in dense.decoder.blocks:
        block.forward = types.MethodType(dense_reference, block)
    x = torch.randn(3, 3, 64, 64)
    outs = []
    for model in (sparse, dense):
        out = model(x)
        (out["main"].square().mean() + sum(a.mean() for a in out["aux"]) + out["moe_aux"]).backward()
        outs.append(out)
    assert torch.allclose(outs[0]["main"], outs[1]["main"], atol=1e-5)
    assert torch.allclose(outs[0]["moe_aux"], outs[1]["moe_aux"], atol=1e-6)
    assert torch.allclose(outs[0]["expert_usage"], outs[1]["expert_usage"])
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_the_only_host_sync_in_forward_is_one_count_per_block(monkeypatch):
    """dynamo breaks the graph at every host sync (.item(), .tolist(), bool(tensor)); with the
    sparse path traced (as in eager), every break is at the one ``.tolist()`` of expert counts."""
    monkeypatch.setattr(MoEBlock, "_use_dense", lambda self: self.top_k >= self.num_experts)
    model = build_model("edgenext_xx_small", num_experts=4, moe_top_k=2, pretrained=False,
                        decoder_channels=16)
    feats = model.encoder(torch.randn(2, 3, 64, 64))
    explained = torch._dynamo.explain(model.decoder)(feats)
    torch._dynamo.reset()
    assert explained.graph_break_count > 0
    lines = {r.user_stack[-1].line.split("#")[0].strip() for r in explained.break_reasons}
    assert lines == {"counts = keep.sum(0).long().tolist()"}


def test_top1_router_learns_from_the_task_loss_alone():
    """Renormalised over one expert the weight is the constant 1 (no router gradient); the raw
    Switch probability gives the router a gradient from the prediction, balance weight 0."""
    from losses import build_loss

    probs = torch.softmax(torch.randn(4, E), 1)
    weights, keep = top_k_weights(probs, 1)
    assert torch.equal(weights, keep)  # the renormalised weight is exactly 1: why k=1 needs more

    torch.manual_seed(0)
    model = build_model("edgenext_xx_small", num_experts=4, moe_top_k=1, deep_supervision=True,
                        pretrained=False, decoder_channels=16).train()
    x, mask = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    out = model(x)
    total, terms = build_loss(moe_aux_weight=0.0)(out, mask)
    assert terms["moe_aux"] == 0
    total.backward()
    for block in model.decoder.blocks:
        assert block.router.fc.weight.grad.abs().sum() > 0
    # usage is still the fraction of samples sent to each expert
    block = make_block(1)
    x = torch.randn(5, 8, 9, 7)
    _, _, keep = block.route(x)
    assert torch.allclose(block(x)[2], keep.mean(0))
