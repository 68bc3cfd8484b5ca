"""
Attention: the Transformer, the "copying" end of the bench and the foundation the other files build on.

Every token attends to every earlier token, so the model can look anything up verbatim: copying a string,
recalling the value stored under a key. The price is a state (the key/value cache) that grows with the
sequence, and time that grows with its square. On long noisy streams with a sparse signal, attention also
has to find the needle again at every step, and positional encodings trained at one length may not carry
to a longer one: this is where the recurrent models of this repo are meant to win (the README's claims C1 and C2).
`rmt.py`, `titans.py` and `hrm.py` import `Block` from here, because they are built on it.

Reading list
  1. Vaswani et al., "Attention Is All You Need", arXiv 1706.03762 (scaled dot-product attention, Eq. 1).
  2. Su et al., "RoFormer: rotary position embedding", arXiv 2104.09864 (RoPE, Eq. 34).
  3. Kazemnejad et al., "The Impact of Positional Encoding on Length Generalization", arXiv 2305.19466 (NoPE).
  4. karpathy/nanoGPT `model.py`: the layout of this file (pre-norm block, scaled residual init).
  5. Dehghani et al., "Universal Transformers", arXiv 1807.03819 (the same Blocks applied again and again:
     `loops`, the bench's control for HRM's recurrent depth).

Glossary (the other files keep these letters; each one's own glossary names where it cannot)
  B batch, T time (sequence length), D model width, H heads, K head dim (D = H*K), V vocabulary.
  q, k, v    queries, keys, values, each (B, H, T, K)
  window w   with a window, query i sees keys j with i - w < j <= i (causal) or |i - j| < w (bidirectional)
  theta_i    RoPE frequency base**(-2i/K) for the i-th pair of channels
  loops      passes through the stack of Blocks (1: the plain Transformer); before each pass after the first the
             embedded input is added to the stream again, as HRM injects its input into every update
"""
import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    vocab_size: int = 32     # V
    d_model: int = 64        # D
    n_layers: int = 2        # number of Blocks
    n_heads: int = 2         # H; head dim K = D / H
    mlp_ratio: int = 4       # hidden width of the MLP is mlp_ratio * D
    pos: str = "rope"        # "rope" (rotary) or "none" (NoPE: causal masking alone carries order)
    rope_base: float = 10000.0
    window: int | None = None  # sliding-window attention: see the glossary; None attends to everything
    causal: bool = True      # False for bidirectional models (HRM on grid puzzles)
    loops: int = 1           # passes through the Blocks: > 1 is a looped (Universal) Transformer, same parameters

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.pos not in ("rope", "none"):
            raise ValueError(f"pos must be 'rope' or 'none', not {self.pos!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, not {self.window}")
        if self.loops < 1:
            raise ValueError(f"loops must be >= 1, not {self.loops}")
        self.head_dim = self.d_model // self.n_heads  # K
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of channels: the head dim d_model / n_heads = {self.head_dim} must "
                             "be even")


# ---------------------------------------------------------------------------------------------------------
# Reference: softmax(q_i k^T / sqrt(K)) v over the keys query i may see, one query at a time (Vaswani et al. Eq. 1)
# ---------------------------------------------------------------------------------------------------------

def attention_ref(q, k, v, causal=True, window=None):
    """Scaled dot-product attention one query at a time, over the keys it may see, the softmax written by hand: the
    spec `attention` is tested against. (Loop over queries, so the mask, the point of `attention`, is not handed out.)

    Args:
        q, k, v: (B, H, T, K)
        causal: query i only sees keys j <= i
        window: if set, query i only sees keys with |i - j| < window (and j <= i when causal)
    Returns:
        (B, H, T, K)
    """
    T, K = q.shape[-2], q.shape[-1]
    out = []
    for i in range(T):                                              # keys first..last-1: never empty, i is in
        first = 0 if window is None else max(0, i - window + 1)
        last = i + 1 if causal else T if window is None else min(T, i + window)
        scores = q[..., i:i + 1, :] @ k[..., first:last, :].transpose(-2, -1) / math.sqrt(K)   # (B, H, 1, keys)
        weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()                # softmax: shifted, exp, sum
        out.append(weights / weights.sum(dim=-1, keepdim=True) @ v[..., first:last, :])
    return torch.cat(out, dim=-2)


# ---------------------------------------------------------------------------------------------------------
# Fast core: PyTorch's fused scaled_dot_product_attention (flash / memory-efficient kernels where possible)
# ---------------------------------------------------------------------------------------------------------

