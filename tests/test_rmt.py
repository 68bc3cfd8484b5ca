"""rmt.py: the model equals its recurrence run by hand, causality across segments, memory, truncated BPTT."""
import pytest
import torch

from conftest import GRADE_SEED, causal_logits, close
from rmt import RMT, RMTConfig


def model(**options):
    torch.manual_seed(GRADE_SEED)
    config = dict(vocab_size=13, d_model=16, n_heads=2, n_mem=3, segment_len=5)
    return RMT(RMTConfig(**{**config, **options})).double().eval()


def test_memory_starts_on_the_embeddings_scale():
    """The memory's parameters, N(0, 0.02) like the token embeddings (attention.py's init), and the memory's norm
    set to 0.02 after it, so that the memory a segment writes stays on that scale, not at RMSNorm's unit scale."""
    m = RMT(RMTConfig(d_model=64, n_mem=64))
    for p in (m.memory_init, m.read_emb, m.write_emb, m.embed.weight):
        assert abs(p.std().item() / 0.02 - 1) < 0.1
    assert (m.mem_norm.weight == 0.02).all() and (m.norm.weight == 1).all()
    assert m.read_emb.shape == m.write_emb.shape == m.memory_init.shape == (64, 64)    # one embedding per slot


def test_the_smallest_config_runs_and_smaller_ones_raise():
    """One memory slot and segments of one token make a (slow) RMT; none, or empty segments, raise."""
    m = model(n_mem=1, segment_len=1)
    assert m(torch.randint(0, 13, (2, 3))).shape == (2, 3, 13)
    for bad in (dict(n_mem=0), dict(segment_len=0), dict(bptt_depth=0)):   # the message names the field and value
        with pytest.raises(ValueError, match=rf"{next(iter(bad))}.* must be >= 1.*got.*\b0\b"):
            RMTConfig(**bad)
    RMTConfig(d_model=6, n_heads=2, pos="none")       # head dim 3: odd is fine without RoPE (refused with it)
    with pytest.raises(ValueError):
        RMTConfig(d_model=6, n_heads=2, pos="rope")


def test_forward_equals_segments_by_hand():
    m = model()
    x = torch.randint(0, 13, (2, 23))                          # 4 full segments and a short one of 3
    memory, logits = m.memory_init.expand(2, -1, -1), []
    for start in range(0, 23, 5):
        out, memory = m.segment_step(x[:, start:start + 5], memory)
        logits.append(out)
    full, final = m(x, return_memory=True)
    torch.testing.assert_close(full, torch.cat(logits, dim=1))
    torch.testing.assert_close(final, memory)


@pytest.mark.parametrize("pos", ["rope", "none"])
@pytest.mark.parametrize("s", [5, 2])                          # a full segment and a short last one
def test_segment_step_runs_the_blocks_on_2M_plus_s_positions_with_the_right_rope(pos, s):
    """Every Block sees [read slots ; segment ; write slots], 2M + s = 6 + s positions, with the RoPE tables of
    `positions(s)` when pos="rope" and none at all when pos="none"."""
    from attention import rotary
    m = model(pos=pos)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args, kw: seen.append((args, kw)), with_kwargs=True)
             for b in m.blocks]
    try:
        logits, memory = m.segment_step(torch.randint(0, 13, (2, s)), torch.randn(2, 3, 16, dtype=torch.float64))
    finally:
        for h in hooks:
            h.remove()
    name = f"rmt.RMT.segment_step(pos={pos!r}, a segment of {s} tokens, M=3)"
    assert len(seen) == len(m.blocks), f"{name}: called the {len(m.blocks)} Blocks {len(seen)} times"
    assert logits.shape == (2, s, 13) and memory.shape == (2, 3, 16), f"{name}: returned logits " \
        f"{tuple(logits.shape)} and memory {tuple(memory.shape)}, expected (2, {s}, 13) and (2, 3, 16)"
    for args, kw in seen:
        x, rope = args[0], args[1] if len(args) > 1 else kw.get("rope")
        assert x.shape == (2, 6 + s, 16), f"{name}: a Block got {tuple(x.shape)}, expected (2, {6 + s}, 16)"
        if pos == "none":
            assert rope is None, f"{name}: a Block got RoPE tables, but pos='none' means no positions at all"
        else:
            assert rope is not None, f"{name}: a Block got no RoPE tables, but pos='rope'"
            want = rotary(m.positions(s, "cpu"), m.config.block.head_dim)
            for got, ref, what in zip(rope, want, ("cos", "sin")):
                close(got, ref, f"{name}: the RoPE {what} table (it should be rotary(positions({s}), head_dim))", "TK",
                      rtol=0, atol=1e-6)


def test_state_carry():
    """A stream read in two calls, the memory passed along, equals one call (split at a segment border)."""
    m = model()
    x = torch.randint(0, 13, (2, 23))
    first, memory = m(x[:, :10], return_memory=True)
    second = m(x[:, 10:], memory=memory)
    torch.testing.assert_close(torch.cat([first, second], dim=1), m(x))


@pytest.mark.parametrize("t", [2, 4, 5, 12])                  # inside a segment, at and across its borders
def test_causal_across_segments(t):
    m = model()
    x = torch.randint(0, 13, (2, 23))
    x2 = x.clone()
    x2[:, t + 1:] = (x[:, t + 1:] + 1) % 13
    a, b = m(x), m(x2)
    causal_logits(a, b, t, "rmt.RMT (segments of 5 tokens)")


