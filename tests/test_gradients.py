"""Every parameter's gradient, in each of the five models, held to two oracles in float64 on odd shapes.

1. The reference loops. The model is run again with each vectorised core swapped for its slow twin of the same
   signature (`attention_ref`, `ssd_scan_ref`, `neural_memory_ref`): every parameter's gradient must be the same.
   This holds each core's backward to its spec inside the whole model, on what the model feeds it.
2. Finite differences. For every parameter p and a random direction u, the derivative of L(p + s u) at s = 0,
   taken from values of L alone, must equal <dL/dp, u>. This needs no second implementation, so it also catches a
   gradient cut in code both paths share (a `.detach()` in attention.Block or in a model's recurrence), which the
   first oracle cannot see: a detach changes no value, only the gradient.
Each config uses every parameter, so every gradient must also be there and not all zeros.
The second oracle is then turned on itself: a gradient cut by half on any one parameter, in any model, must fail
it (148 parameters in all).

Last, what a backward pass costs where a core loops: Titans' backward must do work linear in the number of chunks.

HRM's gradient is the one-step approximation by design (hrm.py's docstring): in each segment only the last low
and high update are on the graph, and the carry between segments is detached. So it is not the derivative of the
forward, and its finite differences are taken of the function it is the exact gradient of: per segment, the states
entering those two updates held at the values they have at the unperturbed parameters (`hrm_one_step_loss`). A
cut anywhere else, or one more update on the graph, fails it.
"""
import pytest
import torch

import attention
import ssm
import titans
from attention import Transformer, TransformerConfig
from conftest import GRADE_SEED, close
from hrm import HRM, HRMConfig
from rmt import RMT, RMTConfig
from ssm import Mamba, MambaConfig
from titans import Titans, TitansConfig

# name: (the model, T, the cores it runs as (module, name, reference loop)). The shapes are odd: T prime, not a
# multiple of the SSD chunk (4), Titans' chunk (4) and window (4), or RMT's segment (4: segments of 4, 4, 3).
MODELS = {
    "attention": (lambda: Transformer(TransformerConfig(vocab_size=7, d_model=12, n_layers=2, n_heads=2)), 11,
                  [(attention, "attention", attention.attention_ref)]),
    "ssm": (lambda: Mamba(MambaConfig(vocab_size=7, d_model=6, n_layers=2, expand=2, n_heads=3, d_state=5, d_conv=3,
                                      chunk_size=4)), 11,
            [(ssm, "ssd_scan", ssm.ssd_scan_ref)]),
    "rmt": (lambda: RMT(RMTConfig(vocab_size=7, d_model=8, n_layers=2, n_heads=2, n_mem=2, segment_len=4)), 11,
            [(attention, "attention", attention.attention_ref)]),
    "titans": (lambda: Titans(TitansConfig(vocab_size=7, d_model=12, n_layers=2, n_heads=2, memory_expand=2,
                                           chunk_size=4, window=4, d_conv=3)), 11,
               [(titans, "neural_memory", titans.neural_memory_ref), (titans, "attention", attention.attention_ref)]),
    "hrm": (lambda: HRM(HRMConfig(vocab_size=7, d_model=8, n_layers=2, n_heads=2, causal=False, H_cycles=2,
                                  L_cycles=3, segments=2)), 7,
            [(attention, "attention", attention.attention_ref)]),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits, and on a CPU that other work keeps busy made this file 4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(name):
    """The model in float64 with every parameter drawn at random (no default 1 or 0 hides a term), the tokens, and
    a random projection per segment (HRM's deep supervision has two; the others one)."""
    make, T, _ = MODELS[name]
    torch.manual_seed(GRADE_SEED)
    model = make().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    tokens = torch.randint(0, 7, (2, T))
    segments = model.config.segments if name == "hrm" else 1
    return model, tokens, torch.randn(segments, 2, T, 7, dtype=torch.float64)


def loss(model, tokens, projection):
    """A random projection of the logits, so that every logit weighs in; for HRM, of every segment's logits."""
    logits = model.segment_logits(tokens) if isinstance(model, HRM) else [model(tokens)]
    return sum((z * p).sum() for z, p in zip(logits, projection))


def gradients(model, tokens, projection):
    """{name: dL/dp, or None where no gradient reaches p}"""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss(model, tokens, projection), list(params.values()), allow_unused=True)
    return dict(zip(params, grads))


def hrm_one_step_loss(model, tokens, projection):
    """The function whose exact gradient HRM's one-step gradient is: every update of every segment run with
    gradients off, by hand (L_cycles low updates, then a high one, H_cycles times), keeping the states that enter
    each segment's last low and high update; the returned function runs only those two updates from the kept
    states, at the parameters of the moment, and the loss of their logits."""
    c = model.config
    x, rope, z_H, z_L = model.start(tokens)
    entering = []
    with torch.no_grad():
        for _ in range(c.segments):
            for h in range(c.H_cycles):
                for i in range(c.L_cycles):
                    if (h, i) == (c.H_cycles - 1, c.L_cycles - 1):
                        entering.append((z_H, z_L))
                    z_L = model.low(z_L, z_H + x, rope)
                z_H = model.high(z_H, z_L, rope)

    def one_step():
        x = model.embed(tokens)
        return sum((model.head(model.high(z_H, model.low(z_L, z_H + x, rope), rope)) * p).sum()
                   for (z_H, z_L), p in zip(entering, projection))
    return one_step


def directional_derivative(f, p, u, h=1e-5):
    """d/ds f(p + s u) at s = 0, by the fourth-order central difference (8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h
    (the plain one, (f(h) - f(-h)) / 2h, was off by 2e-6 of the gradient on a sharp SSM); p is put back after."""
    p0 = p.clone()
    at = {}
    for s in (-2, -1, 1, 2):
        p.copy_(p0 + s * h * u)
        at[s] = f()
    p.copy_(p0)
    return (8 * (at[1] - at[-1]) - (at[2] - at[-2])) / (12 * h)


