"""
Titans: a neural long-term memory that learns while it reads, beside sliding-window attention.

The memory is a small network M (a matrix, or a 2-layer MLP) whose *weights* are the recurrent state. At each
token it takes one gradient step on an associative loss, ||M(k_t) - v_t||^2, so it stores "key k_t maps to
value v_t", with momentum (past surprise) and a forgetting gate; reading is a forward pass M(q_t). Because the
write is proportional to the prediction error, a pair it already knows costs nothing and an overwrite replaces
the old value. Beside it runs sliding-window attention, which copies exactly inside its window. The hybrid
(Memory-as-Gate, MAG) should copy like attention inside the window and recall or filter like a recurrent
model beyond it (the README's claim C4).

Training needs a parallel form. Following the paper (§3.2), the sequence is cut into chunks of C tokens and
every gradient inside a chunk is taken at the weights of the chunk start; then the whole chunk is a few
batched matmuls (the "dual form", as in test-time training, TTT) and the loop runs over chunks only. C = 1 is
exact online gradient descent; a larger C is a different, cheaper model (the surprise of a token ignores what
earlier tokens of its chunk wrote). `neural_memory_ref` is the same computation token by token, with the gradients
taken by autograd: the spec that `neural_memory` is tested against.

One addition to the paper: each token's inner gradient is clipped to norm c = `max_grad_norm` before it enters
the momentum (as in lucidrains/titans-pytorch). With inner learning rate theta, a step on the MLP memory's second
layer moves its output by theta ||z||^2 times the error, z being the hidden activation (the first layer's output),
and z grows with the first layer's weights, so unclipped the inner loop can run away (the weights reached 1e15 and
the loss NaN at an outer lr of 1e-2); clipped, and without forgetting (alpha = 0), momentum eta lets the memory
move at most T theta c / (1 - eta) in T tokens, and forgetting only pulls it back towards 0.

Not included: the paper's persistent memory (Eq. 19), a few learnable, data-independent tokens prepended to
every sequence (MAG runs both of its branches on them, Eq. 26), meant to hold task knowledge and to give
attention a sink; in the paper's ablation (Table 5), removing them costs the least of all the components.

Reading list
  1. Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663: Eqs. 8-15
     (the memory), §3.2 and Eqs. 16-18 (chunked training), Eqs. 26-28 (MAG), §4.4 (conv, norms, gates).
  2. Sun et al., "Learning to (Learn at Test Time)" (TTT), arXiv 2407.04620: the dual form.
  3. Yang et al., "Gated Delta Networks", arXiv 2412.06464: the linear memory with eta = 0.
  4. lucidrains/titans-pytorch `neural_memory.py`: a public implementation (with torch.func).

Glossary (paper -> here)
  B batch, T time, D model width, H heads, K head dim, C chunk size, V vocabulary.
  q, k, v (B, H, T, K)      queries, keys, values per head; q and k have unit norm
  weights                   the memory M: (W,) for a linear map, (W1, W2) for an MLP, each (B, H, in, out)
  momentum S                the same shapes: S_t = eta_t S_{t-1} - theta_t grad l(M_{t'-1}; k_t, v_t) (Eq. 10)
  M_t = (1 - alpha_t) M_{t-1} + S_t                                                                    (Eq. 13)
  theta, eta, alpha (B, H, T) per-token inner learning rate, momentum decay, forgetting gate, all in [0, 1)
  t'                        the first token of t's chunk: gradients are taken at M_{t'-1}              (Eq. 16)
  beta_i, a_i               running products of (1 - alpha) and of eta inside a chunk (exp of cumsums)
  stream                    reads a long stream in pieces, carrying per layer the memory (weights, momentum),
                            the conv's last inputs and the window's last keys and values: constant memory
"""
import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Block, RMSNorm, TransformerConfig, apply_rotary, attention, init_weights, rotary


