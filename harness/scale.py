"""--scale's second half: the trained models read test streams of up to 11M tokens, a piece at a time.

Recurrent models `stream` each piece with their state carried, so memory is the state's whatever the length;
attention reads each sequence in one call until it meets a wall (memory, or a predicted time cap). On GPUs the cells
read side by side as threads of one process, each on a CUDA stream of its own, so their kernels overlap: 12 cells
read to 1M tokens in 53 s so, 113 s one at a time (one H200; worker processes would take turns on the GPU).
A BABILong cell at or below chance at two lengths in a row reads no longer streams (mostly Titans' 11M: minutes).
"""
import contextlib
import functools
import math
import os
import time

import torch

import tasks
from harness.bench import peak_mib
from harness.graphs import StreamGraphs, side_stream
from harness.report import ACCURACY, md_table, series, short
from harness.runner import STOP, run_all

SCALE = dict(   # --scale's reading, after it has trained PRESETS["scale"]
    lengths=dict(flipflop=[16_384, 131_072, 1_048_576],   # its last write is ~20 tokens back: 1M shows a stable
                 # recurrence as 11M would (Titans' flip-flop read at 11M took 455 s, most of the reading)
                 **dict.fromkeys(["babilong_qa1", "babilong_qa2"], [16_384, 131_072, 1_048_576, 11_000_000])),
    examples=dict(flipflop=1, babilong_qa1=64, babilong_qa2=64),   # streams read side by side (flip-flop scores
                                                  # ~T/10 reads in each, BABILong one answer per stream)
    piece=16_384,            # tokens per `stream` call and per generated piece: the host never holds more
    attention_cap_s=30.0)    # attention stops at the first length whose one call would take longer (predicted)
READERS = 8   # cells read at once on one GPU, as threads (a cap, not tuned: the 12 cells of --scale read in 475 s on
              # one H200, little more than the slowest cell, Titans, spent reading)


GRAPH_SPAN = {"RMT": "segment_len", "Titans": "chunk_size"}   # a graph replay reads 64 segments or 64 chunks


@torch.no_grad()
def scale_read(model, task, length, batch, piece, device, seed, shared=False, stream=None):
    """Read `batch` test streams of `length` tokens made piece by piece (`task.pieces`): recurrent models `stream`
    each piece with the state carried, attention reads the whole sequence in one call. Returns token accuracy,
    scored positions, exact match per stream (and by the deciding fact's depth, where the task gives it), tokens
    per second of model time, and peak GPU MiB (None on CPU): this read's, or with `shared` (other threads reading
    on the GPU) the GPU's since the reading began. `stream`: the model's stream (or its StreamGraphs) to read with."""
    if not shared:
        peak_mib(device, start=True)
    pieces = task.pieces(batch, length, piece, seed, device)
    stream = stream or getattr(model, "stream", None)
    if stream is None:                               # attention: one call on the whole sequence
        pieces = [tuple(torch.cat(t, dim=1) for t in zip(*pieces))]
    wrong, scored, seconds, state = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long), 0, None
    for x, y in pieces:
        if STOP.is_set():
            raise KeyboardInterrupt("stopped")
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
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


