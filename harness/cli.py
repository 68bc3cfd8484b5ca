"""The command line of compare.py: every flag checked, and each task asked whether it can make what the command
will ask of it, before any training. Bad input stops the command with one line and exit status 2 (a results file
that cannot be used, or that another command holds, with exit status 1: harness/store.py)."""
import argparse
import os
import sys
from dataclasses import dataclass

import torch

import tasks

SEEDS = 2 ** 32         # seeds are 0 .. 2**32 - 1, so every generator seed made from one fits
LR_RANGE = (1e-6, 1.0)  # AdamW moves a weight by about lr a step: below, nothing is learnt; above, steps outgrow it
MAX_TEST_TOKENS = 2 ** 16   # evaluate's batch (max_tokens): a longer test sequence is --scale's to read in pieces
BOTH_WAYS = "a grid task (the maze) is read both ways, which only attention (and its variants) and HRM do"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, never a traceback
        self.exit(2, f"compare.py: error: {message}\n")


def csv(kind, what, ok=lambda v: True):
    """An argparse type: 'a,b,c' -> [kind(a), kind(b), kind(c)]: at least one value, each ok(value), none twice."""
    def parse(s):
        try:
            values = [kind(v.strip()) for v in s.split(",")]
        except ValueError:
            values = []
        if not values or not all(map(ok, values)):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}" + (
                " (if a space followed the comma, it cut the list there: write it without spaces, or quote it)"
                if s.rstrip().endswith(",") else ""))
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
    stream_lengths: list | None  # --scale's --test-lengths; None: harness/scale.py's SCALE
    device: str                 # cpu, cuda (every GPU) or cuda:i
    workers: int | None
    out: str
    bench: bool
    scale: bool
    line: str                   # the command line, as the reports show it


