"""titans.py: the chunked dual form against the token loop (outputs, state, gradients), the delta rule,
the state carry, recall beyond the window, causality."""
import pytest
import torch
import torch.nn.functional as F

import compare
import tasks
from conftest import GRADE_SEED, causal_logits, close, lengths
from harness.graphs import tensors
from attention import apply_rotary, attention_ref, rotary
from titans import NeuralMemory, Titans, TitansConfig, neural_memory, neural_memory_ref


def inputs(T, memory, b=2, H=2, K=4, seed=GRADE_SEED):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)   # noqa: E731
    q, k = F.normalize(r(b, H, T, K), dim=-1), F.normalize(r(b, H, T, K), dim=-1)
    # theta <= 1/32: the (up to) 16 gradient steps of a chunk, all taken at its start, cannot overshoot, so the
    # memory stays bounded at every seed and length (with theta up to 0.2 it diverged to NaN at some seeds)
    gates = (0.03 * u(b, H, T), 0.05 + 0.9 * u(b, H, T), 0.1 * u(b, H, T))
    weights = (0.3 * r(b, H, K, K),) if memory == "linear" else (0.5 * r(b, H, K, 6), 0.3 * r(b, H, 6, K))
    momentum = tuple(0.1 * torch.randn_like(W) for W in weights)
    return q, k, r(b, H, T, K), *gates, weights, momentum


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("T", lengths([1, 13, 64]))
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("max_grad_norm", [None, 3.0])   # 3: about half of the tokens' gradients here are clipped
def test_dual_form_equals_token_loop(memory, T, chunk_size, max_grad_norm):
    args = inputs(T, memory)
    y, (W, S) = neural_memory(*args, chunk_size=chunk_size, max_grad_norm=max_grad_norm)
    y_ref, (W_ref, S_ref) = neural_memory_ref(*args, chunk_size=chunk_size, max_grad_norm=max_grad_norm)
    case = f"titans.neural_memory({memory} memory, T={T}, chunk_size={chunk_size}, max_grad_norm={max_grad_norm})"
    close(y, y_ref, f"{case}: y", "BHTK", rtol=1e-10, atol=1e-12)
    assert len(W) == len(W_ref) and len(S) == len(S_ref), f"{case}: returned {len(W)} weights and {len(S)} momenta"
    for i, (a, b) in enumerate(zip(W, W_ref)):
        close(a, b, f"{case}: the final weights[{i}]", "BHIO", rtol=1e-10, atol=1e-12)
    for i, (a, b) in enumerate(zip(S, S_ref)):
        close(a, b, f"{case}: the final momentum[{i}]", "BHIO", rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5, 3.0])   # none clipped, all, about half
def test_gradients_equal_token_loop(memory, max_grad_norm):
    """Gradients w.r.t. q, k, v, the three gates and the initial weights and momentum agree."""
    q, k, v, theta, eta, alpha, weights, momentum = inputs(13, memory)
    leaves = [q, k, v, theta, eta, alpha, *weights, *momentum]
    for t in leaves:
        t.requires_grad_()
    probe = torch.randn(2, 2, 13, 4, dtype=torch.float64)
    grads = []
    for fn in (neural_memory, neural_memory_ref):
        y, (W, S) = fn(q, k, v, theta, eta, alpha, weights, momentum, chunk_size=4, max_grad_norm=max_grad_norm)
        out = (y * probe).sum() + sum(w.sum() for w in W) + sum(s.square().sum() for s in S)
        grads.append(torch.autograd.grad(out, leaves))
    names = ["q", "k", "v", "theta", "eta", "alpha"] + [f"weights[{i}]" for i in range(len(weights))] \
        + [f"momentum[{i}]" for i in range(len(momentum))]
    for name, a, b in zip(names, *grads):
        close(a, b, f"titans.neural_memory({memory} memory, T=13, chunk_size=4, max_grad_norm={max_grad_norm}): "
              f"the gradient w.r.t. {name}",
              rtol=1e-9, atol=1e-11)


