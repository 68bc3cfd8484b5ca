"""hrm.py: the paper's update order, where the gradient flows, detached carry, forward = cycles by hand, causality."""
import pytest
import torch

from conftest import GRADE_SEED
from hrm import HRM, HRMConfig, training_memory


def make(gradient="one_step", causal=True, **kw):
    torch.manual_seed(GRADE_SEED)
    cfg = dict(vocab_size=7, d_model=16, n_layers=4, n_heads=2, H_cycles=2, L_cycles=3, segments=2, causal=causal,
               gradient=gradient)
    return HRM(HRMConfig(**{**cfg, **kw})).double()


@pytest.mark.parametrize("gradient, on_graph", [("one_step", 2), ("last_cycle", 4)])
def test_segment_calls_low_and_high_in_order_and_only_the_last_updates_on_the_graph(gradient, on_graph):
    model = make(gradient)
    calls = []
    for name in ("low", "high"):
        getattr(model, name).register_forward_hook(
            lambda m, inp, out, name=name: calls.append((name, out.requires_grad)))
    model.segment_logits(torch.randint(0, 7, (2, 5)), segments=1)
    assert [c[0] for c in calls] == (["low"] * 3 + ["high"]) * 2    # H_cycles = 2 of 3 low updates, then high
    assert [c[1] for c in calls] == [False] * (8 - on_graph) + [True] * on_graph


def by_hand(model, tokens, segments, gradient):
    """The HRM segment loop written out: low-level updates see z_H + x, high-level ones z_L; early updates under
    no_grad."""
    B, T = tokens.shape
    x = model.embed(tokens)
    z_H, z_L = model.z_init[0].expand(B, T, -1), model.z_init[1].expand(B, T, -1)
    rope = model.start(tokens)[1]
    f_L = lambda zl, zh: model.low(zl, zh + x, rope)   # noqa: E731
    f_H = lambda zh, zl: model.high(zh, zl, rope)      # noqa: E731
    for _ in range(segments):
        z_H, z_L = z_H.detach(), z_L.detach()
        with torch.no_grad():                           # cycle 1: always off the graph
            z_L = f_L(z_L, z_H)
            z_L = f_L(z_L, z_H)
            z_L = f_L(z_L, z_H)
            z_H = f_H(z_H, z_L)
        with torch.set_grad_enabled(gradient == "last_cycle"):   # cycle 2: all of it, or only its last low and high
            z_L = f_L(z_L, z_H)
            z_L = f_L(z_L, z_H)
        z_L = f_L(z_L, z_H)
        z_H = f_H(z_H, z_L)
    return model.head(z_H)


@pytest.mark.parametrize("gradient", ["one_step", "last_cycle"])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_and_gradients_equal_the_cycles_by_hand(gradient, causal):
    model = make(gradient, causal)
    tokens = torch.randint(0, 7, (3, 11))
    out = model(tokens, segments=3)
    ref = by_hand(model, tokens, 3, gradient)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    grads_ref = torch.autograd.grad(ref.square().sum(), list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, grads_ref):
        assert g is not None and r is not None, name      # every parameter learns, both levels alike
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12, msg=name)


def test_carry_is_detached_between_segments():
    """The loss of segment 2 trains segment 2 only: its gradient equals that of segment 2 run from the
    (constant) states segment 1 left, and the states handed on carry no graph."""
    model = make()
    tokens = torch.randint(0, 7, (2, 9))
    x, rope, z_H, z_L = model.start(tokens)
    _, z_H, z_L = model.segment(x, z_H, z_L, rope)
    assert not z_H.requires_grad and not z_L.requires_grad
    second = model.segment(x, z_H.clone(), z_L.clone(), rope)[0]
    deep = model.segment_logits(tokens)
    assert len(deep) == 2
    torch.testing.assert_close(deep[1], second, rtol=0, atol=1e-12)
    params = list(model.parameters())
    g_deep = torch.autograd.grad(deep[1].sum(), params)
    g_ref = torch.autograd.grad(second.sum(), params)
    for g, r in zip(g_deep, g_ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_causal_mode_is_causal_and_grid_mode_is_not():
    tokens = torch.randint(0, 7, (2, 13))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 7
    causal = make(causal=True).eval()
    with torch.no_grad():
        a, b = causal(tokens, segments=3), causal(changed, segments=3)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-12)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-6
    grid = make(causal=False).eval()
    with torch.no_grad():
        assert (grid(tokens)[:, :8] - grid(changed)[:, :8]).abs().max() > 1e-6


def test_test_time_segments():
    model = make(eval_segments=5)
    tokens = torch.randint(0, 7, (2, 6))
    torch.testing.assert_close(model(tokens), model(tokens, segments=5), rtol=0, atol=0)
    assert len(model.segment_logits(tokens)) == 2                 # training uses `segments`


def test_one_step_gradient_memory_does_not_grow_with_cycles():
    """Bytes saved for backward (counted by autograd hooks, not timed): flat with the one-step gradient,
    growing with L_cycles when the whole last cycle is on the graph."""
    small = training_memory(2, 2, "one_step", batch=2, T=25, d_model=16)[0]
    large = training_memory(4, 4, "one_step", batch=2, T=25, d_model=16)[0]
    assert small == large
    assert training_memory(4, 4, "last_cycle", batch=2, T=25, d_model=16)[0] > 1.5 * small


def test_bad_config_raises():
    with pytest.raises(ValueError, match="n_layers"):
        HRMConfig(n_layers=1)
    with pytest.raises(ValueError, match="gradient"):
        HRMConfig(gradient="full")