@dataclass
class TitansConfig:
    vocab_size: int = 32      # V
    d_model: int = 64         # D
    n_layers: int = 2
    n_heads: int = 2          # H; memory head dim K = D / H
    mlp_ratio: int = 1        # 1, not the Transformer's 4: pays for the memory branch (parameters within 10%)
    memory: str = "mlp"       # "linear" (a K x K matrix) or "mlp" (K -> memory_expand * K -> K, SiLU)
    memory_expand: int = 1
    chunk_size: int = 16      # C: gradients inside a chunk are taken at the chunk-start weights
    window: int = 32          # sliding-window attention span
    use_attention: bool = True  # False: the memory alone (the paper's LMM)
    d_conv: int = 4           # short causal depthwise conv on q, k, v (binds a key to the value after it)
    theta_max: float = 0.1    # theta = theta_max * sigmoid(.): small inner steps
    max_grad_norm: float = 1.0  # each token's inner gradient clipped to this norm: the inner loop cannot blow up
    pos: str = "rope"

    def __post_init__(self):
        if self.memory not in ("linear", "mlp"):
            raise ValueError(f"memory must be 'linear' or 'mlp', not {self.memory!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:   # 0 makes 0/0, < 0 gradient ascent
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        self.attn = TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                                      n_heads=self.n_heads, mlp_ratio=self.mlp_ratio, pos=self.pos,
                                      window=self.window, causal=True)
        self.head_dim = self.attn.head_dim


# ---------------------------------------------------------------------------------------------------------
# The memory network: an L-layer MLP without biases (L = 1 is a linear map), applied per batch row and head
# ---------------------------------------------------------------------------------------------------------

def memory_forward(weights, x):
    """M(x): x (B, H, n, in) -> (B, H, n, out), SiLU between layers."""
    for i, W in enumerate(weights):
        x = x @ W
        if i < len(weights) - 1:
            x = F.silu(x)
    return x


# ---------------------------------------------------------------------------------------------------------
# Reference: token by token, gradients from autograd at the chunk-start weights (the spec)
# ---------------------------------------------------------------------------------------------------------

def neural_memory_ref(q, k, v, theta, eta, alpha, weights, momentum=None, chunk_size=16, max_grad_norm=None):
    """Read and update the memory one token at a time: update with token t, then read M_t(q_t).

    Args:
        q, k, v: (B, H, T, K); theta, eta, alpha: (B, H, T) in [0, 1)
        weights: tuple of (B, H, in, out), the memory at the start; momentum: the same shapes, or None (zeros)
        chunk_size: C; gradients for tokens t' .. t'+C-1 are taken at the weights before token t'
        max_grad_norm: None, or each token's gradient (all weights together) is scaled down to at most this norm
    Returns:
        y (B, H, T, out), and the final (weights, momentum)
    """
    momentum = tuple(torch.zeros_like(W) for W in weights) if momentum is None else momentum
    ys = []
    for t in range(q.shape[2]):
        if t % chunk_size == 0:
            start = weights
        with torch.enable_grad():
            ws = [W if W.requires_grad else W.detach().requires_grad_() for W in start]
            loss = (memory_forward(ws, k[:, :, t:t + 1]) - v[:, :, t:t + 1]).pow(2).sum()
            grads = torch.autograd.grad(loss, ws, create_graph=True)
        if max_grad_norm is not None:
            norm2 = sum(g.pow(2).sum((-2, -1)) for g in grads)[..., None, None]          # (B, H, 1, 1)
            grads = tuple(g * max_grad_norm * norm2.clamp_min(max_grad_norm ** 2).rsqrt() for g in grads)
        th, et, al = (g[:, :, t, None, None] for g in (theta, eta, alpha))
        momentum = tuple(et * S - th * g for S, g in zip(momentum, grads))               # Eq. 10
        weights = tuple((1 - al) * W + S for W, S in zip(weights, momentum))             # Eq. 13
        ys.append(memory_forward(weights, q[:, :, t:t + 1]))
    return torch.cat(ys, dim=2), (weights, momentum)


# ---------------------------------------------------------------------------------------------------------
# Fast core: the chunked dual form, a few batched matmuls per chunk
# ---------------------------------------------------------------------------------------------------------

def segsum(x):
    """(..., C) -> (..., C, C): out[..., i, j] = x[j+1] + ... + x[i] for j <= i, -inf above (as in ssm.py)."""
    C = x.shape[-1]
    z = x[..., :, None].expand(*x.shape, C)
    z = z.masked_fill(~torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1), 0).cumsum(dim=-2)
    return z.masked_fill(~torch.ones(C, C, dtype=torch.bool, device=x.device).tril(), float("-inf"))