def test_clipped_inner_gradients_keep_the_memory_bounded():
    """Gates at their worst (theta = 0.5, eta = 0.99, no forgetting) and large values: without the clip the MLP
    memory's inner loop blows up (each step on W2 is theta ||z||^2, and z grows with W1). With every token's
    gradient clipped to norm c, the momentum obeys ||S_t|| <= eta ||S_{t-1}|| + theta c, so
    ||W_T - W_0|| <= T theta c / (1 - eta): finite whatever the data. One token by hand too: the step is the
    gradient scaled to norm c."""
    g = torch.Generator().manual_seed(GRADE_SEED)
    B, H, T, K = 2, 2, 64, 4
    q, k = (F.normalize(torch.randn(B, H, T, K, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    v = 10 * torch.randn(B, H, T, K, generator=g, dtype=torch.float64)
    theta, eta, alpha = (torch.full((B, H, T), x, dtype=torch.float64) for x in (0.5, 0.99, 0.0))
    weights = (torch.randn(B, H, K, 8, generator=g, dtype=torch.float64), torch.randn(B, H, 8, K, generator=g,
                                                                                       dtype=torch.float64))
    free = neural_memory(q, k, v, theta, eta, alpha, weights, chunk_size=4)[1][0]
    assert not all(torch.isfinite(W).all() and W.abs().max() < 1e6 for W in free), "the case is not adversarial"
    W_T = neural_memory(q, k, v, theta, eta, alpha, weights, chunk_size=4, max_grad_norm=1.0)[1][0]
    moved = sum((a - b).pow(2).sum((-2, -1)) for a, b in zip(W_T, weights)).sqrt()
    assert (moved <= T * 0.5 * 1.0 / (1 - 0.99) + 1e-9).all(), f"the clipped memory moved by {moved.max():.3g}"
    # one token, linear memory: W1 = W0 - theta * grad * min(1, c / ||grad||), grad = 2 k^T (k W0 - v)
    W0 = torch.randn(1, 1, K, K, generator=g, dtype=torch.float64)
    one = lambda x: x[:1, :1, :1]  # noqa: E731
    _, ((W1,), _) = neural_memory(one(q), one(k), one(v), one(theta), one(eta), one(alpha), (W0,), chunk_size=1,
                                  max_grad_norm=0.25)
    grad = 2 * one(k)[0, 0].T @ (one(k)[0, 0] @ W0[0, 0] - one(v)[0, 0])
    close(W1[0, 0], W0[0, 0] - 0.5 * grad * min(1.0, 0.25 / grad.norm().item()),
          "titans.neural_memory: one clipped step of a linear memory", rtol=1e-12, atol=1e-12)


def test_clipped_gradients_are_finite_in_float32_when_a_gradient_is_tiny():
    """A token the memory already knows has a tiny gradient (here norm ~1e-13). The clip's backward must not divide
    by that norm: in float32 the derivative of 1/sqrt(x) at x ~ 1e-27 overflows, and 0 * inf is NaN (it was, and
    Titans' training runs diverged, at 1e-2 on flip-flop within 300 steps)."""
    q, k, _, theta, eta, alpha, _, _ = (t.float() if torch.is_tensor(t) else t for t in inputs(13, "linear"))
    v = torch.full_like(q, 1e-14)                                   # the zero memory is almost right everywhere
    W0 = torch.zeros(2, 2, 4, 4)
    leaves = [q, k, v, theta, W0]
    for t in leaves:
        t.requires_grad_()
    y, (W, S) = neural_memory(q, k, v, theta, eta, alpha, (W0,), chunk_size=4, max_grad_norm=0.5)
    grads = torch.autograd.grad(y.sum() + W[0].sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads), "titans.neural_memory: a non-finite gradient in float32"


@pytest.mark.parametrize("gate, logit, bf16", [("alpha", 30.0, False), ("eta", -120.0, False), ("alpha", 8.0, True)])
def test_saturated_gates_keep_the_gradients_finite(gate, logit, bf16):
    """A gate's sigmoid rounds to exactly 1 (alpha) or 0 (eta) at a large enough logit: from about 17 in float32, from
    about 6 in bf16 under autocast. The core takes log(1 - alpha) and log(eta), so an unbounded gate makes them -inf
    and every gradient of the model NaN (how Titans diverged at the higher learning rates on a GPU)."""
    torch.manual_seed(0)
    model = Titans(TitansConfig(vocab_size=7, d_model=16, n_layers=1, n_heads=2, chunk_size=4, window=4))
    H = model.config.n_heads
    with torch.no_grad():
        for mem in (m for m in model.modules() if isinstance(m, NeuralMemory)):
            mem.gates.bias[(H if gate == "eta" else 2 * H):][:H] = logit
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(torch.randint(0, 7, (2, 10)))
    logits.float().sum().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"titans: {gate} at logit {logit}{' (bf16)' if bf16 else ''} gives non-finite gradients in {bad}"


def test_bad_config_raises():
    """Each bad field is refused with a message that names it and the value given; the smallest good values pass."""
    for bad, says in ((dict(memory="deep"), "memory.*'deep'"), (dict(chunk_size=0), "chunk_size.*0"),
                      (dict(max_grad_norm=0.0), "max_grad_norm.*0.0"),
                      (dict(max_grad_norm=-1.0), "max_grad_norm.*-1.0")):
        with pytest.raises(ValueError, match=says):
            TitansConfig(**bad)
    TitansConfig(max_grad_norm=None)                                 # no clip at all is allowed
    TitansConfig(chunk_size=1)                                       # exact online gradient descent


@pytest.mark.parametrize("memory, expand, shapes", [("linear", 3, [(2, 8, 8)]), ("mlp", 3, [(2, 8, 24), (2, 24, 8)])])
def test_the_memory_is_the_network_the_config_names(memory, expand, shapes):
    """memory="linear" is one K x K matrix per head (the paper's linear memory); "mlp" is K -> expand*K -> K. Each
    layer's starting weights are a parameter of that shape (H=2 heads, K=8 here)."""
    model = Titans(TitansConfig(vocab_size=7, d_model=16, n_layers=1, n_heads=2, memory=memory, memory_expand=expand))
    mem = next(m for m in model.modules() if isinstance(m, NeuralMemory))
    assert [tuple(W.shape) for W in mem.memory_init] == shapes, f"titans memory={memory!r}: {mem.memory_init}"


def test_gradcheck():
    q, k, v, theta, eta, alpha, weights, momentum = inputs(5, "mlp", b=1, H=1, K=2)
    args = [t.requires_grad_() for t in (q, k, v, theta, eta, alpha)]
    for i, name in enumerate(["q", "k", "v", "theta", "eta", "alpha"]):   # one input at a time: a failure names it
        fn = lambda a: neural_memory(*args[:i], a, *args[i + 1:], weights, momentum, chunk_size=2)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (args[i],), raise_exception=False), \
            f"titans.neural_memory: the gradient of y w.r.t. {name} disagrees with finite differences " \
            f"(torch.autograd.gradcheck, float64, MLP memory, T=5, chunk_size=2)"


def test_linear_memory_without_momentum_is_the_gated_delta_rule():
    q, k, v, theta, _, alpha, (W0,), _ = inputs(20, "linear")
    eta = torch.zeros_like(theta)
    y, ((W,), _) = neural_memory(q, k, v, theta, eta, alpha, (W0,), chunk_size=1)
    W_loop, ys = W0, []
    for t in range(20):                                    # W <- (1 - alpha) W - 2 theta k^T (k W - v)
        kt, vt, qt = k[:, :, t, None], v[:, :, t, None], q[:, :, t, None]
        err = kt @ W_loop - vt
        W_loop = (1 - alpha[:, :, t, None, None]) * W_loop - 2 * theta[:, :, t, None, None] * kt.mT @ err
        ys.append(qt @ W_loop)
    torch.testing.assert_close(y, torch.cat(ys, dim=2))
    torch.testing.assert_close(W, W_loop)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_state_carry(memory):
    """The whole sequence equals the two halves with (weights, momentum) carried, split at a chunk border."""
    q, k, v, theta, eta, alpha, weights, momentum = inputs(40, memory)
    y, (W, S) = neural_memory(q, k, v, theta, eta, alpha, weights, momentum, chunk_size=8)
    half = lambda t, s: t[:, :, s]  # noqa: E731
    a, b = slice(0, 24), slice(24, 40)
    y1, (W1, S1) = neural_memory(*(half(t, a) for t in (q, k, v, theta, eta, alpha)), weights, momentum, 8)
    y2, (W2, S2) = neural_memory(*(half(t, b) for t in (q, k, v, theta, eta, alpha)), W1, S1, 8)
    torch.testing.assert_close(torch.cat([y1, y2], dim=2), y)
    for x, z in zip(W + S, W2 + S2):
        torch.testing.assert_close(x, z)


def test_a_key_written_early_is_recalled_far_beyond_any_window():
    """By construction: 3 orthonormal keys written at t = 0, 1, 2 with theta = 0.5 (one exact delta-rule step
    each), no momentum, no forgetting; then 300 tokens with theta = 0; the queries at the end read the values."""
    K, T = 4, 306
    keys = torch.eye(K, dtype=torch.float64)[:3]
    values = torch.randn(3, K, dtype=torch.float64)
    k = torch.cat([keys, F.normalize(torch.randn(T - 6, K, dtype=torch.float64), dim=-1), keys])[None, None]
    v = torch.cat([values, torch.randn(T - 3, K, dtype=torch.float64)])[None, None]
    theta = torch.zeros(1, 1, T, dtype=torch.float64)
    theta[..., :3] = 0.5
    zeros = torch.zeros_like(theta)
    y, _ = neural_memory(k, k, v, theta, zeros, zeros, (torch.zeros(1, 1, K, K, dtype=torch.float64),),
                         chunk_size=1)
    torch.testing.assert_close(y[0, 0, -3:], values)


def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_conv(x, conv):
    """A depthwise conv over time that sees the current input and the d_conv - 1 before it (zeros before t = 0)."""
    W, T = conv.weight.shape[-1], x.shape[1]
    past = F.pad(x, (0, 0, W - 1, 0))
    return conv.bias + sum(conv.weight[:, 0, j] * past[:, j:j + T] for j in range(W)), past[:, T:]


def titans_by_hand(model, tokens):
    """Titans (MAG) spelled out from the paper (Behrouz et al. arXiv 2501.00663 §4.4 and Eq. 28, with the sum of
    branches this repository uses), the memory's update and read by the token loop `neural_memory_ref`. Per block,
    on h = RMSNorm(x): the memory branch projects q, k, v, runs each through a causal depthwise conv and SiLU,
    l2-normalises q and k (not v); its three gates are sigmoids of one linear map of h, theta scaled by
    theta_max, then eta (momentum) and alpha (forgetting); the memory starts at memory_init and is read at q;
    the read, RMSNorm'd, is gated by SiLU(out_gate(h)) and projected. The attention branch is causal attention
    over a window, RoPE on q and k. x + both branches, then the MLP with its residual; logits head(RMSNorm(x)).
    Returns the logits and per layer the conv's last inputs and the memory's final weights and momentum."""
    c = model.config
    B, T = tokens.shape
    H, K, D = c.n_heads, c.head_dim, c.d_model
    heads = lambda a: a.view(B, T, H, K).transpose(1, 2)                      # noqa: E731  (B, T, D) -> (B, H, T, K)
    x, states = model.embed.weight[tokens], []
    for block in model.blocks:
        h, mem = rms_norm(x, block.norm1.weight), block.memory
        qkv, tail = causal_conv(h @ mem.qkv.weight.T, mem.conv)
        q, k, v = (heads(a) for a in F.silu(qkv).split(D, dim=-1))
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        gates = torch.sigmoid(h @ mem.gates.weight.T + mem.gates.bias).clamp(1e-6, 1 - 1e-6)   # (B, T, 3H)
        theta, eta, alpha = (g.transpose(1, 2) for g in gates.split(H, dim=-1))
        weights = tuple(W.expand(B, *W.shape) for W in mem.memory_init)
        read, (Ws, Ss) = neural_memory_ref(q, k, v, c.theta_max * theta, eta, alpha, weights, chunk_size=c.chunk_size,
                                           max_grad_norm=c.max_grad_norm)     # each token's gradient clipped
        read = rms_norm(read.transpose(1, 2).reshape(B, T, D), mem.norm.weight)
        y = (read * F.silu(h @ mem.out_gate.weight.T)) @ mem.proj.weight.T
        if c.use_attention:
            a = block.attn
            q, k, v = (heads(z) for z in (h @ a.qkv.weight.T + a.qkv.bias).split(D, dim=-1))
            cos, sin = rotary(torch.arange(T), K)                                # tested in tests/test_attention.py
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            o = attention_ref(q, k, v, causal=True, window=c.window).transpose(1, 2).reshape(B, T, D)
            y = y + o @ a.proj.weight.T + a.proj.bias
        x = x + y
        v = rms_norm(x, block.norm2.weight)
        x = x + F.gelu(v @ block.mlp.fc.weight.T + block.mlp.fc.bias) @ block.mlp.proj.weight.T + block.mlp.proj.bias
        states.append((tail, Ws, Ss))
    return rms_norm(x, model.norm.weight) @ model.head.weight.T, states


def recalled_untrained(memory, expand, P, B=64):
    """The share of P random unit pairs that a fresh memory (Titans' init: an MLP's last layer zero) recalls when
    written by its own rule, no momentum, no forgetting, the default chunks and clipping; then each key read again
    with theta 0, right when its nearest stored value is the pair's. The best of five inner rates theta."""
    torch.manual_seed(0)
    c = TitansConfig(memory=memory, memory_expand=expand)
    mem = NeuralMemory(c)
    mem.reset_memory_parameters()
    weights = tuple(W[:1].detach().expand(B, 1, *W.shape[1:]) for W in mem.memory_init)   # head 0's init
    write = torch.cat([torch.ones(B, 1, P), torch.zeros(B, 1, P)], 2)
    best = 0.0
    for theta in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        k, v = (F.normalize(torch.randn(B, 1, P, c.head_dim), dim=-1) for _ in range(2))
        kk, vv = torch.cat([k, k], 2), torch.cat([v, v], 2)
        tiny = torch.full_like(write, 1e-6)
        y, _ = neural_memory(kk, kk, vv, theta * write, tiny, tiny, weights, chunk_size=c.chunk_size,
                             max_grad_norm=c.max_grad_norm)
        best = max(best, ((y[:, :, P:] @ v.transpose(-1, -2)).argmax(-1) == torch.arange(P)).float().mean().item())
    return best


def test_every_memory_holds_the_pairs_its_own_rule_writes():
    """Untrained, each memory recalls 4 random pairs whole and most of 32: the write rule stores through an MLP
    whose last layer starts at zero. It also measures what the README says of Titans' dial (`pytest -s -k
    own_rule tests/test_titans.py` prints it): at 32 pairs the 1x MLP holds fewer than the smaller linear memory."""
    shares = {(m, e): [recalled_untrained(m, e, P) for P in (4, 32, 64)]
              for m, e in (("linear", 1), ("mlp", 1), ("mlp", 4))}
    print("\nshare of P random pairs recalled untrained, P = 4 / 32 / 64: " + "; ".join(
        f"{m}{f' x{e}' if m == 'mlp' else ''} {' / '.join(f'{s:.3f}' for s in v)}" for (m, e), v in shares.items()))
    assert all(v[0] == 1.0 for v in shares.values())
    assert min(v[1] for v in shares.values()) > 0.7


@pytest.mark.parametrize("options", [dict(memory="mlp", memory_expand=2), dict(use_attention=False, memory="linear")])
@pytest.mark.parametrize("T", [1, 11])
def test_model_is_titans_spelled_out(options, T):
    """Every parameter drawn at random (so that no default of 1 or 0 hides a missing term), float64, odd sizes:
    D=12, H=2, K=6, a window of 4, chunks of 4, a conv of 3. (RoPE tables are fp32, hence the tolerance.)"""
    torch.manual_seed(GRADE_SEED)
    model = Titans(TitansConfig(vocab_size=7, d_model=12, n_layers=2, n_heads=2, chunk_size=4, window=4, d_conv=3,
                                **options)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    tokens = torch.randint(0, 7, (2, T))
    logits, state = model(tokens, return_state=True)
    ref, ref_state = titans_by_hand(model, tokens)
    name = f"titans.Titans({', '.join(f'{k}={v!r}' for k, v in options.items())}) at T={T}"
    close(logits, ref, f"{name}: the logits against Titans spelled out", "BTV", rtol=1e-6, atol=1e-6)
    for i, ((memory_state, _), (tail, Ws, Ss)) in enumerate(zip(state, ref_state)):
        close(memory_state[0], tail, f"{name}: layer {i}'s carried conv inputs", "BTC")
        for j, (a, b) in enumerate(zip(memory_state[1] + memory_state[2], Ws + Ss)):
            close(a, b, f"{name}: layer {i}'s final memory {'weights' if j < len(Ws) else 'momentum'}", "BHIO")


@pytest.mark.parametrize("options", [dict(), dict(use_attention=False, memory="linear")])
def test_model_is_causal(options):
    torch.manual_seed(0)
    model = Titans(TitansConfig(vocab_size=11, d_model=16, chunk_size=4, window=5, **options)).double().eval()
    x = torch.randint(0, 11, (2, 23))
    x2 = x.clone()
    x2[:, 10:] = (x[:, 10:] + 1) % 11
    a, b = model(x), model(x2)
    causal_logits(a, b, 9, f"titans.Titans{options or ''} (chunk_size 4, window 5)")


def test_lmm_has_no_attention_and_a_constant_state():
    m = Titans(TitansConfig(use_attention=False))
    assert not any("attn" in name for name, _ in m.named_parameters())
    assert m.state_size(100) == m.state_size(10_000)
    hybrid = Titans(TitansConfig(window=32))
    assert hybrid.state_size(10_000) == hybrid.state_size(32) > hybrid.state_size(8)


def test_memory_inits_after_the_blanket_init():
    """attention.py's init (tested there), then the memory's own, which it would overwrite: the gate biases give
    theta = theta_max / 2, eta = 0.9 and alpha = sigmoid(-5) at first; the memory's last layer is 0 (it reads 0
    before it has learnt anything), the others N(0, 1 / fan-in); its output projection is scaled as a residual
    one, N(0, 0.02 / sqrt(2 L))."""
    torch.manual_seed(0)
    model = Titans(TitansConfig(d_model=64, n_heads=2, n_layers=8, memory_expand=2))
    for block in model.blocks:
        m = block.memory
        theta, eta, alpha = torch.sigmoid(m.gates.bias).view(3, 2)
        assert (theta == 0.5).all() and torch.allclose(eta, torch.tensor(0.9)) and (alpha < 0.01).all()
        first, last = m.memory_init
        assert (last == 0).all() and abs(first.std().item() * 32 ** 0.5 - 1) < 0.1
        assert abs(m.proj.weight.std().item() / (0.02 / 4) - 1) < 0.1
        assert abs(m.qkv.weight.std().item() / 0.02 - 1) < 0.1
        bound = 1 / m.conv.weight[0].numel() ** 0.5           # PyTorch's conv init: U(-1/sqrt(fan-in), 1/sqrt(fan-in))
        assert m.conv.weight.abs().max() <= bound and abs(m.conv.weight.std().item() / (bound / 3 ** 0.5) - 1) < 0.1


def test_memory_branch_speaks_at_init():
    """What the memory's RMSNorm receives at init is far above its eps (1e-6): below it, the norm would pass on a
    near-zero signal and the branch would start mute (it did with the conv at N(0, 0.02): mean square ~1e-6)."""
    torch.manual_seed(0)
    model = Titans(TitansConfig(vocab_size=64))
    seen = []
    for block in model.blocks:
        block.memory.norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].pow(2).mean().item()))
    model(torch.randint(0, 64, (8, 48)))
    assert min(seen) > 1e-4, f"titans: the memory's read at init has mean square {min(seen):.2g} (eps 1e-6)"


