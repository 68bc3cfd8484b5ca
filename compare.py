"""
compare.py: train every model on every task at matched size, and show when filtering beats copying.

    python compare.py                    # `full` on a GPU, `quick` on a CPU (it says which)
    python compare.py --preset smoke     # every model and task for a few steps: checks the plumbing
    python compare.py --preset depth     # the maze: recurrent depth (HRM) against a fixed-depth Transformer
    python compare.py --models attention,ssm --tasks copy,recall --seeds 0,1,2
    python compare.py --bench            # cost against length (untrained), and the cost of a training step
    python compare.py --scale            # train at <= 256 tokens, then read streams of up to 11M tokens

How the comparison is made fair, and where each rule lives:
  1. The same budget for every model on a task: steps, batch, training lengths and their curriculum, optimiser
     and schedule (`Budget`, `PRESETS`, `train`).
  2. Matched size: one width and depth per task, parameter counts within +-10% of the Transformer's
     (`PRESETS[...]["size"]`; tests/test_compare.py checks every model on every task of the full and depth presets).
  3. Each model at its own best learning rate: the same log-spaced grid on the first seed, the best validation
     accuracy wins (ties: the lower validation loss), never a rate where a run diverged (`make_specs`,
     `best_runs`); a choice on the edge of the grid is marked, since a better rate may lie outside.
  4. Several seeds on the headline cells, at the chosen rate, reported as mean +- half the spread (`seeded`).
  5. The same questions for everyone: test sets are drawn from fixed seeds (`run_one`, `evaluate`).
  6. Cost in the open: parameters, state floats, steps, examples and wall time of every cell (`report`'s Runs table).

Runs are stored in runs/<preset>.json (untracked) as each finishes and reused only while their whole spec is
unchanged: a stopped command resumes, a changed setting re-runs what it changes, and commands may share the
folder (`Store`). The committed results live in results/reference/, which the bench never reads.
"""
import argparse
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import reprlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode   # (torch's own tracing and memory tools use these two)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from tqdm import tqdm

import attention
import hrm
import rmt
import ssm
import tasks
import titans

ROOT = os.path.dirname(os.path.abspath(__file__))
PROTOCOL = 7   # bumped when training or scoring changes meaning: stored runs of another protocol are re-run
# Subnormal floats (products of many decays in the recurrent cores) are up to 100x slower on CPUs; zero them.
torch.set_flush_denormal(True)

# ---------------------------------------------------------------------------------------------------------
# Training and evaluation: usable from Python with any model and any object that follows tasks.py's contract
# ---------------------------------------------------------------------------------------------------------


def autocast(device, cache=True):
    """bf16 autocast on CUDA, plain fp32 elsewhere. (A CUDA graph's capture needs the cast-weights cache off.)"""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda",
                          cache_enabled=cache)


def stages(train_lengths):
    """[lo, hi] -> [[lo, hi]]; a curriculum [[lo1, hi1], [lo2, hi2], ...] stays as it is."""
    return [list(train_lengths)] if isinstance(train_lengths[0], int) else [list(s) for s in train_lengths]


def all_logits(model, x):
    """The logits to train on: HRM's one per segment (deep supervision), every other model's one."""
    return model.segment_logits(x) if hasattr(model, "segment_logits") else [model(x)]


@functools.cache
def side_stream(device, use="warm-up"):
    """One side stream per GPU and use (warm-ups, captures), made once: cuBLAS keeps a workspace for every stream it
    runs on, and torch.cuda.graph's own capture stream is made on whichever GPU is current at first use."""
    return torch.cuda.Stream(device)


CAPTURING = threading.Lock()