def last_rows(z, T):
    """(B, H, n, C, ...) -> (B, H, n, ...): each chunk's row at its last real token (C - 1, and in the last chunk,
    which padding fills up to C, the row of token T - 1)."""
    C = z.shape[3]
    return torch.cat([z[:, :, :-1, C - 1], z[:, :, -1:, (T - 1) % C]], dim=2)


def memory_gradients(weights, k, v, max_grad_norm=None):
    """The gradient of l = ||M(k_j) - v_j||^2 for each token j, in factored form: for every weight W_l a pair
    (inp_l, err_l) of shapes (B, H, n, in_l) and (B, H, n, out_l) with grad_j W_l = inp_l[j]^T err_l[j].
    Backpropagation written out, so that no per-token weight copy is ever made. With max_grad_norm = c, each
    token's gradient (all weights together) is scaled to norm at most c."""
    xs, pres = [k], []
    for i, W in enumerate(weights):
        pres.append(xs[-1] @ W)
        xs.append(F.silu(pres[-1]) if i < len(weights) - 1 else pres[-1])
    err = 2 * (xs[-1] - v)
    factors = []
    for i in reversed(range(len(weights))):
        factors.append((xs[i], err))
        if i > 0:
            s = torch.sigmoid(pres[i - 1])
            err = (err @ weights[i].transpose(-1, -2)) * s * (1 + pres[i - 1] * (1 - s))   # silu'(h)
    if max_grad_norm is not None:   # ||inp_j^T err_j||^2 = ||inp_j||^2 ||err_j||^2: no outer product is formed
        # min(1, c / norm) as c / sqrt(max(norm^2, c^2)): rsqrt is never taken near 0, where its derivative
        # overflows in float32 and 0 * inf = NaN (a first version, c * rsqrt(max(norm^2, 1e-30)), diverged so)
        norm2 = sum(inp.pow(2).sum(-1) * err.pow(2).sum(-1) for inp, err in factors)[..., None]   # (B, H, n, 1)
        scale = max_grad_norm * norm2.clamp_min(max_grad_norm ** 2).rsqrt()
        factors = [(inp, err * scale) for inp, err in factors]
    return factors[::-1]