def test_trains_on_a_bench_task():
    """Flip-flop at 32 tokens, 100 steps, the memory alone (LMM: no window to read the last write from): it reads
    the last written bit (0.99 when this test was written); chance is 0.5, and 0.50 with the memory's read zeroed."""
    torch.manual_seed(0)
    task = tasks.FlipFlop()
    model = compare.build_model("titans_lmm", task.vocab_size, d_model=32, n_layers=1)
    compare.train(model, task, steps=100, batch_size=32, lr=1e-2, train_lengths=[32, 32])
    accuracy = compare.evaluate(model, task, 32, n_examples=256)["token_acc"]
    assert accuracy > 0.9, f"titans_lmm on flip-flop after 100 steps: token accuracy {accuracy:.3f} (chance 0.5)"


@pytest.mark.parametrize("options", [dict(), dict(use_attention=False, memory="linear")])
def test_stream_in_pieces_equals_one_call(options):
    """Pieces of 64, 128 and 64 tokens (multiples of the chunk), the state passed along, equal one call on the
    whole: the memory's weights and momentum, the conv's last inputs and the window's keys and values carry
    everything. The state holds state_size floats per sequence. (RoPE tables are fp32, hence the tolerance.)"""
    torch.manual_seed(0)
    model = Titans(TitansConfig(vocab_size=11, d_model=16, chunk_size=4, window=5, **options)).double().eval()
    x = torch.randint(0, 11, (2, 256))
    logits, state = [], None
    for piece in x.split([64, 128, 64], dim=1):
        out, state = model.stream(piece, state)
        logits.append(out)
    whole, final = model(x, return_state=True)
    torch.testing.assert_close(torch.cat(logits, dim=1), whole)
    for a, b in zip(tensors(state), tensors(final)):
        torch.testing.assert_close(a, b)
    assert sum(t.numel() for t in tensors(state)) == 2 * model.state_size(256)
    _, state = model.stream(x[:, :3])                              # fewer tokens than the window holds
    assert sum(t.numel() for t in tensors(state)) == 2 * model.state_size(3)


