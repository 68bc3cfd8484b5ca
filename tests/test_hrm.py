"""hrm.py: the paper's update order, where the gradient flows, detached carry, forward = cycles by hand, causality."""
import pytest
import torch

from conftest import GRADE_SEED, causal_logits, close
from attention import rotary
from hrm import HRM, HRMConfig


MODULE = {"L": "low", "H": "high"}   # the letters of the paper, the attribute names of hrm.HRM


def make(gradient="one_step", causal=True, **kw):
    torch.manual_seed(GRADE_SEED)
    cfg = dict(vocab_size=7, d_model=16, n_layers=4, n_heads=2, H_cycles=2, L_cycles=3, segments=2, causal=causal,
               gradient=gradient)
    return HRM(HRMConfig(**{**cfg, **kw})).double()


@pytest.mark.parametrize("gradient, on_graph", [("one_step", 2), ("last_cycle", 4)])
def test_segment_calls_L_and_H_in_order_and_only_the_last_updates_on_the_graph(gradient, on_graph):
    model = make(gradient)
    calls = []
    for name in ("L", "H"):
        getattr(model, MODULE[name]).register_forward_hook(
            lambda m, inp, out, name=name: calls.append((name, out.requires_grad)))
    model.segment_logits(torch.randint(0, 7, (2, 5)), segments=1)
    order = "".join(c[0] for c in calls)
    assert order == "LLLHLLLH", (f"hrm.HRM.segment ({gradient}) updated in the order {order}; the schedule is "
                                 "LLLHLLLH (N = 2 cycles of 3 L updates, then one H update)")
    graph = "".join("g" if c[1] else "-" for c in calls)
    want = "-" * (8 - on_graph) + "g" * on_graph
    assert graph == want, (f"hrm.HRM.segment ({gradient}): the updates on the autograd graph are {graph} (g: on it, "
                           f"-: off), expected {want}, only the last {on_graph}")


@pytest.mark.parametrize("gradient", ["one_step", "last_cycle"])
def test_each_update_reads_the_latest_states(gradient):
    """Checked by the values each update computes, recorded at every call of L and H: an L update gives
    f_L(latest z_L, latest z_H + x), an H update f_H(latest z_H, latest z_L) (any way of passing them that gives
    these values is right: the module adds its two arguments); the logits are head(z_H) and the carry is the last
    z_H, z_L."""
    model = make(gradient)
    tokens = torch.randint(0, 7, (2, 5))
    x, rope, z_H, z_L = model.start(tokens)
    calls = []
    hooks = [getattr(model, MODULE[name]).register_forward_hook(lambda m, args, out, name=name: calls.append((name, out)))
             for name in ("L", "H")]
    logits, carry_H, carry_L = model.segment(x, z_H, z_L, rope)
    for hook in hooks:
        hook.remove()
    state = {"H": z_H, "L": z_L}
    with torch.no_grad():
        for i, (name, out) in enumerate(calls):
            want = model.low(state["L"], state["H"] + x, rope) if name == "L" else model.high(state["H"], state["L"], rope)
            close(out, want, f"hrm.HRM.segment, update {i + 1} of {len(calls)} ({name}): its new z_{name} (should be "
                  f"{'f_L(z_L + z_H + x)' if name == 'L' else 'f_H(z_H + z_L)'} of the latest states)", "BTD",
                  rtol=0, atol=1e-12)
            state[name] = out
    close(logits, model.head(state["H"]), "hrm.HRM.segment: the logits (should be head(z_H))", "BTV", rtol=0,
          atol=1e-12)
    close(carry_H, state["H"], "hrm.HRM.segment: the z_H it returns", "BTD", rtol=0, atol=0)
    close(carry_L, state["L"], "hrm.HRM.segment: the z_L it returns", "BTD", rtol=0, atol=0)


@pytest.mark.parametrize("pos", ["rope", "none"])
def test_start_and_each_update_spelled_out(pos):
    """HRM's input and modules (Wang et al. arXiv 2506.21734 §2): x is the token embedding; z_H and z_L start from
    z_init[0] and z_init[1] at every position; RoPE over positions 0..T-1 (or none); an update of a level adds its
    injection to its state, runs its Blocks (attention.Block, tested on its own) and ends with RMSNorm."""
    model = make(pos=pos)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    tokens = torch.randint(0, 7, (2, 5))
    x, rope, z_H, z_L = model.start(tokens)
    close(x, model.embed.weight[tokens], "hrm.HRM.start: x (should be the token embedding)", "BTD", rtol=0, atol=0)
    close(z_H, model.z_init[0].expand(2, 5, 16), "hrm.HRM.start: z_H (should be z_init[0])", "BTD", rtol=0, atol=0)
    close(z_L, model.z_init[1].expand(2, 5, 16), "hrm.HRM.start: z_L (should be z_init[1])", "BTD", rtol=0, atol=0)
    if pos == "none":
        assert rope is None
    else:
        for got, want in zip(rope, rotary(torch.arange(5), model.config.block.head_dim)):
            close(got, want, "hrm.HRM.start: the RoPE tables of positions 0..T-1", "TK", rtol=0, atol=0)
    z, injection = torch.randn(2, 2, 5, 16, dtype=torch.float64)
    for name in ("low", "high"):
        module = getattr(model, name)
        h = z + injection
        for block in module.blocks:
            h = block(h, rope)
        want = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * module.norm.weight
        close(module(z, injection, rope), want, f"hrm.HRM.{name}: norm(Blocks(z + injection))", "BTD", rtol=0,
              atol=1e-12)


