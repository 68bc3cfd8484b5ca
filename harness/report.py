"""The report of a preset's runs: markdown tables (printed, and saved as <preset>.md) and figures (<preset>_*.png,
with matplotlib when it is installed).

Every table and figure is made from "panels": a panel is one block of columns in a table and one axes in a figure,
with x values `xs` and `lines`, a dict from a label (a model, or a tuple that starts with one) to one list of values
per x, a value per seed. Tables show mean±half the spread; figures the mean. A value that is a string (a diverged
run, a wall) is counted beside the numbers, never averaged.
"""
import collections
import contextlib
import functools
import math
import os
import textwrap

from harness.store import save_text


def average(values):
    """The mean of the numbers among the values (skipping None and labels such as "diverged"); nan when none."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else float("nan")


def mean_spread(values):
    """'mean' or 'mean±half-spread' over seeds, with how many seeds gave a label instead ("diverged", "out of
    memory"); the label alone when no seed gave a number; '' when there is nothing at all."""
    values = [v for v in values if v is not None]
    numbers, labels = [v for v in values if not isinstance(v, str)], collections.Counter(v for v in values
                                                                                         if isinstance(v, str))
    if not numbers:
        return ", ".join(labels)
    return (f"{average(numbers):.2f}" + (f"±{(max(numbers) - min(numbers)) / 2:.2f}" if len(numbers) > 1 else "")
            + "".join(f" ({n} {label})" for label, n in labels.items()))


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


def plot(path, panels, models, title=None):
    """Panels side by side, log x unless a panel says otherwise; a colour and a marker per model of `models` in every
    figure, other dashes for a model's further lines in a panel; dotted verticals at a panel's `marks`, each
    labelled."""
    panels = [p for p in panels if any(not math.isnan(average(v)) for values in p["lines"].values() for v in values)]
    plt = pyplot()
    if plt is None or not panels:   # (a panel with nothing to draw: memory on a CPU, say)
        return
    size = (6.4, 3.6) if any(p.get("legend") for p in panels) else (3.4, 3.4)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5, size[0] * len(panels)), size[1]), squeeze=False)
    for ax, p in zip(axes[0], panels):
        drawn = []
        for label, values in p["lines"].items():
            label = label if isinstance(label, tuple) else (label,)
            i = list(models).index(label[0])
            # each line's points moved sideways on the page (up to 4 points from the last line's, 24 in all), so that
            # equal values show side by side; the values (y) stay where they are
            shift = ax.transData + plt.matplotlib.transforms.ScaledTranslation(
                (len(drawn) - (len(p["lines"]) - 1) / 2) * min(4, 24 / len(p["lines"])) / 72, 0, fig.dpi_scale_trans)
            points = [(x, average(v)) for x, v in zip(p["xs"], values) if not math.isnan(average(v))]
            if points:
                ax.plot(*zip(*points), marker="os^Dv<>pXP"[i % 10], color=f"C{i}",
                        ls=("-", "--", ":", "-.")[drawn.count(label[0]) % 4], label=", ".join(map(str, label)),
                        zorder=3 + len(p["lines"]) - len(drawn))[0].set_transform(shift)   # first on top
            spread = [(x, min(n), max(n)) for x, v in zip(p["xs"], values)
                      if len(n := [a for a in v if isinstance(a, (int, float))]) > 1]
            spread += [(x, *band) for x, band in zip(p["xs"], p.get("intervals", {}).get(label[0], [])) if band]
            if spread:   # the band: the lowest and highest seed, or a panel's intervals
                ax.fill_between(*zip(*spread), color=f"C{i}", alpha=0.15, lw=0).set_transform(shift)
            drawn.append(label[0])
        for mark in p.get("marks", []):   # a length, (length, model) in the model's colour, or (length, model, label)
            x, m, text = (*(mark if isinstance(mark, tuple) else (mark, None)), p.get("mark_label"))[:3]
            ax.axvline(x, color=f"C{list(models).index(m)}" if m else "gray", ls=":", lw=1)
            if text:
                ax.annotate(text, (x, 0.02), xytext=(3, 0), textcoords="offset points", fontsize=7,
                            color="gray", xycoords=("data", "axes fraction"))
        if p.get("chance") is not None:
            ax.axhline(p["chance"], color="gray", ls="--", lw=0.8)
            ax.annotate("chance", (1, p["chance"]), xytext=(-3, -3), textcoords="offset points", ha="right", va="top",
                        fontsize=7, color="gray", xycoords=("axes fraction", "data"))
        if p.get("legend"):   # under its own panel
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=p["legend"], frameon=False)
        ax.set(xscale=p.get("xscale", "log"), **{k: p[k] for k in ("title", "xlabel", "ylabel", "ylim", "yscale")
                                                  if k in p})
        ax.xaxis.minorticks_off()   # (a log y axis spanning less than a decade needs its minor ticks' labels)
        ax.set_xticks(p["xs"], [short(x) for x in p["xs"]], fontsize=7)
    if any(p.get("legend") for p in panels):   # the axes keep their size; the saved image takes the legends in
        fig.subplots_adjust(wspace=0.2)
    else:   # the panels laid out first, then every line's label beside them (the saved image takes it in)
        fig.tight_layout()
        labelled = {label: line for ax in axes[0] for line, label in zip(*ax.get_legend_handles_labels())}
        axes[0][-1].legend(labelled.values(), labelled.keys(), fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1),
                           ncol=1 + len(labelled) // 16, frameon=False)
    if title:   # wrapped to the figure's width (an 8-point character is about 4.4 points wide), set above
        # the laid-out panels (the saved image takes it in)
        wrap = functools.partial(textwrap.fill, width=int(fig.get_figwidth() * 72 / 4.4))
        fig.suptitle("\n".join(map(wrap, title.split("\n"))), fontsize=8, y=1, va="bottom")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"plot: {path}")


