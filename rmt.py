"""
The Recurrent Memory Transformer (RMT): attention inside a segment, a few memory vectors carried across.

RMT cuts a long sequence into segments of S tokens and runs an ordinary Transformer on each one, with M
memory slots added around it: the segment reads the previous memory at its start and, at its end, M write
slots attend to everything before them; their final hidden states become the next segment's memory. So inside
a segment the model can copy like attention, and across segments it must compress into M x D floats, like a
recurrent network. Cost is linear in the sequence length and the state is constant. It should length-
generalise on filtering tasks (babilong, flipflop; the README's claim C2) and sit between attention and an SSM on
copying (C4). Gradients flow back through all segments (BPTT): the loss is only on answers, often far from
the facts they need, so truncating the gradient cuts the signal (`bptt_depth` exists to show that).

Reading list
  1. Bulatov, Kuratov, Burtsev, "Recurrent Memory Transformer", arXiv 2207.06881 (Fig. 1: the decoder layout
     [read memory ; segment ; write memory]).
  2. Bulatov et al., "Scaling Transformer to 1M tokens and beyond with RMT", arXiv 2304.11062 (§4.1: the
     segment-count curriculum).
  3. Kuratov et al., "BABILong", arXiv 2406.10149; official code booydar/recurrent-memory-transformer
     (`modeling_rmt/language_modeling.py`: `MemoryCell`, `RecurrentWrapper`).
  4. lucidrains/recurrent-memory-transformer-pytorch: per-slot memory embeddings, normalised memory.

Glossary
  B batch, T time, D model width, S segment length, M memory slots, V vocabulary.
  memory (B, M, D)   carried from segment to segment; the first one is a learned parameter
  read slots         memory + a learned per-slot embedding, placed before the segment (positions 0..M-1)
  write slots        memory + another per-slot embedding, placed after it (positions M+S..2M+S-1, fixed even
                     when the last segment is shorter, so the write slots never see a shifted position)
  bptt_depth k       None: full BPTT; k: the memory is detached every k segments (gradient windows of k)
  stream             reads a long stream in pieces, carrying only the memory: constant memory at any length
"""
import argparse
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from attention import Block, RMSNorm, TransformerConfig, init_weights, rotary


@dataclass
class RMTConfig:
    vocab_size: int = 32      # V
    d_model: int = 64         # D
    n_layers: int = 2         # Transformer blocks, shared by every segment
    n_heads: int = 2          # H
    mlp_ratio: int = 4
    n_mem: int = 8            # M, memory slots: the dial of the state size (M * D floats)
    segment_len: int = 32     # S
    bptt_depth: int | None = None  # None = backpropagate through every segment
    pos: str = "rope"         # position encoding inside a segment: "rope" or "none"

    def __post_init__(self):
        if self.n_mem < 1 or self.segment_len < 1:
            raise ValueError(f"n_mem and segment_len must be >= 1, got {self.n_mem}, {self.segment_len}")
        if self.bptt_depth is not None and self.bptt_depth < 1:
            raise ValueError(f"bptt_depth must be >= 1 or None, got {self.bptt_depth}")
        self.block = TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                                       n_heads=self.n_heads, mlp_ratio=self.mlp_ratio, pos=self.pos, causal=True)


class RMT(nn.Module):
    """tokens (B, T) -> logits (B, T, V), segment by segment with the memory carried."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c.block) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model)
        self.mem_norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.memory_init = nn.Parameter(torch.empty(c.n_mem, c.d_model))
        self.read_emb = nn.Parameter(torch.empty(c.n_mem, c.d_model))     # lets the slots differ
        self.write_emb = nn.Parameter(torch.empty(c.n_mem, c.d_model))
        init_weights(self, c.n_layers)                                     # N(0, 0.02): the embedding scale
        with torch.no_grad():                                              # after the blanket init:
            self.mem_norm.weight.fill_(0.02)                               # memory on that scale too

    def positions(self, s, device):
        """RoPE positions of [read slots ; s tokens ; write slots]; the write slots sit after a full segment."""
        M, S = self.config.n_mem, self.config.segment_len
        arange = lambda n: torch.arange(n, device=device)  # noqa: E731  (made on the device: no copy, so a
        return torch.cat([arange(M), M + arange(s), M + S + arange(M)])  # CUDA graph can capture it)

    def segment_step(self, tokens, memory):
        """One segment: the recurrence step. The Blocks read [memory + read_emb ; embed(tokens) ; memory +
        write_emb] (2M + s positions, causal; RoPE at `positions(s)` when pos="rope", none when pos="none"); the
        logits come from the segment's s outputs (after the final norm and the head), the next memory from the M
        outputs at the write slots, normalised by mem_norm.

        Args:
            tokens: (B, s) with s <= S, memory: (B, M, D)
        Returns:
            logits (B, s, V), next memory (B, M, D)
        """
        c = self.config
        ### BEGIN SOLUTION
        M, s = c.n_mem, tokens.shape[1]
        x = torch.cat([memory + self.read_emb, self.embed(tokens), memory + self.write_emb], dim=1)  # (B, 2M+s, D)
        rope = rotary(self.positions(s, tokens.device), c.block.head_dim) if c.pos == "rope" else None
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x[:, M:M + s])), self.mem_norm(x[:, M + s:])
        ### END SOLUTION

    def forward(self, tokens, memory=None, return_memory=False):
        """tokens: (B, T), any T (the last segment may be short); memory: (B, M, D) to continue a stream.
        Returns logits (B, T, V), and the final memory if return_memory."""
        c = self.config
        if memory is None:
            memory = self.memory_init.expand(tokens.shape[0], -1, -1)
        logits = []
        for i, seg in enumerate(tokens.split(c.segment_len, dim=1)):
            if c.bptt_depth is not None and i > 0 and i % c.bptt_depth == 0:
                memory = memory.detach()                                   # truncated BPTT
            out, memory = self.segment_step(seg, memory)
            logits.append(out)
        logits = torch.cat(logits, dim=1)
        return (logits, memory) if return_memory else logits

    def stream(self, tokens, state=None):
        """Read a stream in pieces: the logits of a piece and the memory to pass with the next one. Pieces whose
        lengths are multiples of S (all but the last) give the same logits as one call on the whole.

        Args:
            tokens: LongTensor (B, T), the next piece
            state: None at the start, else the memory (B, M, D) that the previous call returned
        Returns:
            logits (B, T, V), memory (B, M, D)
        """
        return self(tokens, state, return_memory=True)

    def state_size(self, seq_len=None):
        """Floats per sequence carried from one segment (or `stream` call) to the next: the memory, M * D.
        Constant in the length. (Reading a segment also holds its key/value cache, 2 * D per layer for each of
        its 2M + S positions, but that is working memory, dropped before the next segment.)"""
        c = self.config
        return c.n_mem * c.d_model


if __name__ == "__main__":
    argparse.ArgumentParser(description="A smoke run of RMT: parameters, logits' shape, state size.").parse_args()
    if "OMP_NUM_THREADS" not in os.environ:   # README, "Threads": one thread unless told otherwise; on a machine
        torch.set_num_threads(1)              # with other work, threads waiting for busy cores run many times slower
    torch.manual_seed(0)
    model = RMT(RMTConfig(vocab_size=32))
    tokens = torch.randint(0, 32, (2, 100))
    print(f"RMT: {sum(p.numel() for p in model.parameters()):,} parameters, logits {tuple(model(tokens).shape)}, "
          f"state {model.state_size():,} floats per sequence")
