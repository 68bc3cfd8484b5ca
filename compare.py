"""
compare.py: train every model on every task at matched size, and show when filtering beats copying.

    python compare.py                    # `full` on a GPU, `quick` on a CPU (it says which)
    python compare.py --preset smoke     # the CI run: every model and task, tiny, well under a minute
    python compare.py --models attention --tasks copy,mqar --seeds 0,1
    python compare.py --bench            # time, peak memory and state size against length, every model

This is the one file that knows every model and every task. For each (model, task) it sweeps a few learning
rates on seed 0 (Zoology's protocol: recurrent models train only in a narrow window), keeps the one with the
best validation accuracy at the training length, runs the other seeds at that rate, then tests at the
training length and beyond; HRM is also tested with more segments than it trained with (the maze), and the
recurrent models are retrained at other state sizes (the dial). Budgets (steps, batch, schedule) are set per
task and are the same for every model. Runs go to worker processes (several share a GPU); every finished run
is written to results/<preset>.json at once, so an interrupted run resumes where it stopped; --fresh starts
over. The tables, results/<preset>.md and the plots are made from that file.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from multiprocessing import get_context
from queue import Queue

import torch
import torch.nn.functional as F
from tqdm import tqdm

import attention
import hrm
import rmt
import ssm
import tasks
import titans

ROOT = os.path.dirname(os.path.abspath(__file__))
# On CPUs, arithmetic on subnormal floats (below ~1e-38, e.g. products of many decay factors in the recurrent
# cores) is up to 100x slower; flushing them to zero changes no result that matters and keeps runs fast.
torch.set_flush_denormal(True)

# ---------------------------------------------------------------------------------------------------------
# Models: one registry, `build_model(name, vocab_size, **overrides)`
# ---------------------------------------------------------------------------------------------------------

MODELS = {  # name -> (model class, config class, options that define the variant)
    "attention": (attention.Transformer, attention.TransformerConfig, {}),
    "attention_nope": (attention.Transformer, attention.TransformerConfig, {"pos": "none"}),
    "ssm": (ssm.Mamba, ssm.MambaConfig, {}),
    "rmt": (rmt.RMT, rmt.RMTConfig, {}),
    "titans": (titans.Titans, titans.TitansConfig, {}),
    "titans_lmm": (titans.Titans, titans.TitansConfig, {"use_attention": False}),
    "attention_swa": (attention.Transformer, attention.TransformerConfig, {"window": 32}),
    "hrm": (hrm.HRM, hrm.HRMConfig, {}),
    "hrm_last_cycle": (hrm.HRM, hrm.HRMConfig, {"gradient": "last_cycle"}),   # TRM's gradient
}


def build_model(name, vocab_size, **overrides):
    """A fresh model: tokens (B, T) -> logits (B, T, V). `overrides` set fields of the model's config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model_class, config_class, variant = MODELS[name]
    fields = config_class.__dataclass_fields__
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ValueError(f"model {name!r} has no option {', '.join(unknown)}")
    return model_class(config_class(vocab_size=vocab_size, **{**variant, **overrides}))