ACCURACY = dict(ylim=(-0.03, 1.03))
BANDS = "the mean over seeds, the band from the lowest seed to the highest"
FIGURES = ("length", "dial", "tradeoff", "segments", "depth", "streams", "gap")   # every figure a report may draw
CAPTIONS = {   # what a report's figure plots (each line above where its runs were made)
    "length": f"Token accuracy against test length (recall: key-value pairs): {BANDS};\n"
              "dotted: the longest training length; dashed: chance (flip-flop's 0.5)",
    "dial": f"Token accuracy against content, a line per state size: {BANDS}",
    "segments": f"Exact match against test-time depth: {BANDS}",
    "depth": f"Exact match by path length (maze) or by the depth of the deciding fact (BABILong): {BANDS}",
    "streams": "Accuracy against the test stream's length, band: its 95% interval; dotted, in each model's colour: "
               "its longest training stream and its wall"}


def report(runs, meta, task_names, model_names, lab):
    """The markdown report of a preset's runs, and its figures as {name: panels}. `lab` is compare.py."""
    best_runs, stages, is_grid, DIVERGED = lab.best_runs, lab.stages, lab.is_grid, lab.DIVERGED

    def at(rs, L, *path):   # a metric of each seed's run at test length L, e.g. at(rs, 64, "by_depth", 0)
        return [DIVERGED if r.get("diverged_at") is not None else r["metrics"][str(L)].get("wall") or
                functools.reduce(lambda value, key: value[key], path, r["metrics"][str(L)]) for r in rs]
    best = best_runs(runs)
    edges = lab.edge_cells(runs, best)
    cells = {t: [(m, best[(m, t)]) for m in model_names if (m, t) in best] for t in task_names}
    first = {t: next((rs[0] for _, rs in cs if not rs[0].get("train_wall")), cs[0][1][0])   # a run of each task
             for t, cs in cells.items() if cs}   # with its test lengths and its whole curriculum (no wall met)
    sequence_tasks = [t for t in first if not is_grid(t)]

    def by_length(t, metric):   # a task's panel: a metric against test length (recall: content), a line per model
        return dict(title=t, xs=first[t]["test"], xlabel="key-value pairs" if t == "recall" else "test length",
                    chance=0.5 if t == "flipflop" else None,
                    lines={m: [at(rs, L, metric) for L in first[t]["test"]] for m, rs in cells[t]},
                    ylabel="token accuracy", marks=[stages(first[t]["train"])[-1][1]], mark_label="longest trained",
                    **ACCURACY)
    made_on = sorted({f"{r.get('device_name')}, commit {r.get('commit')}" for r in runs})
    parts = [f"# compare.py, preset `{meta['preset']}`", "", f"Command: `{meta['command']}`  ",
             f"Device: {meta['device_name']}, torch {meta['torch']}, commit {meta['commit']}, "
             f"wall time {meta.get('wall_time_s', 0):.0f} s; runs trained by this command: {meta.get('runs_run', 0)}, "
             f"reused from earlier ones: {meta.get('runs_reused', 0)}; the runs' own times add up to "
             f"{sum(r['wall_time_s'] for r in runs):.0f} s" + (
                 f"; the runs were made on: {'; '.join(made_on)}" if len(made_on) > 1 else ""), ""]

    def curriculum(r):   # "2-4, 2-8, 2-16 (a third of the steps each)" or "2-16"
        plan = stages(r["train"])
        share = {1: "", 2: " (half of the steps each)", 3: " (a third of the steps each)"}.get(
            len(plan), f" (1/{len(plan)} of the steps each)") if isinstance(r["steps"], int) else \
            f" ({', '.join(map(str, r['steps']))} steps)"
        return ", ".join(f"{lo}-{hi}" if lo != hi else f"{lo}" for lo, hi in plan) + share

    def total(r):   # a run's steps in all (a curriculum may give each stage its own count)
        return sum(r["steps"]) if isinstance(r["steps"], list) else r["steps"]

    def batches(r):   # "128", or a batch per stage when long stages take fewer streams (and a lower rate)
        sizes = lab.stage_batches(r["train"], r["batch_size"], r.get("tokens_per_step"))
        return str(sizes[0]) if len(set(sizes)) == 1 else ", ".join(map(str, sizes)) + (
            f" (a stage's lr x sqrt(batch / {r['batch_size']}))")
    walls = [f"- {m} on {t} stops at its wall, after the stages up to {stages(rs[0]['train'])[-1][1]:,} tokens "
             f"({total(rs[0])} steps): {rs[0]['train_wall']}" for t, cs in cells.items() for m, rs in cs
             if rs[0].get("train_wall")]
    parts += ["## Budgets: the same for every model on a task", "", md_table(
        ["task", "steps", "batch", "training lengths, stage by stage", "test lengths", "task options"],
        [[t, total(r), batches(r), curriculum(r), ", ".join(map(str, r["test"])),
          ", ".join(f"{k}={v}" for k, v in r["task_options"].items()) or "-"] for t, r in first.items()]), ""]
    if walls:
        parts += ["Where a stage would cost a model too much, it stops there (the same stages and steps up to it):",
                  "", *walls, ""]
    figures = {}
    if sequence_tasks:
        figures["length"] = [by_length(t, "token_acc") for t in sequence_tasks]
        parts += ["## Token accuracy on scored positions, by test length (mean±half-spread over seeds)", "",
                  table(figures["length"]), "",
                  "## Exact match: every scored position of an example right", "",
                  table([by_length(t, "exact") for t in sequence_tasks]), ""]
    for t in [t for t in sequence_tasks if any(r.get("dial") and r["task"] == t for r in runs)]:
        sizes = best_runs(runs, dial=True)
        points = [(m, "default", rs) for m, rs in cells[t]] + [
            (m, ", ".join(f"{k}={v}" for k, v in size), rs)
            for (m, task, size), rs in sizes.items() if task == t and m in model_names]
        size_edges = lab.edge_cells(runs, sizes)

        def state(rs):   # the state floats at the largest content
            return rs[0]["state_size"][str(first[t]["test"][-1])]

        def accuracy(rs):
            return [at(rs, L, "token_acc") for L in first[t]["test"]]
        points.sort(key=lambda p: (model_names.index(p[0]), state(p[2])))
        dial = dict(by_length(t, "token_acc"), lines={   # a dial size's row names the rate its own sweep chose
            (m, size if size == "default" else f"{size} (lr {rs[0]['lr']:g}"
             + (", edge)" if lab.dial_cell(rs[0]) in size_edges else ")"), f"{state(rs):,}"): accuracy(rs)
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
                dict(ff, title="Filtering: flip-flop as the stream grows", legend=3,
                     xlabel="stream length in tokens (log scale)", mark_label="longest training stream",
                     ylabel="token accuracy (band: lowest to highest seed)")]
        parts += [f"## The dial on {t}: token accuracy against content, one row per state size", "",
                  table([dial], first=("model", "size", "state floats")), ""]
    for t in [t for t in first if is_grid(t)]:   # HRM at each count of test-time segments
        counts = sorted({s for m, rs in cells[t] for s in rs[0].get("test_segments", [1])})
        lines = {}
        for m, rs in cells[t]:
            for L in rs[0]["test"]:
                if any("by_segments" in r["metrics"].get(str(L), {}) for r in rs):
                    lines[(m, f"{L}x{L}")] = [at(rs, L, "by_segments", str(s), "exact") for s in counts]
                else:   # a fixed-depth model has one number, the same at every count
                    fixed = "" if all(r.get("diverged_at") is not None for r in rs) else ", fixed depth"
                    lines[(m, f"{L}x{L}{fixed}")] = [at(rs, L, "exact")] * len(counts)
        figures.setdefault("segments", []).append(dict(
            title=t, xs=counts, lines=lines, names=[f"{s} seg" for s in counts],
            xlabel="test-time segments (HRM)\nor loops (looped Transformer)", ylabel="exact match", **ACCURACY))
        parts += [f"## {t}: exact match against test-time segments (HRM) or loops (attention_looped)", "",
                  table(figures["segments"][-1:], first=("model", "size")), "",
                  "Training compute, Block applications per example (one forward, every supervised segment): "
                  + ", ".join(f"{m} {rs[0]['block_calls']}" for m, rs in cells[t]
                              if rs[0].get("block_calls") is not None),
                  ""]
        paths = [v.get("by_path", {}) for _, rs in cells[t] for r in rs for v in r["metrics"].values()]
        xs = sorted({int(b) for bins in paths for b in bins})
        if xs:   # the maze by path length, one line per model and size: pooled over sizes, the mix of sizes in each
            # bin would make the trend (larger mazes have longer paths)
            low = cells[t][0][1][0]["task_options"].get("min_path", 0)   # no shorter path is ever drawn
            lines = {(m, f"{L}x{L}"): [[DIVERGED if r.get("diverged_at") is not None else
                                     r["metrics"][str(L)].get("by_path", {}).get(str(b), [None])[0] for r in rs]
                                    for b in xs] for m, rs in cells[t] for L in rs[0]["test"]}
            figures.setdefault("depth", []).append(dict(
                title=f"{t}: by path length", xs=xs, xscale="linear", ylabel="exact match",
                xlabel=f"squares on the S-G path\n(bins of {lab.PATH_BIN}, from the value shown)", **ACCURACY,
                names=[f"{max(b, low)}-{b + lab.PATH_BIN - 1}" for b in xs], lines=lines))
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
                                            if r.get("diverged_at") is not None), total(rs[0]),
                     f"{rs[0]['examples_seen']:,}", f"{average(r['wall_time_s'] for r in rs):.1f}"])
    parts += ["## Runs", "", md_table(["model", "task", "params (vs attention)", "state floats (per test length)",
                                       "chosen lr", "seeds", "steps", "examples", "wall s"], rows), ""]
    if edges:
        parts += [f"Chosen lr on the edge of the grid {meta['lrs']}: {', '.join(sorted(f'{m}/{t}' for m, t in edges))}."
                  " A wider grid might find a better rate for these.", ""]
    return "\n".join(parts), figures