def capture(fn, inputs, device, pool=None, undo=None):
    """fn(*inputs) recorded as a CUDA graph, after one warm-up call on a side stream (lazy inits) and undo() of what
    it changed. Returns the graph and the outputs it overwrites at each replay."""
    with CAPTURING:   # threads reading streams side by side (read_streams) share the side streams: one at a time
        side = side_stream(device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        if undo:
            undo()
        # Only kernels launched on the capture stream join the graph; thread_local keeps other threads' unsafe calls
        # meanwhile (a synchronise, a cudaMalloc) from spoiling the capture. (Entering the capture waits for the GPU.)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool, stream=side_stream(device, "capture"), capture_error_mode="thread_local"):
            outputs = fn(*inputs)
    return graph, outputs


class StepGraphs:
    """The whole training step (forward, loss, backward, clipping, AdamW) replayed as one CUDA graph per batch shape:
    the models are so small that an eager step is all kernel-launch overhead. The lr is a tensor the graphs read.
    The warm-up before a capture is undone (weights and optimiser state put back), so the graphs learn what the eager
    loop learns (tested on CUDA). One memory pool serves all graphs: what they read lives outside it, and the loss
    they return is overwritten by the next call.
    A curriculum draws many lengths, each a capture, so when task and model are causal the batch is padded on the
    right to a multiple of `bucket` with unscored targets: logits at t see only tokens <= t, so loss and gradients
    are unchanged (tested for every model), and 32..256 tokens make 8 graphs, not 225."""

    def __init__(self, step, model, opt, bucket=None):
        self.step, self.model, self.opt, self.bucket = step, model, opt, bucket
        self.graphs, self.pool = {}, torch.cuda.graph_pool_handle()

    def __call__(self, x, y):
        if self.bucket:
            pad = -x.shape[1] % self.bucket
            x, y = F.pad(x, (0, pad)), F.pad(y, (0, pad), value=tasks.IGNORE)
        if x.shape not in self.graphs:
            self.capture(x, y)
        graph, static_x, static_y, loss = self.graphs[x.shape]
        static_x.copy_(x.pin_memory(), non_blocking=True)     # pinned: the copy does not wait for the GPU
        static_y.copy_(y.pin_memory(), non_blocking=True)
        graph.replay()
        return loss

    def capture(self, x, y):
        device = next(self.model.parameters()).device
        static_x, static_y = x.to(device), y.to(device)
        state = [*self.model.parameters(), *self.model.buffers()]
        saved = [t.detach().clone() for t in state]
        saved_opt = {p: {k: v.clone() for k, v in s.items()} for p, s in self.opt.state.items()}

        @torch.no_grad()
        def undo():
            for t, s in zip(state, saved):
                t.copy_(s)
            for p, s in self.opt.state.items():                 # a state made by the warm-up starts at zero
                for k, v in s.items():
                    v.copy_(saved_opt[p][k]) if p in saved_opt else v.zero_()
            self.opt.zero_grad(set_to_none=True)                # the graph's backward makes its own gradients
        graph, loss = capture(self.step, (static_x, static_y), device, self.pool, undo)
        self.graphs[x.shape] = (graph, static_x, static_y, loss)


def train(model, task, steps, batch_size, lr, train_lengths, device="cpu", seed=0, weight_decay=0.1,
          warmup=0.1, clip=1.0, progress=False, graphs=True, check_every=200):
    """AdamW, the lower of a linear warm-up (10% of the steps) and a cosine decay, gradient clipping. Each batch
    draws its length uniformly from train_lengths = [lo, hi], or from the stage of a curriculum [[lo, hi], ...] that
    the step falls in (equal shares). HRM: one loss per segment (deep supervision), one step on their mean.
    On CUDA with graphs=True every step is replayed from a CUDA graph (`StepGraphs`). Losses stay on the device and
    are read every `check_every` steps. Returns the losses, ending at the first non-finite one if it diverged."""
    model.to(device).train()
    cuda = torch.device(device).type == "cuda"
    fast = graphs and cuda
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    rate = torch.tensor(float(lr), device=device) if fast else lr   # a graph reads the rate from a tensor
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=rate, betas=(0.9, 0.98),
                            fused=cuda, capturable=fast)       # fused: fewer kernels; capturable: in a graph
    n_warm = max(1, int(warmup * steps))
    schedule = lambda s: min((s + 1) / n_warm, 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731

    def step(x, y):
        with autocast(device, cache=not fast):
            outputs = all_logits(model, x)
        loss = sum(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=tasks.IGNORE)
                   for logits in outputs) / len(outputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    causal = getattr(task, "causal", True) and getattr(getattr(model, "config", None), "causal", True)
    run_step = StepGraphs(step, model, opt, bucket=32 if causal else None) if fast else step
    g = torch.Generator().manual_seed(1_000_003 * seed + 1)       # the training data stream
    sample = getattr(task, "sample_train", task.sample)           # the maze trains on a fixed, small set
    plan = stages(train_lengths)
    losses, read = torch.zeros(steps, device=device), 0
    for s in tqdm(range(steps), desc="train", leave=False, disable=not progress):
        lo, hi = plan[s * len(plan) // steps]
        x, y = sample(batch_size, int(torch.randint(lo, hi + 1, (1,), generator=g)), g, "cpu" if fast else device)
        if fast:
            rate.fill_(lr * schedule(s))                           # every param group holds this tensor
        else:
            for group in opt.param_groups:
                group["lr"] = lr * schedule(s)
        losses[s] = run_step(x, y)
        if s + 1 == steps or (s + 1) % check_every == 0:           # the only host sync of the loop
            bad = (~torch.isfinite(losses[read:s + 1])).nonzero()
            if len(bad):
                return losses[:read + int(bad[0]) + 1].tolist()
            read = s + 1
    return losses.tolist()


@torch.no_grad()
def generate(model, prompt, n_new):
    """Greedy decoding: append the argmax token n_new times. Recomputes the prefix each step (tiny scale)."""
    seq = prompt
    for _ in range(n_new):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


def test_batches(task, length, n_examples, device="cpu", seed=0, max_tokens=2 ** 16):
    """The test examples of one length (the task's knob) as (x, y, depth) batches of about max_tokens // length;
    depth, where the task gives one, is the deciding fact's relative depth (BABILong) or the squares on the path (the
    maze), else None: made once with the examples. The same seed, the same examples."""
    g = torch.Generator().manual_seed(seed)
    batch, seen = max(1, min(n_examples, max_tokens // length)), 0
    while seen < n_examples:
        b = min(batch, n_examples - seen)
        if hasattr(task, "sample_with_depth"):
            yield task.sample_with_depth(b, length, g, device)
        else:
            x, y = task.sample(b, length, g, device)
            yield x, y, task.path_lengths(x) if hasattr(task, "path_lengths") else None
        seen += b


PATH_BIN = 20   # the maze's exact match is kept by path length in bins of this many squares (10x10: up to 199)


@torch.no_grad()
def evaluate(model, task, length, n_examples, device="cpu", seed=0, max_tokens=2 ** 16, segments=None,
             batches=None):
    """Accuracy at one length: token_acc (scored positions right), loss (their mean cross-entropy), exact (every
    scored position of an example right; None if no example is scored), and where the task defines them gen_exact
    (greedy generation: copy), by_depth (exact match in four bins of the deciding fact's depth: babilong) or by_path
    (the maze: {lowest path length of a PATH_BIN bin: [exact, examples]}). `segments`: the test-time depth (HRM's
    segments, the looped Transformer's loops). `batches`: test_batches' examples made before, to read them again."""
    knob = "segments" if hasattr(model, "segment_logits") else "loops"
    forward = model if segments is None else lambda x: model(x, **{knob: segments})
    model.to(device).eval()
    right = total = exact = scored_examples = seen = gen_exact = loss = 0
    depth_right, depth_total = torch.zeros(4), torch.zeros(4)
    path_right, path_total = collections.Counter(), collections.Counter()
    for x, y, depth in batches or test_batches(task, length, n_examples, device, seed, max_tokens):
        with autocast(device):
            logits = forward(x).float()
        pred = logits.argmax(-1)
        loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=tasks.IGNORE, reduction="sum").item()
        scored = y != tasks.IGNORE
        ok = (pred == y) & scored
        row_ok = (ok.sum(1) == scored.sum(1)) & scored.any(1)   # an example with nothing scored is not a match
        right, total = right + ok.sum().item(), total + scored.sum().item()
        exact, scored_examples = exact + row_ok.sum().item(), scored_examples + scored.any(1).sum().item()
        if depth is not None and hasattr(task, "sample_with_depth"):
            bins = (depth * 4).long().clamp(0, 3).cpu()
            depth_right += torch.bincount(bins[row_ok.cpu()], minlength=4)
            depth_total += torch.bincount(bins, minlength=4)
        elif depth is not None:   # the maze: its paths' squares
            bins = (depth // PATH_BIN * PATH_BIN).tolist()
            path_total.update(bins)
            path_right.update(b for b, ok in zip(bins, row_ok.tolist()) if ok)
        if hasattr(task, "prompt_length"):
            p = task.prompt_length(length)
            with autocast(device):
                out = generate(model, x[:, :p], length)
            gen_exact += (out == y[:, p - 1:p - 1 + length]).all(1).sum().item()
        seen += len(x)
    loss = loss / max(total, 1)      # inf or nan from a model whose outputs overflow: stored as null (strict JSON)
    result = {"token_acc": right / max(total, 1), "loss": loss if math.isfinite(loss) else None,
              "exact": exact / scored_examples if scored_examples else None}
    if hasattr(task, "prompt_length"):
        result["gen_exact"] = gen_exact / seen
    if hasattr(task, "sample_with_depth"):
        result["by_depth"] = [r / t if t else None for r, t in zip(depth_right.tolist(), depth_total.tolist())]
    if hasattr(task, "path_lengths"):   # (keys are strings, as JSON stores them)
        result["by_path"] = {str(b): [path_right[b] / n, n] for b, n in sorted(path_total.items())}
    return result


# ---------------------------------------------------------------------------------------------------------
# Models, budgets and presets
# ---------------------------------------------------------------------------------------------------------

MODELS = {  # name -> (model class, config class, options that define the variant)
    "attention": (attention.Transformer, attention.TransformerConfig, {}),
    "attention_nope": (attention.Transformer, attention.TransformerConfig, {"pos": "none"}),
    "attention_swa": (attention.Transformer, attention.TransformerConfig, {"window": 32}),
    "ssm": (ssm.Mamba, ssm.MambaConfig, {}),
    "rmt": (rmt.RMT, rmt.RMTConfig, {}),
    "titans": (titans.Titans, titans.TitansConfig, {}),
    "titans_lmm": (titans.Titans, titans.TitansConfig, {"use_attention": False}),
    "hrm": (hrm.HRM, hrm.HRMConfig, {}),
    "hrm_last_cycle": (hrm.HRM, hrm.HRMConfig, {"gradient": "last_cycle"}),   # TRM's gradient
    # HRM's control (depth preset): the Blocks looped 4 times, as HRM trains 4 segments (the same test-time counts)
    "attention_looped": (attention.Transformer, attention.TransformerConfig, {"loops": 4}),
}


def build_model(name, vocab_size, **overrides):
    """A fresh model: tokens (B, T) -> logits (B, T, V). `overrides` set fields of the model's config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model_class, config_class, variant = MODELS[name]
    unknown = [k for k in overrides if k not in config_class.__dataclass_fields__]
    if unknown:
        raise ValueError(f"model {name!r} has no option {', '.join(unknown)}")
    return model_class(config_class(vocab_size=vocab_size, **{**variant, **overrides}))


def is_grid(task_name):
    """Whether a task is a grid puzzle (the maze), read bidirectionally, rather than a next-token sequence."""
    return not getattr(tasks.TASKS[task_name], "causal", True)


def reads_grids(name):
    """Whether a model can run bidirectionally, as grid tasks (the maze) need: attention and HRM can."""
    return "causal" in MODELS[name][1].__dataclass_fields__


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@dataclass
class Budget:
    """What one task gets: the same for every model that runs it."""
    train: list                 # training lengths [lo, hi] (each batch draws one), or a curriculum [[lo, hi], ...]
    test: list                  # test lengths (the first usually the longest training length)
    steps: int                  # optimiser steps
    options: dict = field(default_factory=dict)        # the task's constructor options
    models: list = None         # the models that run it (default: the preset's)
    seeded: list = field(default_factory=list)         # headline models: every seed, not only the first
    size: dict = field(default_factory=dict)           # the task's model size, over the preset's
    model_options: dict = field(default_factory=dict)  # model -> options of its own (HRM's training segments)
    segments: list = None       # HRM's test-time segments to evaluate
    dial: dict = field(default_factory=dict)           # model -> {option: [values]}: other state sizes


LRS = [2e-4, 1e-3, 5e-3, 2.5e-2]   # the sweep: four rates 5x apart (two decades), the same for every model
CURRICULUM = [[32, 64], [64, 128], [128, 256]]   # lengths for the long-stream tasks, in three stages
BABI_CURRICULUM = [[33, 64], [64, 128], [128, 256], [256, 512]]   # --scale's BABILongs: 2 up to 16 RMT segments
HARD_RECALL = dict(vocab_size=512, random_non_queries=True, distinct_values=True)   # Zoology's MQAR settings
SEQUENCE_MODELS = ["attention", "ssm", "rmt", "titans"]
HRM_SEGMENTS = {"hrm": dict(segments=4), "hrm_last_cycle": dict(segments=4)}   # the depth preset's training depth
PRESETS = {
    "smoke": dict(  # the plumbing, not the science: every model and task, a few steps, one lr
        models=[m for m in MODELS if m != "attention_looped"], size=dict(d_model=32, n_layers=2), batch_size=16,
        lrs=[3e-3], seeds=[0], eval_examples=16, tasks={
            "copy": Budget(train=[2, 6], test=[6, 12], steps=15),
            "mqar": Budget(train=[32, 32], test=[32, 64], steps=15, options=dict(n_pairs=4, vocab_size=64)),
            "recall": Budget(train=[[2, 3], [3, 4]], test=[2, 4], steps=15, options=dict(vocab_size=16),
                             dial={"ssm": {"d_state": [4]}}),
            "flipflop": Budget(train=[32, 32], test=[32, 128], steps=15),
            "selective_copy": Budget(train=[24, 24], test=[24, 64], steps=15, options=dict(n_data=4)),
            "babilong": Budget(train=[32, 32], test=[32, 96], steps=15, options=dict(max_facts=4)),
            "maze": Budget(train=[2, 2], test=[2, 3], steps=15, segments=[1, 2], options=dict(canvas=7, n_train=20),
                           models=list(MODELS)),
            "sudoku": Budget(train=[1, 2], test=[2], steps=15, segments=[1, 2], options=dict(n_train=5),
                             models=["attention", "attention_looped", "hrm"]),   # (the maze runs every grid model)
        }),
    "quick": dict(  # a 2-core CPU in minutes: one task at each end of the trade-off, three seeds each
        models=["attention", "ssm"], size=dict(d_model=64, n_layers=2), batch_size=64, lrs=LRS[1:], seeds=[0, 1, 2],
        eval_examples=256, tasks={
            "copy": Budget(train=[2, 8], test=[8, 16], steps=800, seeded=["attention", "ssm"]),
            "flipflop": Budget(train=[32, 32], test=[32, 256, 1024], steps=150, seeded=["attention", "ssm"]),
        }),
    "full": dict(  # one GPU; the sequence tasks, each at both ends of the trade-off (the maze: --preset depth)
        models=["attention", "ssm", "rmt", "titans", "hrm"], size=dict(d_model=64, n_layers=2), batch_size=128,
        lrs=LRS, seeds=[0, 1, 2], eval_examples=256, tasks={
            # each stage keeps the shorter strings (without, attention forgot short copies while learning long ones);
            # 6,000 steps take attention through its phase change at 16 letters
            "copy": Budget(train=[[2, 6], [2, 11], [2, 16]], test=[8, 16, 32, 64], steps=6000,
                           models=SEQUENCE_MODELS, seeded=SEQUENCE_MODELS),
            "recall": Budget(train=[[2, 8], [8, 16], [16, 32]], test=[4, 8, 16, 32], steps=4000, options=HARD_RECALL,
                             models=SEQUENCE_MODELS, seeded=SEQUENCE_MODELS,
                             dial={"ssm": {"d_state": [4, 64]}, "rmt": {"n_mem": [2, 32]},
                                   "titans": {"memory": ["linear"], "memory_expand": [4]}}),
            "flipflop": Budget(train=CURRICULUM, test=[256, 1024, 4096], steps=500, seeded=SEQUENCE_MODELS + ["hrm"]),
            "selective_copy": Budget(train=[64, 64], test=[64, 256], steps=600, options=dict(n_data=8),
                                     models=SEQUENCE_MODELS),
            "babilong": Budget(train=CURRICULUM, test=[256, 1024, 4096], steps=500, models=SEQUENCE_MODELS,
                               seeded=SEQUENCE_MODELS),
        }),
    "depth": dict(  # one GPU: recurrent depth (HRM, a looped Transformer) against a fixed-depth Transformer of the
        # same size, on mazes and on Sudoku graded by the rounds of singles it needs
        models=["attention", "attention_looped", "hrm", "hrm_last_cycle"],
        size=dict(d_model=128, n_heads=4, n_layers=4), batch_size=128,
        lrs=LRS, seeds=[0, 1, 2], eval_examples=256, tasks={
            # up to 10x10 cells (a 21x21 grid), graded by path length; trained on paths of >= 30 squares
            "maze": Budget(train=[6, 6], test=[6, 8, 10], steps=800, segments=[1, 2, 4, 8, 16],
                           seeded=["attention", "hrm"], model_options=HRM_SEGMENTS,
                           options=dict(canvas=21, n_train=1000, min_path=30)),
            # a curriculum over depth, each stage keeping the shallower puzzles; tested one round deeper than trained
            "sudoku": Budget(train=[[1, 2], [1, 4], [1, 6]], test=[2, 4, 6, 7], steps=800, segments=[1, 2, 4, 8, 16],
                             seeded=["attention", "attention_looped", "hrm"], model_options=HRM_SEGMENTS,
                             options=dict(n_train=300)),
        }),
    "scale": dict(  # --scale trains these, keeps their weights, then reads SCALE's streams. BABILong's qa1 and qa2
        # rise through RMT's segment curriculum to 16 segments of 32 tokens (RMT's BABILong runs: 1 to 32 of 512)
        models=SEQUENCE_MODELS, size=dict(d_model=64, n_layers=2), batch_size=128,
        lrs=LRS[1:3], seeds=[0], eval_examples=256, tasks={   # two rates keep it within minutes
            "flipflop": Budget(train=CURRICULUM, test=[256], steps=500),
            # 4,000 steps: every model near 1.00 at 512 tokens (2,000 left Titans' qa2 and the SSM's qa1 at 0.87)
            "babilong_qa1": Budget(train=BABI_CURRICULUM, test=[512, 4096], steps=4000),
            "babilong_qa2": Budget(train=BABI_CURRICULUM, test=[512, 4096], steps=4000)}),
}


# ---------------------------------------------------------------------------------------------------------
# The protocol: the runs a command asks for, the choice of learning rate, one run
# ---------------------------------------------------------------------------------------------------------

def task_models(command, t):
    """The models that run task t: those asked for, or the task's own, or the preset's; on a grid, only those that
    read bidirectionally."""
    budget = PRESETS[command.preset]["tasks"][t]
    names = command.models if command.chosen_models else (budget.models or command.models)
    return [m for m in names if not is_grid(t) or reads_grids(m)]


def model_config(preset, t, m):
    """Model m's config options on task t: the preset's size, the task's, the model's own; bidirectional on a grid."""
    b = preset["tasks"][t]
    return {**preset["size"], **b.size, **b.model_options.get(m, {}), **({"causal": False} if is_grid(t) else {})}


def run_key(spec):
    dial = "".join(f"[{k}={v}]" for k, v in spec.get("dial", {}).items())
    return f"{spec['model']}{dial}/{spec['task']}/lr={spec['lr']:g}/seed={spec['seed']}"


WHERE = ("device", "out")   # where a run ran and where it is stored: not part of what defines it


def spec_hash(spec):
    defining = {k: v for k, v in spec.items() if k not in WHERE}
    return hashlib.sha1(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:12]


def make_specs(command, phase="lr sweep", lr_by_cell=None):
    """The runs of one phase: the "lr sweep" on the first seed, of each cell and of each of the dial's other state
    sizes (a size may want a rate of its own); then the "seeds": the other seeds at each cell's chosen lr, on the
    task's `seeded` models. --scale's runs also keep their weights, to read the long streams with."""
    preset, seeds, specs = PRESETS[command.preset], command.seeds, []
    for t in command.tasks:
        b = preset["tasks"][t]
        for m in task_models(command, t):
            if phase != "lr sweep" and (m, t) not in lr_by_cell:
                continue
            options = model_config(preset, t, m)
            base = dict(model=m, task=t, task_options=b.options, model_options=options, train=b.train,
                        test=command.test_lengths or b.test, steps=command.steps or b.steps,
                        batch_size=preset["batch_size"], eval_examples=preset["eval_examples"], protocol=PROTOCOL,
                        device=command.device, **({"test_segments": b.segments} if b.segments else {}))
            if phase == "lr sweep":
                specs += [dict(base, lr=lr, seed=seeds[0]) for lr in command.lrs]
                specs += [dict(base, lr=lr, seed=seeds[0], dial={option: v}, model_options={**options, option: v})
                          for option, values in b.dial.get(m, {}).items() for v in values for lr in command.lrs]
            elif phase == "seeds" and (command.chosen_models or m in b.seeded):
                specs += [dict(base, lr=lr_by_cell[(m, t)], seed=s) for s in seeds[1:]]
    if command.scale:   # weights named by all that defines the run: other settings never read them
        specs = [dict(s, out=command.out, weights=f"scale_weights/{s['model']}_{s['task']}_{spec_hash(s)}.pt")
                 for s in specs]
    return specs


def same_spec(saved, spec):
    """A stored run is reused only if all that defines it is unchanged, and the weights it kept, if any, still exist."""
    return (saved is not None and all(saved.get(k) == v for k, v in spec.items() if k not in WHERE)
            and ("weights" not in spec or os.path.exists(os.path.join(spec["out"], spec["weights"]))))


DIVERGED = "diverged"   # what a diverged run shows in place of a metric


def mean(values):
    """The mean of the numbers among the values (skipping None and DIVERGED); nan when there is none."""
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else float("nan")


def dial_cell(run):
    """The cell of a run: (model, task), and for a run of the dial's other state sizes (model, task, size)."""
    return (run["model"], run["task"]) + ((tuple(run["dial"].items()),) if run.get("dial") else ())


def best_runs(runs, dial=False):
    """For each (model, task): its runs at the lr chosen on the sweep seeds (those run at every lr): the best mean
    validation accuracy, ties broken by the lower validation loss; an lr where a sweep run diverged only if every
    lr did. Seeds added later never change the choice. dial=True: the same for each (model, task, size) of the dial."""
    by_cell = {}
    for r in runs:
        if bool(r.get("dial")) == dial:
            by_cell.setdefault(dial_cell(r), {}).setdefault(r["lr"], []).append(r)
    best = {}
    for cell, by_lr in by_cell.items():
        sweep = set.intersection(*({r["seed"] for r in rs} for rs in by_lr.values()))

        def score(lr):
            rs = [r for r in by_lr[lr] if r["seed"] in sweep]
            if any(r.get("diverged_at") is not None for r in rs):
                return -math.inf, -math.inf
            return mean(r["val_token_acc"] for r in rs), -mean(math.inf if r["val_loss"] is None else r["val_loss"]
                                                                for r in rs)   # None: an overflowed loss, the worst
        best[cell] = sorted(by_lr[max(sorted(by_lr), key=score)], key=lambda r: r["seed"])
    return best


def edge_cells(runs, best):
    """The cells whose chosen lr is the smallest or largest of a grid of several: a better one may lie outside."""
    grids = collections.defaultdict(set)
    for r in runs:
        if not r.get("dial"):
            grids[r["model"], r["task"]].add(r["lr"])
    return {cell for cell, rs in best.items()
            if len(grids[cell]) > 1 and rs[0]["lr"] in (min(grids[cell]), max(grids[cell]))}


@torch.no_grad()
def block_calls(model, x):
    """`attention.Block` applications in one training forward of x (every supervised segment of HRM): the training
    compute per example that the depth preset compares."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, attention.Block)]
    try:
        all_logits(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


def run_one(spec):
    """Train and test one model on one task; returns the record stored in runs/<preset>.json."""
    device, cuda = spec["device"], torch.device(spec["device"]).type == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if cuda:
        torch.cuda.set_device(device)   # streams, graphs and their pools belong to the current GPU: make it the run's
    task = tasks.TASKS[spec["task"]](**spec["task_options"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], task.vocab_size, **spec["model_options"])
    start = time.time()
    losses = train(model, task, spec["steps"], spec["batch_size"], spec["lr"], spec["train"], device,
                   seed=spec["seed"])
    train_time, trained = time.time() - start, stages(spec["train"])[-1][1]
    times = lambda: dict(train_time_s=round(train_time, 2), wall_time_s=round(time.time() - start, 2))  # noqa: E731
    tokens = {L: task.sample(1, L, 0)[0].shape[1] for L in spec["test"]}   # length is a task's knob, not T
    record = {**spec, "params": n_params(model), "state_size": {str(L): model.state_size(tokens[L]) for L in tokens},
              "examples_seen": spec["steps"] * spec["batch_size"], "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if cuda else "CPU"}
    if is_grid(spec["task"]):   # the depth preset's training compute per example, at the longest training size
        record["block_calls"] = block_calls(model, task.sample_train(1, trained, 0, device)[0])
    if spec.get("weights"):   # kept even when diverged: a stored run is reused only while its weights exist
        os.makedirs(os.path.join(spec["out"], "scale_weights"), exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(spec["out"], spec["weights"]))
    if not math.isfinite(losses[-1]):   # diverged: nothing to test, and the lr choice skips it (best_runs)
        return {**record, "diverged_at": len(losses), "final_loss": None, "val_token_acc": None, "val_loss": None,
                "metrics": {}, **times()}
    test = lambda L, **kw: evaluate(model, task, L, spec["eval_examples"], device, **kw)  # noqa: E731
    val = test(trained, seed=10_000 + spec["seed"])
    metrics = {}
    deep = spec.get("test_segments") and (hasattr(model, "segment_logits") or getattr(model.config, "loops", 1) > 1)
    for L in spec["test"]:   # HRM and the looped Transformer: also against test-time depth, on the same examples
        batches = list(test_batches(task, L, spec["eval_examples"], device, 20_000 + spec["seed"])) if deep else None
        metrics[str(L)] = test(L, seed=20_000 + spec["seed"], batches=batches)
        if deep:
            metrics[str(L)]["by_segments"] = {str(s): test(L, batches=batches, segments=s)
                                              for s in spec["test_segments"]}
    return {**record, "diverged_at": None, "final_loss": sum(losses[-20:]) / len(losses[-20:]), **times(),
            "val_token_acc": val["token_acc"], "val_loss": val["loss"], "metrics": metrics}


# ---------------------------------------------------------------------------------------------------------
# Running and storing many runs: worker processes share the GPU (tiny models leave it mostly idle) or the cores
# ---------------------------------------------------------------------------------------------------------

def usable_cores():
    """The CPU cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(workers):
    """torch threads per worker: never more in all than the cores, nor more than this process has (README,
    "Threads"), since threads waiting for busy cores spin and slow everything down."""
    return max(1, min(usable_cores() // workers, torch.get_num_threads()))


def slow_first(spec):
    """Scheduling order: the grids, then the models with loops inside a step, so no long run starts last."""
    return (spec["task"] not in ("maze", "sudoku"),
            spec["model"] not in ("titans", "titans_lmm", "hrm", "hrm_last_cycle"))


def worker_start(parent):
    """Each worker process ignores Ctrl-C (the main process stops the workers and keeps every finished run), and
    ends as soon as the main process is gone, however it ended (kill -9 included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


STOP = threading.Event()   # set when run_all is stopped: its threads (not processes) must see it and return


def run_all(specs, workers, devices, on_done, claim=lambda spec: True, work=None, threads=False):
    """Run work(spec) (run_one unless told) for every spec that claim(spec) allows (`Store.claim`), `workers` at a
    time: here (one worker) or in a pool of processes (or of threads), each on the device with the fewest in flight.
    on_done(record) stores a result and returns the runs it unlocks, which join the queue at once."""
    work = work or run_one                                         # (looked up now: a test may replace it)
    bar = tqdm(total=len(specs), desc="runs", disable=not specs)
    queue, running = sorted(specs, key=slow_first), {}           # running: future -> its device
    # On a GPU too, each worker's host threads share the cores (8 workers of 32 threads on 32 cores stalled 2 GPUs)
    cpu = None if threads else cpu_threads(workers)   # (threads share this process's torch threads)
    pool = None
    if workers > 1 and threads:
        pool = ThreadPoolExecutor(workers)
    elif workers > 1:
        # a worker stopped mid-run leaves its queue's semaphores to the resource tracker, which would warn at exit
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=worker_start,
                                   initargs=(os.getpid(),))
    try:
        while queue or running:
            while queue and len(running) < workers:
                if not claim(queue[0]):
                    queue.pop(0)
                    bar.total -= 1
                    continue
                device = min(devices, key=list(running.values()).count)
                spec = dict(queue.pop(0), device=device, threads=cpu)
                if pool:
                    future = pool.submit(work, spec)
                else:                                     # one worker: run it here and now
                    future = Future()
                    future.set_result(work(spec))
                running[future] = device
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                del running[future]
                new = on_done(future.result())
                queue = sorted(queue + new, key=slow_first)
                bar.total += len(new)
                bar.update()
    except BaseException:
        STOP.set()                                                 # threads: each stops at its next piece
        for process in list(getattr(pool, "_processes", {}).values()):   # no public way to stop a running task
            process.terminate()
        raise
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        STOP.clear()
        bar.close()


def git_commit():
    """The commit of this code (+dirty if tracked files changed), or $GIT_COMMIT when set (a copied working tree may
    have no history, or a stale one)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)  # noqa
        commit = git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = dirty = ""
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def save_json(path, obj):
    """Write a temporary file of this process, then rename: never a half-written file, never two writers of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run_problem(run):
    """What is wrong with a stored run of this protocol, in a few words, or None: every result the report reads must
    have its type and range (a hand-edited accuracy of 1.5 would print as such, a list would crash the report)."""
    number = lambda v: type(v) in (int, float) and math.isfinite(v)                    # noqa: E731 (not a bool)
    share = (lambda v: v is None or number(v) and 0 <= v <= 1, "an accuracy in [0, 1] or null")
    loss = (lambda v: v is None or type(v) in (int, float) and not v < 0, "a loss >= 0 or null")   # (nan: overflow)
    count = (lambda v: type(v) is int and v >= 0, "a count")
    a_dict = (lambda v: isinstance(v, dict), "a dict")

    def metrics(path, m):   # the checks of the metrics at one test length, or at one count of test-time segments
        yield path, a_dict
        for k, v in m.items():
            if k == "by_segments":
                yield path + (k,), a_dict
                for s, at_s in v.items():
                    yield from metrics(path + (k, s), at_s)
            elif k == "by_depth":
                yield path + (k,), (lambda v: isinstance(v, list) and all(map(share[0], v)), "a list of accuracies")
            elif k == "by_path":
                yield path + (k,), (lambda v: isinstance(v, dict) and all(
                    isinstance(p, list) and len(p) == 2 and share[0](p[0]) and count[0](p[1]) for p in v.values()),
                    "bins of [accuracy, count]")
            elif k in ("token_acc", "exact", "gen_exact", "loss"):
                yield path + (k,), loss if k == "loss" else share

    def checks():   # (path, check), lazily: a dict is checked before anything in it is looked at
        yield from [(("val_token_acc",), share), (("val_loss",), loss), (("final_loss",), loss), (("params",), count),
                    (("examples_seen",), count), (("wall_time_s",), (lambda v: number(v) and v >= 0, "seconds")),
                    (("diverged_at",), (lambda v: v is None or count[0](v), "a step or null")),
                    (("state_size",), a_dict), (("metrics",), a_dict)]
        yield from ((("state_size", L), count) for L in run["state_size"])
        for L, m in run["metrics"].items():
            yield from metrics(("metrics", L), m)
    for path, (ok, what) in checks():
        value = functools.reduce(lambda v, k: v.get(k), path, run)
        if not ok(value):
            return f"has {path[0]}{''.join(f'[{k!r}]' for k in path[1:])} {reprlib.repr(value)}, expected {what}"
    return None


def load_runs(path, preset, fresh):
    """The stored runs of `path`, checked, and the commands that trained them (meta.commands: wall time, runs,
    commit of each). With fresh, the old file is kept under a new name and none are used. A file that is not a
    results file of this preset stops the command with one line saying what to do."""
    if not os.path.exists(path):
        return {}, []
    if fresh:
        kept = path[:-len(".json")] + time.strftime(".%Y%m%d-%H%M%S.json")
        os.replace(path, kept)
        print(f"--fresh: the old runs are kept in {kept}")
        return {}, []

    def stop(why):
        sys.exit(f"compare.py: error: {path} {why}; move it away, point --out at another folder, or run with --fresh "
                 "(which keeps it under a new name)")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        stop(f"is not a readable results file ({type(e).__name__})")
    runs = results.get("runs") if isinstance(results, dict) else None
    fields = {"model", "task", "lr", "seed", "metrics"}
    if not isinstance(runs, dict) or not all(isinstance(r, dict) and fields <= set(r) for r in runs.values()):
        stop("does not hold compare.py runs")
    meta = results.get("meta") if isinstance(results.get("meta"), dict) else {}
    if meta.get("preset") != preset:
        stop(f"holds runs of preset {meta.get('preset')!r}, not {preset!r}")
    for key, run in runs.items():   # (a run of another protocol is never read, only run again)
        problem = run.get("protocol") == PROTOCOL and run_problem(run)
        if problem:
            stop(f"holds a run {key!r} that {problem}")
    commands = meta.get("commands") if isinstance(meta.get("commands"), list) else []
    return runs, [c for c in commands if isinstance(c, dict) and type(c.get("wall_time_s")) in (int, float)]


def alive(pid):
    try:
        os.kill(pid, 0)                      # signal 0 only asks
    except ProcessLookupError:
        return False
    except PermissionError:                  # running, as another user
        pass
    return True


class Store:
    """A preset's results file, <out>/<preset>.json, shared by every command whose --out is its folder: none drops a
    run another stored, none trains a run another is training. Every read-and-write holds a lock (fcntl.flock on
    <preset>.json.lock, released by the kernel however its holder ends) and merges the runs on disk with this
    command's. The lock file lists the runs being trained and the process of each; a command trains only what it
    claimed, and waits for what another live process claimed. (Process ids: the commands must share a machine.)"""

    def __init__(self, path, preset, fresh):
        self.path, self.preset, self.mine = path, preset, {}    # mine: the runs this command trained
        with self.locked():
            self.runs, self.commands = load_runs(path, preset, fresh)   # run_key -> record; the commands on disk

    @contextlib.contextmanager
    def locked(self):
        """Hold the lock; yields the claims of live processes, {run_key: pid}, which the caller may change."""
        with open(self.path + ".lock", "a+") as lock:           # a+: made if missing, never emptied by opening
            fcntl.flock(lock, fcntl.LOCK_EX)
            lock.seek(0)
            try:
                claims = {k: pid for k, pid in json.loads(lock.read()).items()
                          if isinstance(pid, int) and pid > 0 and alive(pid)}
            except (ValueError, AttributeError):                # empty, or cut short by a kill: no claims
                claims = {}
            yield claims
            lock.seek(0)
            lock.truncate()
            json.dump(claims, lock)

    def merge(self):
        """(Under the lock.) The runs on disk, and over them the runs this command trained; the commands on disk."""
        disk, self.commands = load_runs(self.path, self.preset, fresh=False)
        self.runs.clear()
        self.runs.update({**disk, **self.mine})

    def sync(self):
        """Read what other commands stored meanwhile; returns the claims of other live processes."""
        with self.locked() as claims:
            self.merge()
            return {k: pid for k, pid in claims.items() if pid != os.getpid()}

    def claim(self, spec):
        """Claim `spec` and say True, unless another command has stored it or a live process is training it."""
        key = run_key(spec)
        with self.locked() as claims:
            self.merge()
            if same_spec(self.runs.get(key), spec) or claims.get(key, os.getpid()) != os.getpid():
                return False
            claims[key] = os.getpid()
            return True

    def save(self, results, record=None):
        """Write `results` (its "runs" are self.runs) with `record`, a run just trained, merged with the disk's."""
        with self.locked() as claims:
            if record is not None:
                self.mine[run_key(record)] = record
                claims.pop(run_key(record), None)
            self.merge()
            meta = results["meta"]
            if "commands" in meta:   # the other commands' entries as on disk (they may be running too), ours as now
                ours = {c["id"]: c for c in meta["commands"] if "id" in c}
                meta["commands"] = [ours.pop(c.get("id"), c) for c in self.commands] + list(ours.values())
            save_json(self.path, {**results, "runs": self.runs})

    def release(self):
        """Give up this process's claims on the runs it did not finish: other commands may train them."""
        with self.locked() as claims:
            for key in [k for k, pid in claims.items() if pid == os.getpid()]:
                del claims[key]


class Schedule:
    """The runs a command owes: every cell's (and dial size's) lr sweep on the first seed; a cell's other seeds once
    its sweep is stored, at the lr it chose (none when every lr diverged). `finished` stores a run and returns the
    runs it unlocks, so no phase waits for the one before."""

    def __init__(self, command, store, results, this):
        self.command, self.store, self.results, self.this = command, store, results, this
        self.sweeps, self.n_run, self.start = {}, 0, time.time()
        for s in make_specs(command):
            self.sweeps.setdefault(dial_cell(s), []).append(s)

    def done(self, spec):
        return same_spec(self.store.runs.get(run_key(spec)), spec)

    def follow_ups(self, cell, lr):
        return make_specs(self.command, "seeds", {cell: lr})

    def owed_follow_ups(self, cell):
        """The cell's follow-ups once every run of its sweep is stored; [] before, and [] when every lr diverged."""
        if not all(map(self.done, self.sweeps[cell])):
            return []
        chosen = best_runs([self.store.runs[run_key(s)] for s in self.sweeps[cell]], dial=len(cell) == 3)[cell][0]
        return [] if chosen.get("diverged_at") is not None else self.follow_ups(cell, chosen["lr"])

    def owed(self):
        return [s for cell in self.sweeps for s in self.sweeps[cell] + self.owed_follow_ups(cell)]

    def todo(self):
        return [s for s in self.owed() if not self.done(s)]

    def finished(self, record):
        """Store a run this command trained; the cell's other seeds, when it was the last of the cell's sweep."""
        record["commit"] = self.results["meta"]["commit"]
        self.n_run += 1
        self.this.update(wall_time_s=round(time.time() - self.start, 1), runs_run=self.n_run)
        self.store.save(self.results, record)
        sweep_run = not record.get("dial") and record["seed"] == self.command.seeds[0]
        return [s for s in self.owed_follow_ups((record["model"], record["task"])) if sweep_run and not self.done(s)]

    def summary(self):
        """One line: the runs reused, those to train now, and those owed once their cells' sweeps are stored."""
        owed = self.owed()
        stale = sum(run_key(s) in self.store.runs and not self.done(s) for s in owed)
        later = sum(len(self.follow_ups(cell, None)) for cell, sweep in self.sweeps.items()
                    if not all(map(self.done, sweep)))
        return (f"{sum(map(self.done, owed))} stored runs reused, {sum(not self.done(s) for s in owed)} to train now"
                + (f" ({stale} because their settings differ from the stored ones)" if stale else "")
                + (f", {later} more once their cells' lr sweeps are done" if later else ""))


def train_owed(schedule, workers, devices):
    """Train every run the schedule owes, then those other commands on the folder claimed and left unfinished; a run
    another live command is training is waited for, never trained twice."""
    todo, told = schedule.todo(), False
    while todo:
        run_all(todo, workers, devices, schedule.finished, schedule.store.claim)
        others = schedule.store.sync()              # with the runs other commands stored meanwhile
        todo = schedule.todo()
        pids = sorted({others[run_key(s)] for s in todo if run_key(s) in others})
        if pids:
            if not told:
                print(f"waiting for {sum(run_key(s) in others for s in todo)} runs that another command (pid "
                      f"{', '.join(map(str, pids))}) is training in {schedule.command.out}: they will be reused, not "
                      "trained again")
            told = True
            time.sleep(1)


# ---------------------------------------------------------------------------------------------------------
# Reports. Every table and figure is made from "panels": a panel is one block of columns in a table and one
# axes in a figure, with x values `xs` and `lines`, a dict from a label (a model, or a tuple that starts with
# one) to one list of values per x, a value per seed. Tables show mean±half the spread; figures the mean.
# ---------------------------------------------------------------------------------------------------------

def mean_spread(values):
    """'mean' or 'mean±half-spread' over seeds, with how many seeds diverged; '' when there is nothing at all."""
    values = [v for v in values if v is not None]
    numbers, diverged = [v for v in values if v != DIVERGED], values.count(DIVERGED)
    if not numbers:
        return DIVERGED if diverged else ""
    return (f"{mean(numbers):.2f}" + (f"±{(max(numbers) - min(numbers)) / 2:.2f}" if len(numbers) > 1 else "")
            + (f" ({diverged} {DIVERGED})" if diverged else ""))


def md_row(cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def md_table(header, rows):
    return "\n".join([md_row(header), "|" + "---|" * len(header)] + [md_row(r) for r in rows])


def table(panels, first=("model",)):
    """A row per label (a tuple fills the first columns), a column per x of each panel (its `names`, or title@x);
    rows with no value are left out."""
    header = list(first) + [n for p in panels for n in p.get("names") or [f"{p['title']}@{x}" for x in p["xs"]]]
    rows = []
    for label in dict.fromkeys(label for p in panels for label in p["lines"]):
        cells = [mean_spread(v) for p in panels for v in p["lines"].get(label, [[]] * len(p["xs"]))]
        if any(cells):
            rows.append(list(label if isinstance(label, tuple) else [label]) + cells)
    return md_table(header, rows)


@functools.cache
def pyplot():
    """matplotlib.pyplot, or None when matplotlib is not installed (said once)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None


def short(n):
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e4 else f"{n:g}"


def plot(path, panels, title=None):
    """Panels side by side, log x unless a panel says otherwise; a colour per model in every figure, other dashes
    for a model's further lines in a panel; dotted verticals at a panel's `marks`."""
    panels = [p for p in panels if any(not math.isnan(mean(v)) for values in p["lines"].values() for v in values)]
    plt = pyplot()
    if plt is None or not panels:   # (a panel with nothing to draw: memory on a CPU, say)
        return
    size = (6.4, 3.6) if any(p.get("legend") for p in panels) else (3.4, 3.4)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5, size[0] * len(panels)), size[1]), squeeze=False)
    for ax, p in zip(axes[0], panels):
        drawn = []
        for label, values in p["lines"].items():
            label = label if isinstance(label, tuple) else (label,)
            colour = f"C{list(MODELS).index(label[0])}"
            points = [(x, mean(v)) for x, v in zip(p["xs"], values) if not math.isnan(mean(v))]
            if points:
                ax.plot(*zip(*points), marker="o", color=colour, ls=("-", "--", ":", "-.")[drawn.count(label[0]) % 4],
                        label=", ".join(map(str, label)), zorder=3 + len(p["lines"]) - len(drawn))   # first on top
            spread = [(x, min(n), max(n)) for x, v in zip(p["xs"], values)
                      if len(n := [a for a in v if isinstance(a, (int, float))]) > 1]
            spread += [(x, *band) for x, band in zip(p["xs"], p.get("intervals", {}).get(label[0], [])) if band]
            if spread:   # the band: the lowest and highest seed, or a panel's intervals
                ax.fill_between(*zip(*spread), color=colour, alpha=0.15, lw=0)
            drawn.append(label[0])
        for mark in p.get("marks", []):   # a length, or (length, model): drawn in the model's colour
            x, m = mark if isinstance(mark, tuple) else (mark, None)
            ax.axvline(x, color=f"C{list(MODELS).index(m)}" if m else "gray", ls=":", lw=1)
            if p.get("mark_label"):
                ax.annotate(p["mark_label"], (x, 0.02), xytext=(3, 0), textcoords="offset points", fontsize=7,
                            color="gray", xycoords=("data", "axes fraction"))
        if p.get("chance") is not None:
            ax.axhline(p["chance"], color="gray", ls="--", lw=0.8)
            ax.annotate("chance", (1, p["chance"]), xytext=(-3, 3), textcoords="offset points", ha="right",
                        fontsize=7, color="gray", xycoords=("axes fraction", "data"))
        if p.get("legend"):   # under its own panel
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=p["legend"], frameon=False)
        ax.set(xscale=p.get("xscale", "log"), **{k: p[k] for k in ("title", "xlabel", "ylabel", "ylim", "yscale")
                                                  if k in p})
        ax.minorticks_off()
        ax.set_xticks(p["xs"], [short(x) for x in p["xs"]], fontsize=7)
    if not any(p.get("legend") for p in panels):
        labelled = {label: line for ax in axes[0] for line, label in zip(*ax.get_legend_handles_labels())}
        axes[0][-1].legend(labelled.values(), labelled.keys(), fontsize=6)   # every line's label, wherever it is
    if title:
        fig.suptitle(title, fontsize=8)
    if any(p.get("legend") for p in panels):   # the axes keep their size; the saved image takes the legends in
        fig.subplots_adjust(wspace=0.2)
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"plot: {path}")


def at(rs, L, *path):
    """A metric of each seed's run at test length L, e.g. at(rs, 64, "by_depth", 0); DIVERGED for a diverged run."""
    return [DIVERGED if r.get("diverged_at") is not None else
            functools.reduce(lambda value, key: value[key], path, r["metrics"][str(L)]) for r in rs]


ACCURACY = dict(ylim=(-0.02, 1.02))


def report(runs, meta, task_names, model_names):
    """The markdown report of a preset's runs, and its figures as {name: panels}."""
    best = best_runs(runs)
    edges = edge_cells(runs, best)
    cells = {t: [(m, best[(m, t)]) for m in model_names if (m, t) in best] for t in task_names}
    first = {t: rs[0][1][0] for t, rs in cells.items() if rs}   # a run of each task: its test and train lengths
    sequence_tasks = [t for t in first if not is_grid(t)]

    def by_length(t, metric):   # a task's panel: a metric against test length (recall: content), a line per model
        return dict(title=t, xs=first[t]["test"], xlabel="key-value pairs" if t == "recall" else "test length",
                    lines={m: [at(rs, L, metric) for L in first[t]["test"]] for m, rs in cells[t]},
                    ylabel="token accuracy", marks=[stages(first[t]["train"])[-1][1]], mark_label="longest trained",
                    **ACCURACY)
    made_on = sorted({f"{r.get('device_name')}, commit {r.get('commit')}" for r in runs})
    trained = [c for c in meta.get("commands", []) if c.get("runs_run")]
    parts = [f"# compare.py, preset `{meta['preset']}`", "", f"Command: `{meta['command']}`  ",
             f"Device: {meta['device_name']}, torch {meta['torch']}, commit {meta['commit']}, "
             f"wall time {meta.get('wall_time_s', 0):.0f} s; {meta.get('runs_run', 0)} runs trained by this command, "
             f"{meta.get('runs_reused', 0)} reused from earlier ones" + (
                 f"; {len(trained)} commands have trained runs into this file (since it was made or --fresh), in "
                 f"{sum(c['wall_time_s'] for c in trained):.0f} s of wall time in all" if len(trained) > 1 else "")
             + f"; the runs' own times add up to {sum(r['wall_time_s'] for r in runs):.0f} s" + (
                 f"; the runs were made on: {'; '.join(made_on)}" if len(made_on) > 1 else ""), ""]

    def curriculum(r):   # "2-4, 2-8, 2-16 (a third of the steps each)" or "2-16"
        plan = stages(r["train"])
        share = {1: "", 2: " (half of the steps each)", 3: " (a third of the steps each)"}.get(
            len(plan), f" (1/{len(plan)} of the steps each)")
        return ", ".join(f"{lo}-{hi}" if lo != hi else f"{lo}" for lo, hi in plan) + share
    parts += ["## Budgets: the same for every model on a task", "", md_table(
        ["task", "steps", "batch", "training lengths, stage by stage", "test lengths", "task options"],
        [[t, r["steps"], r["batch_size"], curriculum(r), ", ".join(map(str, r["test"])),
          ", ".join(f"{k}={v}" for k, v in r["task_options"].items()) or "-"] for t, r in first.items()]), ""]
    figures = {}
    if sequence_tasks:
        figures["length"] = [by_length(t, "token_acc") for t in sequence_tasks]
        parts += ["## Token accuracy on scored positions, by test length (mean±half-spread over seeds)", "",
                  table(figures["length"]), "",
                  "## Exact match: every scored position of an example right (copy: greedy generation)", "",
                  table([by_length(t, "gen_exact" if hasattr(tasks.TASKS[t], "prompt_length") else "exact")
                         for t in sequence_tasks]), ""]
    for t in [t for t in sequence_tasks if any(r.get("dial") and r["task"] == t for r in runs)]:
        points = [(m, "default", rs) for m, rs in cells[t]] + [
            (m, ", ".join(f"{k}={v}" for k, v in size), rs)
            for (m, task, size), rs in best_runs(runs, dial=True).items() if task == t and m in model_names]

        def state(rs):   # the state floats at the largest content
            return rs[0]["state_size"][str(first[t]["test"][-1])]

        def accuracy(rs):
            return [at(rs, L, "token_acc") for L in first[t]["test"]]
        points.sort(key=lambda p: (model_names.index(p[0]), state(p[2])))
        dial = dict(by_length(t, "token_acc"), lines={   # a dial size's row names the rate its own sweep chose
            (m, size if size == "default" else f"{size} (lr {rs[0]['lr']:g})", f"{state(rs):,}"): accuracy(rs)
            for m, size, rs in points})
        figures.setdefault("dial", []).append(dict(dial, title=f"the dial: {t}, accuracy against content"))
        if t == "recall" and "flipflop" in first:   # the trade-off in one picture: the dial beside a long stream
            ff = by_length("flipflop", "token_acc")
            by_size = sorted(points, key=lambda p: (model_names.index(p[0]), p[1] != "default"))   # default: solid
            figures["tradeoff"] = [
                dict(dial, title="Copying: recall as the content grows", marks=[], legend=2,
                     xlabel="key-value pairs to recall (log scale; chance is ~0)",
                     ylabel="token accuracy (band: lowest to highest seed)",
                     lines={(m, f"{size.replace('default', 'default size')}: {state(rs):,} state floats"): accuracy(rs)
                            for m, size, rs in by_size}),
                dict(ff, title="Filtering: flip-flop as the stream grows", legend=3, chance=0.5,
                     xlabel="stream length in tokens (log scale)", mark_label="longest training stream",
                     ylabel="token accuracy (band: lowest to highest seed)")]
        parts += [f"## The dial on {t}: token accuracy against content, one row per state size", "",
                  table([dial], first=("model", "size", "state floats")), ""]
    for t in [t for t in first if is_grid(t)]:   # HRM at each count of test-time segments
        counts = sorted({s for m, rs in cells[t] for s in rs[0].get("test_segments", [1])})
        lines = {}
        size = (lambda L: f"{L}x{L}") if t == "maze" else (lambda L: f"depth {L}")   # noqa: E731 (Sudoku: rounds)
        for m, rs in cells[t]:
            for L in rs[0]["test"]:
                if any("by_segments" in r["metrics"].get(str(L), {}) for r in rs):
                    lines[(m, size(L))] = [at(rs, L, "by_segments", str(s), "exact") for s in counts]
                else:   # a fixed-depth model has one number, the same at every count
                    fixed = "" if all(r.get("diverged_at") is not None for r in rs) else ", fixed depth"
                    lines[(m, f"{size(L)}{fixed}")] = [at(rs, L, "exact")] * len(counts)
        figures.setdefault("segments", []).append(dict(
            title=f"{t}: recurrent depth at test time", xs=counts, lines=lines, names=[f"{s} seg" for s in counts],
            xlabel="test-time segments (HRM) or loops (looped Transformer)", ylabel="exact match", **ACCURACY))
        parts += [f"## {t}: exact match against test-time segments (HRM) or loops (attention_looped)", "",
                  table(figures["segments"][-1:], first=("model", "size")), "",
                  "Training compute, Block applications per example (one forward, every supervised segment): "
                  + ", ".join(f"{m} {rs[0]['block_calls']}" for m, rs in cells[t]
                              if rs[0].get("block_calls") is not None),
                  ""]
        paths = [v.get("by_path", {}) for _, rs in cells[t] for r in rs for v in r["metrics"].values()]
        xs = sorted({int(b) for bins in paths for b in bins})
        if xs:   # the maze by path length, one line per model and size: pooled over sizes, the mix of sizes in each
            # bin would make the trend (larger mazes have longer paths). (Sudoku's test lengths are its depths.)
            low = cells[t][0][1][0]["task_options"].get("min_path", 0)   # no shorter path is ever drawn
            lines = {(m, size(L)): [[DIVERGED if r.get("diverged_at") is not None else
                                     r["metrics"][str(L)].get("by_path", {}).get(str(b), [None])[0] for r in rs]
                                    for b in xs] for m, rs in cells[t] for L in rs[0]["test"]}
            figures.setdefault("depth", []).append(dict(
                title=f"{t}: exact match against path length", xs=xs, xscale="linear", ylabel="exact match",
                xlabel=f"squares on the S-G path (bins of {PATH_BIN}, from the value shown)", **ACCURACY,
                names=[f"{max(b, low)}-{b + PATH_BIN - 1}" for b in xs], lines=lines))
            parts += [f"## {t}: exact match against path length (squares from S to G, both included)", "",
                      table(figures["depth"][-1:], first=("model", "size")), ""]
    quarters = dict(xs=[12.5, 37.5, 62.5, 87.5], xscale="linear", xlabel="depth of the deciding fact (%)",
                    ylabel="exact match", **ACCURACY)
    for t in [t for t in sequence_tasks if any("by_depth" in v for _, rs in cells[t] for r in rs
                                               for v in r.get("metrics", {}).values())]:   # the BABILongs
        lengths = first[t]["test"]   # one row per (model, length); one panel per length in the figure
        depth = {(m, L): [at(rs, L, "by_depth", k) for k in range(4)] for m, rs in cells[t] for L in lengths}
        figures.setdefault("depth", []).extend(
            dict(quarters, title=f"{t}@{L}", lines={m: v for (m, at_L), v in depth.items() if at_L == L})
            for L in lengths)
        parts += [f"## {t}: exact match by the depth of the deciding fact", "",
                  table([dict(quarters, lines=depth, names=["0-25%", "25-50%", "50-75%", "75-100%"])],
                        first=("model", "length")), ""]
    rows = []   # the cost of each cell, at its chosen lr
    for m, t in [(m, t) for m in model_names for t in task_names if (m, t) in best]:
        rs, ref = best[(m, t)], best.get(("attention", t))
        rows.append([m, t, f"{rs[0]['params']:,}" + (f" ({rs[0]['params'] / ref[0]['params']:.2f}x)" if ref else ""),
                     ", ".join(f"{v:,}" for v in rs[0]["state_size"].values()),
                     f"{rs[0]['lr']:g}" + (" (edge)" if (m, t) in edges else ""),
                     f"{len(rs)}" + "".join(f", seed {r['seed']} {DIVERGED} at step {r['diverged_at']}" for r in rs
                                            if r.get("diverged_at") is not None), rs[0]["steps"],
                     f"{rs[0]['examples_seen']:,}", f"{mean(r['wall_time_s'] for r in rs):.1f}"])
    parts += ["## Runs", "", md_table(["model", "task", "params (vs attention)", "state floats (per test length)",
                                       "chosen lr", "seeds", "steps", "examples", "wall s"], rows), ""]
    if edges:
        parts += [f"Chosen lr on the edge of the grid {meta['lrs']}: {', '.join(sorted(f'{m}/{t}' for m, t in edges))}."
                  " A wider grid might find a better rate for these.", ""]
    return "\n".join(parts), figures

# ---------------------------------------------------------------------------------------------------------
# Cost against length (--bench): one untrained model at a time, the time and memory of a training step and of
# reading a whole sequence in one call.
# ---------------------------------------------------------------------------------------------------------

def series(rows, key, **match):
    """A panel's xs and lines from rows of measurements: `key` against length, a line per model, over the rows
    that match (e.g. task="flipflop"); rows without the key (out of memory, a wall) are left out."""
    rows = [r for r in rows if all(r[k] == v for k, v in match.items())]
    xs = sorted({r["length"] for r in rows})
    return dict(xs=xs, lines={m: [[r[key] for r in rows if (r["model"], r["length"]) == (m, x) and r.get(key)
                                   is not None] for x in xs] for m in dict.fromkeys(r["model"] for r in rows)})


def peak_mib(device, start=False):
    """CUDA: reset the peak-memory counter (start) or read it in MiB; None on a CPU."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.current_stream(device).synchronize()   # this thread's work (other threads may be capturing graphs)
    return torch.cuda.reset_peak_memory_stats(device) if start else torch.cuda.max_memory_allocated(device) / 2 ** 20


def timed(fn, device, repeats=3):
    """Median seconds of fn() after one warm-up call, and the peak memory (MiB) it allocated on CUDA."""
    fn()
    peak_mib(device, start=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        peak_mib(device)   # waits for the GPU to finish
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], peak_mib(device)


def bench_row(name, T, device, size, vocab_size=32, batch=1):
    """A training step's forward+backward time and peak memory, a no-grad forward's time per token and peak
    memory (the whole sequence in one call: prefill, not token-by-token decoding), the inference state size."""
    torch.manual_seed(0)
    model = build_model(name, vocab_size, **size).to(device)
    tokens = torch.randint(0, vocab_size, (batch, T), device=device)
    row = dict(model=name, length=T, params=n_params(model), state_floats=model.state_size(T))

    def train_step():
        with autocast(device):
            outputs = all_logits(model, tokens)
        sum(o.float().logsumexp(-1).mean() for o in outputs).backward()

    def infer():
        with torch.no_grad(), autocast(device):
            model(tokens)
    try:
        seconds, row["train_mib"] = timed(train_step, device)
        row["train_ms"] = seconds * 1e3
        seconds, row["infer_mib"] = timed(infer, device)
        row["infer_us_per_token"] = seconds * 1e6 / (batch * T)
    except torch.OutOfMemoryError:
        row["oom"] = True
    return row


STEP_TASKS = ["recall", "flipflop", "maze"]   # the training-step benchmark: a task of each kind, at its longest


def train_seconds(name, t, preset, device, counts, graphs=True, ready=lambda: None):
    """Seconds of `train` for each number of steps in `counts`, model `name` on task t at the preset's size, batch and
    longest training length, after an untimed call of a few steps (lazy initialisations); ready() before each timed
    call. Also returns the last model."""
    b = preset["tasks"][t]
    task, L, seconds = tasks.TASKS[t](**b.options), stages(b.train)[-1][1], []
    for i, n in enumerate([min(5, counts[0]), *counts]):
        torch.manual_seed(0)
        model = build_model(name, task.vocab_size, **model_config(preset, t, name))
        if i:
            ready()
        start = time.perf_counter()
        train(model, task, n, preset["batch_size"], 1e-3, [L, L], device, graphs=graphs)   # returns after a sync
        seconds.append(time.perf_counter() - start)
    return seconds[1:], model


def step_row(name, t, preset, device, graphs, steps=(5, 105)):
    """ms per optimiser step of `train` (sampling, forward, backward, clipping, AdamW): the time of steps[1] steps
    less that of steps[0], over the difference, so one-off costs (the optimiser, graph captures) cancel."""
    (few, many), model = train_seconds(name, t, preset, device, steps, graphs)
    L = stages(preset["tasks"][t].train)[-1][1]
    tokens = tasks.TASKS[t](**preset["tasks"][t].options).sample(1, L, 0)[0].shape[1]
    return dict(model=name, task=t, length=L, tokens=tokens, batch=preset["batch_size"], params=n_params(model),
                graphs=graphs, ms_per_step=(many - few) * 1e3 / (steps[1] - steps[0]))


def step_bench(command, meta):
    """--bench's first table: ms per training step of every model on STEP_TASKS, eager and (on CUDA) from CUDA
    graphs, each model alone on the device. A GPU measures the full preset's sizes, a CPU the smoke preset's."""
    cuda = command.device.startswith("cuda")
    on = {t: PRESETS[("full" if t in PRESETS["full"]["tasks"] else "depth") if cuda else "smoke"] for t in STEP_TASKS}
    cells = [(m, t) for t in STEP_TASKS for m in (command.models if command.chosen_models else
                                                   on[t]["tasks"][t].models or on[t]["models"])
             if not is_grid(t) or reads_grids(m)]
    rows = []
    heading = (f"## Training step: ms per optimiser step (batch {on['recall']['batch_size']}, the "
               f"{'full and depth presets' if cuda else 'smoke preset'}'s sizes, the task's longest training length), "
               "each model alone on the device")
    print(heading)
    for m, t in cells:
        eager = step_row(m, t, on[t], command.device, graphs=False, steps=(5, 45) if cuda else (2, 8))
        fast = step_row(m, t, on[t], command.device, graphs=True) if cuda else None
        rows.append(dict(eager, graphs_ms_per_step=fast["ms_per_step"] if fast else None))
        print(f"{m:16} {t}@{eager['length']} ({eager['tokens']} tokens): eager {eager['ms_per_step']:.1f} ms"
              + (f", CUDA graphs {fast['ms_per_step']:.2f} ms" if fast else ""), flush=True)
    table = heading + "\n\n" + md_table(["model", "task", "tokens", "params", "eager ms/step", "CUDA graphs ms/step",
                                          "speed-up"], [
        [r["model"], f"{r['task']}@{r['length']}", r["tokens"], f"{r['params']:,}", f"{r['ms_per_step']:.2f}"] + (
            [f"{r['graphs_ms_per_step']:.2f}", f"{r['ms_per_step'] / r['graphs_ms_per_step']:.1f}x"]
            if r["graphs_ms_per_step"] else ["-", "-"]) for r in rows])
    return rows, table


def sharing_worker(m, t, device, steps, threads, barrier, results):
    """One of shared_rate's processes: train `steps` steps once all are warmed up, and report the seconds."""
    torch.set_num_threads(threads)
    results.put(train_seconds(m, t, PRESETS["full"], device, [steps], ready=lambda: barrier.wait(timeout=600))[0][0])


def shared_rate(n, m, t, device, steps=300):
    """Training steps per second of n processes at once on one GPU, each training its own copy of model m on task
    t for `steps` steps from a common start (graph captures included), each with its share of the CPU's threads:
    how many training runs should share a GPU. (It times training only, not the evaluations that follow it.)"""
    ctx = get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)
    processes = [ctx.Process(target=sharing_worker, args=(m, t, device, steps, threads, barrier, results))
                 for _ in range(n)]
    for p in processes:
        p.start()
    seconds = [results.get(timeout=1200) for _ in processes]   # a worker that died raises queue.Empty, not a hang
    for p in processes:
        p.join()
    return n * steps / max(seconds)


def bench(command, meta):
    """--bench: the length table (every model at every length), then the training-step table and, on a GPU with the
    default models, how many processes should share it; printed as they go, saved as bench.json/.md/.png. The
    lengths go first so that their peak memory holds nothing left over from the training steps' CUDA graphs."""
    cuda = command.device.startswith("cuda")
    lengths = command.test_lengths or ([1024, 4096, 16384, 65536] if cuda else [256, 1024, 4096])
    models = command.models if command.chosen_models else PRESETS["full"]["models"]
    size = PRESETS[command.preset]["size"]
    mib = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    cells = lambda r: [r["model"], f"{r['length']:,}", f"{r['state_floats']:,}"] + (  # noqa: E731
        ["out of memory", "", "", ""] if r.get("oom") else
        [f"{r['train_ms']:,.1f}", mib(r["train_mib"]), f"{r['infer_us_per_token']:.2f}", mib(r["infer_mib"])])
    head = ["# compare.py --bench: cost against length, and the cost of a training step", "",
            f"Command: `{meta['command']}`  ",
            f"Device: {meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, "
            f"commit {meta['commit']}", "", f"## Cost against length: batch 1, model size {size}, median of 3 after a "
            "warm-up", "", md_table(["model", "length", "state floats", "fwd+bwd ms", "fwd+bwd peak MiB",
                                     "inference us/token", "inference peak MiB"], [])]
    print("\n".join(head))
    rows = []
    for m in models:
        for T in lengths:
            rows.append(bench_row(m, T, command.device, size))
            if cuda:
                torch.cuda.empty_cache()
            print(md_row(cells(rows[-1])), flush=True)
            if rows[-1].get("oom"):
                break                    # longer sequences would not fit either
    print()
    step_rows, step_table = step_bench(command, meta)
    sharing = None
    if cuda and not command.chosen_models:   # how many runs should share one GPU: the default of --workers
        sharing = {n: shared_rate(n, "ssm", "flipflop", command.device) for n in (1, 2, 4, 8, 16)}
        step_table += "\n\n" + md_table(["processes on one GPU", "steps/s, all together", "vs one"],
                                          [[n, f"{r:.0f}", f"{r / sharing[1]:.1f}x"] for n, r in sharing.items()])
    print(step_table, flush=True)
    save_json(os.path.join(command.out, "bench.json"), dict(meta, size=size, rows=rows, step_rows=step_rows,
                                                         sharing=sharing))
    with open(os.path.join(command.out, "bench.md"), "w") as f:
        f.write("\n".join(head + [md_row(cells(r)) for r in rows] + ["", step_table]) + "\n")
    plot(os.path.join(command.out, "bench.png"), [
        dict(title=label, xlabel="sequence length", yscale="log", **series(rows, key))
        for key, label in [("train_ms", "fwd+bwd ms (batch 1)"), ("infer_us_per_token", "inference us / token"),
                           ("train_mib", "fwd+bwd peak MiB")]], title=f"{meta['device_name']}, {meta['dtype']}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Long streams (--scale): the trained models read streams of up to 11M tokens, a piece at a time
# ---------------------------------------------------------------------------------------------------------

SCALE = dict(   # --scale's reading, after it has trained PRESETS["scale"]
    lengths=dict.fromkeys(["flipflop", "babilong_qa1", "babilong_qa2"], [16_384, 131_072, 1_048_576, 11_000_000]),
    examples=dict(flipflop=1, babilong_qa1=64, babilong_qa2=64),   # streams read side by side (flip-flop scores
                                                  # ~T/10 reads in each, BABILong one answer per stream)
    piece=16_384,            # tokens per `stream` call and per generated piece: the host never holds more
    attention_cap_s=30.0)    # attention stops at the first length whose one call would take longer (predicted)
READERS = 8   # cells read at once on one GPU, as threads (a cap, not tuned: the 12 cells of --scale read in 475 s on
              # one H200, little more than the slowest cell, Titans, spent reading)


def tensors(tree):
    """The tensors of a nested tuple/list, such as a stream's state, in order."""
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class StreamGraphs:
    """A model's `stream` on CUDA without gradients, each `span` of tokens after the first (which fixes the state's
    shapes) replayed from a CUDA graph, one per shape, dtype and autocast setting: one launch instead of the
    thousands of RMT's loop over segments and Titans' over chunks, which cost more than the GPU's work at this size.
    `span` is a multiple of the segment and the chunk, so the pieces give what one call gives. The graphs hold the
    weights' addresses: make new ones after moving the model (`STREAM_GRAPHS` keeps them while the model lives)."""

    def __init__(self, span):
        self.span, self.graphs = span, {}

    def __call__(self, model, tokens, state):
        logits = []
        for piece in tokens.split(self.span, dim=1):
            if state is None or piece.shape[1] < self.span:
                out, state = model.stream(piece, state)
            else:
                out, state = self.replay(model, piece, state)
            logits.append(out)
        return torch.cat(logits, dim=1), state

    def replay(self, model, tokens, state):
        cast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (tuple(tokens.shape), *((t.shape, t.dtype) for t in tensors(state)), *cast)
        if key not in self.graphs:
            inputs = (tokens.clone(), tree_map_only(torch.Tensor, torch.clone, state))
            with torch.autocast("cuda", dtype=cast[1], enabled=cast[0], cache_enabled=False):
                self.graphs[key] = (inputs, *capture(model.stream, inputs, tokens.device))
        inputs, graph, outputs = self.graphs[key]
        for static, new in zip(tensors(inputs), tensors((tokens, state))):
            static.copy_(new)
        graph.replay()
        return tree_map_only(torch.Tensor, torch.clone, outputs)


STREAM_GRAPHS = weakref.WeakKeyDictionary()   # model -> its StreamGraphs while the model lives
GRAPH_SPAN = {rmt.RMT: "segment_len", titans.Titans: "chunk_size"}   # a replay reads 64 segments or 64 chunks


@torch.no_grad()
def scale_read(model, task, length, batch, piece, device, seed, shared=False):
    """Read `batch` test streams of `length` tokens made piece by piece (`task.pieces`): recurrent models `stream`
    each piece with the state carried, attention reads the whole sequence in one call. Returns token accuracy,
    scored positions, exact match per stream (and by the deciding fact's depth, where the task gives it), tokens
    per second of model time, and peak GPU MiB (None on CPU): this read's, or with `shared` (other threads reading
    on the GPU) the GPU's since the reading began."""
    if not shared:
        peak_mib(device, start=True)
    pieces = task.pieces(batch, length, piece, seed, device)
    stream = getattr(model, "stream", None)
    if stream is None:                               # attention: one call on the whole sequence
        pieces = [tuple(torch.cat(t, dim=1) for t in zip(*pieces))]
    elif type(model) in GRAPH_SPAN and torch.device(device).type == "cuda":
        span = 64 * getattr(model.config, GRAPH_SPAN[type(model)])   # never a segment or chunk cut in two
        stream = functools.partial(STREAM_GRAPHS.setdefault(model, StreamGraphs(span)), model)
    wrong, scored, seconds, state = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long), 0, None
    for x, y in pieces:
        if STOP.is_set():
            raise KeyboardInterrupt("stopped")
        start = time.perf_counter()
        with autocast(device):
            logits, state = stream(x, state) if stream else (model(x), None)
        pred = logits.argmax(-1)
        peak_mib(device)   # waits for the GPU to finish
        seconds += time.perf_counter() - start
        mask = y != tasks.IGNORE
        wrong += ((pred != y) & mask).sum(1).cpu()
        scored += mask.sum(1).cpu()
    exact = (wrong == 0) & (scored > 0)
    row = dict(token_acc=(scored.sum().item() - wrong.sum().item()) / max(scored.sum().item(), 1),
               scored=scored.sum().item(),
               exact=exact.sum().item() / max((scored > 0).sum().item(), 1), tokens_per_s=batch * length / seconds,
               seconds=round(seconds, 2), peak_mib=peak_mib(device))
    if hasattr(task, "depths"):
        bins = (task.depths(batch, length, seed) * 4).long().clamp(0, 3)
        row["by_depth"] = [exact[bins == k].float().mean().item() if (bins == k).any() else None for k in range(4)]
        row["depth_counts"] = torch.bincount(bins, minlength=4).tolist()
    return row


def wilson(p, n, z=1.96):
    """The 95% Wilson interval of a proportion p seen in n independent trials (Wilson 1927): (low, high)."""
    if n == 0:
        return 0.0, 1.0
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(
        p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def read_cell(spec):
    """One trained cell (its chosen run, spec["run"]) reads test streams of growing length until it meets a wall;
    returns its rows. A worker of `read_streams`, as run_one is of training."""
    device, run, m, t = spec["device"], spec["run"], spec["model"], spec["task"]
    cap, piece, shared = SCALE["attention_cap_s"], SCALE["piece"], spec.get("shared", False)
    trained = stages(run["train"])[-1][1]
    if run.get("diverged_at") is not None:                        # every lr diverged: nothing to read with
        return [dict(model=m, task=t, length=trained, trained=trained, batch=0, state_floats=None,
                     wall="every learning rate diverged in training")]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    task = tasks.TASKS[t](**run["task_options"])
    model = build_model(m, task.vocab_size, **run["model_options"])
    model.load_state_dict(torch.load(os.path.join(spec["out"], run["weights"]), weights_only=True))
    model.to(device).eval()
    batch, last, rows = SCALE["examples"][t], None, []
    # On a GPU, a CUDA stream of its own: the cells' kernels run side by side (threads of one process). Not the
    # capture stream, which torch's pool of streams hands out again in turn: kernels on it would join a capture.
    stream = torch.cuda.Stream(device) if cuda else None
    while cuda and stream == side_stream(torch.device(device), "capture"):   # (the key capture() is called with)
        stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        scale_read(model, task, min(2 * piece, spec["lengths"][0]), batch, piece, device, 1, shared)   # warm-up
        for L in spec["lengths"]:
            row = dict(model=m, task=t, length=L, trained=trained, batch=batch, state_floats=model.state_size(L),
                       weights=run["weights"], trained_in=run.get("train_time_s"))   # which training: read_streams
            predicted = last[1] * (L / last[0]) ** 2 if last else 0          # attention: time grows as T^2
            if not hasattr(model, "stream") and predicted > cap:
                row["wall"] = f"time: {predicted:,.0f} s predicted > {cap:.0f} s cap"
            else:
                try:
                    row.update(scale_read(model, task, L, batch, piece, device, 20_000 + L, shared), shared=shared)
                    last = (L, batch * L / row["tokens_per_s"])          # unrounded: row["seconds"] has 10 ms steps
                except torch.OutOfMemoryError:
                    row["wall"] = "out of memory"
            rows.append(row)
            if row.get("wall"):
                break                                              # longer lengths would hit it too
    return rows


def read_streams(best, lengths, workers, devices, out, rows, save, stored=()):
    """--scale's second half: each trained cell reads its test streams (`read_cell`), the cells side by side (a
    stream is read one small segment or chunk after another, too little to fill a GPU); a cell's rows join `rows`
    as it ends, then save(). A cell whose rows an earlier command stored (`stored`: the same weights and training
    time, streams and lengths, read to the end or to a wall) is not read again; the rows of cells not read now stay."""
    order = {cell: i for i, cell in enumerate(sorted(best, key=lambda c: (c[1], list(MODELS).index(c[0]))))}

    def done(cell_rows):   # the rows kept by task, then model, then length, whichever cell ends first
        rows.extend(cell_rows)
        rows.sort(key=lambda r: (order.get((r["model"], r["task"]), len(order)), r["length"]))
        save()
        return []
    others = [r for r in stored if (r.get("model"), r.get("task")) not in best]   # cells this command does not read
    if others:
        done(others)
    specs, reused = [], 0
    for (m, t), rs in best.items():
        want = lengths or SCALE["lengths"][t]
        old = [r for r in stored if (r.get("model"), r.get("task"), r.get("batch")) == (m, t, SCALE["examples"][t])
               and rs[0].get("weights") and (r.get("weights"), r.get("trained_in")) == (rs[0]["weights"],
                                                                         rs[0].get("train_time_s"))]
        read = [r["length"] for r in old]
        if old and (read == want or old[-1].get("wall") and read == want[:len(read)]):
            done(old)
            reused += 1
        else:
            specs.append(dict(model=m, task=t, run=rs[0], lengths=want, out=out))
    # On GPUs the cells are threads of this process, each on a CUDA stream of its own, so that their kernels run at
    # once: processes time-slice a GPU, their kernels never overlap (four RMT readers took 3x as long as one alone;
    # a graphed training step fills the GPU on its own, so training loses nothing to that). Up to READERS a GPU.
    cuda = torch.device(devices[0]).type == "cuda"
    workers = min(len(specs), READERS * len(devices)) if cuda else workers
    shared = cuda and workers > len(devices)          # a GPU's peak memory is then its readers' together
    for d in devices if shared else []:
        peak_mib(d, start=True)
        side_stream(torch.device(d), "capture")       # made here, once: the readers compare their streams with it
    specs = [dict(s, shared=shared) for s in specs]
    print(f"streams: {reused} cells read by an earlier command reused, {len(specs)} to read now"
          + (f", {workers} at once on {len(devices)} GPU(s)" if cuda and specs else ""))
    run_all(specs, workers, devices, done, work=read_cell, threads=cuda)


def streams_report(rows):
    """The tables of --scale's reading, and its figure: accuracy (with its 95% interval) per task and peak memory
    against length. BABILong scores one answer per stream, so its interval is over the streams read."""
    def accuracy(r):
        low, high = wilson(r["token_acc"], r["scored"])
        return f"{r['token_acc']:.3f} [{low:.3f}, {high:.3f}]"
    cells = lambda r: [r["model"], r["task"], f"{r['length']:,}", r["batch"]] + (  # noqa: E731
        [f"wall: {r['wall']}", "", "", ""] if r.get("wall") else
        [accuracy(r), f"{r['scored']:,}", f"{r['tokens_per_s']:,.0f}",
         "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}" + ("*" if r.get("shared") else "")]) + [
            "-" if r["state_floats"] is None else f"{r['state_floats']:,}"]
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    trained = {r["task"]: r.get("trained", CURRICULUM[-1][1]) for r in rows}
    panels = []
    for t in task_names:
        task = tasks.TASKS[t]()   # (the scale preset's tasks have their default options)
        panel = dict(title=f"{t} (trained <= {trained[t]:,})", xlabel="test length (tokens)",
                     chance=1 / task.n_places if hasattr(task, "n_places") else 0.5,
                     ylabel="accuracy (band: 95% interval)", marks=[(r["length"], r["model"]) for r in rows
                                                                   if r["task"] == t and r.get("wall")],
                     mark_label="wall", **series(rows, "token_acc", task=t), **ACCURACY)
        read = {(r["model"], r["length"]): r for r in rows if r["task"] == t and not r.get("wall")}
        panel["intervals"] = {m: [wilson(read[m, x]["token_acc"], read[m, x]["scored"]) if (m, x) in read else None
                                  for x in panel["xs"]] for m in panel["lines"]}
        panels.append(panel)
    together = ", all readers" if any(r.get("shared") for r in rows) else ""
    panels.append(dict(title=f"peak GPU memory ({task_names[0]}{together})", xlabel="test length (tokens)",
                       ylabel="MiB", yscale="log", **series(rows, "peak_mib", task=task_names[0])))   # (none on a CPU)
    deep = [r for r in rows if r.get("by_depth")]
    depth_table = ["### Exact match by the depth of the deciding fact (streams in each quarter)", "", md_table(
        ["model", "task", "length", "0-25%", "25-50%", "50-75%", "75-100%"],
        [[r["model"], r["task"], f"{r['length']:,}"] + ["-" if v is None else f"{v:.2f} ({n})"
                                                         for v, n in zip(r["by_depth"], r["depth_counts"])]
         for r in deep]), ""] if deep else []
    return "\n".join([
        "## Streams: read with the weights trained above (" + ", ".join(
            f"{t} at <= {n:,} tokens" for t, n in trained.items()) + ")", "",
        f"Recurrent models `stream` pieces of {SCALE['piece']:,} tokens, carrying their state; attention reads each "
        f"sequence in one call until one is predicted to take over {SCALE['attention_cap_s']:.0f} s (time ~ T^2) or "
        "runs out of memory. The cells read side by side, so tokens/s (model time, all of a cell's sequences) is each "
        "one's share; peak memory includes the weights, and * marks its GPU's, all cells on it together (- on a CPU). "
        "Accuracy is over scored positions: one per BABILong stream, so its 95% Wilson interval is over the streams; "
        "flip-flop's reads in one stream are not independent, so its interval is too narrow.", "",
        md_table(["model", "task", "length", "batch", "accuracy [95% interval]", "scored", "tokens/s", "peak MiB",
                  "state floats"], [cells(r) for r in rows]), ""] + depth_table), panels

# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, never a traceback
        self.exit(2, f"compare.py: error: {message}\n")


def csv(kind, what, ok=lambda v: True):
    """An argparse type: 'a,b,c' -> [kind(a), kind(b), kind(c)]: at least one value, each ok(value), none twice."""
    def parse(s):
        try:
            values = [kind(v.strip()) for v in s.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(map(ok, values)):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise argparse.ArgumentTypeError(f"{twice[0]} is given twice in {s!r}; expected comma-separated {what}, "
                                             "each once")
        return values
    return parse


def positive(s):
    """An argparse type: an integer >= 1."""
    if not s.strip().isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return int(s)


class LiveBytes(TorchDispatchMode):
    """While active, keeps the peak of the bytes of the tensors that ops made and that still live: the memory a piece
    of code needs on any device (a CPU has no peak counter). Views and in-place results make none. The op after the
    first max_ops raises LiveBytes.TooLong."""

    class TooLong(Exception):
        pass

    def __init__(self, max_ops=math.inf):
        super().__init__()
        self.live = self.peak = self.ops = 0
        self.max_ops = max_ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if self.ops > self.max_ops:
            raise LiveBytes.TooLong
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info for r in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    size = t.untyped_storage().nbytes()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self.free, size)
        return out

    def free(self, size):
        self.live -= size


def eval_bytes(model, tokens, device, max_ops=5000):
    """About the memory `evaluate` needs to read one sequence of `tokens` tokens: LiveBytes counts the forward at
    1,024 tokens, then on fake tensors (shapes without data) at 4x, 16x, ... up to `tokens`; counted, not scaled,
    since the SSM's chunk-to-chunk decays grow as (T / chunk)^2. Past max_ops in a forward (RMT's and Titans' Python
    loops over segments), the longest count is scaled linearly: such a model carries a fixed-size state."""
    n, counted = min(1024, tokens), None
    while counted is None or counted[0] < tokens:
        try:
            with (FakeTensorMode(allow_non_fake_inputs=True) if counted else contextlib.nullcontext()), \
                    torch.no_grad(), LiveBytes(max_ops if counted else math.inf) as live:
                x = y = torch.zeros(1, n, dtype=torch.long, device=device)    # the tokens and targets, as evaluate
                with autocast(device):
                    logits = model(x).float()
                F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"), logits.argmax(-1)
        except Exception:   # past max_ops (LiveBytes.TooLong), or an op that fake tensors cannot run
            if counted is None:
                raise
            break
        counted, n = (n, live.peak), min(4 * n, tokens)
    return counted[1] * tokens / counted[0]


def device_bytes(device):
    """The memory of a device: a GPU's own, or the machine's for the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


SEEDS = 2 ** 32         # seeds are 0 .. 2**32 - 1, so every generator seed made from one fits
LR_RANGE = (1e-6, 1.0)  # AdamW moves a weight by about lr a step: below, nothing is learnt; above, steps outgrow it


@dataclass(frozen=True)
class Command:
    """What a command asks for, its flags checked and the preset's defaults filled in (`parse_args`)."""
    preset: str
    models: list
    chosen_models: bool         # --models given; else each task may name its own models (the maze)
    tasks: list
    seeds: list
    lrs: list
    steps: int | None           # None: each task's own
    test_lengths: list | None   # None: each task's own
    stream_lengths: list | None  # --scale's --test-lengths; None: SCALE's
    device: str                 # cpu, cuda (every GPU) or cuda:i
    workers: int | None
    out: str
    fresh: bool
    bench: bool
    scale: bool
    line: str                   # the command line, as the reports show it


def parse_args(argv):
    p = Parser(description="Train every model on every task and compare them.")
    p.add_argument("--preset", choices=[name for name in PRESETS if name != "scale"],
                   help="default: full on CUDA, quick otherwise")
    p.add_argument("--models", type=csv(str, "names"), help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--tasks", type=csv(str, "names"), help=f"comma-separated, from: {', '.join(tasks.TASKS)}")
    p.add_argument("--seeds", type=csv(int, f"integers from 0 to {SEEDS - 1}", lambda v: 0 <= v < SEEDS),
                   help="comma-separated seeds (the first runs the lr sweep)")
    p.add_argument("--lrs", type=csv(float, f"learning rates from {LR_RANGE[0]:g} to {LR_RANGE[1]:g}",
                                     lambda v: LR_RANGE[0] <= v <= LR_RANGE[1]),
                   help="comma-separated learning rates to sweep")
    p.add_argument("--steps", type=positive, help="override every task's number of training steps")
    p.add_argument("--test-lengths", type=csv(int, "positive integers", lambda v: v > 0), help="override every "
                   "task's test lengths (with --bench: the lengths measured; with --scale: the streams' lengths)")
    p.add_argument("--device", help="cpu, cuda (every GPU), cuda:1 (that GPU only); default: cuda when available")
    p.add_argument("--workers", type=positive, help="runs at once, each in its own process (default: 4 per GPU, "
                   "up to 4 on a CPU; never more than the CPU cores). --scale reads its streams on GPUs in threads "
                   "instead, up to 8 a GPU")
    p.add_argument("--out", default=os.path.join(ROOT, "runs"), help="folder for results and plots (default: runs/)")
    p.add_argument("--fresh", action="store_true", help="start over; the old results file is kept under a new name")
    p.add_argument("--bench", action="store_true", help="measure time and memory against length instead of training")
    p.add_argument("--scale", action="store_true", help="train the scale preset (flip-flop at <= 256 tokens, "
                   "BABILong's qa1 and qa2 at <= 512), then read streams of up to 11M tokens")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        p.error(f"unknown device {args.device!r}")
    if not (device.type == "cpu" and not device.index
            or device.type == "cuda" and (device.index or 0) < torch.cuda.device_count()):
        p.error(f"device {args.device!r} is not available here; this machine has cpu and "
                f"{torch.cuda.device_count()} CUDA GPU(s)")
    if args.scale and (args.preset or args.bench):
        p.error("--scale trains its own preset and measures its own costs; leave out --preset and --bench")
    name = "scale" if args.scale else args.preset or ("full" if device.type == "cuda" else "quick")
    preset = PRESETS[name]
    command = Command(   # with --scale the test lengths are the streams': the runs test at their training length
        preset=name, models=args.models or preset["models"], chosen_models=args.models is not None,
        tasks=args.tasks or list(preset["tasks"]), seeds=args.seeds or preset["seeds"], lrs=args.lrs or preset["lrs"],
        steps=args.steps, test_lengths=None if args.scale else args.test_lengths,
        stream_lengths=args.test_lengths if args.scale else None, device="cpu" if device.type == "cpu" else str(device),
        workers=args.workers, out=args.out, fresh=args.fresh, bench=args.bench, scale=args.scale,
        line="python compare.py " + " ".join(sys.argv[1:] if argv is None else argv))
    for kind, names, known in [("model", command.models, MODELS), ("task", command.tasks, tasks.TASKS)]:
        for n in names:
            if n not in known:
                p.error(f"unknown {kind} {n!r}; choose from {', '.join(known)}")
    for t in command.tasks:
        if t not in preset["tasks"] and not args.bench:
            has = [n for n, pr in PRESETS.items() if t in pr["tasks"] and n != "scale" and not args.scale]
            p.error(f"task {t!r} has no settings in preset {name!r}; it has {', '.join(preset['tasks'])}"
                    + (f" (try {' or '.join(f'--preset {n}' for n in has)})" if has else ""))
    longest = max([stages(preset["tasks"][t].train)[-1][1] for t in command.tasks if args.scale] or [0])
    if min(command.stream_lengths or [math.inf]) < longest:   # --scale reads no shorter than it trained
        p.error(f"--test-lengths with --scale are stream lengths, at least {longest} tokens (the longest training "
                f"length), got {command.stream_lengths}")
    folder = "expected a folder (new or existing) that this process can write to"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is a file; {folder}")
    try:
        os.makedirs(args.out, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()          # a name of its own: other commands may be testing too
    except OSError as e:
        why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "a read-only file "
               "system", errno.ENOSPC: "no space left", errno.ENOTDIR: "a part of the path is a file"}.get(
                   e.errno, "no file can be made there")
        p.error(f"--out {args.out!r}: {why}; {folder}")
    if args.bench:
        return command
    tokens = {}
    for t in command.tasks:  # ask each task whether it can make what we will ask of it
        b = preset["tasks"][t]
        for L in (command.test_lengths or b.test) + sum(stages(b.train), []):
            try:
                tokens[t, L] = tasks.TASKS[t](**b.options).sample(1, L, 0)[0].shape[1]
            except ValueError as e:
                p.error(str(e))
    if not any(task_models(command, t) for t in command.tasks):
        p.error(f"none of the models {', '.join(command.models)} can run the tasks {', '.join(command.tasks)}")
    longest = max(command.test_lengths or [0])
    if longest > 2 ** 16:   # past one of evaluate's batches: would its one sequence fit? Asked now, not after training
        memory = device_bytes(command.device)
        for s in {(s["model"], s["task"]): s for s in make_specs(command)}.values():
            task = tasks.TASKS[s["task"]](**s["task_options"])
            model = build_model(s["model"], task.vocab_size, **s["model_options"]).to(command.device).eval()
            need = eval_bytes(model, tokens[s["task"], longest], command.device)
            if need > memory:
                p.error(f"--test-lengths {longest}: testing {s['model']} on {s['task']} at that length reads "
                        f"{tokens[s['task'], longest]:,} tokens at once and needs about {need / 2 ** 30:,.1f} GiB, "
                        f"more than the device's {memory / 2 ** 30:,.1f} GiB ({command.device}); expected test "
                        f"lengths whose evaluation fits in {memory / 2 ** 30:,.1f} GiB")
    return command


# ---------------------------------------------------------------------------------------------------------
# main: the runs a command owes, trained and stored as they finish, then the report
# ---------------------------------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`), raised in the main process so that it stops the command as Ctrl-C does."""


def terminated(signum, frame):
    raise Terminated


def stopped(stop, command, path, results, n_run):
    """What a stopped command says it kept; its exit status (130 for Ctrl-C, 143 for SIGTERM)."""
    again, how = f"run the same command{' without --fresh' if command.fresh else ''}", (
        " by SIGTERM" if isinstance(stop, Terminated) else "")
    if "streams" in results:   # the training is all stored, and the cells read to the end
        cells = len({(r["model"], r["task"]) for r in results["streams"]})
        print(f"\nstopped{how} while reading streams: the {cells} cells read to the end are saved in {path}; {again}"
              " to reuse the training and those cells, and read the others")
    elif n_run:
        print(f"\nstopped{how}: the {n_run} runs finished by this command are saved in {path}; {again} to go on "
              "from there")
    else:
        print(f"\nstopped{how} before any run finished: nothing new was saved")
    return 128 + signal.SIGTERM if isinstance(stop, Terminated) else 130


def main(argv=None):
    command = parse_args(argv)
    cuda = command.device.startswith("cuda")
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if command.device == "cuda" else [command.device]
    meta = dict(preset=command.preset, command=command.line, device=command.device,
                device_name=(f"{len(devices)} x " if len(devices) > 1 else "") + torch.cuda.get_device_name(devices[0])
                if cuda else "CPU", torch=torch.__version__,
                commit=git_commit(), dtype="bf16 autocast" if cuda else "fp32", lrs=command.lrs)
    if command.bench:
        return bench(command, meta)
    path = os.path.join(command.out, f"{command.preset}.json")
    store = Store(path, command.preset, command.fresh)
    results = {"meta": meta, "runs": store.runs}
    this = dict(id=f"{os.getpid()}@{time.time_ns()}", wall_time_s=0.0, runs_run=0, commit=meta["commit"],
                device_name=meta["device_name"])
    meta["commands"] = store.commands + [this]   # this command's entry is kept up to date with each run
    # a graphed training step keeps a GPU busy alone (--bench's sharing table: processes time-slice it), so a few
    # runs a GPU are enough to overlap the host work
    cores = usable_cores()   # never more workers than cores, whatever --workers asks (it says so)
    meta["workers"] = workers = min(command.workers or (4 * len(devices) if cuda else 4), cores)
    capped = (f" (--workers {command.workers} is capped at the {cores} CPU cores)"
              if workers < (command.workers or 0) else "")
    print(f"preset {command.preset!r} on {meta['device_name']} ({command.device}), {workers} worker(s){capped}; runs "
          f"are saved in {path}")

    schedule = Schedule(command, store, results, this)
    print(schedule.summary())
    sigterm = signal.signal(signal.SIGTERM, terminated)
    try:
        train_owed(schedule, workers, devices)
        runs = [store.runs[run_key(s)] for s in schedule.owed()]
        if command.scale:   # read the long streams with the trained weights; each row is saved as it comes
            longest = max(command.stream_lengths or sum(SCALE["lengths"].values(), []))
            print(f"reading streams of up to {longest:,} tokens")
            stored = json.load(open(path)).get("streams", []) if os.path.exists(path) else []   # (checked by Store)
            results["streams"] = []
            read_streams(best_runs(runs), command.stream_lengths, workers, devices, command.out, results["streams"],
                         functools.partial(store.save, results), stored)
    except KeyboardInterrupt as stop:               # Ctrl-C, or SIGTERM: the workers are stopped by now
        if schedule.n_run:
            store.save(results)                     # (in case the stop came while the last run was being saved)
        return stopped(stop, command, path, results, schedule.n_run)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        store.release()
    meta.update(wall_time_s=round(time.time() - schedule.start, 1), runs_run=schedule.n_run,
                runs_reused=len(runs) - schedule.n_run)
    this.update(wall_time_s=meta["wall_time_s"])
    store.save(results)
    models = list(dict.fromkeys(m for t in command.tasks for m in task_models(command, t)))
    text, figures = report(runs, meta, command.tasks, models)
    if command.scale:   # its figure is the streams'; the runs' own test is only at the training length
        streams_text, panels = streams_report(results["streams"])
        text, figures = text + "\n" + streams_text, {"streams": panels}
    with open(os.path.join(command.out, f"{command.preset}.md"), "w") as f:
        f.write(text)
    print(text)
    made = collections.Counter(f"{r.get('device_name')}, commit {r.get('commit')}" for r in runs)   # not this command's
    title = "; ".join(f"{where} ({n} runs)" if len(made) > 1 else where for where, n in made.most_common())
    if command.scale:
        title = f"trained on {title}; read on {meta['device_name']}, commit {meta['commit']}"
    for name, panels in figures.items():
        plot(os.path.join(command.out, f"{command.preset}_{name}.png"), panels, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