def test_information_crosses_segments():
    m = model()
    x = torch.randint(0, 13, (2, 23))
    x2 = x.clone()
    x2[:, 0] = (x[:, 0] + 1) % 13                               # change only the first token
    assert not torch.allclose(m(x)[:, -3:], m(x2)[:, -3:])      # the last (third) segment sees it


def test_write_slots_keep_their_positions_in_a_short_segment():
    m = model()
    full, short = m.positions(5, "cpu"), m.positions(2, "cpu")
    assert full[-3:].tolist() == short[-3:].tolist() == [8, 9, 10]
    assert short.tolist() == [0, 1, 2, 3, 4, 8, 9, 10]


@pytest.mark.parametrize("bptt_depth, loss_on, reached", [(None, 3, [0, 1, 2, 3]), (2, 3, [2, 3]), (2, 4, [4]),
                                                       (3, 4, [3, 4]), (3, 2, [0, 1, 2]), (1, 3, [3]), (1, 1, [1])])
def test_truncated_bptt(bptt_depth, loss_on, reached):
    """5 segments of 5 tokens, segment j made of token j + 1 only, so the gradient on that token's embedding says
    whether the loss reached segment j. With depth k the memory is cut before segments k, 2k, ...: a loss on
    segment i reaches the segments of its own window, from k * (i // k) to i, and the initial memory only from
    the first window; with full BPTT it reaches every segment up to i and the initial memory."""
    m = model(bptt_depth=bptt_depth).train()
    x = torch.arange(1, 6).repeat_interleave(5).expand(2, 25)
    logits = m(x)[:, 5 * loss_on:5 * loss_on + 5]
    (logits * torch.randn(logits.shape, dtype=torch.float64)).sum().backward()
    got = [j for j in range(5) if m.embed.weight.grad[j + 1].abs().sum() > 0]
    init = m.memory_init.grad is not None and m.memory_init.grad.abs().sum().item() > 0
    name = f"RMT(bptt_depth={bptt_depth}), 5 segments, the loss on segment {loss_on}"
    assert got == reached, f"{name}: its gradient reaches segments {got}, expected {reached}"
    assert init == (reached[0] == 0), f"{name}: {'reaches' if init else 'does not reach'} the initial memory"


def test_stream_in_pieces_equals_one_call():
    """Pieces of 64, 128 and 64 tokens (multiples of S), the memory passed along, equal one call on the whole;
    the state is the memory alone, state_size floats per sequence."""
    m = model(segment_len=16)
    x = torch.randint(0, 13, (2, 256))
    logits, state = [], None
    for piece in x.split([64, 128, 64], dim=1):
        out, state = m.stream(piece, state)
        logits.append(out)
    whole, memory = m(x, return_memory=True)
    torch.testing.assert_close(torch.cat(logits, dim=1), whole, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, memory, rtol=1e-10, atol=1e-12)
    assert state.numel() == 2 * m.state_size(256)


def test_state_size_is_what_stream_carries_at_any_length():
    """state_size(T) counts the floats that `stream` hands on after T tokens, the same at 3 tokens and at 23."""
    m = model()
    for T in (3, 23):
        with torch.no_grad():
            _, state = m.stream(torch.randint(0, 13, (1, T)))
        assert state.numel() == m.state_size(T), T


def fixed_weights(m):
    """Every parameter set to a fixed pattern (no random generator, so the same on any machine and PyTorch)."""
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(0.5 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).view_as(p))
    return m


# The reference model's outputs on the fixed weights and tokens below (D=8, H=2, M=2, S=3, V=5, 7 tokens: segments
# of 3, 3 and 1), each time step's logits projected on cos(0..V-1), and each memory slot on cos(0..D-1).
STORED = {"rope": ([-0.8305969041, -0.848866965, -0.8123219541, -0.8529180718, -0.8415570559, -0.8455234764,
                    -0.838600221], [-0.9267016951, -0.9349445387]),
          "none": ([-0.83057656, -0.8484846515, -0.8129978564, -0.8531025756, -0.8443890483, -0.8497552566,
                    -0.8385942554], [-0.9220564515, -0.9317205696])}


@pytest.mark.parametrize("pos", ["rope", "none"])
def test_outputs_equal_the_reference_models_on_fixed_inputs(pos):
    """The whole model against stored outputs of the reference solution: a slice of the Blocks' output shifted, a
    norm left out, the read and write embeddings swapped, a Block skipped or RoPE dropped all change them."""
    m = fixed_weights(RMT(RMTConfig(vocab_size=5, d_model=8, n_heads=2, n_mem=2, segment_len=3, pos=pos)).double())
    with torch.no_grad():
        logits, memory = m(torch.tensor([[1, 4, 0, 2, 2, 3, 1]]), return_memory=True)
    logits, memory = logits @ torch.cos(torch.arange(5.0)).double(), memory @ torch.cos(torch.arange(8.0)).double()
    want_logits, want_memory = (torch.tensor([values], dtype=torch.float64) for values in STORED[pos])
    close(logits, want_logits, f"rmt.RMT(pos={pos!r}) on fixed weights and 7 tokens in segments of 3: the logits "
          "(projected on cos(0..V-1)) against the reference model's", "BT", rtol=1e-6, atol=1e-8)
    close(memory, want_memory, f"rmt.RMT(pos={pos!r}): the final memory (each slot projected on cos(0..D-1)) against "
          "the reference model's", "BM", rtol=1e-6, atol=1e-8)
