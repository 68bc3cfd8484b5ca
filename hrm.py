"""
HRM: the Hierarchical Reasoning Model, the "depth" end of the bench.

Some inputs are small but need many sequential steps of computation: finding the one path through a maze
(the bench's `maze` task). A fixed stack of layers can only do as many steps as it has layers. HRM re-uses a few
layers many times instead: a fast low-level module updates its state several times for every update of a
slow high-level module, and the pair runs again and again over the same input, so the depth grows with
compute, not with parameters; at test time it can simply run longer. It pays in compute per example, and on
the bench's long streams it has no memory across the sequence beyond attention's (the README's claim C3).

Two tricks make it trainable. The one-step gradient: only the last low- and high-level update of a pass are
on the autograd graph, everything before runs under no_grad, so training memory does not grow with the number
of cycles (the paper justifies it by the implicit-function theorem at a fixed point; TRM shows the fixed point
is not reached and that back-propagating through the whole last cycle trains much better: `gradient`).
Deep supervision: the pass (a "segment") is repeated, each segment gets its own loss, and the state carried
from one segment to the next is detached, so each segment learns to improve on the last one's answer.
The paper takes an optimizer step after every segment (the deep-supervision pseudo-code of its §2), so the
later segments of an example run on weights the earlier ones have already updated; the official code carries
the state across batches and runs one segment per step. Here the bench takes one optimizer step per batch, on
the mean of the segment losses (compare.py's `train`), so HRM sees the same examples and takes the same steps
as every other model: with the carry detached, that step follows the mean of the per-segment gradients, all
taken at the same weights.
Not included: the ACT halting head (evaluation runs a fixed number of segments, as the official code does),
the puzzle embedding, EMA of the weights.

Reading list
  1. Wang et al., "Hierarchical Reasoning Model", arXiv 2506.21734 (§2: the modules, the one-step gradient,
     deep supervision; §3.1: Maze-Hard).
  2. Jolicoeur-Martineau, "Less is More: Recursive Reasoning with Tiny Networks" (TRM), arXiv 2510.04871
     (§2.3, §3.1: the fixed point is not reached; §4: back-propagate through the last whole cycle).
  3. sapientinc/HRM `models/hrm/hrm_act_v1.py` (official); SamsungSAILMontreal/TinyRecursiveModels.
  4. ARC Prize, "The Hidden Drivers of HRM's Performance on ARC-AGI" (2025): the outer loop of supervised
     segments, not the high/low hierarchy, carries most of the gain.

Glossary (B, T, D, H, V as in attention.py: H is the number of attention heads, as in every file)
  x          the embedded input (B, T, D), on the same (unit) scale as the states, since it is added to them
  z_H, z_L   the high- and low-level states (B, T, D): the carry from one segment to the next. The subscripts
             are the paper's names of the two levels, as in H_cycles and L_cycles; they are not dimensions
  f_H, f_L   the high- and low-level modules, `high` and `low` here (a few attention.Blocks each):
             z_L <- f_L(z_L + z_H + x)      z_H <- f_H(z_H + z_L)       (input injection by addition)
  H_cycles   high-level updates per segment                 (the paper's N; N is the state size in ssm.py)
  L_cycles   low-level updates per high-level update        (the paper's T; T is the sequence length here)
  segment    H_cycles * L_cycles low-level and H_cycles high-level updates, in the order
             low..low high low..low high ...; logits = head(z_H)
"""
import argparse
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from attention import Block, RMSNorm, TransformerConfig, init_weights, rotary


@dataclass
class HRMConfig:
    vocab_size: int = 32     # V
    d_model: int = 64        # D
    n_layers: int = 2        # Blocks in all, half per level: the parameters of a Transformer of n_layers
    n_heads: int = 2         # H (attention heads)
    mlp_ratio: int = 4       # MLP width is mlp_ratio * D
    pos: str = "rope"        # positions inside the Blocks: "rope" or "none"
    causal: bool = True      # True on the sequence tasks; False on grid puzzles (the maze)
    H_cycles: int = 2        # high-level updates per segment (the paper's N)
    L_cycles: int = 2        # low-level updates per high-level update (the paper's T)
    segments: int = 2        # supervised segments per training example (deep supervision)
    eval_segments: int | None = None  # segments at test time; None: as many as in training
    gradient: str = "one_step"  # "one_step": the last low and high update on the graph (HRM); "last_cycle" (TRM)

    def __post_init__(self):
        if self.n_layers < 2:
            raise ValueError(f"HRM needs n_layers >= 2 (one Block per level), got {self.n_layers}")
        if min(self.H_cycles, self.L_cycles, self.segments) < 1:
            raise ValueError("H_cycles, L_cycles and segments must be >= 1")
        if self.gradient not in ("one_step", "last_cycle"):
            raise ValueError(f"gradient must be 'one_step' or 'last_cycle', not {self.gradient!r}")
        self.block = TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                                       n_heads=self.n_heads, mlp_ratio=self.mlp_ratio, pos=self.pos,
                                       causal=self.causal)


# ---------------------------------------------------------------------------------------------------------
# The two modules
# ---------------------------------------------------------------------------------------------------------