def neural_memory(q, k, v, theta, eta, alpha, weights, momentum=None, chunk_size=16, max_grad_norm=None):
    """Same contract as `neural_memory_ref`. Inside a chunk with start state (W0, S0) and chunk-start gradients
    u_j = inp_j^T err_j, unrolling Eqs. 10 and 13 gives, for every position i of the chunk,

        W_i = beta_i W0 + f_i S0 - sum_{j <= i} G_ij u_j,   G = D_beta D_eta diag(theta),   f = D_beta a,

    with D_beta[i, m] = beta_i / beta_m and D_eta[m, j] = a_m / a_j (exp of segment sums, never a division).
    Reading x W_i then needs only (x inp^T) * G, a masked (C, C) product, never W_i itself. The gate matrices
    do not depend on the memory, so they are built for all chunks at once; only the gradients and the state
    update run in the loop over chunks, and the read follows it, for all chunks at once. The loop takes chunk c's
    pieces from lists split once (`unbind`): indexed inside it (`k[:, :, c]`), each piece's backward would build a
    zero tensor of the whole input, work quadratic in the chunks (a forward and backward at 1,024 tokens, 64 chunks,
    batch 32, MLP memory, on a CPU: 1.25 s indexed, 1.08 s unbound, the fastest of six each).

    Args:
        q, k, v: (B, H, T, K); theta, eta, alpha: (B, H, T) in [0, 1), eta > 0 (its log is taken: at 0 the
            values hold but eta's gradient is not finite; `NeuralMemory` keeps the gates in [1e-6, 1 - 1e-6])
        weights: tuple of (B, H, in, out), the memory at the start; momentum: the same shapes, or None (zeros)
        chunk_size: C; gradients for tokens t' .. t'+C-1 are taken at the weights before token t'
        max_grad_norm: None, or each token's gradient (all weights together) is scaled down to at most this norm
    Returns:
        y (B, H, T, out), the reads M_t(q_t), and the final (weights, momentum)
    """
    ### BEGIN SOLUTION
    B, H, T, _ = q.shape
    C = min(chunk_size, T)
    n, pad = -(-T // C), (-T) % C
    momentum = tuple(torch.zeros_like(W) for W in weights) if momentum is None else momentum
    # Padded tokens: zero inputs and theta = 0, log-gates 0; they come after every real token of the last
    # chunk, so the lower-triangular G and D_eta give them no say in it, and the state is read at its last
    # real row.
    q, k, v = (F.pad(x, (0, 0, 0, pad)).view(B, H, n, C, -1) for x in (q, k, v))
    theta, log_keep, log_eta = (F.pad(x, (0, pad)).view(B, H, n, C)
                                for x in (theta, torch.log1p(-alpha), torch.log(eta)))    # logs <= 0
    D_beta, D_eta = torch.exp(segsum(log_keep)), torch.exp(segsum(log_eta))       # (B, H, n, C, C)
    beta, a = torch.exp(log_keep.cumsum(-1))[..., None], torch.exp(log_eta.cumsum(-1))[..., None]
    G = (D_beta @ D_eta) * theta[..., None, :]                                    # lower triangular
    f = D_beta @ a                                                                # (B, H, n, C, 1)
    g_end = last_rows(G, T)[..., None]                                            # (B, H, n, C, 1)
    c_end = (theta * last_rows(D_eta, T))[..., None]                              # theta_j a_last / a_j
    b_end, f_end, a_end = (last_rows(z, T)[..., None] for z in (beta, f, a))      # (B, H, n, 1, 1)
    chunks = zip(*(z.unbind(2) for z in (k, v, g_end, c_end, b_end, f_end, a_end)))   # split once: see above
    starts = []                                   # per chunk: its start state and its gradients' factors
    for k_c, v_c, g_c, c_c, b_c, f_c, a_c in chunks:                              # the only loop: over chunks
        factors = memory_gradients(weights, k_c, v_c, max_grad_norm)
        starts.append((weights, momentum, factors))
        weights = tuple(b_c * W0 + f_c * S0 - inp.mT @ (g_c * err)
                        for W0, S0, (inp, err) in zip(weights, momentum, factors))
        momentum = tuple(a_c * S0 - inp.mT @ (c_c * err) for S0, (inp, err) in zip(momentum, factors))
    # The read needs only each chunk's start state and factors, so it runs after the loop, for every chunk at
    # once, layer by layer (the loop then carries the state alone: fewer, larger kernels).
    x = q                                                                         # (B, H, n, C, K)
    for i in range(len(weights)):
        W0 = torch.stack([W[i] for W, _, _ in starts], dim=2)                      # (B, H, n, in, out)
        S0 = torch.stack([S[i] for _, S, _ in starts], dim=2)
        inp = torch.stack([fs[i][0] for _, _, fs in starts], dim=2)                # (B, H, n, C, in)
        err = torch.stack([fs[i][1] for _, _, fs in starts], dim=2)                # (B, H, n, C, out)
        x = beta * (x @ W0) + f * (x @ S0) - ((x @ inp.mT) * G) @ err
        if i < len(weights) - 1:
            x = F.silu(x)
    return x.reshape(B, H, n * C, -1)[:, :, :T], (weights, momentum)
    ### END SOLUTION


# ---------------------------------------------------------------------------------------------------------
# The memory layer, the hybrid block, the model
# ---------------------------------------------------------------------------------------------------------

class NeuralMemory(nn.Module):
    """x (B, T, D) -> (B, T, D): q, k, v with a short causal conv and SiLU, unit-norm q and k, per-token
    gates, the memory update and read in fp32, then a norm and an output gate (paper §4.4)."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        D, H, K = c.d_model, c.n_heads, c.head_dim
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.conv = nn.Conv1d(3 * D, 3 * D, c.d_conv, groups=3 * D)       # causal: fed its past inputs
        self.gates = nn.Linear(D, 3 * H)                                         # theta, eta, alpha logits
        sizes = [K, K] if c.memory == "linear" else [K, c.memory_expand * K, K]
        self.memory_init = nn.ParameterList(nn.Parameter(torch.empty(H, i, o)) for i, o in zip(sizes, sizes[1:]))
        self.norm = RMSNorm(D)
        self.out_gate = nn.Linear(D, D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)

    def reset_memory_parameters(self):
        """Titans' own inits; called after any blanket init, which would overwrite them."""
        H = self.config.n_heads
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([0.0] * H + [math.log(9)] * H + [-5.0] * H))  # eta 0.9, alpha 0.007
        # The conv's own (PyTorch) init, not the blanket N(0, 0.02): through a 4-tap conv that would leave the
        # memory's output at init (mean square ~1e-6) under its RMSNorm's eps, so the branch would start mute.
        self.conv.reset_parameters()
        with torch.no_grad():
            for i, W in enumerate(self.memory_init):                            # last layer 0: M(x) = 0 at first
                nn.init.normal_(W, std=W.shape[1] ** -0.5) if i < len(self.memory_init) - 1 else nn.init.zeros_(W)

    def forward(self, x, state=None):
        """x (B, T, D), state None or (conv's last d_conv - 1 inputs (B, d_conv - 1, 3D), weights, momentum) from
        the previous piece of a stream -> (B, T, D), the state after the last token."""
        c = self.config
        B, T, D = x.shape
        qkv = self.qkv(x)
        tail, weights, momentum = (qkv.new_zeros(B, c.d_conv - 1, 3 * D), None, None) if state is None else state
        qkv = torch.cat([tail.to(qkv.dtype), qkv], dim=1)                                 # (B, d_conv-1+T, 3D)
        tail = qkv[:, T:].clone()                               # a copy: a view would keep all of qkv
        qkv = F.silu(self.conv(qkv.transpose(1, 2)).transpose(1, 2))                     # causal conv
        q, k, v = qkv.view(B, T, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)        # 3 x (B, H, T, K)
        f32 = torch.promote_types(x.dtype, torch.float32)
        # The gates in f32 and held off 0 and 1: the core takes log(1 - alpha) and log(eta), which are -inf where
        # a sigmoid has saturated (in bf16 alpha rounds to 1 from a logit of about 6 on), and the -inf made every
        # gradient NaN: that, not the inner loop, is how Titans diverged at the higher learning rates.
        gates = torch.sigmoid(self.gates(x).to(f32)).clamp(1e-6, 1 - 1e-6)
        theta, eta, alpha = gates.view(B, T, 3, c.n_heads).permute(2, 0, 3, 1)
        with torch.autocast(x.device.type, enabled=False):                               # memory maths in f32
            q, k, v = F.normalize(q.to(f32), dim=-1), F.normalize(k.to(f32), dim=-1), v.to(f32)
            if weights is None:
                weights = tuple(W.to(f32).expand(B, *W.shape) for W in self.memory_init)
            y, (weights, momentum) = neural_memory(q, k, v, c.theta_max * theta, eta, alpha, weights, momentum,
                                                   chunk_size=c.chunk_size, max_grad_norm=c.max_grad_norm)
        y = self.norm(y.transpose(1, 2).reshape(B, T, D).to(x.dtype))
        return self.proj(y * F.silu(self.out_gate(x))), (tail, weights, momentum)


