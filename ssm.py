"""
A Mamba-2 style selective state-space model: the "filtering" end of the bench.

The model reads a stream once, left to right, and keeps a fixed-size state h per head: at every token it decays
the state by a data-dependent amount and writes the token into it, h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
then reads it out with y_t = h_t C_t (every symbol is in the glossary below). Because dt, B and C depend on the
token ("selection"), it can ignore noise and hold on to what matters, for any length, at constant cost per
token: this is why it should win on long noisy streams (flipflop, babilong; the README's claim C2). Because the
state has a fixed size (H * K * N floats per layer, plus the last few inputs of the short causal convolution
that feeds the scan: `state_size`), it cannot copy or recall more than that state holds (copy, recall; C1). N is
the dial of that trade-off.

A loop over time is slow on a GPU (T small kernel launches). Mamba-2's SSD algorithm computes the same thing in
chunks of Q tokens with a handful of matrix multiplications: inside a chunk it is a masked attention-like
product, across chunks a short recurrence over chunk states, scanned here in groups of chunks, recursively:
linear in the chunks (170k of them at 11M tokens), where Listing 1's one matmul over every pair of chunks is
quadratic (either passes the tests). `ssd_scan` is that algorithm in plain PyTorch; `ssd_scan_ref` is the loop
it is tested against. `Mamba.stream` reads a stream piece by piece, carrying only the scan state and the
convolution's last inputs, so its memory does not grow with the length.

Reading list
  1. Dao & Gu, "Transformers are SSMs" (Mamba-2, SSD), arXiv 2405.21060: §6 and Listing 1 (the chunked
     algorithm), the `ssd_minimal.py` file of state-spaces/mamba.
  2. Gu & Dao, "Mamba", arXiv 2312.00752: selection (§3.2, Algorithm 2), the block, the dt and A inits.
  3. johnma2006/mamba-minimal `model.py`: a readable single-file Mamba-1.

Glossary (paper -> here)
  B batch, T time, D model width, E = expand*D inner width, H heads, K head dim (E = H*K; the paper's P),
  N state size (d_state), Q chunk length (the paper's Q, `chunk_size`; the other files call it C, a letter
  this file leaves to the readout C_t), c the chunk axis in shape comments (n_chunks chunks); the mixer's
  `self.D` (Mamba's name) is not a width but the skip's weight per head, y_t += D x_t.
  x_t (B, T, H, K)  input per head          dt_t (B, T, H) step size > 0 (softplus)
  A (H,) < 0        decay rate per head      a_t = dt_t * A <= 0, the log of the decay at step t
  B_t, C_t (B, T, N) input and output maps, shared by all heads (one group); in a shape, B is the batch
  h_t (B, H, K, N)  the state: h_t = exp(a_t) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t   (Mamba-2 Eq. 2)
  segsum(a)[i, j] = a_{j+1} + ... + a_i for j <= i (else -inf): the log of the decay from step j to i.
  We discretise B with an Euler step (dt * B), as Mamba-2 does; A's step is exact (exp(dt * A)).
"""
import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import MLP, RMSNorm


@dataclass
class MambaConfig:
    vocab_size: int = 32   # V
    d_model: int = 64      # D
    n_layers: int = 2      # number of blocks, each = SSM mixer + MLP (as the Transformer's attention + MLP)
    expand: int = 2        # E = expand * D
    n_heads: int = 4       # H; head dim K = E / H
    d_state: int = 16      # N, the dial of the copy/filter trade-off
    d_conv: int = 4        # width of the short causal depthwise convolution
    chunk_size: int = 64   # Q, the SSD chunk length (a speed knob: results do not depend on it)
    dt_min: float = 1e-3   # softplus(dt_bias) is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    mlp_ratio: int = 3     # MLP width mlp_ratio * D; 3, not the Transformer's 4, pays for the mixer's wider
                           # projections (parameters within 10% of the Transformer's at the bench's sizes)

    def __post_init__(self):
        self.d_inner = self.expand * self.d_model  # E
        if self.d_inner % self.n_heads:
            raise ValueError(f"expand * d_model = {self.d_inner} is not divisible by n_heads={self.n_heads}")
        self.head_dim = self.d_inner // self.n_heads  # K