def assert_every_parameter_learns(grads, what):
    cut = [n for n, g in grads.items() if g is None or not g.abs().max() > 0]
    assert not cut, f"{what}: no gradient reaches {', '.join(cut)}, which the config uses: a gradient is cut"


@pytest.mark.parametrize("name", list(MODELS))
def test_every_gradient_equals_the_reference_loops(name, monkeypatch):
    model, tokens, projection = setup(name)
    fast = gradients(model, tokens, projection)
    cores = MODELS[name][2]
    for module, core, ref in cores:
        monkeypatch.setattr(module, core, ref)
    slow = gradients(model, tokens, projection)
    what = f"{name} (T={tokens.shape[1]}, float64)"
    refs = " and ".join(f"{ref.__module__}.{ref.__name__}" for _, _, ref in cores)
    assert_every_parameter_learns(fast, what)
    for n in fast:
        assert slow[n] is not None, f"{what} on {refs}: no gradient reaches {n}"
        close(fast[n], slow[n], f"{what}: the gradient of {n} against the model run on {refs}")


@pytest.mark.parametrize("name", list(MODELS))
def test_every_gradient_equals_finite_differences(name):
    """Along a random direction u per parameter, the error allowed is 1e-6 of sum |dL/dp * u|: the finite difference
    was off by at most 1e-8 of it at GRADE_SEED 0 to 39, and a gradient cut, all of it or a part, is far off."""
    model, tokens, projection = setup(name)
    grads = gradients(model, tokens, projection)
    what = f"{name} (T={tokens.shape[1]}, float64)"
    assert_every_parameter_learns(grads, what)
    f = hrm_one_step_loss(model, tokens, projection) if name == "hrm" else lambda: loss(model, tokens, projection)
    g = torch.Generator().manual_seed(GRADE_SEED)
    wrong = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            u = torch.randn(p.shape, generator=g, dtype=p.dtype)
            along, fd = (grads[n] * u).sum().item(), directional_derivative(f, p, u).item()
            allowed = 1e-6 * (grads[n] * u).abs().sum().item()
            if not abs(along - fd) <= allowed:
                wrong.append(f"{n} ({along:.6g}, finite differences {fd:.6g}, allowed |diff| {allowed:.1e})")
    assert not wrong, (f"{what}: along a random direction, the gradients of {len(wrong)} parameters disagree with "
                       f"finite differences of the {'one-step ' if name == 'hrm' else ''}loss, so a gradient is cut or "
                       f"wrong on the way to them: {'; '.join(wrong)}")


class HalfCut(torch.nn.Module):
    """A parameter seen as 0.5 p + 0.5 p.detach(): the same value, half its true gradient (a detach on one of two
    paths, the commonest way a gradient is cut in part)."""
    def forward(self, p):
        return 0.5 * p + 0.5 * p.detach()


@pytest.mark.parametrize("name", list(MODELS))
def test_finite_differences_catch_a_cut_on_any_one_parameter(name):
    """The oracle above, turned on itself: for each parameter in turn, half of its gradient is cut, and the finite
    difference along a random direction must disagree with the (now wrong) gradient by more than it allows."""
    import torch.nn.utils.parametrize as parametrize
    missed = []
    for i, n in enumerate(n for n, _ in setup(name)[0].named_parameters()):
        model, tokens, projection = setup(name)
        *path, leaf = n.split(".")
        module = model.get_submodule(".".join(path))
        parametrize.register_parametrization(module, leaf, HalfCut(), unsafe=True)
        p = module.parametrizations[leaf].original
        grad = gradients(model, tokens, projection)[".".join([*path, "parametrizations", leaf, "original"])]
        f = hrm_one_step_loss(model, tokens, projection) if name == "hrm" else lambda: loss(model, tokens, projection)
        u = torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype)
        with torch.no_grad():
            along, fd = (grad * u).sum().item(), directional_derivative(f, p, u).item()
        if abs(along - fd) <= 1e-6 * (grad * u).abs().sum().item():
            missed.append(n)
    assert not missed, f"{name}: a gradient cut by half on {', '.join(missed)} passes the finite-difference check"


def test_titans_backward_work_is_linear_in_the_chunks():
    """neural_memory loops over chunks. Indexing the whole inputs inside that loop (`k[:, :, c]`) gives the same
    values and gradients, but each index's backward builds a zero tensor of the whole input to put one chunk's
    gradient in: work quadratic in the chunks (on a CPU, 1,024 tokens, batch 32: 1.25 s a step against 1.08 s).
    The tensor elements the backward writes (tests/test_cores.py's count) may grow at most 20x from 4 to 64
    chunks: unbinding once grows 16.6x, indexing k and v alone in the loop 25.9x, indexing everything 65.9x.
    (Not a grading rule: grade.py leaves this file out, and an indexed loop is right, only slower.)"""
    from test_cores import Trace, titans_inputs
    written = []
    for T in (64, 1024):
        args, options = titans_inputs(T, chunk_size=16)
        args = [tuple(w.requires_grad_() for w in a) if isinstance(a, tuple) else a.requires_grad_() for a in args]
        y, _ = titans.neural_memory(*args, **options)
        trace = Trace()
        with trace:
            y.sum().backward()
        written.append(trace.elements)
    assert written[1] <= 20 * written[0], (
        f"the backward of neural_memory wrote {written[0]:,} elements at 4 chunks and {written[1]:,} at 64: "
        f"{written[1] / written[0]:.1f}x for 16x the chunks; take each chunk's pieces once, before the loop")
