"""
compare.py: train every model on every task at matched size, and show when filtering beats copying.

    python compare.py                    # `full` on a GPU, `quick` on a CPU (it says which)
    python compare.py --preset smoke     # every model and task for a few steps: checks the plumbing
    python compare.py --preset depth     # mazes: recurrent depth (HRM) against a fixed-depth Transformer
    python compare.py --models attention,ssm --tasks copy,flipflop --seeds 0,1,2
    python compare.py --bench            # time and memory against length (untrained models)
    python compare.py --scale            # train BABILong on streams up to 524,288 tokens, then read up to 11M

This file is the lesson: how a fair comparison is made. It reads top to bottom: training, evaluation, the models,
the budgets and presets, the protocol (which runs, which learning rate, one run), running the two phases, main.
The engineering it leans on (CUDA graphs, the results file, worker processes, the command line, reports, --bench,
--scale) lives in harness/, which a reader need not open.

How the comparison is made fair, and where each rule lives:
  1. The same budget for every model on a task: steps, batch, training lengths and their curriculum, optimiser
     and schedule (`Budget`, `PRESETS`, `train`); a model that cannot afford a stage stops at its wall, stated
     (`Budget.walls`, `make_specs`).
  2. Matched size: one width and depth per task, parameter counts within +-10% of the Transformer's
     (`PRESETS[...]["size"]`; tests/test_compare.py checks every model on every task of the full and depth presets).
  3. Each model at its own best learning rate: the same log-spaced grid on the first seed (the full preset's recall:
     all three, `sweep_seeds`), the best mean validation accuracy over the last stage's lengths, log-spaced too,
     wins (`val_lengths`; ties: the lower validation loss), never a rate with a diverged run while another has none
     (`make_specs`, `best_runs`); a choice on the edge of the grid is marked, since a better rate may lie outside.
  4. Several seeds on the headline cells, at the chosen rate, reported as mean +- half the spread (`seeded`).
  5. The same questions for everyone: test sets are drawn from fixed seeds (`run_one`, `evaluate`).
  6. Cost in the open: parameters, state floats, steps, examples and wall time of every cell (the report's Runs
     table).

Runs are stored in runs/<preset>.json (untracked) as each finishes and reused only while their whole spec is
unchanged: a stopped command resumes, a changed setting re-runs what it changes. The committed results live in
results/reference/, which the bench never reads.
"""
import collections
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from statistics import fmean

import torch
import torch.nn.functional as F
from tqdm import tqdm

import attention
import hrm
import rmt
import ssm
import tasks
import titans
from harness import bench, cli, report, runner, scale, store
from harness.graphs import StepGraphs

PROTOCOL = 10   # bumped when training or scoring changes meaning: stored runs of another protocol are re-run
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


def val_lengths(train_lengths):
    """The validation lengths: four spread evenly on a log scale over the last stage [lo, hi] (one when lo == hi),
    so that the lr is chosen on what training asked for at the end, not on its hardest length alone, where a model
    at the floor would leave the choice to noise. Log, not linear: recall's last stage spans 2-255 pairs, and a small
    state's knee lies in its first decade (evenly spaced, 2 / 86 / 171 / 255 pairs, every rate of Titans' MLP
    memories and of RMT scored 0.25-0.26 in full runs at protocol 9: right at 2 pairs, at the floor beyond)."""
    lo, hi = stages(train_lengths)[-1]
    return sorted({round(lo * (hi / lo) ** (i / 3)) for i in range(4)})