def test_input_and_states_start_at_unit_scale():
    """The embedding is N(0, 1) (after the blanket N(0, 0.02), which would make the input vanish next to the
    unit-scale states it is added to); the states start from fixed N(0, 1) vectors clamped to [-2, 2]."""
    torch.manual_seed(0)
    model = HRM(HRMConfig(vocab_size=64, d_model=256))
    assert abs(model.embed.weight.std().item() - 1) < 0.05
    assert 1.9 < model.z_init.abs().max() <= 2 and abs(model.z_init.std().item() - 1) < 0.15
    assert abs(model.head.weight.std().item() / 0.02 - 1) < 0.1


def test_no_gradient_inside_no_grad():
    """Inference under torch.no_grad() keeps no graph: no update may turn gradients back on."""
    model = make()
    grad_on = []
    for name in ("L", "H"):
        getattr(model, MODULE[name]).register_forward_hook(
            lambda m, args, out, name=name: grad_on.append((name, torch.is_grad_enabled())))
    with torch.no_grad():
        x, rope, z_H, z_L = model.start(torch.randint(0, 7, (2, 5)))
        logits, z_H, z_L = model.segment(x, z_H, z_L, rope)
    on = [f"{i + 1} ({name})" for i, (name, g) in enumerate(grad_on) if g]
    assert not on and not logits.requires_grad, (
        f"hrm.HRM.segment turned gradients back on inside torch.no_grad() for updates {', '.join(on)} of "
        f"{len(grad_on)}: inference would keep their activations. The updates on the graph inherit the caller's "
        f"setting; only the others switch gradients off")


def test_carry_is_detached_between_segments():
    """The loss of segment 2 trains segment 2 only: its gradient equals that of segment 2 run from the
    (constant) states segment 1 left, and the states handed on carry no graph."""
    model = make()
    tokens = torch.randint(0, 7, (2, 9))
    x, rope, z_H, z_L = model.start(tokens)
    _, z_H, z_L = model.segment(x, z_H, z_L, rope)
    attached = [name for name, z in (("z_H", z_H), ("z_L", z_L)) if z.requires_grad]
    assert not attached, (f"hrm.HRM.segment returns {' and '.join(attached)} still on the autograd graph: the carry "
                          "handed to the next segment must be detached (no gradient crosses segments)")
    second = model.segment(x, z_H.clone(), z_L.clone(), rope)[0]
    deep = model.segment_logits(tokens)
    assert len(deep) == 2
    close(deep[1], second, "hrm.HRM: segment 2's logits against segment 2 run alone from segment 1's states", "BTV",
          rtol=0, atol=1e-12)
    params = dict(model.named_parameters())
    for what, logits in (("run after segment 1", deep[1]), ("run alone", second)):
        assert logits.requires_grad, (f"hrm.HRM.segment: segment 2's logits ({what}) carry no gradient: the last "
                                      "updates must run on the autograd graph")
    g_deep = torch.autograd.grad(deep[1].sum(), list(params.values()), allow_unused=True)
    g_ref = torch.autograd.grad(second.sum(), list(params.values()), allow_unused=True)
    for name, g, r in zip(params, g_deep, g_ref):
        assert (g is None) == (r is None), (f"hrm.HRM: the gradient of segment 2's loss w.r.t. {name} is "
                                            f"{'missing' if g is None else 'there'} after segment 1 and "
                                            f"{'missing' if r is None else 'there'} when segment 2 runs alone")
        if g is not None:
            close(g, r, f"hrm.HRM: the gradient of segment 2's loss w.r.t. {name}, after segment 1 against alone",
                  rtol=0, atol=1e-12)


def test_causal_mode_is_causal_and_grid_mode_is_not():
    tokens = torch.randint(0, 7, (2, 13))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 7
    model = make(causal=True).eval()
    with torch.no_grad():
        a, b = model(tokens, segments=3), model(changed, segments=3)
    causal_logits(a, b, 7, "hrm.HRM(causal=True), 3 segments", atol=1e-12)
    grid = make(causal=False).eval()
    with torch.no_grad():
        moved = (grid(tokens)[:, :8] - grid(changed)[:, :8]).abs().max().item()
    assert moved > 1e-6, (f"hrm.HRM(causal=False): the logits at positions 0..7 moved by at most {moved:.3g} when "
                          "the tokens after 7 changed: the grid mode must see the whole grid")


