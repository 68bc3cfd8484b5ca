"""attention.py: the fused core against the hand-written reference, window semantics, RoPE, causality."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import GRADE_SEED, causal_logits, close, lengths
from attention import Transformer, TransformerConfig, apply_rotary, attention, attention_ref, rotary


def qkv(T, B=2, H=3, K=8, seed=GRADE_SEED):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, B, H, T, K, generator=g, dtype=torch.float64).unbind(0)


def attention_loop(q, k, v, causal, window):
    """A third, independent spelling of the window rule: one query at a time over an explicit key list."""
    T, K = q.shape[-2], q.shape[-1]
    out = torch.zeros_like(q)
    for i in range(T):
        keys = [j for j in range(T) if (j <= i or not causal) and (window is None or abs(i - j) < window)]
        s = q[..., i:i + 1, :] @ k[..., keys, :].transpose(-2, -1) / math.sqrt(K)
        out[..., i, :] = (torch.softmax(s, -1) @ v[..., keys, :])[..., 0, :]
    return out


@pytest.mark.parametrize("T", lengths([1, 2, 13, 37]))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 4, 12, 40])     # 12: longer than the head dim K = 8, shorter than T
def test_core_equals_reference_and_loop(T, causal, window):
    q, k, v = qkv(T)
    fast, ref = attention(q, k, v, causal, window), attention_ref(q, k, v, causal, window)
    close(fast, ref, f"attention.attention(causal={causal}, window={window}) at T={T}, K=8: the output", "BHTK")
    if T <= 37:                                          # the reference itself, checked on the written lengths
        close(ref, attention_loop(q, k, v, causal, window), f"attention_ref(causal={causal}, window={window})", "BHTK")


@pytest.mark.parametrize("causal", [True, False])
def test_reference_equals_pytorch_builtin(causal):
    q, k, v = qkv(29)
    torch.testing.assert_close(attention_ref(q, k, v, causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("T", lengths([1, 37, 100]))
@pytest.mark.parametrize("causal", [True, False])
def test_blocked_window_equals_reference(T, causal):
    """With a window the core works in blocks of `window` queries: T shorter than one block, T not a multiple of
    the block, and several blocks, against the dense mask of the reference."""
    q, k, v = qkv(T)
    torch.testing.assert_close(attention(q, k, v, causal, 16), attention_ref(q, k, v, causal, 16),
                               rtol=1e-10, atol=1e-10)


def test_reference_runs_on_its_inputs_device():
    """On 'meta', PyTorch's device without data, the reference's mask is built beside its inputs (a mask made on
    the CPU would fail there), with and without a window."""
    q, k, v = (t.to("meta") for t in qkv(7))
    for causal, window in [(True, None), (False, 3)]:
        assert attention_ref(q, k, v, causal, window).device.type == "meta"


def test_window_one_sees_only_itself():
    q, k, v = qkv(9)
    torch.testing.assert_close(attention(q, k, v, causal=True, window=1), v)


@pytest.mark.parametrize("causal, window", [(True, 3), (False, None)])
def test_gradcheck(causal, window):
    q, k, v = (t.requires_grad_() for t in qkv(5, B=1, H=2, K=4))
    for name in "qkv":                                   # one input at a time, so a failure names it
        fn = lambda x: attention(*(x if n == name else t for n, t in zip("qkv", (q, k, v))), causal, window)  # noqa
        assert torch.autograd.gradcheck(fn, (dict(q=q, k=k, v=v)[name],), raise_exception=False), \
            f"attention.attention(causal={causal}, window={window}): the gradient w.r.t. {name} disagrees with " \
            f"finite differences (torch.autograd.gradcheck, float64)"


def test_rotary_tables_are_roformers():
    """rotary(positions, K): cos and sin of t * 10000^(-2i/K) for i < K/2 at any positions, RoFormer's base being
    the default that RMT, Titans and HRM rely on."""
    positions = torch.tensor([0, 1, 5, 2, 40])
    i = torch.arange(3, dtype=torch.float64)
    angle = positions.double()[:, None] * 10000.0 ** (-2 * i / 6)
    for got, want, what in zip(rotary(positions, 6), (angle.cos(), angle.sin()), ("cos", "sin")):
        close(got, want, f"attention.rotary(positions, 6): the {what} table", "TK", rtol=0, atol=1e-5)


def test_rope_scores_depend_only_on_offset():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g, dtype=torch.float64).unbind(0)
    def score(i, j):
        cos, sin = rotary(torch.tensor([i, j]), 16)
        qi = apply_rotary(q, cos[:1].double(), sin[:1].double())
        kj = apply_rotary(k, cos[1:].double(), sin[1:].double())
        return (qi * kj).sum().item()
    assert score(3, 1) == pytest.approx(score(103, 101), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_by_hand(x, base=10000.0):
    """RoFormer Eq. 34 on x (B, H, T, K), in the half-split pairing: channels i and i + K/2 turn together by the
    angle t * base^(-2i/K) at position t, x_i' = x_i cos - x_(i+K/2) sin, x_(i+K/2)' = x_i sin + x_(i+K/2) cos."""
    T, K = x.shape[-2:]
    i = torch.arange(K // 2, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-2 * i / K)                 # (T, K/2)
    first, second = x[..., :K // 2], x[..., K // 2:]
    return torch.cat([first * angle.cos() - second * angle.sin(), first * angle.sin() + second * angle.cos()], dim=-1)


def transformer_by_hand(model, tokens):
    """The pre-norm Transformer spelled out, `attention_ref` as the oracle of the attention itself: per block,
    h = RMSNorm(x); q, k, v = h W + b split into heads; RoPE on q and k (not v) when pos="rope"; attention (causal or
    not, windowed or not); the output projection and the residual; then x + MLP(RMSNorm(x)), MLP = GELU between
    two linear maps. The logits: head(RMSNorm(x)). With loops > 1 the blocks run `loops` times over, the embedding
    e added to x before each pass after the first."""
    c = model.config
    B, T = tokens.shape
    x = e = model.embed.weight[tokens]
    for block in [b for _ in range(c.loops) for b in model.blocks]:
        if block is model.blocks[0] and x is not e:
            x = x + e
        h, a = rms_norm(x, block.norm1.weight), block.attn
        q, k, v = (h @ a.qkv.weight.T + a.qkv.bias).split(c.d_model, dim=-1)
        q, k, v = (z.view(B, T, c.n_heads, c.head_dim).transpose(1, 2) for z in (q, k, v))
        if c.pos == "rope":
            q, k = rope_by_hand(q, c.rope_base), rope_by_hand(k, c.rope_base)
        o = attention_ref(q, k, v, causal=c.causal, window=c.window).transpose(1, 2).reshape(B, T, c.d_model)
        x = x + o @ a.proj.weight.T + a.proj.bias
        h = rms_norm(x, block.norm2.weight)
        x = x + F.gelu(h @ block.mlp.fc.weight.T + block.mlp.fc.bias) @ block.mlp.proj.weight.T + block.mlp.proj.bias
    return rms_norm(x, model.norm.weight) @ model.head.weight.T


@pytest.mark.parametrize("options", [dict(), dict(pos="none"), dict(window=3, causal=False, rope_base=100.0),
                                     dict(loops=3, causal=False)])
def test_model_is_the_transformer_spelled_out(options):
    """Every parameter drawn at random (so that no default of 1 or 0 hides a missing term), float64, D=12, H=2,
    K=6, T=9. (RoPE tables are fp32, hence the tolerance.)"""
    torch.manual_seed(GRADE_SEED)
    model = Transformer(TransformerConfig(vocab_size=7, d_model=12, n_layers=2, n_heads=2, **options)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    tokens = torch.randint(0, 7, (2, 9))
    close(model(tokens), transformer_by_hand(model, tokens), f"attention.Transformer({options}): the logits against "
          "the Transformer spelled out", "BTV", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", [dict(), dict(pos="none"), dict(window=3), dict(loops=3)])
def test_model_is_causal(options):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=11, d_model=16, n_heads=2, **options)).double().eval()
    x = torch.randint(0, 11, (2, 17))
    t = 8
    x2 = x.clone()
    x2[:, t + 1:] = torch.randint(0, 11, (2, 17 - t - 1))
    a, b = model(x), model(x2)
    causal_logits(a, b, t, f"attention.Transformer{options or ''}")


def test_looped_model_has_the_same_parameters_and_its_depth_is_set_at_test_time():
    """A looped Transformer is the plain one's parameters applied again: loops=1 is the plain model, and
    model(x, loops=k) is the model with loops=k in its config (the same weights), for k below and above it."""
    torch.manual_seed(0)
    looped = Transformer(TransformerConfig(vocab_size=11, d_model=16, loops=3, causal=False)).double()
    x = torch.randint(0, 11, (2, 10))
    for k in (1, 2, 5):
        other = Transformer(TransformerConfig(vocab_size=11, d_model=16, loops=k, causal=False)).double()
        other.load_state_dict(looped.state_dict())
        close(looped(x, loops=k), other(x), f"Transformer(loops=3)(x, loops={k}) against a model built with loops={k}",
              "BTV")
    assert not torch.allclose(looped(x), looped(x, loops=1))
    with pytest.raises(ValueError, match="loops must be >= 1, not 0"):
        looped(x, loops=0)


def test_bidirectional_model_sees_the_future():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=11, d_model=16, causal=False)).double().eval()
    x = torch.randint(0, 11, (1, 10))
    x2 = x.clone()
    x2[0, -1] = (x[0, -1] + 1) % 11
    assert not torch.allclose(model(x)[:, 0], model(x2)[:, 0])


def test_state_size_is_the_kv_cache():
    """Without a window, state_size(T) is the keys and values that the layers compute for T tokens (counted from
    the outputs of their qkv projections, two thirds of which are keys and values); with a window of w it stops
    growing at w - 1 tokens, which with the next token's own make its window."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=11, d_model=12, n_layers=3, n_heads=2)).eval()
    counted = []
    for block in model.blocks:
        block.attn.qkv.register_forward_hook(lambda m, args, out: counted.append(out[0].numel() * 2 // 3))
    for T in (1, 7):
        counted.clear()
        with torch.no_grad():
            model(torch.randint(0, 11, (2, T)))
        assert len(counted) == 3 and sum(counted) == model.state_size(T), T
    windowed = Transformer(TransformerConfig(vocab_size=11, d_model=12, n_layers=3, n_heads=2, window=5))
    assert windowed.state_size(4) == model.state_size(4) == windowed.state_size(100) < model.state_size(5)
    looped = Transformer(TransformerConfig(vocab_size=11, d_model=12, n_layers=3, n_heads=2, loops=2)).eval()
    for block in looped.blocks:            # each pass through the layers makes keys and values of its own
        block.attn.qkv.register_forward_hook(lambda m, args, out: counted.append(out[0].numel() * 2 // 3))
    counted.clear()
    with torch.no_grad():
        looped(torch.randint(0, 11, (2, 7)))
    assert len(counted) == 6 and sum(counted) == looped.state_size(7)


def test_init_is_gpt2s_with_the_residual_projections_scaled():
    """GPT-2's init, as nanoGPT's: every matrix N(0, 0.02), biases 0, norms 1; then the projections into the
    residual stream (attn.proj, mlp.proj) N(0, 0.02 / sqrt(2 L)), after the blanket init, which would overwrite
    them. 64 x 64 and larger matrices: their sample std is within 10% of the target."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=64, d_model=64, n_layers=8))
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            want = 0.02 / 4 if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
            assert abs(p.std().item() / want - 1) < 0.1 and abs(p.mean().item()) < want / 10, (name, p.std().item())
        else:
            assert (p == (1.0 if "norm" in name else 0.0)).all(), name


def test_bad_config_raises():
    """Each bad field is refused with a message naming it and the value given; the smallest good values pass."""
    with pytest.raises(ValueError, match="d_model=30.*n_heads=4"):
        TransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="pos.*'alibi'"):
        TransformerConfig(pos="alibi")
    with pytest.raises(ValueError, match="window.*0"):
        TransformerConfig(window=0)
    with pytest.raises(ValueError, match="loops.*0"):
        TransformerConfig(loops=0)
    with pytest.raises(ValueError, match="head dim.*3.*even"):  # RoPE's pairs; apply_rotary would make K + 1 channels
        TransformerConfig(d_model=6, n_heads=2)
    TransformerConfig(d_model=6, n_heads=2, pos="none")         # without RoPE any head dim is fine
    TransformerConfig(window=1)                                 # a token attends to itself alone
    head_dim = TransformerConfig(d_model=12, n_heads=3).head_dim
    assert head_dim == 4 and isinstance(head_dim, int), f"d_model=12, n_heads=3: head_dim {head_dim!r}, not 4"


def test_attention_is_causal_unless_told():
    """The contract's defaults, attention(q, k, v, causal=True, window=None): a call without them is causal and sees
    every earlier key."""
    torch.manual_seed(GRADE_SEED)
    q, k, v = (torch.randn(1, 2, 7, 4, dtype=torch.float64) for _ in range(3))
    for fn in (attention, attention_ref):
        close(fn(q, k, v), fn(q, k, v, causal=True, window=None), f"attention.{fn.__name__}(q, k, v): defaults", "BHTK")