def stage_batches(train_lengths, batch_size, tokens_per_step=None):
    """The batch of each stage: batch_size streams, or, once batch_size streams of the stage's longest length hi
    would hold more than tokens_per_step tokens, tokens_per_step // hi of them (at least one). So the short stages
    train at the full batch, and a step of long streams reads about as many tokens as the last short one."""
    return [batch_size if tokens_per_step is None else max(1, min(batch_size, tokens_per_step // hi))
            for _, hi in stages(train_lengths)]


def stage_steps(steps, n_stages):
    """The steps of each of a curriculum's stages: `steps` itself when it is a list (a count a stage), else equal
    shares of the int (step s falls in stage s * n_stages // steps)."""
    if isinstance(steps, list):
        if len(steps) != n_stages:
            raise ValueError(f"{len(steps)} step counts for {n_stages} stages")
        return list(steps)
    return [-(-(k + 1) * steps // n_stages) + (k * steps // -n_stages) for k in range(n_stages)]


def all_logits(model, x):
    """The logits to train on: HRM's one per segment (deep supervision), every other model's one."""
    return model.segment_logits(x) if hasattr(model, "segment_logits") else [model(x)]


def train(model, task, steps, batch_size, lr, train_lengths, device="cpu", seed=0, weight_decay=0.1,
          warmup=0.1, clip=1.0, progress=False, graphs=True, check_every=200, tokens_per_step=None, restarts=False):
    """AdamW, the lower of a linear warm-up (10% of the steps) and a cosine decay (with `restarts`, each stage's
    own, as if it were a training of its own from the last one's weights), gradient clipping. Each batch draws its
    length uniformly from train_lengths = [lo, hi], or from the stage of a curriculum [[lo, hi], ...] that the step
    falls in (`stage_steps`: equal shares, or a count a stage), with that stage's batch (`stage_batches`: fewer
    streams once they are long) and a rate scaled by the square root of its share of batch_size, since a gradient
    over fewer examples is noisier (the rate of Adam's square-root scaling rule, Malladi et al. arXiv 2205.10287).
    HRM: one loss per segment (deep supervision), one step on their mean.
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
    plan, batches = stages(train_lengths), stage_batches(train_lengths, batch_size, tokens_per_step)
    counts = stage_steps(steps, len(plan))
    stage_of = [k for k, n in enumerate(counts) for _ in range(n)]    # step -> its stage
    steps, first = len(stage_of), [sum(counts[:k]) for k in range(len(plan))]

    def schedule(s):   # the lr's factor at step s: its place in the schedule it belongs to, and that one's length
        at, span = (s - first[stage_of[s]], counts[stage_of[s]]) if restarts else (s, steps)
        return min((at + 1) / max(1, int(warmup * span)), 0.5 * (1 + math.cos(math.pi * at / span))) * math.sqrt(
            batches[stage_of[s]] / batch_size)

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
    losses, read = torch.zeros(steps, device=device), 0
    for s in tqdm(range(steps), desc="train", leave=False, disable=not progress):
        k = stage_of[s]
        lo, hi = plan[k]
        x, y = sample(batches[k], int(torch.randint(lo, hi + 1, (1,), generator=g)), g, "cpu" if fast else device)
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
    scored position of an example right; None if no example is scored), and where the task defines them by_depth
    (exact match in four bins of the deciding fact's depth: babilong) or by_path (the maze: {lowest path length of
    a PATH_BIN bin: [exact, examples]}). `segments`: the test-time depth (HRM's segments, the looped Transformer's
    loops). `batches`: test_batches' examples made before, to read them again."""
    knob = "segments" if hasattr(model, "segment_logits") else "loops"
    forward = model if segments is None else lambda x: model(x, **{knob: segments})
    model.to(device).eval()
    right = total = exact = scored_examples = loss = 0
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
    loss = loss / max(total, 1)      # inf or nan from a model whose outputs overflow: stored as null (strict JSON)
    result = {"token_acc": right / max(total, 1), "loss": loss if math.isfinite(loss) else None,
              "exact": exact / scored_examples if scored_examples else None}
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
    test: list                  # test lengths (recall: key-value pairs)
    steps: int | list           # optimiser steps: in all, or a count a stage of the curriculum
    options: dict = field(default_factory=dict)        # the task's constructor options
    models: list = None         # the models that run it (default: the preset's)
    seeded: list = field(default_factory=list)         # headline models: every seed, not only the first
    size: dict = field(default_factory=dict)           # the task's model size, over the preset's
    model_options: dict = field(default_factory=dict)  # model -> options of its own (HRM's training segments)
    segments: list = None       # HRM's test-time segments to evaluate
    dial: dict = field(default_factory=dict)           # model -> {option: [values]}: other state sizes
    tokens_per_step: int = None  # long stages take fewer streams a step, about this many tokens (`stage_batches`)
    restarts: bool = False      # each stage its own warm-up and cosine decay (`train`)
    walls: dict = field(default_factory=dict)          # model -> (length, why): it trains the stages up to there
    sweep_seeds: int = 1        # seeds the lr sweep runs on (every model), choosing on their mean; the rest run at it


LRS = [2e-4, 1e-3, 5e-3, 2.5e-2]   # the sweep: four rates 5x apart (two decades), the same for every model
CURRICULUM = [[32, 64], [64, 128], [128, 256]]   # lengths for the long-stream tasks, in three stages
# --scale's BABILongs: four short stages at the full batch, 1,000 steps each (at 200 the SSM had not learnt the
# task by 512 tokens), then 4,096 to 524,288 tokens at about 2**17 tokens a step, 250 steps each: a gate keeps a
# fact about as far as training asked (trained to 262,144, the SSM recalled half the facts further back in 1M).
# A model trains a stage only while its step takes <= 0.3 s (graphed, alone on one GPU; results/README.md, Scale).
# At 1,048,576 attention's takes 4.5 s; the SSM's is quick (55.6 GiB for one stream), but a stage there made it
# worse at every length (a pilot, results/README.md, Scale), so the curriculum ends at 524,288.
BABI_CURRICULUM = [[33, 64], [64, 128], [128, 256], [256, 512]] + [[2 ** k] * 2 for k in (12, 14, 16, 18, 19)]
BABI_STEPS = [1000] * 4 + [250] * 5
SCALE_WALLS = {   # model -> (its longest stage, why it stops there)
    "attention": (262144, "a step at 524,288 tokens takes 0.79 s (0.25 s at 262,144; time ~ T^2), over the 0.3 s "
                  "limit"),
    "rmt": (4096, "a step at 16,384 tokens takes 0.33 s (its loop over 32-token segments), over the 0.3 s limit"),
    "titans": (512, "a step at 4,096 tokens takes 0.32 s (its loop over 16-token chunks), over the 0.3 s limit")}
HARD_RECALL = dict(vocab_size=512, random_non_queries=True, distinct_values=True)   # as Zoology's own MQAR
SEQUENCE_MODELS = ["attention", "ssm", "rmt", "titans"]
HRM_SEGMENTS = {"hrm": dict(segments=4), "hrm_last_cycle": dict(segments=4)}   # the depth preset's training depth
PRESETS = {
    "smoke": dict(  # the plumbing, not the science: every model and task, a few steps, one lr
        models=[m for m in MODELS if m != "attention_looped"], size=dict(d_model=32, n_layers=2), batch_size=16,
        lrs=[3e-3], seeds=[0], eval_examples=16, tasks={
            "copy": Budget(train=[2, 6], test=[6, 12], steps=15),
            "recall": Budget(train=[[2, 3], [3, 4]], test=[2, 4], steps=15, options=dict(vocab_size=16),
                             dial={"ssm": {"d_state": [4]}}),
            "flipflop": Budget(train=[32, 32], test=[32, 128], steps=15),
            "babilong": Budget(train=[32, 32], test=[32, 96], steps=15, options=dict(max_facts=4)),
            "maze": Budget(train=[2, 2], test=[2, 3], steps=15, segments=[1, 2], options=dict(canvas=7, n_train=20),
                           models=list(MODELS)),
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
            # each stage keeps the fewest pairs too (as copy's), and the first (4,000 steps) fits in one RMT segment:
            # every state size of the dial past its phase change at 4 pairs (RMT's read slots are attention sinks that
            # delay it); up to 255 pairs (the most a vocabulary of 512 has keys for), to take the default SSM past its
            # knee: trained to 128, it still recalled 0.57 there. The middle stage is long: a run that starts the
            # last one unsettled on 32 pairs can lose even the short contents (one SSM seed in seven did at 2,000
            # steps). The sweep runs every seed: at 2.5e-2 RMT recalled 4 pairs on seeds 0, 2, 4, 5 and on 1, 3, 6
            # stayed at chance (0.26), so a rate chosen on one seed's luck would report the others at chance
            "recall": Budget(train=[[2, 8], [2, 32], [2, 255]], test=[4, 8, 16, 32, 64, 128, 255],
                             steps=[4000, 4000, 2000], sweep_seeds=3,
                             options=HARD_RECALL, models=SEQUENCE_MODELS, seeded=SEQUENCE_MODELS,
                             dial={"ssm": {"d_state": [4, 64]}, "rmt": {"n_mem": [2, 32]},
                                   "titans": {"memory": ["linear"], "memory_expand": [4]}}),
            "flipflop": Budget(train=CURRICULUM, test=[256, 1024, 4096], steps=500, seeded=SEQUENCE_MODELS + ["hrm"]),
            "babilong": Budget(train=CURRICULUM, test=[256, 1024, 4096], steps=500, models=SEQUENCE_MODELS,
                               seeded=SEQUENCE_MODELS),
        }),
    "depth": dict(  # one GPU: recurrent depth (HRM, a looped Transformer) against a fixed-depth Transformer of the
        # same size, on mazes graded by the length of their path
        models=["attention", "attention_looped", "hrm", "hrm_last_cycle"],
        size=dict(d_model=128, n_heads=4, n_layers=4), batch_size=128,
        lrs=LRS, seeds=[0, 1, 2], eval_examples=256, tasks={
            # up to 10x10 cells (a 21x21 grid), graded by path length; trained on paths of >= 30 squares
            "maze": Budget(train=[6, 6], test=[6, 8, 10], steps=800, segments=[1, 2, 4, 8, 16],
                           seeded=["attention", "hrm"], model_options=HRM_SEGMENTS,
                           options=dict(canvas=21, n_train=1000, min_path=30)),
        }),
    "scale": dict(  # --scale trains these, keeps their weights, then reads long streams (harness/scale.py).
        # BABILong's qa1 and qa2 rise from 33 tokens to 524,288 (BABI_CURRICULUM, BABI_STEPS), each stage with its
        # own lr schedule; a model stops at its wall. RMT backpropagates through 16 segments at most (truncated BPTT)
        models=SEQUENCE_MODELS, size=dict(d_model=64, n_layers=2), batch_size=128,
        lrs=LRS[1:3], seeds=[0], eval_examples=128, tasks={   # two rates keep it within minutes
            "flipflop": Budget(train=CURRICULUM, test=[256], steps=500),   # (its last write is ~20 tokens back)
            **{t: Budget(train=BABI_CURRICULUM, test=[512, 4096], steps=BABI_STEPS, tokens_per_step=2 ** 17,
                         restarts=True, walls=SCALE_WALLS, model_options={"rmt": dict(bptt_depth=16)})
               for t in ("babilong_qa1", "babilong_qa2")}}),
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
    """The runs of one phase: the "lr sweep" on the task's first `sweep_seeds` seeds for each cell, and on the first
    for each of the dial's other sizes (a size may want a rate of its own); then the "seeds": the other seeds at each
    cell's chosen lr, on the task's `seeded` models. --scale's runs also keep their weights, to read streams with."""
    preset, seeds, specs = PRESETS[command.preset], command.seeds, []
    for t in command.tasks:
        b = preset["tasks"][t]
        for m in task_models(command, t):
            if phase != "lr sweep" and (m, t) not in lr_by_cell:
                continue
            options, train, steps, extra = model_config(preset, t, m), b.train, command.steps or b.steps, {}
            if m in b.walls:   # the same stages up to the model's wall, each with its steps
                train = [s for s in stages(b.train) if s[1] <= b.walls[m][0]]
                steps, extra["train_wall"] = stage_steps(steps, len(stages(b.train)))[:len(train)], b.walls[m][1]
            if b.tokens_per_step:
                extra["tokens_per_step"] = b.tokens_per_step
            if b.restarts:
                extra["restarts"] = True
            if b.segments:
                extra["test_segments"] = b.segments
            base = dict(model=m, task=t, task_options=b.options, model_options=options, train=train,
                        test=command.test_lengths or b.test, steps=steps, batch_size=preset["batch_size"],
                        eval_examples=preset["eval_examples"], protocol=PROTOCOL, device=command.device, **extra)
            if phase == "lr sweep":
                specs += [dict(base, lr=lr, seed=s) for lr in command.lrs for s in seeds[:b.sweep_seeds]]
                specs += [dict(base, lr=lr, seed=seeds[0], dial={option: v}, model_options={**options, option: v})
                          for option, values in b.dial.get(m, {}).items() for v in values for lr in command.lrs]
            elif phase == "seeds" and (command.chosen_models or m in b.seeded):
                specs += [dict(base, lr=lr_by_cell[(m, t)], seed=s) for s in seeds[b.sweep_seeds:]]
    if command.scale:   # weights named by all that defines the run: other settings never read them
        specs = [dict(s, out=command.out, weights=f"scale_weights/{s['model']}_{s['task']}_{spec_hash(s)}.pt")
                 for s in specs]
    return specs


OPTIONAL = ("dial", "train_wall", "tokens_per_step", "restarts", "test_segments")   # keys only some specs have


def spec_changes(saved, spec):
    """What keeps a stored run from being reused for `spec`: each key that defines a run and differs (one that only
    one of the two has, too), and "weights" when the weights it kept are gone. [] when it may be reused."""
    changed = [k for k in sorted({*spec, *OPTIONAL} - set(WHERE)) if saved.get(k) != spec.get(k)]
    gone = "weights" in spec and not os.path.exists(os.path.join(spec["out"], spec["weights"]))
    return changed + ["weights (the file is gone)"] * gone


def same_spec(saved, spec):
    """A stored run is reused only if all that defines it is unchanged, and the weights it kept, if any, still exist."""
    return saved is not None and not spec_changes(saved, spec)


DIVERGED = "diverged"   # what a diverged run shows in place of a metric


def dial_cell(run):
    """The cell of a run: (model, task), and for a run of the dial's other state sizes (model, task, size)."""
    return (run["model"], run["task"]) + ((tuple(run["dial"].items()),) if run.get("dial") else ())


def best_runs(runs, dial=False):
    """For each (model, task): its runs at the lr chosen on the sweep seeds (those run at every lr): the best mean
    validation accuracy, ties broken by the lower validation loss; an lr where a sweep run diverged only if every
    lr had one (then the one with the fewest). Seeds added later never change the choice. dial=True: the same for
    each (model, task, size) of the dial."""
    by_cell = {}
    for r in runs:
        if bool(r.get("dial")) == dial:
            by_cell.setdefault(dial_cell(r), {}).setdefault(r["lr"], []).append(r)
    best = {}
    for cell, by_lr in by_cell.items():
        sweep = set.intersection(*({r["seed"] for r in rs} for rs in by_lr.values()))

        def score(lr):
            rs = [r for r in by_lr[lr] if r["seed"] in sweep]
            if diverged := sum(r.get("diverged_at") is not None for r in rs):   # (chosen only if every rate has one)
                return -diverged, -math.inf, -math.inf
            return 0, fmean(r["val_token_acc"] for r in rs), -fmean(math.inf if r["val_loss"] is None else r["val_loss"]
                                                                  for r in rs)   # None: an overflowed loss, the worst
        best[cell] = sorted(by_lr[max(sorted(by_lr), key=score)], key=lambda r: r["seed"])
    return best


def edge_cells(runs, best):
    """The cells (or the dial's sizes, with `best` of best_runs(runs, dial=True)) whose chosen lr is the smallest or
    largest of their own grid of several: a better one may lie outside."""
    grids = collections.defaultdict(set)
    for r in runs:
        grids[dial_cell(r)].add(r["lr"])
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
        torch.cuda.set_device(torch.device(device).index or 0)   # streams, graphs and their pools belong to the
        # current GPU: make it the run's ("cuda" alone is GPU 0)
    task = tasks.TASKS[spec["task"]](**spec["task_options"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], task.vocab_size, **spec["model_options"])
    start = time.time()
    losses = train(model, task, spec["steps"], spec["batch_size"], spec["lr"], spec["train"], device,
                   seed=spec["seed"], tokens_per_step=spec.get("tokens_per_step"), restarts=spec.get("restarts", False))
    batches = stage_batches(spec["train"], spec["batch_size"], spec.get("tokens_per_step"))
    train_time, trained = time.time() - start, stages(spec["train"])[-1][1]
    times = lambda: dict(train_time_s=round(train_time, 2), wall_time_s=round(time.time() - start, 2))  # noqa: E731
    tokens = {L: task.sample(1, L, 0)[0].shape[1] for L in spec["test"]}   # length is a task's knob, not T
    record = {**spec, "params": n_params(model), "state_size": {str(L): model.state_size(tokens[L]) for L in tokens},
              "examples_seen": sum(n * b for n, b in zip(stage_steps(spec["steps"], len(batches)), batches)),
              "torch": torch.__version__,
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
    val = [test(L, seed=10_000 + spec["seed"]) for L in val_lengths(spec["train"])]
    metrics, test_seed = {}, 20_000 + spec["seed"]   # the same test examples for every model and lr
    deep = spec.get("test_segments") and (hasattr(model, "segment_logits") or getattr(model.config, "loops", 1) > 1)
    for L in spec["test"]:   # HRM and the looped Transformer: also against test-time depth, on the same examples
        try:
            batches = list(test_batches(task, L, spec["eval_examples"], device, test_seed)) if deep else None
            metrics[str(L)] = test(L, seed=test_seed, batches=batches)
            if deep:
                metrics[str(L)]["by_segments"] = {str(s): test(L, batches=batches, segments=s)
                                                  for s in spec["test_segments"]}
        except torch.OutOfMemoryError:   # this model's wall: longer lengths would not fit either
            metrics.update({str(longer): {"wall": "out of memory"} for longer in spec["test"] if longer >= L})
            break
    return {**record, "diverged_at": None, "final_loss": sum(losses[-20:]) / len(losses[-20:]), **times(),
            "val_token_acc": fmean(v["token_acc"] for v in val),
            "val_loss": None if any(v["loss"] is None for v in val) else fmean(v["loss"] for v in val),
            "metrics": metrics}


# ---------------------------------------------------------------------------------------------------------
# Running the two phases, and main
# ---------------------------------------------------------------------------------------------------------

def chosen_rates(runs):
    """Each cell's chosen lr among these runs; none for a cell where every run of every rate diverged."""
    return {cell: rs[0]["lr"] for cell, rs in best_runs(runs).items()
            if any(r.get("diverged_at") is None for r in rs)}


def run_phases(command, runs, save, workers, devices):
    """The protocol's two phases in order, each run stored by save(record) as it finishes: the lr sweep (every rate
    on the sweep seeds, for every cell and dial size), then the other seeds at each cell's chosen rate. A stored run
    whose spec equals the one asked for is reused; a cell whose sweep is stored whole has its rate chosen already,
    so its other seeds start with the rest of the sweep (a resumed command's long runs wait for nothing). Returns
    the runs of both."""
    done, ran = {}, set()
    for phase in ("lr sweep", "seeds"):
        specs = make_specs(command, phase, chosen_rates(done.values()))
        todo, early = [s for s in specs if not same_spec(runs.get(run_key(s)), s)], []
        above = sum(run_key(s) in ran for s in specs)   # the other seeds this command trained with the sweep
        if phase == "lr sweep":   # the cells whose sweep is stored whole (the dial's sizes aside): rates chosen
            owed = {(s["model"], s["task"]) for s in todo if not s.get("dial")}
            whole = chosen_rates([runs[run_key(s)] for s in specs if s not in todo])
            early = [s for s in make_specs(command, "seeds", {c: lr for c, lr in whole.items() if c not in owed})
                     if not same_spec(runs.get(run_key(s)), s)]
        stale = [s for s in todo + early if run_key(s) in runs]   # stored with other settings: trained again
        changed = sorted({k for s in stale for k in spec_changes(runs[run_key(s)], s)})
        print(f"{phase}: {len(specs) - len(todo) - above} stored runs reused, {len(todo)} to train now" + (
            f" ({above} trained above, with the sweep)" if above else "") + (
            f", with {len(early)} of the other seeds (their cells' sweeps are stored whole)" if early else "") + (
            f" ({len(stale)} because of what changed since they were stored: {', '.join(changed)})" if stale else ""))
        runner.run_all(todo + early, workers, devices, run_one, save)
        ran.update(run_key(s) for s in todo + early)
        done.update({run_key(s): runs[run_key(s)] for s in specs})
    return list(done.values())


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`), raised in the main process so that it stops the command as Ctrl-C does."""


def terminated(signum, frame):   # once: `timeout` signals the process and then its group, so it comes twice
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def quiet(hook):   # the unraisable-error hook, but silent on a SIGTERM that arrived while the handler turned to SIG_IGN
    race = f"Signal {int(signal.SIGTERM)} ignored due to race condition"
    return lambda error: None if isinstance(error.exc_value, OSError) and str(error.exc_value) == race else hook(error)


def main(argv=None):
    command = cli.parse_args(argv, sys.modules[__name__])
    cuda = command.device.startswith("cuda")
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if command.device == "cuda" else [command.device]
    meta = dict(preset=command.preset, command=command.line, device=command.device,
                device_name=(f"{len(devices)} x " if len(devices) > 1 else "") + torch.cuda.get_device_name(devices[0])
                if cuda else "CPU", torch=torch.__version__,
                commit=store.git_commit(), dtype="bf16 autocast" if cuda else "fp32", lrs=command.lrs)
    if command.bench:
        return bench.bench(command, meta, sys.modules[__name__])   # (a stopped bench keeps the rows it measured)
    meta["path"] = path = os.path.join(command.out, f"{command.preset}.json")
    with store.locked(path):                        # one command at a time on a results file
        results = dict(store.load(path, command.preset), meta=meta)
        if not command.scale:
            del results["streams"]                  # (only --scale reads streams)
        runs, trained, reading, start = results["runs"], [], False, time.time()
        # never more workers than cores (a thread waiting for a busy core spins); a graphed step keeps a GPU busy
        # alone, so a few runs a GPU are enough to overlap the host's work
        meta["workers"] = workers = min(command.workers or (4 * len(devices) if cuda else 4), runner.usable_cores())
        capped = f" (--workers {command.workers} is capped at the CPU cores)" if workers < (command.workers or 0) \
            else ""
        print(f"preset {command.preset!r} on {meta['device_name']} ({command.device}), {workers} worker(s){capped}; "
              f"runs are saved in {path}")
        if not cuda and command.preset in ("full", "depth", "scale"):
            print(f"note: {command.preset!r} is sized for a GPU; on a CPU it takes hours (Ctrl-C keeps what finished)")

        def save(record):                           # every finished run is written at once
            runs[run_key(record)] = dict(record, commit=meta["commit"])
            trained.append(record)
            meta.update(wall_time_s=round(time.time() - start, 1), runs_run=len(trained))
            store.save_json(path, results)
        sigterm, unraisable = signal.getsignal(signal.SIGTERM), sys.unraisablehook
        try:
            signal.signal(signal.SIGTERM, terminated)
            sys.unraisablehook = quiet(unraisable)  # (CPython reports it with a traceback; it is one to ignore)
            chosen = run_phases(command, runs, save, workers, devices)
            if command.scale:                       # read the long streams with the weights of the chosen runs
                stored, results["streams"], reading = results["streams"], [], True   # (stored rows come back if reused)
                scale.read_streams(best_runs(chosen), command.stream_lengths, devices, command.out, results["streams"],
                                   lambda: store.save_json(path, results), sys.modules[__name__], stored)
        except KeyboardInterrupt as stop:           # Ctrl-C, or SIGTERM: the workers are stopped by now
            kept = [f"the {len(trained)} runs finished by this command"] if trained else []
            kept += [f"the {len({(r['model'], r['task']) for r in results['streams']})} cells of streams read to the "
                     "end"] if reading else []
            if kept:
                store.save_json(path, results)      # (in case the stop came while a run was being saved)
            print(f"\nstopped{' by SIGTERM' if isinstance(stop, Terminated) else ''}: " + (
                f"{' and '.join(kept)} are saved in {path}; run the same command to go on from there" if kept
                else "nothing new was saved"))
            return 128 + signal.SIGTERM if isinstance(stop, Terminated) else 130
        finally:   # the caller's handler back; where it was SIGTERM's default, a stopping process ignores more
            stopping = sigterm == signal.SIG_DFL and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            signal.signal(signal.SIGTERM, signal.SIG_IGN if stopping else sigterm)
            sys.unraisablehook = unraisable
        meta.update(wall_time_s=round(time.time() - start, 1), runs_run=len(trained),
                    runs_reused=len(chosen) - len(trained))
        store.save_json(path, results)
    models = list(dict.fromkeys(m for t in command.tasks for m in task_models(command, t)))
    text, figures = report.report(chosen, meta, command.tasks, models, sys.modules[__name__])
    if command.scale:   # its figure is the streams'; the runs' own test is only at the training length
        streams_text, figures = scale.streams_report(results["streams"], sys.modules[__name__])
        text += "\n" + streams_text
    report.publish(text, figures, chosen, meta, sys.modules[__name__])
    return 0


if __name__ == "__main__":
    sys.stdout, sys.stderr = (s and cli.Unread(s) for s in (sys.stdout, sys.stderr))   # `| head` finishes (None: >&-)
    try:
        sys.exit(main())
    except NotImplementedError as blank:            # a student copy (tests/make_assignment.py): a core not written
        if ": see the docstring" not in str(blank):   # (torch's own: an operation missing on a device)
            raise
        blanks = []                                  # every one, in the lesson's order
        for module in (attention, ssm, rmt, titans, hrm):
            with open(module.__file__) as source:
                blanks += re.findall(r'NotImplementedError\("([\w.]+): see the docstring', source.read())
        sys.exit(f"compare.py: error: a core is not written yet ({blank}; pytest tests/test_<file>.py checks it)" + (
            f"; not written yet, in the lesson's order: {', '.join(blanks)}" if len(blanks) > 1 else ""))
    except torch.OutOfMemoryError as full:         # a run too big for its GPU even alone (harness/runner.py)
        sys.exit(f"compare.py: error: {str(full).splitlines()[0]}: it needs a GPU with more free memory (the runs "
                 "that finished are saved)")
