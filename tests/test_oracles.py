"""Grader-only oracles, kept out of the student copy (tests/make_assignment.py): each spells out a blanked step
in full, so it would hand the answer out. `python tests/grade.py SUBMISSION` runs them on a student's files."""
import pytest
import torch

from attention import rotary
from conftest import GRADE_SEED, close
from hrm import HRM, HRMConfig
from rmt import RMT, RMTConfig


@pytest.mark.parametrize("pos", ["rope", "none"])
@pytest.mark.parametrize("s", [5, 4])                          # a full segment and a short one
def test_rmt_segment_step_is_read_segment_write(pos, s):
    torch.manual_seed(GRADE_SEED)
    m = RMT(RMTConfig(vocab_size=13, d_model=16, n_heads=2, n_mem=3, segment_len=5, pos=pos)).double().eval()
    tokens, memory = torch.randint(0, 13, (2, s)), torch.randn(2, 3, 16, dtype=torch.float64)
    x = torch.cat([memory + m.read_emb, m.embed(tokens), memory + m.write_emb], dim=1)
    rope = rotary(m.positions(s, tokens.device), m.config.block.head_dim) if pos == "rope" else None
    for block in m.blocks:
        x = block(x, rope)
    logits, new_memory = m.segment_step(tokens, memory)
    name = f"rmt.RMT.segment_step(pos={pos!r}, a segment of {s} of S=5 tokens, M=3)"
    # RoPE's tables are float32: another correct spelling of them (torch.polar) differs in their last bit, 6e-8
    close(logits, m.head(m.norm(x[:, 3:3 + s])), f"{name}: the logits", "BTV", rtol=1e-6, atol=1e-6)
    close(new_memory, m.mem_norm(x[:, 3 + s:]), f"{name}: the next memory", "BMD", rtol=1e-6, atol=1e-6)


def hrm_by_hand(model, tokens, segments, gradient):
    """The HRM segment loop written out (2 cycles of 3 L updates and one H update each)."""
    B, T = tokens.shape
    x = model.embed(tokens)
    z_H, z_L = model.z_init[0].expand(B, T, -1), model.z_init[1].expand(B, T, -1)
    rope = model.start(tokens)[1]
    f_L = lambda zl, zh: model.low(zl, zh + x, rope)  # noqa: E731
    f_H = lambda zh, zl: model.high(zh, zl, rope)      # noqa: E731
    for _ in range(segments):
        z_H, z_L = z_H.detach(), z_L.detach()
        with torch.no_grad():                           # cycle 1: always off the graph
            z_L = f_L(z_L, z_H)
            z_L = f_L(z_L, z_H)
            z_L = f_L(z_L, z_H)
            z_H = f_H(z_H, z_L)
        with torch.set_grad_enabled(gradient == "last_cycle"):   # cycle 2: all of it, or only its last L and H
            z_L = f_L(z_L, z_H)
            z_L = f_L(z_L, z_H)
        z_L = f_L(z_L, z_H)
        z_H = f_H(z_H, z_L)
    return model.head(z_H)


@pytest.mark.parametrize("gradient", ["one_step", "last_cycle"])
@pytest.mark.parametrize("causal", [True, False])
def test_hrm_forward_and_gradients_equal_the_cycles_by_hand(gradient, causal):
    torch.manual_seed(GRADE_SEED)
    model = HRM(HRMConfig(vocab_size=7, d_model=16, n_layers=4, n_heads=2, H_cycles=2, L_cycles=3, segments=2,
                          causal=causal, gradient=gradient)).double()
    tokens = torch.randint(0, 7, (3, 11))
    out = model(tokens, segments=3)
    ref = hrm_by_hand(model, tokens, 3, gradient)
    name = f"hrm.HRM.segment(gradient={gradient!r}, causal={causal}), 3 segments"
    close(out, ref, f"{name}: the logits", "BTV", rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    grads_ref = torch.autograd.grad(ref.square().sum(), list(model.parameters()), allow_unused=True)
    for (param, _), g, r in zip(model.named_parameters(), grads, grads_ref):
        assert g is not None, f"{name}: no gradient reaches {param}, which should learn"
        close(g, r, f"{name}: the gradient of {param}", rtol=0, atol=1e-12)