class ReasoningModule(nn.Module):
    """f_H or f_L, one level: add the injection to the state, run the Blocks, normalise.

    The Blocks are attention.py's pre-norm ones; the official code uses post-norm Blocks instead. Either way the
    state leaves every update at unit scale (here: the final RMSNorm), or it would grow from cycle to cycle."""

    def __init__(self, config, n_blocks):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config.block) for _ in range(n_blocks))
        self.norm = RMSNorm(config.d_model)

    def forward(self, z, injection, rope=None):
        """z, injection: (B, T, D) -> the new state (B, T, D)"""
        h = z + injection
        for block in self.blocks:
            h = block(h, rope)
        return self.norm(h)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

class HRM(nn.Module):
    """tokens (B, T) -> logits (B, T, V) after `eval_segments` segments; `segment_logits` for training."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.low = ReasoningModule(config, config.n_layers - config.n_layers // 2)     # f_L
        self.high = ReasoningModule(config, config.n_layers // 2)                      # f_H
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # The states start from fixed random vectors, the same at every position (HRM's H_init / L_init).
        self.register_buffer("z_init", torch.randn(2, config.d_model).clamp(-2, 2))
        init_weights(self, config.n_layers)
        # After the blanket init, which would overwrite it: the input is added to unit-scale states, so it needs
        # unit scale too (the official code scales an embedding of std 1/sqrt(D) by sqrt(D)).
        nn.init.normal_(self.embed.weight, std=1.0)

    def schedule(self):
        """The updates of one segment in order, and how many of the last ones are on the autograd graph."""
        c = self.config
        updates = (["low"] * c.L_cycles + ["high"]) * c.H_cycles       # low low high low low high for 2 x 2
        n_grad = 2 if c.gradient == "one_step" else c.L_cycles + 1     # the last low and high, or the last cycle
        return updates, n_grad

    def segment(self, x, z_H, z_L, rope=None):
        """One segment: the updates of `schedule()` in order, z_L <- f_L(z_L, z_H + x) for "low" and
        z_H <- f_H(z_H, z_L) for "high". Only the last n_grad updates are on the autograd graph; the ones before run
        with gradients off (when gradients are on at all), so training memory does not grow with the cycles.

        Args:
            x: (B, T, D) the embedded input; z_H, z_L: (B, T, D) the carry; rope: RoPE tables or None
        Returns:
            logits = head(z_H) (B, T, V), and z_H, z_L detached: the next segment's carry, which no gradient crosses
        """
        ### BEGIN SOLUTION
        updates, n_grad = self.schedule()
        for i, which in enumerate(updates):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= len(updates) - n_grad):
                if which == "low":
                    z_L = self.low(z_L, z_H + x, rope)       # the low level sees the plan z_H and the input x
                else:
                    z_H = self.high(z_H, z_L, rope)          # the high level sees only the low level's result
        return self.head(z_H), z_H.detach(), z_L.detach()
        ### END SOLUTION

    def start(self, tokens):
        """The embedded input, the RoPE tables and the initial states for these tokens."""
        B, T = tokens.shape
        x = self.embed(tokens)
        rope = rotary(torch.arange(T, device=tokens.device), self.config.block.head_dim) \
            if self.config.pos == "rope" else None
        z_H, z_L = (z.to(x.dtype).expand(B, T, -1) for z in self.z_init)
        return x, rope, z_H, z_L

    def segment_logits(self, tokens, segments=None):
        """Deep supervision: the logits of every segment, a list of (B, T, V); put a loss on each. The carry is
        detached between segments, so each loss trains one segment only."""
        x, rope, z_H, z_L = self.start(tokens)
        out = []
        for _ in range(segments or self.config.segments):
            logits, z_H, z_L = self.segment(x, z_H, z_L, rope)
            out.append(logits)
        return out

    def forward(self, tokens, segments=None):
        """tokens: LongTensor (B, T) -> logits (B, T, V) of the last of `segments` segments (default: the
        config's eval_segments, or its training segments)."""
        c = self.config
        return self.segment_logits(tokens, segments or c.eval_segments or c.segments)[-1]

    def state_size(self, seq_len):
        """Floats per sequence kept at inference on a causal task: a key/value cache of 2 * D per token for
        every Block call of every segment (each call attends over its own input). Nothing more: a new token's two
        states start from their initial values, and it reads the earlier tokens' only through those keys and values."""
        c = self.config
        n_low, n_high = c.n_layers - c.n_layers // 2, c.n_layers // 2
        calls = (n_low * c.L_cycles + n_high) * c.H_cycles * (c.eval_segments or c.segments)
        return 2 * c.d_model * seq_len * calls


if __name__ == "__main__":
    argparse.ArgumentParser(description="A smoke run of HRM: parameters, the logits' shape.").parse_args()
    if "OMP_NUM_THREADS" not in os.environ:   # README, "Threads": one thread unless told otherwise; on a machine
        torch.set_num_threads(1)              # with other work, threads waiting for busy cores run many times slower
    model = HRM(HRMConfig(vocab_size=5, n_layers=4, causal=False))   # as on a maze (here a 7x7 grid of 5 kinds
    tokens = torch.randint(0, 5, (2, 49))                             # of cell, read both ways): 2 layers a module
    print(f"HRM: {sum(p.numel() for p in model.parameters()):,} parameters, logits {tuple(model(tokens).shape)} "
          f"for tokens {tuple(tokens.shape)}")