def test_test_time_segments():
    model = make(eval_segments=5)
    tokens = torch.randint(0, 7, (2, 6))
    torch.testing.assert_close(model(tokens), model(tokens, segments=5), rtol=0, atol=0)
    assert len(model.segment_logits(tokens)) == 2                 # training uses `segments`


def training_memory(H_cycles, L_cycles, gradient):
    """Bytes of activations that one training step of deep supervision (2 segments) saves for backward, counted by
    autograd's saved-tensor hooks (each tensor once)."""
    torch.manual_seed(0)
    model = HRM(HRMConfig(vocab_size=5, d_model=16, n_layers=4, n_heads=4, causal=False, H_cycles=H_cycles,
                          L_cycles=L_cycles, gradient=gradient))
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(logits.logsumexp(-1).mean() for logits in model.segment_logits(torch.randint(0, 5, (2, 25)))).backward()
    return sum(saved.values())


def test_one_step_gradient_memory_does_not_grow_with_cycles():
    """Bytes saved for backward (counted by autograd hooks, not timed): flat with the one-step gradient, HRM's
    O(1) memory in the cycles, growing with L_cycles when the whole last cycle is on the graph."""
    small = training_memory(2, 2, "one_step")
    assert small == training_memory(4, 4, "one_step")
    assert training_memory(4, 4, "last_cycle") > 1.5 * small


@pytest.mark.parametrize("n_layers,n_low", [(3, 2), (4, 2)])
def test_state_size_counts_a_key_value_cache_per_block_call(n_layers, n_low):
    """state_size(T), HRM's inference memory on a causal task: the keys and values (2 * D per token) of every Block
    call of a pass at eval_segments (each call attends over its own input), counted here by hooks. Odd sizes: 3
    Blocks (2 low, 1 high) or 4 (2 and 2), 2 x 3 cycles, 3 segments."""
    model = make(n_layers=n_layers, eval_segments=3).eval()
    calls = []
    for block in [*model.low.blocks, *model.high.blocks]:
        block.register_forward_hook(lambda m, args, out: calls.append(out.shape[1]))
    with torch.no_grad():
        model(torch.randint(0, 7, (2, 5)))
    n_high = n_layers - n_low
    assert len(calls) == (n_low * 3 + n_high) * 2 * 3 and model.state_size(5) == 2 * 16 * sum(calls)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="n_layers"):
        HRMConfig(n_layers=1)
    with pytest.raises(ValueError, match="gradient"):
        HRMConfig(gradient="full")
    for bad in (dict(H_cycles=0), dict(L_cycles=0), dict(segments=0)):     # each count checked, and 1 allowed
        with pytest.raises(ValueError, match=r"^H_cycles, L_cycles and segments must be >= 1$"):
            HRMConfig(**bad)
    assert make(H_cycles=1, L_cycles=1, segments=1)(torch.randint(0, 7, (1, 4))).shape == (1, 4, 7)
    HRMConfig(d_model=6, n_heads=2, pos="none")       # head dim 3: odd is fine without RoPE (refused with it)
    with pytest.raises(ValueError):
        HRMConfig(d_model=6, n_heads=2, pos="rope")


def fixed_weights(m):
    """Every parameter and z_init set to a fixed pattern (no random generator: the same on any machine)."""
    with torch.no_grad():
        for i, p in enumerate([*m.parameters(), m.z_init]):
            p.copy_(0.5 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).view_as(p))
    return m


# The reference model's logits on the fixed weights and tokens below (D=8, H=2, 2 + 2 Blocks, 2 x 3 cycles,
# 2 segments, V=5, 6 tokens), each time step's projected on cos(0..V-1).
STORED = {True: [0.4248649882, 0.448100931, 0.4599951193, 0.4240458146, 0.4281444077, 0.4363978147],
          False: [0.4360543749, 0.4452511274, 0.4585870236, 0.4239803129, 0.4262767055, 0.4360925918]}


@pytest.mark.parametrize("causal", [True, False])
def test_logits_equal_the_reference_models_on_fixed_inputs(causal):
    """The whole model against stored outputs of the reference solution: an update on the wrong state, a cycle too
    many or too few, RoPE dropped in some updates, or the logits read from z_L all change them."""
    model = fixed_weights(make(causal=causal, d_model=8, vocab_size=5)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 4, 0, 2, 3, 1]])) @ torch.cos(torch.arange(5.0)).double()
    close(logits, torch.tensor([STORED[causal]], dtype=torch.float64), f"hrm.HRM(causal={causal}) on fixed weights "
          "and 6 tokens: the logits (projected on cos(0..V-1)) against the reference model's", "BT", rtol=1e-6,
          atol=1e-8)