def reads_grids(name):
    """Whether a model can run bidirectionally, as grid tasks (the maze) need: attention and HRM can."""
    return "causal" in MODELS[name][1].__dataclass_fields__


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Presets. Per task: the training lengths (each batch draws one uniformly from [lo, hi], or a curriculum of
# such stages), the test lengths, the steps and the task's options; optionally the models that run it (else
# the preset's), `seeded` (the headline cells that get the extra seeds), `size` and per-model
# `model_options` (HRM's training segments), `segments` (HRM's test-time segments to evaluate), `lrs`.
# `dial`: the extra state sizes trained at each cell's best lr. Budgets are per task, equal for every model.
# ---------------------------------------------------------------------------------------------------------

PRESETS = {
    "smoke": dict(
        models=list(MODELS), size=dict(d_model=32, n_layers=2), batch_size=16, lrs=[3e-3], seeds=[0],
        eval_examples=32, tasks={
            "copy": dict(train=[2, 6], test=[6, 12], steps=30),
            "mqar": dict(train=[32, 32], test=[32, 64], steps=30, options=dict(n_pairs=4, vocab_size=64)),
            "flipflop": dict(train=[32, 32], test=[32, 128], steps=30),
            "selective_copy": dict(train=[24, 24], test=[24, 64], steps=30, options=dict(n_data=4)),
            "babilong": dict(train=[32, 32], test=[32, 96], steps=30, options=dict(max_facts=4)),
            "maze": dict(train=[2, 2], test=[2, 3], steps=30, segments=[1, 2],
                         options=dict(canvas=7, n_train=20)),
        },
        dial=dict(tasks=["mqar"], sweep={"ssm": {"d_state": [4]}})),
    "quick": dict(
        models=["attention", "ssm", "rmt", "titans"], size=dict(d_model=64, n_layers=2), batch_size=64,
        lrs=[1e-3, 1e-2], seeds=[0], eval_examples=256, tasks={
            "copy": dict(train=[2, 8], test=[8, 16], steps=800),
            "mqar": dict(train=[16, 16], test=[16, 64], steps=800, options=dict(n_pairs=4, vocab_size=32)),
            "flipflop": dict(train=[32, 32], test=[32, 256, 1024], steps=500),
        }),
    "full": dict(
        models=["attention", "ssm", "rmt", "titans", "hrm"], size=dict(d_model=64, n_layers=2), batch_size=128,
        lrs=[1e-3, 3e-3], seeds=[0, 1], eval_examples=256, tasks={
            "copy": dict(train=[2, 16], test=[16, 32, 64], steps=600, seeded=["attention", "ssm"]),
            "mqar": dict(train=[32, 32], test=[32, 128], steps=1200, options=dict(n_pairs=8, vocab_size=64),
                         seeded=["attention", "ssm"]),
            "flipflop": dict(train=[[32, 64], [64, 128], [128, 256]], test=[256, 1024, 4096], steps=500,
                             seeded=["attention", "ssm", "rmt"]),
            "selective_copy": dict(train=[64, 64], test=[64, 256], steps=600, options=dict(n_data=8),
                                   seeded=["attention", "ssm"]),
            "babilong": dict(train=[[32, 64], [64, 128], [128, 256]], test=[256, 1024, 4096], steps=500,
                             seeded=["attention", "ssm", "rmt", "titans"]),
            "maze": dict(train=[6, 6], test=[6, 8], steps=800, segments=[1, 2, 4, 8, 16],
                         models=["attention", "hrm", "hrm_last_cycle"], seeded=["attention", "hrm"],
                         size=dict(d_model=128, n_heads=4, n_layers=4),
                         model_options={"hrm": dict(segments=4), "hrm_last_cycle": dict(segments=4)},
                         options=dict(canvas=17, n_train=1000, min_path=30)),
        },
        dial=dict(tasks=["mqar", "flipflop"],
                  sweep={"ssm": {"d_state": [4, 64]}, "rmt": {"n_mem": [2, 32]}, "titans": {"memory_expand": [4]}})),
}


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation: usable from Python with any object that follows the task contract of tasks.py
# ---------------------------------------------------------------------------------------------------------

def autocast(device):
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def stages(train_lengths):
    """[lo, hi] -> [[lo, hi]]; a curriculum [[lo1, hi1], [lo2, hi2], ...] stays as it is."""
    return [list(train_lengths)] if isinstance(train_lengths[0], int) else [list(s) for s in train_lengths]


def train(model, task, steps, batch_size, lr, train_lengths, device="cpu", seed=0, weight_decay=0.1,
          warmup=0.1, clip=1.0, progress=False):
    """AdamW, linear warm-up then cosine decay, gradient clipping. Each batch draws its length uniformly from
    train_lengths = [lo, hi], or, for a curriculum [[lo1, hi1], [lo2, hi2], ...], from the stage that the
    step falls in (equal shares of the steps; RMT's segment-count curriculum, given to every model alike).
    Returns the list of training losses."""
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98),
                            fused=torch.device(device).type == "cuda")   # fewer kernel launches per step
    n_warm = max(1, int(warmup * steps))
    schedule = lambda s: min((s + 1) / n_warm, 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(1_000_003 * seed + 1)       # the training data stream
    sample = getattr(task, "sample_train", task.sample)           # the maze trains on a fixed, small set
    plan = stages(train_lengths)
    losses = []
    for step in tqdm(range(steps), desc="train", leave=False, disable=not progress):
        lo, hi = plan[step * len(plan) // steps]
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        x, y = sample(batch_size, length, g, device)
        with autocast(device):   # HRM: deep supervision, a loss on every segment
            outputs = model.segment_logits(x) if hasattr(model, "segment_logits") else [model(x)]
        loss = sum(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=tasks.IGNORE)
                   for logits in outputs) / len(outputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def generate(model, prompt, n_new):
    """Greedy decoding: append the argmax token n_new times. Recomputes the prefix each step (tiny scale)."""
    seq = prompt
    for _ in range(n_new):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


@torch.no_grad()
def evaluate(model, task, length, n_examples, device="cpu", seed=0, max_tokens=2 ** 16, segments=None):
    """Accuracy at one length. Returns token_acc (scored positions right), exact (every scored position of an
    example right), and where the task defines them gen_exact (greedy generation, e.g. copy) and by_depth
    (accuracy in four bins of the deciding fact's depth, e.g. babilong). `segments`: HRM's test-time segments."""
    forward = model if segments is None else lambda x: model(x, segments=segments)
    model.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    batch = max(1, min(n_examples, max_tokens // length))
    right = total = exact = seen = gen_exact = 0
    depth_right, depth_total = [0] * 4, [0] * 4
    while seen < n_examples:
        b = min(batch, n_examples - seen)
        if hasattr(task, "sample_with_depth"):
            x, y, depth = task.sample_with_depth(b, length, g, device)
        else:
            x, y, depth = *task.sample(b, length, g, device), None
        with autocast(device):
            pred = forward(x).argmax(-1)
        scored = y != tasks.IGNORE
        ok = (pred == y) & scored
        right, total = right + ok.sum().item(), total + scored.sum().item()
        exact += (ok.sum(1) == scored.sum(1)).sum().item()
        if depth is not None:
            row_ok = ok.sum(1) == scored.sum(1)
            bins = (depth * 4).long().clamp(0, 3)
            for k in range(4):
                depth_right[k] += (row_ok & (bins == k)).sum().item()
                depth_total[k] += (bins == k).sum().item()
        if hasattr(task, "prompt_length"):
            p = task.prompt_length(length)
            with autocast(device):
                out = generate(model, x[:, :p], length)
            gen_exact += (out == y[:, p - 1:p - 1 + length]).all(1).sum().item()
        seen += b
    result = {"token_acc": right / max(total, 1), "exact": exact / seen}
    if hasattr(task, "prompt_length"):
        result["gen_exact"] = gen_exact / seen
    if hasattr(task, "sample_with_depth"):
        result["by_depth"] = [r / t if t else None for r, t in zip(depth_right, depth_total)]
    return result


# ---------------------------------------------------------------------------------------------------------
# One run (model, task, lr, seed), self-contained so that worker processes can run it
# ---------------------------------------------------------------------------------------------------------

def run_one(spec):
    """Train and test one model on one task; returns the record saved in results/<preset>.json."""
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    task = tasks.TASKS[spec["task"]](**spec["task_options"])
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], task.vocab_size, **spec["model_options"])
    start = time.time()
    losses = train(model, task, spec["steps"], spec["batch_size"], spec["lr"], spec["train"], device,
                   seed=spec["seed"])
    train_time = time.time() - start
    hi = stages(spec["train"])[-1][1]
    val = evaluate(model, task, hi, spec["eval_examples"], device, seed=10_000 + spec["seed"])
    metrics = {str(L): evaluate(model, task, L, spec["eval_examples"], device, seed=20_000 + spec["seed"])
               for L in spec["test"]}
    if spec.get("test_segments") and hasattr(model, "segment_logits"):   # HRM: accuracy vs test-time segments
        for L in spec["test"]:
            metrics[str(L)]["by_segments"] = {
                str(s): evaluate(model, task, L, spec["eval_examples"], device, seed=20_000 + spec["seed"],
                                 segments=s) for s in spec["test_segments"]}
    tokens = {L: task.sample(1, L, 0)[0].shape[1] for L in spec["test"]}   # length is a task's knob, not T
    return {**spec, "params": n_params(model), "state_size": {str(L): model.state_size(tokens[L]) for L in tokens},
            "examples_seen": spec["steps"] * spec["batch_size"], "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "train_time_s": round(train_time, 2), "wall_time_s": round(time.time() - start, 2),
            "val_token_acc": val["token_acc"], "metrics": metrics}


def run_key(spec):
    dial = "".join(f"[{k}={v}]" for k, v in spec.get("dial", {}).items())
    return f"{spec['model']}{dial}/{spec['task']}/lr={spec['lr']:g}/seed={spec['seed']}"


# ---------------------------------------------------------------------------------------------------------
# Results: atomic saves, resumption, the table
# ---------------------------------------------------------------------------------------------------------

def git_commit():
    """The commit of this code (+dirty if tracked files changed), or $GIT_COMMIT when set: a copy of the working
    tree on a rented GPU may have no history, or a stale one."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)  # noqa
        commit = run("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = dirty = ""
    if not commit:
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def save_json(path, obj):
    """Write to a temporary file, then rename: a killed process never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def best_runs(runs):
    """For each (model, task): all runs at the learning rate chosen on the sweep seeds (the seeds run at every
    lr): best mean validation accuracy, ties broken by the lower final training loss. Seeds added later at
    that lr never change the choice."""
    by_cell = {}
    for r in runs:
        if r.get("dial"):
            continue                  # the dial's extra state sizes are not cells of the table
        by_cell.setdefault((r["model"], r["task"]), {}).setdefault(r["lr"], []).append(r)
    best = {}
    for cell, by_lr in by_cell.items():
        sweep = set.intersection(*({r["seed"] for r in rs} for rs in by_lr.values()))
        def score(lr):
            rs = [r for r in by_lr[lr] if r["seed"] in sweep]
            return (sum(r["val_token_acc"] for r in rs) / len(rs), -sum(r["final_loss"] for r in rs) / len(rs))
        best[cell] = sorted(by_lr[max(sorted(by_lr), key=score)], key=lambda r: r["seed"])
    return best


def table(runs, metric, task_names, model_names):
    """A markdown table, models x task@length, mean (and +- half the spread) over seeds at the best lr."""
    best = best_runs(runs)
    cols = []
    for t in task_names:
        lengths = next((r["test"] for (m, tt), rs in best.items() for r in rs if tt == t), [])
        cols += [(t, L) for L in lengths]
    header = "| model | " + " | ".join(f"{t}@{L}" for t, L in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    for m in model_names:
        cells = []
        for t, L in cols:
            vals = [r["metrics"][str(L)].get(metric) for r in best.get((m, t), [])]
            vals = [v for v in vals if v is not None]
            if not vals:
                cells.append("")
                continue
            mean = sum(vals) / len(vals)
            spread = f"±{(max(vals) - min(vals)) / 2:.2f}" if len(vals) > 1 else ""
            cells.append(f"{mean:.2f}{spread}")
        if any(cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(runs, task_names, model_names):
    """Per (model, task) at its best lr: parameters, state size, lr, seeds, steps, examples, wall time."""
    best = best_runs(runs)
    lines = ["| model | task | params (vs attention) | state floats (per test length) | best lr | seeds | steps "
             "| examples | wall s |", "|" + "---|" * 9]
    for m in model_names:
        for t in task_names:
            rs = best.get((m, t))
            if not rs:
                continue
            r, ref = rs[0], best.get(("attention", t))
            ratio = f" ({r['params'] / ref[0]['params']:.2f}x)" if ref else ""
            state = ", ".join(f"{v:,}" for v in r["state_size"].values())
            lines.append(f"| {m} | {t} | {r['params']:,}{ratio} | {state} | {r['lr']:g} | {len(rs)} | {r['steps']} "
                         f"| {r['examples_seen']:,} | {sum(x['wall_time_s'] for x in rs) / len(rs):.1f} |")
    return "\n".join(lines)


def segments_table(runs, model_names):
    """Grid tasks: exact match against HRM's test-time segments; fixed-depth models have one number."""
    best = best_runs(runs)
    rows = [(m, rs) for m in model_names for (mm, t), rs in best.items() if mm == m and t == "maze"]
    counts = sorted({int(s) for _, rs in rows for r in rs for v in r["metrics"].values()
                     for s in v.get("by_segments", {})})
    lines = ["| model | maze size | fixed depth | " + " | ".join(f"{s} seg" for s in counts) + " |",
             "|" + "---|" * (len(counts) + 3)]
    for m, rs in rows:
        for L in rs[0]["test"]:
            mean = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
            by = rs[0]["metrics"][str(L)].get("by_segments")
            cells = [f"{mean(lambda r: r['metrics'][str(L)]['by_segments'][str(s)]['exact']):.2f}" if by else ""
                     for s in counts]
            fixed = "" if by else f"{mean(lambda r: r['metrics'][str(L)]['exact']):.2f}"
            lines.append(f"| {m} | {L}x{L} | {fixed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dial_points(runs, task, model_names):
    """(model, label, state floats by length, token accuracy by length) for each model at its default size (best
    lr, mean over seeds) and at each dial size."""
    points = []
    for (m, t), rs in best_runs(runs).items():
        if t == task and m in model_names:
            acc = {L: sum(r["metrics"][L]["token_acc"] for r in rs) / len(rs) for L in rs[0]["metrics"]}
            points.append((m, "default", rs[0]["state_size"], acc))
    for r in runs:
        if r.get("dial") and r["task"] == task and r["model"] in model_names:
            label = ", ".join(f"{k}={v}" for k, v in r["dial"].items())
            points.append((r["model"], label, r["state_size"], {L: v["token_acc"] for L, v in r["metrics"].items()}))
    return sorted(points, key=lambda p: (p[0], min(p[2].values())))


def dial_table(runs, dial_tasks, model_names):
    lines = []
    for t in dial_tasks:
        points = dial_points(runs, t, model_names)
        if not points:
            continue
        lengths = list(points[0][3])
        lines += [f"| model | size | state floats @{lengths[-1]} | " + " | ".join(f"{t}@{L}" for L in lengths) + " |",
                  "|" + "---|" * (len(lengths) + 3)]
        lines += [f"| {m} | {label} | {state[lengths[-1]]:,} | " + " | ".join(f"{acc[L]:.2f}" for L in lengths) + " |"
                  for m, label, state, acc in points] + [""]
    return "\n".join(lines)


def report(results, task_names, model_names):
    runs = [r for r in results["runs"].values() if r["task"] in task_names and r["model"] in model_names]
    dial_tasks = [t for t in task_names if any(r.get("dial") and r["task"] == t for r in runs)]
    meta = results["meta"]
    parts = [f"# compare.py, preset `{meta['preset']}`", "",
             f"Command: `{meta['command']}`  ",
             f"Device: {meta['device_name']}, torch {meta['torch']}, commit {meta['commit']}, "
             f"wall time {meta.get('wall_time_s', 0):.0f} s"
             + (f" (resumed: {meta['runs_already_done']} runs were done before)" if meta.get("runs_already_done")
                else ""), "",
             "## Token accuracy on scored positions (training length first; best lr per model and task)", "",
             table(runs, "token_acc", task_names, model_names), "",
             "## Exact match: every scored position of an example right (copy: greedy generation)", "",
             table(runs, "gen_exact", ["copy"], model_names) if "copy" in task_names else "", "",
             table(runs, "exact", [t for t in task_names if t != "copy"], model_names), "",
             *(["## Maze: exact match against test-time segments (trained with the preset's segments)", "",
                segments_table(runs, model_names), ""] if "maze" in task_names else []),
             *(["## The dial: token accuracy against inference state size (floats per sequence)", "",
                dial_table(runs, dial_tasks, model_names)] if dial_tasks else []),
             "## Runs", "", details(runs, task_names, model_names), ""]
    return "\n".join(parts)


def plot(results, path, task_names, model_names):
    """Accuracy against test length, one panel per task, the training length marked. Needs matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    runs = [r for r in results["runs"].values() if r["task"] in task_names and r["model"] in model_names]
    best = best_runs(runs)
    fig, axes = plt.subplots(1, len(task_names), figsize=(3.2 * len(task_names), 3), squeeze=False)
    for ax, t in zip(axes[0], task_names):
        for m in model_names:
            rs = best.get((m, t))
            if rs:
                Ls = rs[0]["test"]
                acc = [sum(r["metrics"][str(L)]["token_acc"] for r in rs) / len(rs) for L in Ls]
                ax.plot(Ls, acc, marker="o", label=m)
                ax.axvline(stages(rs[0]["train"])[-1][1], color="gray", ls=":", lw=1)
        ax.set(title=t, xscale="log", xlabel="test length", ylim=(-0.02, 1.02))
        ax.minorticks_off()
        lengths = sorted({L for m in model_names for r in best.get((m, t), []) for L in r["test"]})
        ax.set_xticks(lengths, [str(L) for L in lengths], fontsize=7)
    axes[0][0].set_ylabel("token accuracy")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def plot_segments(results, path, model_names):
    """Maze exact match against test-time segments, one line per (model, maze size); fixed depth is flat."""
    plt = pyplot()
    if plt is None:
        return
    best = best_runs([r for r in results["runs"].values() if r["task"] == "maze" and r["model"] in model_names])
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for i, ((m, _), rs) in enumerate(sorted(best.items())):
        for L, ls in zip(rs[0]["test"], ("-", "--", ":")):
            by = rs[0]["metrics"][str(L)].get("by_segments")
            counts = [int(s) for s in by] if by else None
            if by:
                acc = [sum(r["metrics"][str(L)]["by_segments"][str(s)]["exact"] for r in rs) / len(rs) for s in counts]
                ax.plot(counts, acc, marker="o", ls=ls, color=f"C{i}", label=f"{m}, {L}x{L}")
                ax.set_xticks(counts, [str(s) for s in counts])
            else:
                ax.axhline(sum(r["metrics"][str(L)]["exact"] for r in rs) / len(rs), ls=ls, color="k", lw=1,
                           label=f"{m} (fixed depth), {L}x{L}")
    ax.set(xscale="log", xlabel="test-time segments", ylabel="exact match (whole path right)", ylim=(-0.02, 1.02),
           title="maze: recurrent depth at test time")
    ax.minorticks_off()
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_dial(results, path, task_names, model_names):
    """The dial: accuracy against state size at the training length and at the longest test length."""
    plt = pyplot()
    runs = [r for r in results["runs"].values() if r["model"] in model_names]
    tasks_ = [t for t in task_names if any(r.get("dial") and r["task"] == t for r in runs)]
    if plt is None or not tasks_:
        return
    fig, axes = plt.subplots(1, 2 * len(tasks_), figsize=(3.2 * 2 * len(tasks_), 3), squeeze=False)
    for i, t in enumerate(tasks_):
        points = dial_points(runs, t, model_names)
        lengths = list(points[0][3])
        for ax, L in zip(axes[0][2 * i:], (lengths[0], lengths[-1])):
            for m in dict.fromkeys(p[0] for p in points):
                xs = [(p[2][L], p[3][L]) for p in points if p[0] == m]
                ax.plot(*zip(*sorted(xs)), marker="o", label=m)
            ax.set(title=f"{t} @ {L}" + (" (train)" if L == lengths[0] else ""), xscale="log",
                   xlabel="state floats per sequence", ylim=(-0.02, 1.02))
            ax.minorticks_off()
    axes[0][0].set_ylabel("token accuracy")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    print(f"plot: {path}")


def pyplot():
    """matplotlib.pyplot, or None (with a message) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None


# ---------------------------------------------------------------------------------------------------------
# Cost against length: `python compare.py --bench`
# ---------------------------------------------------------------------------------------------------------

def timed(fn, device, repeats=3):
    """Median seconds of fn() after one warm-up call, and the peak memory (MiB) it allocated on CUDA."""
    fn()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None)


def bench(model_names, lengths, device, size, vocab_size=32, batch=1):
    """For each model and length: a training step's forward+backward time and peak memory, a no-grad forward's
    time per token and peak memory (the whole sequence in one call: prefill, not token-by-token decoding), the
    inference state size. bf16 autocast on CUDA as in training, fp32 on CPU."""
    rows = []
    for name in model_names:
        for T in lengths:
            torch.manual_seed(0)
            model = build_model(name, vocab_size, **size).to(device)
            tokens = torch.randint(0, vocab_size, (batch, T), device=device)
            row = dict(model=name, length=T, params=n_params(model), state_floats=model.state_size(T))

            def train_step():
                with autocast(device):
                    outputs = model.segment_logits(tokens) if hasattr(model, "segment_logits") else [model(tokens)]
                sum(o.float().logsumexp(-1).mean() for o in outputs).backward()

            def infer():
                with torch.no_grad(), autocast(device):
                    model(tokens)
            try:
                row["train_ms"], row["train_mib"] = timed(train_step, device)
                row["infer_s"], row["infer_mib"] = timed(infer, device)
                row["train_ms"] *= 1e3
                row["infer_us_per_token"] = row.pop("infer_s") * 1e6 / (batch * T)
            except torch.OutOfMemoryError:
                row["oom"] = True
            del model
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(bench_line(row), flush=True)
    return rows


def bench_line(r):
    if r.get("oom"):
        return f"| {r['model']} | {r['length']:,} | {r['state_floats']:,} | out of memory | | | |"
    mib = lambda v: f"{v:,.0f}" if v is not None else "-"  # noqa: E731
    return (f"| {r['model']} | {r['length']:,} | {r['state_floats']:,} | {r['train_ms']:,.1f} | {mib(r['train_mib'])} "
            f"| {r['infer_us_per_token']:.2f} | {mib(r['infer_mib'])} |")


def bench_main(args):
    lengths = args.test_lengths or ([1024, 4096, 16384, 65536] if args.device.startswith("cuda") else [256, 1024, 4096])
    models = args.models if args.chosen_models else ["attention", "ssm", "rmt", "titans", "hrm"]
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    dtype = "bf16 autocast" if args.device.startswith("cuda") else "fp32"
    size = PRESETS[args.preset]["size"]
    head = [f"# compare.py --bench: cost against length", "",
            f"Command: `python compare.py {' '.join(args.argv)}`  ",
            f"Device: {name}, {dtype}, torch {torch.__version__}, commit {git_commit()}; batch 1, model size {size}, "
            "median of 3 after a warm-up", "",
            "| model | length | state floats | fwd+bwd ms | fwd+bwd peak MiB | inference us/token | inference peak MiB |",
            "|---|---|---|---|---|---|---|"]
    print("\n".join(head))
    rows = bench(models, lengths, args.device, size)
    os.makedirs(args.out, exist_ok=True)
    save_json(os.path.join(args.out, "bench.json"), dict(device_name=name, dtype=dtype, torch=torch.__version__,
                                                         commit=git_commit(), size=size, rows=rows))
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(head + [bench_line(r) for r in rows]) + "\n")
    plt = pyplot()
    if plt is None:
        return 0
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, key, label in zip(axes, ("train_ms", "infer_us_per_token", "train_mib"),
                              ("fwd+bwd ms (batch 1)", "inference us / token", "fwd+bwd peak MiB")):
        for m in models:
            pts = [(r["length"], r[key]) for r in rows if r["model"] == m and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", title=label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}, {dtype}", fontsize=9)
    save_figure(fig, os.path.join(args.out, "bench.png"))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, never a traceback
        self.exit(2, f"compare.py: error: {message}\n")


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def parse_args(argv):
    p = Parser(description="Train every model on every task and compare them.")
    p.add_argument("--preset", choices=list(PRESETS), help="default: full on CUDA, quick otherwise")
    p.add_argument("--models", type=csv(str), help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--tasks", type=csv(str), help=f"comma-separated, from: {', '.join(tasks.TASKS)}")
    p.add_argument("--seeds", type=csv(int), help="comma-separated seeds (the first one runs the lr sweep)")
    p.add_argument("--lrs", type=csv(float), help="comma-separated learning rates to sweep")
    p.add_argument("--steps", type=int, help="override every task's number of training steps")
    p.add_argument("--test-lengths", type=csv(int), help="override every task's test lengths")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--workers", type=int, help="runs at once, each in its own process (default: one per CPU core, up "
                   "to 4 on CPU and 16 per GPU)")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for <preset>.json/.md/.png")
    p.add_argument("--fresh", action="store_true", help="ignore saved runs and start over")
    p.add_argument("--bench", action="store_true", help="measure time and memory against length (--test-lengths "
                   "sets the lengths) instead of training")
    p.add_argument("--scale", action="store_true", help="train at <= 256 tokens, then read streams of up to 11M "
                   "tokens (its own options: python compare.py --scale --help)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        p.error(f"unknown device {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"device {args.device!r} asked for, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        p.error(f"device {args.device!r} is not supported; use cpu or cuda")
    args.device = str(device)
    args.preset = args.preset or ("full" if device.type == "cuda" else "quick")
    preset = PRESETS[args.preset]
    args.chosen_models = args.models is not None     # else each task may name its own models (the maze)
    args.models = args.models or preset["models"]
    args.tasks = args.tasks or list(preset["tasks"])
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for t in args.tasks:
        if t not in tasks.TASKS:
            p.error(f"unknown task {t!r}; choose from {', '.join(tasks.TASKS)}")
        if t not in preset["tasks"]:
            p.error(f"task {t!r} has no settings in preset {args.preset!r}; it has {', '.join(preset['tasks'])}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.seeds is not None and not args.seeds:
        p.error("--seeds is empty")
    if args.lrs is not None and (not args.lrs or min(args.lrs) <= 0):
        p.error("--lrs must be positive numbers")
    if args.bench:
        if args.test_lengths and min(args.test_lengths) < 1:
            p.error("--test-lengths must be >= 1")
        return args
    for t in args.tasks:  # ask each task whether it can make what we will ask of it
        s = preset["tasks"][t]
        for L in (args.test_lengths or s["test"]) + sum(stages(s["train"]), []):
            try:
                tasks.TASKS[t](**s.get("options", {})).sample(1, L, 0)
            except ValueError as e:
                p.error(str(e))
    return args


def make_specs(args, phase="lr sweep", lr_by_cell=None):
    """The runs of one phase: the lr sweep on the first seed; then, at each cell's best lr, the other seeds
    (on the task's `seeded` models, the headline cells) and the dial (other state sizes, first seed)."""
    preset = PRESETS[args.preset]
    seeds = args.seeds or preset["seeds"]
    specs = []
    for t in args.tasks:
        s = preset["tasks"][t]
        lrs = args.lrs or s.get("lrs", preset["lrs"])
        grid = not getattr(tasks.TASKS[t], "causal", True)
        for m in args.models if args.chosen_models else s.get("models", args.models):
            if grid and not reads_grids(m):
                continue                                  # a causal-only model has no place on a grid task
            if phase != "lr sweep" and (m, t) not in lr_by_cell:
                continue
            options = {**preset["size"], **s.get("size", {}), **s.get("model_options", {}).get(m, {}),
                       **({"causal": False} if grid else {})}
            base = dict(model=m, task=t, task_options=s.get("options", {}), model_options=options,
                        train=s["train"], test=args.test_lengths or s["test"], steps=args.steps or s["steps"],
                        batch_size=preset["batch_size"], eval_examples=preset["eval_examples"],
                        device=args.device)
            if "segments" in s:
                base["test_segments"] = s["segments"]
            if phase == "lr sweep":
                specs += [dict(base, lr=lr, seed=seeds[0]) for lr in lrs]
            elif phase == "seeds" and (args.chosen_models or m in s.get("seeded", [m])):
                specs += [dict(base, lr=lr_by_cell[(m, t)], seed=sd) for sd in seeds[1:]]
            elif phase == "dial" and t in preset.get("dial", {}).get("tasks", []):
                for field, values in preset["dial"]["sweep"].get(m, {}).items():
                    specs += [dict(base, lr=lr_by_cell[(m, t)], seed=seeds[0], dial={field: v},
                                   model_options={**options, field: v}) for v in values]
    return specs


def same_run(saved, spec):
    """A saved run counts only if everything that defines it is unchanged (device aside)."""
    return all(saved.get(k) == v for k, v in spec.items() if k not in ("device", "threads"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--scale" in argv:
        return scale_main(argv)
    args = parse_args(argv)
    if args.bench:
        return bench_main(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.preset}.json")
    results = {"runs": {}}
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            results = json.load(f)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    # Tiny models leave a device mostly idle: several runs at once use it better (on a 2-core CPU, two
    # one-thread workers train about 1.5x faster than one two-thread process).
    workers = args.workers or (min(16 * gpus, os.cpu_count() or 1) if args.device == "cuda"
                               else min(4, os.cpu_count() or 1))
    meta = dict(preset=args.preset, command="python compare.py " + " ".join(args.argv), device=args.device,
                torch=torch.__version__, commit=git_commit(),
                device_name=torch.cuda.get_device_name(0) if gpus else "CPU", workers=workers)
    print(f"preset {args.preset!r} on {meta['device_name']} ({args.device}), {workers} worker(s); results in {path}")
    start = time.time()

    def done(spec):
        return same_run(results["runs"].get(run_key(spec), {}), spec)

    def follow_ups(record):
        """Once a cell's lr sweep is complete: its other seeds and its dial runs, at the chosen lr."""
        cell = (record["model"], record["task"])
        if record.get("dial") or record["seed"] != sweep_seed or not all(done(s) for s in sweeps[cell]):
            return []
        lr = {cell: best_runs(results["runs"][run_key(s)] for s in sweeps[cell])[cell][0]["lr"]}
        return [s for phase in ("seeds", "dial") for s in make_specs(args, phase, lr) if not done(s)]

    def save(record):
        record.update(commit=meta["commit"], torch=torch.__version__, device_name=meta["device_name"])
        results["runs"][run_key(record)] = record
        save_json(path, results)
        return follow_ups(record)

    sweep_seed = (args.seeds or PRESETS[args.preset]["seeds"])[0]
    sweeps = {}
    for s in make_specs(args, "lr sweep"):
        sweeps.setdefault((s["model"], s["task"]), []).append(s)
    todo = [s for specs in sweeps.values() for s in specs if not done(s)]
    for specs in sweeps.values():   # cells swept in an earlier, interrupted run may still owe their follow-ups
        if all(done(s) for s in specs):
            todo += follow_ups(results["runs"][run_key(specs[0])])
    n_all, n_done = sum(len(v) for v in sweeps.values()), sum(done(s) for v in sweeps.values() for s in v)
    if n_done:
        print(f"{n_done} of {n_all} lr-sweep runs already done, skipping them")
    if todo or "meta" not in results:     # with nothing to run, the report keeps the meta of the run that ran
        results["meta"] = dict(meta, runs_already_done=len(results["runs"]))
        try:
            run_all(todo, workers, gpus, save)
        except KeyboardInterrupt:
            print(f"\nstopped: the finished runs are saved in {path}; run the same command again to resume")
            return 130
        results["meta"]["wall_time_s"] = round(time.time() - start, 1)
        save_json(path, results)
    models = args.models if args.chosen_models else list(dict.fromkeys(   # with the tasks' own (the maze's)
        args.models + [m for t in args.tasks for m in PRESETS[args.preset]["tasks"][t].get("models", [])]))
    text = report(results, args.tasks, models)
    with open(os.path.join(args.out, f"{args.preset}.md"), "w") as f:
        f.write(text)
    print(text)
    if [t for t in args.tasks if t != "maze"]:
        plot(results, os.path.join(args.out, f"{args.preset}_length.png"), [t for t in args.tasks if t != "maze"],
             models)
    plot_dial(results, os.path.join(args.out, f"{args.preset}_dial.png"), args.tasks, models)
    if "maze" in args.tasks:
        plot_segments(results, os.path.join(args.out, f"{args.preset}_segments.png"), models)
    return 0


def slow_first(spec):
    """Scheduling order: the slowest runs first (the maze, then the models with loops inside a step), so that
    no long run starts last and keeps the others waiting."""
    return (spec["task"] != "maze", spec["model"] not in ("titans", "titans_lmm", "hrm", "hrm_last_cycle"))


def run_all(specs, workers, gpus, on_done):
    """Run the specs, in this process or in worker processes sharing the GPUs; on_done(record) saves a finished
    run and returns the runs it unlocks (a cell's seeds and dial, once its lr sweep is done), which join the queue
    at once: no phase waits for the slowest run of the one before."""
    bar = tqdm(total=len(specs), desc="runs", disable=not specs)
    queue = sorted(specs, key=slow_first)
    if workers == 1:
        while queue:
            spec = queue.pop(0)
            bar.set_postfix_str(run_key(spec))
            new = on_done(run_one(spec))
            queue += new
            bar.total += len(new)
            bar.update()
        return
    finished, n_submitted, n_done = Queue(), 0, 0
    # Workers ignore Ctrl-C; the main process gets it, and leaving the block then terminates them.
    ignore_ctrl_c = dict(initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    with get_context("spawn").Pool(workers, **ignore_ctrl_c) as pool:
        while queue or n_done < n_submitted:
            for spec in queue:                     # round-robin over GPUs; on CPU, share the cores
                if gpus:
                    spec["device"] = f"cuda:{n_submitted % gpus}"
                else:
                    spec["threads"] = max(1, (os.cpu_count() or 1) // workers)
                pool.apply_async(run_one, (spec,), callback=finished.put, error_callback=finished.put)
                n_submitted += 1
            record, queue = finished.get(), []
            n_done += 1
            if isinstance(record, BaseException):
                raise record
            queue = sorted(on_done(record), key=slow_first)
            bar.total += len(queue)
            bar.update()


# ---------------------------------------------------------------------------------------------------------
# Scale: `python compare.py --scale`. Train at <= 256 tokens, then read test streams of up to 11 million
# tokens: the recurrent models piece by piece with `model.stream` (constant memory), attention in one call
# until its wall (a time cap or the GPU's memory).
# ---------------------------------------------------------------------------------------------------------

SCALE = dict(
    models=["attention", "ssm", "rmt", "titans"], tasks=["flipflop", "babilong"], size=dict(d_model=64, n_layers=2),
    train=[[32, 64], [64, 128], [128, 256]], steps=500, batch_size=128, lrs=[1e-3, 3e-3],   # as the full preset
    lengths=dict(flipflop=[16_384, 131_072, 1_048_576, 11_000_000],   # babilong stops at 1M: its 8 sequences
                 babilong=[16_384, 131_072, 1_048_576]),              # of 11M would take the run past 10 min
    piece=16_384,            # tokens per `stream` call, and per generated piece: the host never holds more
    examples=dict(flipflop=1, babilong=8),   # sequences read side by side (flipflop scores ~T/10 reads in each;
                                             # babilong one answer per sequence)
    attention_cap_s=30.0)    # attention stops at the first length whose one call would take longer (predicted)


def scale_train(spec):
    """Worker: train one (model, task, lr) as `train` does; returns the record and the trained weights (CPU)."""
    torch.manual_seed(0)
    task = tasks.TASKS[spec["task"]]()
    model = build_model(spec["model"], task.vocab_size, **spec["size"])
    start = time.time()
    losses = train(model, task, spec["steps"], spec["batch_size"], spec["lr"], spec["train"], spec["device"])
    hi = stages(spec["train"])[-1][1]
    val = evaluate(model, task, hi, 256, spec["device"], seed=10_000)["token_acc"]
    record = dict(spec, params=n_params(model), val_token_acc=val, final_loss=sum(losses[-20:]) / len(losses[-20:]),
                  train_time_s=round(time.time() - start, 1))
    return record, {k: v.cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def scale_read(model, task, length, batch, piece, device, seed):
    """Read `batch` test streams of `length` tokens, made piece by piece by `task.pieces`: recurrent models call
    `model.stream` on each piece with the state carried, attention reads the whole sequence in one call.
    Returns token accuracy, scored positions, tokens per second of model time (all sequences together) and
    the peak GPU memory in MiB (None on CPU)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    pieces = task.pieces(batch, length, piece, seed, device)
    if not hasattr(model, "stream"):                 # attention: one call on the whole sequence
        pieces = [tuple(torch.cat(t, dim=1) for t in zip(*pieces))]
    right = scored = seconds = 0
    state = None
    for x, y in pieces:
        start = time.perf_counter()
        with autocast(device):
            logits, state = model.stream(x, state) if hasattr(model, "stream") else (model(x), None)
        pred = logits.argmax(-1)
        if cuda:
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        mask = y != tasks.IGNORE
        right += ((pred == y) & mask).sum().item()
        scored += mask.sum().item()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
    return dict(token_acc=right / max(scored, 1), scored=scored, tokens_per_s=batch * length / seconds,
                seconds=round(seconds, 2), peak_mib=peak)


def scale_main(argv):
    p = Parser(description="Train at <= 256 tokens, then read test streams of up to 11M tokens.")
    p.add_argument("--scale", action="store_true")
    p.add_argument("--models", type=csv(str), default=SCALE["models"])
    p.add_argument("--tasks", type=csv(str), default=SCALE["tasks"])
    p.add_argument("--lengths", type=csv(int), help="test lengths for every task (default: per task, SCALE)")
    p.add_argument("--steps", type=int, default=SCALE["steps"])
    p.add_argument("--piece", type=int, default=SCALE["piece"])
    p.add_argument("--attention-cap", type=float, default=SCALE["attention_cap_s"], help="seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, help="training runs at once (default: all on a GPU, 2 on a CPU)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs"), help="folder for scale.json/.md/.png")
    args = p.parse_args(argv)
    for m in args.models:
        if m not in SCALE["models"]:
            p.error(f"--scale runs {', '.join(SCALE['models'])}, not {m!r}")
    for t in args.tasks:
        if t not in SCALE["tasks"]:
            p.error(f"--scale runs {', '.join(SCALE['tasks'])}, not {t!r}")
    if min(args.lengths or [256]) < 256 or args.piece < 64 or args.piece % 64:
        p.error("--lengths must be >= 256 and --piece a multiple of 64 (whole chunks and segments in each piece)")
    device, start = args.device, time.time()
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    meta = dict(command="python compare.py " + " ".join(argv), device=device, device_name=name,
                torch=torch.__version__, commit=git_commit(), dtype="bf16 autocast" if device.startswith("cuda")
                else "fp32", train=SCALE["train"], steps=args.steps, batch_size=SCALE["batch_size"],
                lrs=SCALE["lrs"], size=SCALE["size"], piece=args.piece, attention_cap_s=args.attention_cap,
                lengths={t: args.lengths or SCALE["lengths"][t] for t in args.tasks},
                examples={t: SCALE["examples"][t] for t in args.tasks})
    print(f"scale on {name}: train {', '.join(args.models)} on {', '.join(args.tasks)} at <= 256 tokens, "
          f"then read up to {max(args.lengths or sum(SCALE['lengths'].values(), [])):,} tokens", flush=True)

    # 1. Train every (model, task, lr) at once, in worker processes: the budgets of the full preset.
    specs = [dict(model=m, task=t, lr=lr, steps=args.steps, batch_size=SCALE["batch_size"], train=SCALE["train"],
                  size=SCALE["size"], device=device) for t in args.tasks for m in args.models for lr in SCALE["lrs"]]
    workers = args.workers or (len(specs) if device.startswith("cuda") else min(2, os.cpu_count() or 1))
    with get_context("spawn").Pool(workers) as pool:
        trained = list(tqdm(pool.imap(scale_train, specs), total=len(specs), desc="train"))
    best = {}
    for record, weights in trained:                  # the lr with the best validation accuracy, per cell
        cell = (record["model"], record["task"])
        if cell not in best or (record["val_token_acc"], -record["final_loss"]) > (
                best[cell][0]["val_token_acc"], -best[cell][0]["final_loss"]):
            best[cell] = (record, weights)
    meta["train_wall_s"] = round(time.time() - start, 1)

    # 2. Read the test streams, one model at a time (so that time and memory are its own).
    rows = []
    for t in args.tasks:
        task = tasks.TASKS[t]()
        for m in args.models:
            record, weights = best[(m, t)]
            model = build_model(m, task.vocab_size, **SCALE["size"])
            model.load_state_dict(weights)
            model.to(device).eval()
            batch = SCALE["examples"][t]
            scale_read(model, task, 2 * args.piece, batch, args.piece, device, seed=1)   # warm-up, CUDA graphs
            last = None
            for L in args.lengths or SCALE["lengths"][t]:
                row = dict(model=m, task=t, length=L, batch=batch, state_floats=model.state_size(L),
                           lr=record["lr"], val_token_acc=record["val_token_acc"])
                predicted = last and last[1] * (L / last[0]) ** 2      # attention: quadratic time
                if not hasattr(model, "stream") and predicted and predicted > args.attention_cap:
                    row["wall"] = f"time: {predicted:,.0f} s predicted > {args.attention_cap:.0f} s cap"
                else:
                    try:
                        row.update(scale_read(model, task, L, batch, args.piece, device, seed=20_000 + L))
                        last = (L, row["seconds"])
                    except torch.OutOfMemoryError:
                        row["wall"] = "out of memory"
                rows.append(row)
                print(scale_line(row), flush=True)
                os.makedirs(args.out, exist_ok=True)                      # saved as it goes: a cut run keeps it
                save_json(os.path.join(args.out, "scale.json"), dict(meta=meta, rows=rows))
                if row.get("wall"):
                    break                                                 # longer lengths hit it too
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    meta["wall_time_s"] = round(time.time() - start, 1)

    os.makedirs(args.out, exist_ok=True)
    save_json(os.path.join(args.out, "scale.json"), dict(meta=meta, training=[r for r, _ in best.values()],
                                                         rows=rows))
    text = scale_report(meta, rows, [r for r, _ in best.values()])
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(text)
    print(text)
    scale_plot(rows, args.tasks, args.models, os.path.join(args.out, "scale.png"), meta)
    return 0


def scale_line(r):
    cells = [r["model"], r["task"], f"{r['length']:,}", str(r["batch"])]
    if r.get("wall"):
        return "| " + " | ".join(cells + [f"wall: {r['wall']}", "", "", "", f"{r['state_floats']:,}"]) + " |"
    mib = f"{r['peak_mib']:,.0f}" if r["peak_mib"] is not None else "-"
    return "| " + " | ".join(cells + [f"{r['token_acc']:.3f}", f"{r['scored']:,}", f"{r['tokens_per_s']:,.0f}",
                                      mib, f"{r['state_floats']:,}"]) + " |"


def scale_report(meta, rows, training):
    lines = ["# compare.py --scale: trained at <= 256 tokens, read streams of up to 11M tokens", "",
             f"Command: `{meta['command']}`  ",
             f"Device: {meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, commit {meta['commit']}, "
             f"wall time {meta['wall_time_s']:.0f} s (training {meta['train_wall_s']:.0f} s)  ",
             f"Training: every model {meta['steps']} steps of batch {meta['batch_size']}, curriculum "
             f"{meta['train']}, model size {meta['size']}, lr from {meta['lrs']} by validation accuracy at 256. "
             f"Reading: recurrent models `stream` pieces of {meta['piece']:,} tokens (state carried), attention "
             f"reads each sequence in one call until a call is predicted to take over {meta['attention_cap_s']:.0f} s"
             " (time ~ T^2 from the last length) or runs out of memory. tokens/s counts model time only, for all the"
             " sequences read side by side (batch); peak memory is the GPU's, weights included. Lengths per task: "
             + "; ".join(f"{t} {', '.join(f'{L:,}' for L in Ls)} ({meta['examples'][t]} sequences side by side)"
                         for t, Ls in meta["lengths"].items()) + ".", "",
             "| model | task | length | batch | token acc | scored | tokens/s | peak MiB | state floats |",
             "|---|---|---|---|---|---|---|---|---|"] + [scale_line(r) for r in rows]
    lines += ["", "Training runs (best lr per model and task):", "",
              "| model | task | params | lr | val acc @256 | final loss | train s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['task']} | {r['params']:,} | {r['lr']:g} | {r['val_token_acc']:.3f} | "
              f"{r['final_loss']:.3f} | {r['train_time_s']:.0f} |" for r in training]
    return "\n".join(lines) + "\n"


def scale_plot(rows, task_names, model_names, path, meta):
    """Accuracy against length, one panel per task, and peak memory against length (log x)."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(task_names) + 1, figsize=(3.4 * (len(task_names) + 1), 3.2))
    for i, m in enumerate(model_names):
        for ax, t in zip(axes, task_names):
            pts = [(r["length"], r["token_acc"]) for r in rows if (r["model"], r["task"]) == (m, t)
                   and "token_acc" in r]
            walls = [r for r in rows if (r["model"], r["task"]) == (m, t) and r.get("wall")]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=m)
            for r in walls:
                ax.axvline(r["length"], color=f"C{i}", ls=":", lw=1)
                ax.annotate(f"{m}: wall", (r["length"], 0.05 + 0.08 * i), fontsize=6, color=f"C{i}", ha="right")
            ax.set(title=f"{t} (trained <= 256)", xscale="log", xlabel="test length (tokens)", ylim=(-0.02, 1.02))
        pts = [(r["length"], r["peak_mib"]) for r in rows if r["model"] == m and r["task"] == task_names[0]
               and r.get("peak_mib") is not None]
        if pts:
            axes[-1].plot(*zip(*pts), marker="o", color=f"C{i}", label=m)
    axes[0].set_ylabel("token accuracy")
    axes[0].legend(fontsize=7)
    axes[-1].set(title=f"peak GPU memory ({task_names[0]})", xscale="log", yscale="log",
                 xlabel="test length (tokens)", ylabel="MiB")
    fig.suptitle(f"{meta['device_name']}, {meta['dtype']}, commit {meta['commit']}", fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