def read_cell(spec, lab):
    """One trained cell (its chosen run, spec["run"]) reads test streams of growing length until it meets a wall,
    or, on BABILong, until it answers at or below chance at two lengths in a row (1 / places at or above the lower
    end of the 95% interval): returns its rows. A worker of
    `read_streams`, as run_one is of training; `lab` is compare.py."""
    device, run, m, t = spec["device"], spec["run"], spec["model"], spec["task"]
    cap, piece, shared = SCALE["attention_cap_s"], SCALE["piece"], spec.get("shared", False)
    trained = lab.stages(run["train"])[-1][1]
    if run.get("diverged_at") is not None:                        # every lr diverged: nothing to read with
        return [dict(model=m, task=t, length=trained, trained=trained, batch=0, state_floats=None,
                     wall="every learning rate diverged in training")]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device).index or 0)   # ("cuda" alone: GPU 0)
    task = tasks.TASKS[t](**run["task_options"])
    model = lab.build_model(m, task.vocab_size, **run["model_options"])
    model.load_state_dict(torch.load(os.path.join(spec["out"], run["weights"]), weights_only=True))
    model.to(device).eval()
    batch, last, rows, read = SCALE["examples"][t], None, [], None
    span = GRAPH_SPAN.get(type(model).__name__)          # (by class: titans_lmm is a Titans too)
    if span and cuda:                                     # a span never cuts a segment or a chunk in two
        read = StreamGraphs(model, 64 * getattr(model.config, span))
    # On a GPU, a CUDA stream of its own: the cells' kernels run side by side (threads of one process). Not the
    # capture stream, which torch's pool of streams hands out again in turn: kernels on it would join a capture.
    stream = torch.cuda.Stream(device) if cuda else None
    while cuda and stream == side_stream(torch.device(device), "capture"):   # (the key capture() is called with)
        stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        scale_read(model, task, min(2 * piece, spec["lengths"][0]), batch, piece, device, 1, shared, read)   # warm-up
        for L in spec["lengths"]:
            row = dict(model=m, task=t, length=L, trained=trained, batch=batch, state_floats=model.state_size(L),
                       weights=run["weights"], trained_in=run.get("train_time_s"))   # which training: read_streams
            predicted = last[1] * (L / last[0]) ** 2 if last else 0          # attention: time grows as T^2
            if not hasattr(model, "stream") and predicted > cap:
                row["wall"] = f"time: {predicted:,.0f} s predicted > {cap:.0f} s cap"
            else:
                try:
                    row.update(scale_read(model, task, L, batch, piece, device, 20_000 + L, shared, read),
                               shared=shared)
                    last = (L, batch * L / row["tokens_per_s"])          # unrounded: row["seconds"] has 10 ms steps
                except torch.OutOfMemoryError:
                    row["wall"] = "out of memory"
            rows.append(row)
            if row.get("wall"):
                break                                              # longer lengths would hit it too
            chance = [r for r in rows[-2:] if hasattr(task, "n_places")   # BABILong: at or below chance (1 / places)
                      and not r.get("wall") and wilson(r["token_acc"], r["scored"])[0] <= 1 / task.n_places]
            if len(chance) == 2 and L != spec["lengths"][-1]:   # twice in a row: a longer stream only adds distance
                rows.append(dict(model=m, task=t, length=spec["lengths"][spec["lengths"].index(L) + 1],
                                 trained=trained, batch=batch, state_floats=None, weights=run["weights"],
                                 trained_in=run.get("train_time_s"), at_chance=True,
                                 wall=f"not read: at or below chance at {rows[-2]['length']:,} and {L:,} tokens"))
                break
    return rows


def read_streams(best, lengths, devices, out, rows, save, lab, stored=()):
    """--scale's second half: each trained cell reads its test streams (`read_cell`), the cells side by side (a
    stream is read one small segment or chunk after another, too little to fill a GPU); a cell's rows join `rows`
    as it ends, then save(). A cell whose rows an earlier command stored (`stored`: the same weights and training
    time, streams and lengths, read to the end or to a wall) is not read again; the rows of cells not read now stay."""
    rank = {m: i for i, m in enumerate(lab.MODELS)}   # the cells read now and those of earlier commands kept
    cells = sorted({*best, *((r.get("model"), r.get("task")) for r in stored)},
                   key=lambda c: (str(c[1]), rank.get(c[0], len(rank)), str(c[0])))
    order = {cell: i for i, cell in enumerate(cells)}

    def done(cell_rows):   # the rows kept by task, then model, then length, whichever cell ends first
        rows.extend(cell_rows)
        rows.sort(key=lambda r: (order.get((r["model"], r["task"]), len(order)), r["length"]))
        save()
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
    # On GPUs the cells are threads of this process, each on a CUDA stream of its own (module docstring), up to
    # READERS a GPU; on a CPU one cell at a time (the cores are the limit there).
    cuda = torch.device(devices[0]).type == "cuda"
    workers = min(len(specs), READERS * len(devices)) if cuda else 1
    shared = cuda and workers > len(devices)          # a GPU's peak memory is then its readers' together
    for d in devices if shared else []:
        peak_mib(d, start=True)
        side_stream(torch.device(d), "capture")       # made here, once: the readers compare their streams with it
    specs = [dict(s, shared=shared) for s in specs]
    print(f"streams: {reused} cells read by an earlier command reused, {len(specs)} to read now"
          + (f", {workers} at once on {len(devices)} GPU(s)" if cuda and specs else ""))
    run_all(specs, workers, devices, functools.partial(read_cell, lab=lab), done, threads=True)