def parse_args(argv, lab):
    """The Command that argv asks for; `lab` is compare.py (its presets, models and protocol)."""
    offered = list(dict.fromkeys(t for p in lab.PRESETS.values() for t in p["tasks"]))
    p = Parser(description="Train every model on every task and compare them.", allow_abbrev=False)
    presets = [name for name in lab.PRESETS if name != "scale"]
    p.add_argument("--preset", type=lambda s: s if s in presets else p.error(f"argument --preset: expected one of "
                   f"{', '.join(presets)}, got {s!r} (--scale and --bench are flags of their own)"),
                   help=f"{', '.join(presets)}; default: full on CUDA, quick otherwise")
    p.add_argument("--models", type=csv(str, "names", bool), help=f"comma-separated, from: {', '.join(lab.MODELS)}")
    p.add_argument("--tasks", type=csv(str, "names", bool), help=f"comma-separated, from: {', '.join(offered)}")
    p.add_argument("--seeds", type=csv(int, f"integers from 0 to {SEEDS - 1}", lambda v: 0 <= v < SEEDS),
                   help="comma-separated seeds (the lr sweep runs on the first, or a task's first few: `sweep_seeds`)")
    p.add_argument("--lrs", type=csv(float, f"learning rates from {LR_RANGE[0]:g} to {LR_RANGE[1]:g}",
                                     lambda v: LR_RANGE[0] <= v <= LR_RANGE[1]),
                   help="comma-separated learning rates to sweep")
    p.add_argument("--steps", type=positive, help="override every task's number of training steps, in all (a "
                   "curriculum's stages share them equally)")
    p.add_argument("--test-lengths", type=csv(int, "positive integers", lambda v: v > 0), help="override every "
                   "task's test lengths, in each task's own unit: copy's letters, recall's pairs, a maze's cells a "
                   "side, tokens otherwise. With --bench: the lengths measured; with --scale: the streams' lengths")
    p.add_argument("--device", help="cpu, cuda (every GPU), cuda:1 (that GPU only); default: cuda when available")
    p.add_argument("--workers", type=positive, help="runs at once, each in its own process (default: 4 per GPU, up "
                   "to 4 on a CPU; never more than the CPU cores). Processes take turns on a GPU, so more than a few "
                   "a GPU gain little; --scale reads its streams on GPUs in threads instead, up to 8 a GPU")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs"),
                   help="folder for results and plots, made with its parents if missing (default: runs/)")
    p.add_argument("--bench", action="store_true", help="measure time and memory against length instead of training")
    p.add_argument("--scale", action="store_true", help="train the scale preset (flip-flop at <= 256 tokens, "
                   "BABILong's qa1 and qa2 on streams up to 524,288), then read streams of up to 11M tokens")
    args = p.parse_args(argv)
    try:
        default = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(default if args.device is None else args.device)
    except RuntimeError:
        p.error(f"unknown device {args.device!r}; expected cpu, cuda or cuda:N")
    if not (device.type == "cpu" and not device.index
            or device.type == "cuda" and (device.index or 0) < torch.cuda.device_count()):
        p.error(f"device {args.device!r} is not available here; this machine has cpu and "
                f"{torch.cuda.device_count()} CUDA GPU(s)")
    if args.scale and (args.preset or args.bench):
        p.error("--scale trains its own preset and measures its own costs; leave out --preset and --bench")
    unused = [f"--{k.replace('_', '-')}" for k in ("tasks", "seeds", "lrs", "steps", "workers")
              if getattr(args, k) not in (None, False)]
    if args.bench and unused:
        p.error(f"--bench trains nothing and stores no runs: it takes --models, --test-lengths, --preset (the model "
                f"size), --device and --out, not {', '.join(unused)}")
    name = "scale" if args.scale else args.preset or ("full" if device.type == "cuda" else "quick")
    preset = lab.PRESETS[name]
    lengths = sorted(args.test_lengths) if args.test_lengths else None   # a wall at one length is a wall beyond it
    command = Command(   # with --scale the test lengths are the streams': the runs test at their training length
        preset=name, models=args.models or preset["models"], chosen_models=args.models is not None,
        tasks=args.tasks or list(preset["tasks"]), seeds=args.seeds or preset["seeds"], lrs=args.lrs or preset["lrs"],
        steps=args.steps, test_lengths=None if args.scale else lengths, stream_lengths=lengths if args.scale else None,
        device="cpu" if device.type == "cpu" else str(device), workers=args.workers, out=args.out, bench=args.bench,
        scale=args.scale, line=" ".join(["python compare.py", *(sys.argv[1:] if argv is None else argv)]))
    for kind, names, known in [("model", command.models, lab.MODELS), ("task", command.tasks, offered)]:
        for n in names:
            if n not in known:
                p.error(f"unknown {kind} {n!r}; choose from {', '.join(known)}")
    for t in command.tasks:
        if t not in preset["tasks"] and not args.bench:
            has = [f"--preset {n}" if n != "scale" else "--scale" for n, pr in lab.PRESETS.items()
                   if t in pr["tasks"] and n != name]
            blind = command.chosen_models and lab.is_grid(t) and not any(map(lab.reads_grids, command.models))
            p.error(f"task {t!r} has no settings in preset {name!r}; it has {', '.join(preset['tasks'])}" + (
                f", and none of {', '.join(command.models)} can run it: {BOTH_WAYS}" if blind
                else f" (try {' or '.join(has)})" if has else ""))
    for t in [] if args.bench else command.tasks:  # ask each task whether it can make what we will ask of it
        b = preset["tasks"][t]
        task = tasks.TASKS[t](**b.options)   # (one task: the maze makes its training set once per size)
        tests = command.test_lengths or b.test
        for L in dict.fromkeys(tests + sum(lab.stages(b.train), []) + (command.stream_lengths or [])):
            try:   # (a task's sequence is never shorter than its length: no need to make one to refuse it)
                tokens = L if L > MAX_TEST_TOKENS else task.sample(1, L, 0)[0].shape[1]
            except ValueError as e:
                p.error(f"length {L} of {t} (--test-lengths, or the preset's): {e}")
            if tokens > MAX_TEST_TOKENS and L in tests:   # (training streams and --scale's may be longer)
                p.error(f"--test-lengths {L}: {t} at that length is at least {tokens:,} tokens, more than evaluate "
                        f"reads at once ({MAX_TEST_TOKENS:,}); longer streams are read in pieces by --scale")
    if not args.bench and not any(lab.task_models(command, t) for t in command.tasks):
        p.error(f"none of {', '.join(command.models)} can run {', '.join(command.tasks)}: {BOTH_WAYS}")
    skipped = [f"{m} on {t}" for t in command.tasks for m in command.models
               if command.chosen_models and not args.bench and m not in lab.task_models(command, t)]
    if skipped:   # a grid task (the maze) is read bidirectionally: only attention and HRM can
        print(f"note: not run, since only models that read both ways run a grid task: {', '.join(skipped)}")
    try:   # a folder (new or existing) that this process can write to
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, f".write-test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        p.error(f"--out {args.out!r}: {e.strerror.lower()}; expected a folder (new or existing) that this process can "
                "write to")
    return command


class Unread:
    """sys.stdout (or stderr, where tqdm draws) for `python compare.py | head`: once the reader has gone, what is
    printed goes to /dev/null instead of raising BrokenPipeError, and the command finishes (its runs, report and
    plots are files)."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text):
        return self._unless_gone(self.stream.write, text)

    def flush(self):
        return self._unless_gone(self.stream.flush)

    def _unless_gone(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:   # the buffer, too, drains to /dev/null from now on
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
            return call(*args)
