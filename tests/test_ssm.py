"""ssm.py: the chunked SSD scan against the loop, the state carry, stability at long T, causality, learning."""
import pytest
import torch
import torch.nn.functional as F

import compare
import tasks
from conftest import GRADE_SEED, causal_logits, close, lengths
from ssm import Mamba, MambaConfig, segsum, ssd_scan, ssd_scan_ref


def inputs(T, b=2, H=3, K=5, N=4, seed=GRADE_SEED, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (r(b, T, H, K), F.softplus(r(b, T, H) - 1), -(torch.rand(H, generator=g, dtype=dtype) + 0.1),
            r(b, T, N), r(b, T, N), r(b, H, K, N))


@pytest.mark.parametrize("T", lengths([1, 7, 64, 131]))
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_scan_equals_reference(T, chunk_size, with_initial_state):
    x, dt, A, B, C, h0 = inputs(T)
    h0 = h0 if with_initial_state else None
    y, h = ssd_scan(x, dt, A, B, C, chunk_size, h0)
    y_ref, h_ref = ssd_scan_ref(x, dt, A, B, C, chunk_size, h0)
    case = f"ssm.ssd_scan(T={T}, chunk_size={chunk_size}, initial_state={'given' if h0 is not None else 'None'})"
    close(y, y_ref, f"{case}: y", "BTHK")
    close(h, h_ref, f"{case}: final_state", "BHKN")


def test_scan_gradcheck():
    args = [t.requires_grad_() for t in inputs(6, b=1, H=2, K=2, N=3)]
    for i, name in enumerate(["x", "dt", "A", "B", "C", "initial_state"]):   # one input at a time: a failure names it
        def fn(a):
            x, dt, A, B, C, h0 = args[:i] + [a] + args[i + 1:]
            return ssd_scan(x, dt, A, B, C, chunk_size=4, initial_state=h0)
        assert torch.autograd.gradcheck(fn, (args[i],), raise_exception=False), \
            f"ssm.ssd_scan: the gradient w.r.t. {name} disagrees with finite differences (torch.autograd.gradcheck, " \
            f"float64, T=6, chunk_size=4)"


def test_state_carry():
    """Scanning [0, T) equals scanning [0, t), then [t, T) from the carried state."""
    x, dt, A, B, C, _ = inputs(50)
    y, h = ssd_scan(x, dt, A, B, C, chunk_size=8)
    t = 23
    y1, h1 = ssd_scan(x[:, :t], dt[:, :t], A, B[:, :t], C[:, :t], chunk_size=8)
    y2, h2 = ssd_scan(x[:, t:], dt[:, t:], A, B[:, t:], C[:, t:], chunk_size=8, initial_state=h1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y)
    torch.testing.assert_close(h2, h)


def test_segsum_is_the_sum_over_each_segment():
    a = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    s = segsum(a)
    assert s[3, 1] == -7.0 and s[2, 2] == 0.0 and s[1, 0] == -2.0 and s[0, 1] == float("-inf")


def test_float32_at_long_T_no_overflow_and_accurate():
    """Strong decays over 2,048 steps in float32. exp() of a cumulative sum over the whole sequence (or a product
    of decays divided by another) overflows here; exp() of sums over segments, as `segsum`, does not. The result
    must then be within 1e-4 of the output's scale of the float64 loop: float32 rounding, not a formula error (the
    float32 loop itself is off by about 1e-7; a cumsum difference inside chunks of 64, by about 1e-5)."""
    x, dt, A, B, C, _ = inputs(2048, b=1, H=2, K=4, N=4, dtype=torch.float32)
    args = (x, dt * 5, A * 10, B, C)
    y, h = ssd_scan(*args, chunk_size=64)
    y_ref, h_ref = ssd_scan_ref(*(t.double() for t in args))
    for name, out, dims in [("y", y, "BTHK"), ("final_state", h, "BHKN")]:
        bad = (~torch.isfinite(out)).nonzero()
        assert not len(bad), (
            f"ssm.ssd_scan in float32 (T=2048, chunk_size=64, strong decays): {name} has {len(bad)} inf or NaN "
            f"values, the first at [{', '.join(f'{d}={i}' for d, i in zip(dims.lower(), bad[0].tolist()))}]: an "
            f"exp() overflowed. Take exp() of sums over segments (segsum), never of a cumulative sum over many steps")
    scale = y_ref.abs().max().item()
    close(y, y_ref.float(), f"ssm.ssd_scan in float32 (T=2048, chunk_size=64, strong decays, max |y| {scale:.0f}): y "
          f"against the float64 loop", "BTHK", rtol=0, atol=1e-4 * scale)
    close(h, h_ref.float(), "ssm.ssd_scan in float32 (T=2048, chunk_size=64): final_state against the float64 loop",
          "BHKN", rtol=0, atol=1e-4 * max(h_ref.abs().max().item(), 1.0))


def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def mamba2_by_hand(model, tokens):
    """The Mamba-2 LM spelled out from the papers (Dao & Gu arXiv 2405.21060 §7.1 and Fig. 6; Gu & Dao arXiv
    2312.00752 §3.4), with the scan's loop `ssd_scan_ref` as the oracle of the recurrence. Per block: u = RMSNorm(x);
    in_proj(u) = [z, xBC, dt]; a causal depthwise conv of width d_conv over x, B and C together (their past only,
    zeros before the start), then SiLU; dt = softplus(dt + dt_bias); A = -exp(A_log); the scan; y + D x (the skip,
    per head); the gate before the norm, RMSNorm(y * SiLU(z)); out_proj; the residual; then the MLP on RMSNorm(x)
    with its residual. The logits: head(RMSNorm(x)). Returns the logits and, per layer, the last d_conv - 1
    inputs of the conv and the final scan state."""
    c = model.config
    E, N, H, K, W = c.d_inner, c.d_state, c.n_heads, c.head_dim, c.d_conv
    x = model.embed.weight[tokens]                                                 # (B, T, D)
    B_, T = tokens.shape
    states = []
    for block in model.blocks:
        m = block.mixer
        u = rms_norm(x, block.norm1.weight)
        z, xBC, dt = (u @ m.in_proj.weight.T).split([E, E + 2 * N, H], dim=-1)
        past = torch.cat([torch.zeros(B_, W - 1, E + 2 * N, dtype=x.dtype), xBC], dim=1)
        conv = m.conv.bias + sum(m.conv.weight[:, 0, j] * past[:, j:j + T] for j in range(W))   # tap W-1: now
        xs, Bs, Cs = F.silu(conv).split([E, N, N], dim=-1)
        xs = xs.reshape(B_, T, H, K)
        dt = F.softplus(dt + m.dt_bias)
        A = -torch.exp(m.A_log)
        y, h = ssd_scan_ref(xs, dt, A, Bs, Cs)
        y = (y + m.D[:, None] * xs).reshape(B_, T, E)
        x = x + rms_norm(y * F.silu(z), m.norm.weight) @ m.out_proj.weight.T
        v = rms_norm(x, block.norm2.weight)
        x = x + F.gelu(v @ block.mlp.fc.weight.T + block.mlp.fc.bias) @ block.mlp.proj.weight.T + block.mlp.proj.bias
        states.append((past[:, -(W - 1):], h))
    return rms_norm(x, model.norm.weight) @ model.head.weight.T, states


@pytest.mark.parametrize("T", [1, 2, 11])                   # shorter than the conv, and longer than a chunk
def test_model_is_mamba2_spelled_out(T):
    """Every parameter drawn at random (so that no default of 1 or 0 hides a missing term), float64, odd sizes."""
    torch.manual_seed(GRADE_SEED)
    cfg = MambaConfig(vocab_size=7, d_model=6, n_layers=2, expand=2, n_heads=3, d_state=5, d_conv=3, chunk_size=4)
    model = Mamba(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    tokens = torch.randint(0, 7, (2, T))
    logits, state = model.stream(tokens)
    ref, ref_state = mamba2_by_hand(model, tokens)
    name = f"ssm.Mamba (2 layers, D=6, E=12, H=3, K=4, N=5, d_conv=3) at T={T}"
    close(logits, ref, f"{name}: the logits against the Mamba-2 block spelled out", "BTV")
    for i, ((tail, h), (tail_ref, h_ref)) in enumerate(zip(state, ref_state)):
        close(tail, tail_ref, f"{name}: layer {i}'s carried conv inputs", "BTC")
        close(h, h_ref, f"{name}: layer {i}'s scan state", "BHKN")


def test_model_is_causal():
    torch.manual_seed(0)
    model = Mamba(MambaConfig(vocab_size=11, d_model=16, n_heads=4, chunk_size=4)).double().eval()
    x = torch.randint(0, 11, (2, 19))
    x2 = x.clone()
    x2[:, 10:] = torch.randint(0, 11, (2, 9))
    a, b = model(x), model(x2)
    causal_logits(a, b, 9, "ssm.Mamba (chunk_size 4)")


def test_dt_init_is_log_uniform_in_range():
    model = Mamba(MambaConfig(d_model=64, expand=8, n_heads=512))  # 512 heads, enough to see the spread
    dt = F.softplus(model.blocks[0].mixer.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert (dt < 1e-2).float().mean().item() == pytest.approx(0.5, abs=0.1)  # log-uniform: half below 1e-2


def test_inits_after_the_blanket_init():
    """The Transformer's N(0, 0.02) on every matrix but the convolution's (PyTorch's default, uniform within
    +-1 / sqrt(d_conv)), biases 0, norms 1; then Mamba's own, which the blanket init would overwrite: A = -exp(A_log)
    uniform in [-16, -1] (Mamba-2), D = 1, and the projections into the residual stream (out_proj, mlp.proj)
    N(0, 0.02 / sqrt(2 L)). (dt's init: test_dt_init_is_log_uniform_in_range.)"""
    torch.manual_seed(0)
    model = Mamba(MambaConfig(d_model=64, n_layers=8, n_heads=64))
    for name, p in model.named_parameters():
        if name.endswith("conv.weight"):
            assert p.abs().max() <= 0.5 and p.std() > 0.2, name              # uniform within +-0.5: std 0.29
        elif p.dim() >= 2:
            want = 0.02 / 4 if name.endswith(("out_proj.weight", "mlp.proj.weight")) else 0.02
            assert abs(p.std().item() / want - 1) < 0.1 and abs(p.mean().item()) < want / 10, (name, p.std().item())
        elif name.endswith("A_log"):
            A = -torch.exp(p)
            assert A.min() >= -16 and A.max() <= -1 and A.min() < -12 and A.max() > -5, A
        elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".D")):
            assert (p == 1).all(), name
        elif name.endswith(("proj.bias", "fc.bias")):
            assert (p == 0).all(), name


def test_stream_in_pieces_equals_one_call():
    """Pieces of 64, 128 and 64 tokens, the state passed along, equal one call on the whole; the state is the
    scan state and the convolution's last inputs of each layer, state_size floats per sequence."""
    torch.manual_seed(0)
    model = Mamba(MambaConfig(vocab_size=11, d_model=16, n_heads=4, chunk_size=16)).double().eval()
    x = torch.randint(0, 11, (2, 256))
    logits, state = [], None
    for piece in x.split([64, 128, 64], dim=1):
        out, state = model.stream(piece, state)
        logits.append(out)
    whole, final = model.stream(x)
    torch.testing.assert_close(torch.cat(logits, dim=1), whole, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-12)
    assert sum(t.numel() for layer in state for t in layer) == 2 * model.state_size(256)


def test_state_size_is_what_stream_carries_at_any_length():
    """state_size(T) counts the floats that `stream` hands on after T tokens, the same at 1 token and at 300."""
    torch.manual_seed(0)
    model = Mamba(MambaConfig(vocab_size=11, d_model=12, n_heads=3, d_state=5, d_conv=3, chunk_size=16)).eval()
    for T in (1, 300):
        with torch.no_grad():
            _, state = model.stream(torch.randint(0, 11, (1, T)))
        assert sum(t.numel() for layer in state for t in layer) == model.state_size(T), T


def test_trains_on_a_bench_task():
    """Flip-flop at 32 tokens, 100 steps: the SSM reads the last written bit (0.99 when this test was written).
    Chance is 0.5, and the 4-token convolution alone, with the scan's output zeroed, reaches only 0.74."""
    torch.manual_seed(0)
    task = tasks.FlipFlop()
    model = compare.build_model("ssm", task.vocab_size, d_model=32, n_layers=1)
    compare.train(model, task, steps=100, batch_size=32, lr=1e-2, train_lengths=[32, 32])
    accuracy = compare.evaluate(model, task, 32, n_examples=256)["token_acc"]
    assert accuracy > 0.9, f"ssm on flip-flop after 100 steps: token accuracy {accuracy:.3f} (chance 0.5)"


def test_the_scan_runs_in_float32_under_bf16_autocast(monkeypatch):
    """The bench trains under bf16 autocast on a GPU. The scan multiplies decays over hundreds of steps, so the layer
    hands it float32 inputs with autocast off: its inputs and its own matmuls' outputs are all float32."""
    import ssm
    seen = []

    def spy(x, dt, A, B, C, *args, **kwargs):
        y, h = ssd_scan(x, dt, A, B, C, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):   # the same call with autocast surely off: the same numbers
            y_off, _ = ssd_scan(x, dt, A, B, C, *args, **kwargs)
        seen.append({**{name: t.dtype for name, t in dict(x=x, dt=dt, A=A, B=B, C=C, y=y, state=h).items()},
                     "y as with autocast off": torch.equal(y, y_off)})
        return y, h
    monkeypatch.setattr(ssm, "ssd_scan", spy)
    torch.manual_seed(0)
    model = Mamba(MambaConfig(vocab_size=7, d_model=16, n_layers=1, chunk_size=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 7, (2, 9)))
    assert len(seen) == 1 and all(d in (torch.float32, True) for d in seen[0].values()), \
        f"ssm under bf16 autocast: the scan saw {seen}, not float32 throughout"