def streams_report(rows, lab):
    """The tables of --scale's reading, and its figures: accuracy (with its 95% interval) per task and peak memory
    against length; the first BABILong task's panel alone. BABILong scores one answer per stream, so its interval
    is over the streams read."""
    def accuracy(r):
        low, high = wilson(r["token_acc"], r["scored"])
        return f"{r['token_acc']:.3f} [{low:.3f}, {high:.3f}]"
    cells = lambda r: [r["model"], r["task"], f"{r['trained']:,}", f"{r['length']:,}", r["batch"]] + (  # noqa: E731
        [r["wall"] if r.get("at_chance") else f"wall: {r['wall']}", "", "", ""] if r.get("wall") else
        [accuracy(r), f"{r['scored']:,}", f"{r['tokens_per_s']:,.0f}",
         "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}" + ("*" if r.get("shared") else "")]) + [
            "-" if r["state_floats"] is None else f"{r['state_floats']:,}"]
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    trained = {}   # task -> {longest training stream: {its models}}: "262k (attention, ssm), 4096 (rmt)", or "262k"
    for r in rows:
        trained.setdefault(r["task"], {}).setdefault(r["trained"], {})[r["model"]] = None
    upto = lambda t: short(max(trained[t])) if len(trained[t]) == 1 else ", ".join(  # noqa: E731
        f"{short(n)} ({', '.join(ms)})" for n, ms in sorted(trained[t].items(), reverse=True))
    panels = []
    for t in task_names:
        task = tasks.TASKS[t]()   # (the scale preset's tasks have their default options)
        panel = dict(title=t, xlabel="test length (tokens)",
                     chance=1 / task.n_places if hasattr(task, "n_places") else 0.5,
                     ylabel="accuracy (band: 95% interval)", **series(rows, "token_acc", task=t), **ACCURACY,
                     marks=list(dict.fromkeys([(r["trained"], r["model"], "trained") for r in rows if r["task"] == t]
                                              + [(r["length"], r["model"], "wall") for r in rows if r["task"] == t
                                                 and r.get("wall") and not r.get("at_chance")])))
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
    gap = [dict(p, legend=2, title=f"Filtering across a long gap: {p['title']}, one answer a stream",
                marks=[m[:2] for m in p["marks"]], xlabel="stream length in tokens; dotted: each model's longest "
                "training stream or its wall")
           for p in panels if p["title"].startswith("babilong")][:1]   # the README's opening figure, beside recall
    return "\n".join([
        "## Streams: read with the weights trained above (" + "; ".join(
            f"{t} on streams of <= {upto(t)} tokens" for t in task_names) + ")", "",
        f"Recurrent models `stream` pieces of {SCALE['piece']:,} tokens, carrying their state; attention reads each "
        f"sequence in one call until one is predicted to take over {SCALE['attention_cap_s']:.0f} s (time ~ T^2) or "
        "runs out of memory. The cells read side by side, so tokens/s (model time, all of a cell's sequences) is each "
        "one's share; peak memory includes the weights, and * marks its GPU's, all cells on it together (- on a CPU). "
        "Accuracy is over scored positions: one per BABILong stream, so its 95% Wilson interval is over the streams; "
        "flip-flop's reads in one stream are not independent, so its interval is too narrow. What each task tests: "
        "flip-flop's last write is ~20 tokens back at any length, so a long stream tests that a recurrence stays "
        "stable; BABILong's facts are scattered through the stream, so its accuracy by the deciding fact's depth "
        "(below) tests how far a fact is carried.", "",
        md_table(["model", "task", "trained to", "length", "batch", "accuracy [95% interval]", "scored", "tokens/s",
                  "peak MiB", "state floats"], [cells(r) for r in rows]), ""] + depth_table), dict(
        streams=panels, gap=gap)
