"""rmt.py: the model equals its recurrence run by hand, causality across segments, memory, truncated BPTT."""
import pytest
import torch

from conftest import GRADE_SEED
from rmt import RMT, RMTConfig


def model(**options):
    torch.manual_seed(GRADE_SEED)
    config = dict(vocab_size=13, d_model=16, n_heads=2, n_mem=3, segment_len=5)
    return RMT(RMTConfig(**{**config, **options})).double().eval()


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


def test_segment_step_is_read_segment_write():
    """The recurrence step spelled out: [memory + read embeddings ; the segment ; memory + write embeddings]
    through the Blocks with RoPE at the model's positions; logits from the segment's outputs, the next memory
    from the normalised outputs at the write slots."""
    from attention import rotary
    m = model()
    tokens, memory = torch.randint(0, 13, (2, 4)), torch.randn(2, 3, 16, dtype=torch.float64)   # a short segment
    x = torch.cat([memory + m.read_emb, m.embed(tokens), memory + m.write_emb], dim=1)
    rope = rotary(m.positions(4, tokens.device), m.config.block.head_dim)
    for block in m.blocks:
        x = block(x, rope)
    logits, new_memory = m.segment_step(tokens, memory)
    torch.testing.assert_close(logits, m.head(m.norm(x[:, 3:7])), rtol=0, atol=1e-12)
    torch.testing.assert_close(new_memory, m.mem_norm(x[:, 7:]), rtol=0, atol=1e-12)


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
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


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


@pytest.mark.parametrize("bptt_depth, reaches_start", [(None, True), (2, False)])
def test_truncated_bptt(bptt_depth, reaches_start):
    """The loss on the last of 5 segments reaches the initial memory only with full BPTT; with depth 2 the
    memory is cut before segments 2 and 4."""
    m = model(bptt_depth=bptt_depth).train()
    x = torch.randint(0, 13, (2, 25))
    m(x)[:, -5:].sum().backward()
    grad = m.memory_init.grad
    assert (grad is not None and grad.abs().sum() > 0) == reaches_start


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


def test_state_size_is_constant_in_length():
    m = model()
    assert m.state_size(10) == m.state_size(10 ** 6) == 3 * 16