def test_the_memory_runs_in_float32_under_bf16_autocast(monkeypatch):
    """The bench trains under bf16 autocast on a GPU. The memory's inner gradient steps and gates compound over the
    stream, so the layer hands the core float32 inputs with autocast off: inputs, weights and read all float32."""
    import titans
    seen = []

    def spy(q, k, v, theta, eta, alpha, weights, *args, **kwargs):
        y, state = neural_memory(q, k, v, theta, eta, alpha, weights, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):   # the same call with autocast surely off: the same numbers
            y_off, _ = neural_memory(q, k, v, theta, eta, alpha, weights, *args, **kwargs)
        tensors = dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, y=y)
        seen.append({**{name: t.dtype for name, t in tensors.items()}, "y as with autocast off": torch.equal(y, y_off),
                     **{f"weights[{i}]": W.dtype for i, W in enumerate(weights + state[0] + state[1])}})
        return y, state
    monkeypatch.setattr(titans, "neural_memory", spy)
    torch.manual_seed(0)
    model = Titans(TitansConfig(vocab_size=7, d_model=16, n_layers=1, n_heads=2, chunk_size=4, window=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 7, (2, 9)))
    assert len(seen) == 1 and all(d in (torch.float32, True) for d in seen[0].values()), \
        f"titans under bf16 autocast: the memory saw {seen}, not float32 throughout"