# ---------------------------------------------------------------------------------------------------------
# Reference: the recurrence, one step at a time (the spec)
# ---------------------------------------------------------------------------------------------------------

def ssd_scan_ref(x, dt, A, B, C, chunk_size=64, initial_state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T and y_t = h_t C_t, as a loop over t.

    Args:
        x: (B, T, H, K), dt: (B, T, H) > 0, A: (H,) < 0, B and C: (B, T, N)
        chunk_size: unused (kept so both functions have one signature)
        initial_state: (B, H, K, N) or None (zeros)
    Returns:
        y: (B, T, H, K), final_state: (B, H, K, N)
    """
    b, T, H, K = x.shape
    h = x.new_zeros(b, H, K, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)                                             # (B, H)
        h = decay[:, :, None, None] * h + torch.einsum("bh,bhk,bn->bhkn", dt[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bhkn,bn->bhk", h, C[:, t]))
    return torch.stack(ys, dim=1), h


# ---------------------------------------------------------------------------------------------------------
# Fast core: chunked SSD (Mamba-2 §6), four batched matmul steps, no loop over time
# ---------------------------------------------------------------------------------------------------------

def segsum(a):
    """(..., L) -> (..., L, L): out[..., i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal.

    Each entry is summed directly over its own segment, so for a <= 0 (a log decay) it is <= 0 and exp() of it
    never overflows;
    the tempting cumsum[i] - cumsum[j] loses precision by cancellation at long L.
    """
    L = a.shape[-1]
    s = a[..., :, None].expand(*a.shape, L)                                         # s[..., k, j] = a[k]
    below = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)            # keep k > j
    s = s.masked_fill(~below, 0).cumsum(dim=-2)                                     # sum over j < k <= i
    return s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_scan(x, dt, A, B, C, chunk_size=64, initial_state=None):
    """Same contract as `ssd_scan_ref`, computed chunk by chunk with matrix multiplications.

    Args:
        x: (B, T, H, K), dt: (B, T, H) > 0, A: (H,) < 0, B and C: (B, T, N), any T >= 1
        chunk_size: Q, the chunk length; the result does not depend on it, the cost does: work of order T * Q
            inside the chunks and a state carried across them, never a (T, T) matrix (tests/test_cores.py)
        initial_state: (B, H, K, N) or None (zeros)
    Returns:
        y: (B, T, H, K), final_state: (B, H, K, N)
    """
    ### BEGIN SOLUTION
    b, T, H, K = x.shape
    N, Q = B.shape[-1], min(chunk_size, T)   # a chunk longer than the sequence would only add padding
    pad = (-T) % Q            # padded steps have dt = 0: no decay (exp 0 = 1) and no input, so h is unchanged
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    n_chunks = (T + pad) // Q
    xdt = (x * dt[..., None]).view(b, n_chunks, Q, H, K).permute(0, 3, 1, 2, 4)     # (B, H, c, Q, K): dt_t x_t
    B, C = B.view(b, 1, n_chunks, Q, N), C.view(b, 1, n_chunks, Q, N)              # one group: shared by heads
    a = (dt * A).view(b, n_chunks, Q, H).permute(0, 3, 1, 2)                        # (B, H, c, Q), <= 0
    a_cum = a.cumsum(dim=-1)                                                        # log decay since chunk start

    # 1. Inside each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
    decay = torch.exp(segsum(a))                                                    # (B, H, c, Q, Q)
    y = ((C @ B.mT) * decay) @ xdt                                                  # (B, H, c, Q, K)

    # 2. The state each chunk leaves behind, from its own tokens only: sum_j exp(a_{j+1..end}) dt_j x_j B_j^T
    #    (This step subtracts cumsums, as `segsum` warns not to: a_cum restarts per chunk, fp32 error ~Q max|a| 1e-7)
    to_end = torch.exp(a_cum[..., -1:] - a_cum)[..., None]                          # (B, H, c, Q, 1)
    chunk_states = (xdt * to_end).mT @ B                                            # (B, H, c, K, N)

    # 3. Across chunks: h entering chunk m = h entering m-1, decayed by its total, + the state it left (h0: chunk -1).
    #    The tokens' recurrence one level up: `carry` scans it in groups of G chunks (step 1's matmul), recursively.
    def carry(s, d):   # s (B, H, n, K*N), log decays d (B, H, n) -> h_m = exp(d_m) h_(m-1) + s_m, from h = 0
        n, G = d.shape[-1], max(Q, 2)   # groups of G chunks, G = Q as in step 1 (>= 2: each level shorter)
        if n <= G:
            return torch.exp(segsum(d)) @ s
        s, d = (F.pad(t, (0, 0) * (t.dim() - 3) + (0, (-n) % G)).unflatten(2, (-1, G)) for t in (s, d))   # pads: 0
        inside, d_cum = torch.exp(segsum(d)) @ s, d.cumsum(dim=-1)               # each group from its own chunks
        before = F.pad(carry(inside[..., -1, :], d_cum[..., -1]), (0, 0, 1, 0))[:, :, :-1]   # entering each group
        return (inside + torch.exp(d_cum)[..., None] * before[..., None, :]).flatten(2, 3)[:, :, :n]   # step 4, up

    h0 = x.new_zeros(b, H, K, N) if initial_state is None else initial_state
    chunk_states = torch.cat([h0[:, :, None], chunk_states], dim=2).flatten(-2)   # (B, H, c+1, K*N)
    states = carry(chunk_states, F.pad(a_cum[..., -1], (1, 0))).view(b, H, n_chunks + 1, K, N)   # after chunk m-1
    entering, final_state = states[:, :, :-1], states[:, :, -1]

    # 4. What the entering state contributes inside each chunk: y_i += exp(a_1 + ... + a_i) h_entering C_i
    y = y + torch.exp(a_cum)[..., None] * (C @ entering.mT)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, n_chunks * Q, H, K)[:, :T]
    return y, final_state
    ### END SOLUTION


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------

class SSMMixer(nn.Module):
    """The Mamba-2 mixer: in_proj -> causal conv on (x, B, C) -> SiLU -> SSD scan (+ D skip) -> gated norm."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        E, N, H = cfg.d_inner, cfg.d_state, cfg.n_heads
        self.in_proj = nn.Linear(cfg.d_model, 2 * E + 2 * N + H, bias=False)        # z, (x, B, C), dt
        self.conv = nn.Conv1d(E + 2 * N, E + 2 * N, cfg.d_conv, groups=E + 2 * N)  # causal: fed its past inputs
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = RMSNorm(E)
        self.out_proj = nn.Linear(E, cfg.d_model, bias=False)

    def reset_ssm_parameters(self):
        """The special inits of Mamba; called after any blanket init, which would overwrite them."""
        cfg = self.config
        # dt = softplus(dt_bias) log-uniform in [dt_min, dt_max]; dt_bias = softplus^-1(dt) = dt + log(1 - e^-dt)
        dt = torch.exp(torch.rand(cfg.n_heads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        with torch.no_grad():
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty(cfg.n_heads).uniform_(1, 16)))  # A in [-16, -1] (Mamba-2)
            self.D.fill_(1.0)

    def forward(self, u, state=None):
        """One layer over a piece of a stream.

        Args:
            u: (B, T, D)
            state: None (the stream starts) or what the previous piece returned: the convolution's last
                d_conv - 1 inputs (B, d_conv - 1, E + 2N) and the scan state h (B, H, K, N)
        Returns:
            (B, T, D), and the state after the last token
        """
        cfg = self.config
        b, T, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([cfg.d_inner, cfg.d_inner + 2 * cfg.d_state, cfg.n_heads], dim=-1)
        tail, h = (xBC.new_zeros(b, cfg.d_conv - 1, xBC.shape[-1]), None) if state is None else state
        xBC = torch.cat([tail.to(xBC.dtype), xBC], dim=1)                          # (B, d_conv - 1 + T, E + 2N)
        tail = xBC[:, T:].clone()                                      # the last d_conv - 1 inputs, copied
        xBC = F.silu(self.conv(xBC.transpose(1, 2)).transpose(1, 2))              # T outputs, each from its past
        x, B, C = xBC.split([cfg.d_inner, cfg.d_state, cfg.d_state], dim=-1)
        x = x.reshape(b, T, cfg.n_heads, cfg.head_dim)
        dtype = torch.promote_types(u.dtype, torch.float32)                        # fp32, or fp64 in tests
        with torch.autocast(u.device.type, enabled=False):                         # the scan runs in fp32
            dt = F.softplus(dt.to(dtype) + self.dt_bias)                            # (B, T, H) > 0
            A = -torch.exp(self.A_log.to(dtype))                                    # (H,) < 0
            x = x.to(dtype)
            y, h = ssd_scan(x, dt, A, B.to(dtype), C.to(dtype), cfg.chunk_size, h)
            y = y + self.D[:, None] * x
        y = y.reshape(b, T, cfg.d_inner).to(u.dtype)
        return self.out_proj(self.norm(y * F.silu(z))), (tail, h)


class MambaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1, self.mixer = RMSNorm(config.d_model), SSMMixer(config)
        self.norm2, self.mlp = RMSNorm(config.d_model), MLP(config)

    def forward(self, x, state=None):
        """x: (B, T, D), state: the mixer's (or None) -> (B, T, D), the mixer's new state"""
        y, state = self.mixer(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

class Mamba(nn.Module):
    """A Mamba-2 style LM: tokens (B, T) -> logits (B, T, V). Causal by construction."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        for name, p in self.named_parameters():                 # blanket init, as the Transformer's
            if p.dim() >= 2 and "conv" not in name:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("proj.bias") or name.endswith("fc.bias"):
                nn.init.zeros_(p)
        for block in self.blocks:                               # then the SSM's own inits, not overwritten
            block.mixer.reset_ssm_parameters()
            nn.init.normal_(block.mixer.out_proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))
            nn.init.normal_(block.mlp.proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))

    def forward(self, tokens):
        """tokens: LongTensor (B, T) -> logits (B, T, V)"""
        return self.stream(tokens)[0]

    def stream(self, tokens, state=None):
        """Read a stream in pieces: the logits of a piece, and the state to pass with the next piece. Any
        piece lengths give the same logits as one call on the whole; memory grows with the piece, not the stream.

        Args:
            tokens: LongTensor (B, T), the next piece
            state: None at the start, else the state the previous call returned: per layer, the convolution's
                last d_conv - 1 inputs and the scan state (`state_size` floats per sequence)
        Returns:
            logits (B, T, V), state
        """
        x = self.embed(tokens)
        states = []
        for block, s in zip(self.blocks, state or [None] * len(self.blocks)):
            x, s = block(x, s)
            states.append(s)
        return self.head(self.norm(x)), states

    def state_size(self, seq_len=None):
        """Floats per sequence in `stream`'s state, whatever the length: per layer the SSM state (H * K * N)
        and the last d_conv - 1 inputs of the convolution."""
        c = self.config
        return c.n_layers * (c.n_heads * c.head_dim * c.d_state + (c.d_conv - 1) * (c.d_inner + 2 * c.d_state))


if __name__ == "__main__":
    argparse.ArgumentParser(description="A smoke run of Mamba: parameters, the logits' shape, the state "
                                        "size.").parse_args()
    if "OMP_NUM_THREADS" not in os.environ:   # README, "Threads": one thread unless told otherwise; on a machine
        torch.set_num_threads(1)              # with other work, threads waiting for busy cores run many times slower
    torch.manual_seed(0)
    model = Mamba(MambaConfig(vocab_size=32))
    tokens = torch.randint(0, 32, (2, 50))
    print(f"Mamba: {sum(p.numel() for p in model.parameters()):,} parameters, logits {tuple(model(tokens).shape)}, "
          f"state {model.state_size():,} floats per sequence at any length")