def series(rows, key, **match):
    """A panel's xs and lines from rows of measurements: `key` against length, a line per model, over the rows
    that match (e.g. task="flipflop"); rows without the key (out of memory, a wall) are left out."""
    rows = [r for r in rows if all(r[k] == v for k, v in match.items())]
    xs = sorted({r["length"] for r in rows})
    return dict(xs=xs, lines={m: [[r[key] for r in rows if (r["model"], r["length"]) == (m, x) and r.get(key)
                                   is not None] for x in xs] for m in dict.fromkeys(r["model"] for r in rows)})


def publish(text, figures, runs, meta, lab):
    """Print the report, save it as <out>/<preset>.md and draw its figures as <out>/<preset>_<name>.png, titled
    with where the runs were made (and, for --scale's streams, where they were read). Figures of an earlier report
    that this one does not draw are removed: they would show runs that this report leaves out."""
    out = os.path.join(os.path.dirname(meta["path"]), meta["preset"])
    save_text(out + ".md", text)   # (whole, or not at all: a stop while writing leaves the last one)
    print(text + f"\nreport: {out}.md")
    for name in FIGURES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{out}_{name}.png")
    made = collections.Counter(f"{r.get('device_name')}, commit {r.get('commit')}" for r in runs)
    title = "; ".join(f"{where} ({n} runs)" if len(made) > 1 else where for where, n in made.most_common())
    if "streams" in figures:   # (and "gap", its first BABILong panel)
        title = f"trained on {title}; read on {meta['device_name']}, commit {meta['commit']}"
    for name, panels in figures.items():
        plot(f"{out}_{name}.png", panels, lab.MODELS, "\n".join(filter(None, [CAPTIONS.get(name), title])))