class TitansBlock(Block):
    """The Transformer Block of attention.py with a memory branch beside its attention (MAG, paper Eq. 28):
    x + SWA(norm(x)) + memory(norm(x)), then the MLP. The paper combines the branches by multiplying their
    normalised outputs; we add them, the memory branch carrying its own output gate, which keeps the attention
    path as in a plain Transformer. With use_attention=False the attention branch is dropped (LMM)."""

    def __init__(self, config):
        super().__init__(config.attn)
        self.config = config
        self.memory = NeuralMemory(config)
        if not config.use_attention:
            self.attn = None                                   # LMM: the memory branch alone

    def forward(self, x, state=None):
        """x (B, T, D), state None or (the memory's state, the window's cache) from the previous piece of a
        stream -> (B, T, D), the state after the last token."""
        memory_state, cache = (None, None) if state is None else state
        h = self.norm1(x)
        y, memory_state = self.memory(h, memory_state)
        if self.attn is not None:
            a, cache = self.window_attention(h, cache)
            y = y + a
        x = x + y
        return x + self.mlp(self.norm2(x)), (memory_state, cache)

    def window_attention(self, h, cache=None):
        """The Block's causal sliding-window attention, continued across the pieces of a stream: the keys and
        values (before RoPE) of the last window - 1 tokens are carried in `cache`, and the piece's queries see
        them. RoPE counts positions from the first cached key: scores depend on positions only through their
        differences, so this equals one call on the whole stream, at any length.

        Args:
            h: (B, T, D); cache: None or keys, values (B, H, P, K) of the P <= window - 1 tokens before
        Returns:
            (B, T, D), the cache for the next piece
        """
        c, attn = self.config, self.attn
        B, T, D = h.shape
        q, k, v = attn.qkv(h).view(B, T, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, K)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        P = k.shape[2] - T
        keep = max(0, k.shape[2] - (c.window - 1))
        cache = (k[:, :, keep:].clone(), v[:, :, keep:].clone())    # copies: views would keep the piece
        q = F.pad(q, (0, 0, P, 0))                       # zero queries at the cached positions, dropped below
        if c.pos == "rope":
            cos, sin = rotary(torch.arange(P + T, device=h.device), c.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attention(q, k, v, causal=True, window=c.window)[:, :, P:]
        return attn.proj(y.transpose(1, 2).reshape(B, T, D)), cache


class Titans(nn.Module):
    """tokens (B, T) -> logits (B, T, V). Causal: the window is causal and the memory reads M_t after token t."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(TitansBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_weights(self, config.n_layers)
        for block in self.blocks:                                  # after the blanket init
            block.memory.reset_memory_parameters()
            nn.init.normal_(block.memory.proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))

    def forward(self, tokens, state=None, return_state=False):
        """tokens: (B, T); state: None, or the state `stream` returned, to continue a stream.
        Returns logits (B, T, V), and the state after the last token if return_state."""
        x = self.embed(tokens)
        states = []
        for block, s in zip(self.blocks, state or [None] * len(self.blocks)):
            x, s = block(x, s)
            states.append(s)
        logits = self.head(self.norm(x))
        return (logits, states) if return_state else logits

    def stream(self, tokens, state=None):
        """Read a stream in pieces: the logits of a piece and the state to pass with the next one. Pieces whose
        lengths are multiples of chunk_size (all but the last) give the same logits as one call on the whole:
        a chunk must not straddle two pieces, since its gradients are all taken at its start.

        Args:
            tokens: LongTensor (B, T), the next piece
            state: None at the start, else what the previous call returned: per layer the convolution's last
                d_conv - 1 inputs, the memory's weights and momentum, the window's last window - 1 keys and
                values (`state_size` floats per sequence)
        Returns:
            logits (B, T, V), state
        """
        return self(tokens, state, return_state=True)

    def state_size(self, seq_len):
        """Floats per sequence in `stream`'s state after seq_len tokens, per layer: memory weights and momentum,
        the conv's last d_conv - 1 inputs, and the window's key/value cache (2 * D per cached token, at most
        window - 1 tokens: the next token's own key and value complete its window)."""
        c = self.config
        memory = sum(W.numel() for W in self.blocks[0].memory.memory_init)
        window = 2 * c.d_model * min(seq_len, c.window - 1) if c.use_attention else 0
        return c.n_layers * (2 * memory + (c.d_conv - 1) * 3 * c.d_model + window)


if __name__ == "__main__":
    argparse.ArgumentParser(description="A smoke run of Titans: parameters, the logits' shape, the state size."
                            ).parse_args()
    if "OMP_NUM_THREADS" not in os.environ:   # README, "Threads": one thread unless told otherwise; on a machine
        torch.set_num_threads(1)              # with other work, threads waiting for busy cores run many times slower
    torch.set_flush_denormal(True)  # CPU: products of many decays underflow to subnormals, which are very slow
    torch.manual_seed(0)
    model = Titans(TitansConfig(vocab_size=32))
    tokens = torch.randint(0, 32, (2, 50))
    print(f"Titans (MAG): {sum(p.numel() for p in model.parameters()):,} parameters, logits "
          f"{tuple(model(tokens).shape)}, state {model.state_size(50):,} floats per sequence")