def attention(q, k, v, causal=True, window=None):
    """Same contract as `attention_ref`, on `F.scaled_dot_product_attention`, in one batched computation: no Python
    loop whose count grows with T (the grader counts a core's operations as T grows, window fixed).

    Args:
        q, k, v: (B, H, T, K)
    Returns:
        (B, H, T, K)
    """
    ### BEGIN SOLUTION
    B, H, T, K = q.shape
    if window is None or window >= T:               # a window as long as the sequence is no window at all
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # A sliding window without a (T, T) mask: cut the sequence into blocks of w = window queries. Query i of
    # block b sees keys j with |i - j| < w, which all lie in blocks b-1, b (and b+1 when bidirectional), so
    # each block attends to those 2w (3w) keys only: memory and time grow linearly in T.
    w, pad = window, (-T) % window
    n = (T + pad) // w
    q, k, v = (F.pad(t, (0, 0, 0, pad)).view(B, H, n, w, K) for t in (q, k, v))
    block = lambda t, s: F.pad(t, (0, 0, 0, 0, 1, 1))[:, :, 1 - s:n + 1 - s]  # noqa: E731  [b] = t[b - s], or 0
    neighbours = (1, 0) if causal else (1, 0, -1)                                  # the previous, own, next block
    k, v = (torch.cat([block(t, s) for s in neighbours], dim=3) for t in (k, v))   # (B, H, n, 2w or 3w, K)
    i = torch.arange(T + pad, device=q.device).view(n, w, 1)                       # query positions
    j = torch.stack([i[:, :, 0] - s * w for s in neighbours], dim=1).view(n, 1, -1)  # their keys' positions
    allowed = ((i - j).abs() < w) & (j >= 0) & (j < T) & ((j <= i) if causal else True)   # (n, w, 2w or 3w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out.view(B, H, T + pad, K)[:, :, :T]
    ### END SOLUTION


# ---------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoFormer Eq. 34): rotate each pair of channels by an angle proportional to the
# position, so q.k depends on the positions only through their difference. We pair channel i with i + K/2 (the
# "half-split" of GPT-NeoX and Llama), not RoFormer's neighbours (2i, 2i+1): a permutation of the channels.
# ---------------------------------------------------------------------------------------------------------

def rotary(positions, head_dim, base=10000.0):
    """cos and sin tables for the given integer positions (T,), each (T, K/2). In float32, so far into a stream they
    drift from the exact values: by up to 0.01 at positions below 262,144 and 0.04 below 1M (K = 32), where attention
    here is at chance anyway (forming them in float64 would change every trained digit of the committed runs)."""
    theta = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * theta[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (x[..., :K/2], x[..., K/2:]) of x (B, H, T, K) by the angles in cos, sin (T, K/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x, rope=None):
        """x: (B, T, D), rope: None or the (cos, sin) tables of `rotary` for these T positions -> (B, T, D)."""
        c = self.config
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, K)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = attention(q, k, v, causal=c.causal, window=c.window)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)). Imported by rmt, titans, hrm."""

    def __init__(self, config):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.norm2 = RMSNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x, rope=None):
        """x: (B, T, D) -> (B, T, D)"""
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


def init_weights(model, n_layers):
    """GPT-2 style init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layers)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    # Runs after the blanket init above, or it would be overwritten.
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

class Transformer(nn.Module):
    """A decoder-only (or, with causal=False, encoder-only) Transformer LM: tokens (B, T) -> logits (B, T, V)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config.n_layers)

    def forward(self, tokens, loops=None):
        """tokens: LongTensor (B, T) -> logits (B, T, V). loops: passes through the Blocks at test time (default:
        the config's), the looped model's test-time depth."""
        c = self.config
        x = e = self.embed(tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        rope = rotary(positions, c.head_dim, c.rope_base) if c.pos == "rope" else None
        loops = c.loops if loops is None else loops
        if loops < 1:
            raise ValueError(f"loops must be >= 1, not {loops}")
        for i in range(loops):
            if i:
                x = x + e                                      # the input again, before every pass after the first
            for block in self.blocks:
                x = block(x, rope)
        return self.head(self.norm(x))

    def state_size(self, seq_len):
        """Floats per sequence kept at inference: the key/value cache, 2 * D per layer (and per pass through the
        layers: a looped model's passes each have their own keys and values) per cached token; with a window of w,
        the last w - 1 tokens (the next token's own key and value complete its window)."""
        c = self.config
        cached = seq_len if c.window is None else min(seq_len, c.window - 1)
        return 2 * c.d_model * c.n_layers * c.loops * cached


if __name__ == "__main__":
    argparse.ArgumentParser(description="A smoke run of the Transformer (parameters, the logits' shape), then "
                                        "attention's largest difference from attention_ref's.").parse_args()
    if "OMP_NUM_THREADS" not in os.environ:   # README, "Threads": one thread unless told otherwise; on a machine
        torch.set_num_threads(1)              # with other work, threads waiting for busy cores run many times slower
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=32))
    tokens = torch.randint(0, 32, (2, 50))
    print(f"Transformer: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"logits {tuple(model(tokens).shape)} for tokens {tuple(tokens.shape)}")
    q, k, v = torch.randn(3, 2, 2, 37, 16, dtype=torch.float64).unbind(0)
    for causal, window in [(True, None), (True, 5), (False, None), (False, 5)]:
        err = (attention(q, k, v, causal, window) - attention_ref(q, k, v, causal, window)).abs().max().item()
        print(f"attention vs attention_ref, causal={causal!s:5} window={window!s:4}: max |diff| = {err:.1e}")
