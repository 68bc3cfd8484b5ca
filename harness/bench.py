"""--bench: what each model costs. First the time and memory of one untrained model against sequence length (a
training step's forward and backward, and a no-grad forward over the whole sequence), then the milliseconds of one
optimiser step of compare.train, eagerly and (on CUDA) replayed from CUDA graphs. Saved as bench.json/.md/.png."""
import os
import time

import torch

import tasks
from harness.report import md_row, md_table, plot, series
from harness.store import save_json, save_text


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


def bench_row(lab, name, T, device, size, vocab_size=32, batch=1):
    """A training step's forward+backward time and peak memory, a no-grad forward's time per token and peak
    memory (the whole sequence in one call: prefill, not token-by-token decoding), the inference state size."""
    torch.manual_seed(0)
    model = lab.build_model(name, vocab_size, **size).to(device)
    tokens = torch.randint(0, vocab_size, (batch, T), device=device)
    row = dict(model=name, length=T, params=lab.n_params(model), state_floats=model.state_size(T))

    def train_step():
        with lab.autocast(device):
            outputs = lab.all_logits(model, tokens)
        sum(o.float().logsumexp(-1).mean() for o in outputs).backward()

    def infer():
        with torch.no_grad(), lab.autocast(device):
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


def step_row(lab, name, t, preset, device, graphs, steps=(5, 105)):
    """ms per optimiser step of compare.train (sampling, forward, backward, clipping, AdamW) for model `name` on
    task t at the preset's size, batch and longest training length: the time of steps[1] steps less that of
    steps[0], over the difference, so one-off costs (the optimiser, graph captures) cancel; after an untimed call."""
    b = preset["tasks"][t]
    task, L, seconds = tasks.TASKS[t](**b.options), lab.stages(b.train)[-1][1], []
    for n in (steps[0], *steps):
        torch.manual_seed(0)
        model = lab.build_model(name, task.vocab_size, **lab.model_config(preset, t, name))
        start = time.perf_counter()
        lab.train(model, task, n, preset["batch_size"], 1e-3, [L, L], device, graphs=graphs)   # ends with a sync
        seconds.append(time.perf_counter() - start)
    return dict(model=name, task=t, length=L, tokens=task.sample(1, L, 0)[0].shape[1], batch=preset["batch_size"],
                params=lab.n_params(model), graphs=graphs,
                ms_per_step=(seconds[2] - seconds[1]) * 1e3 / (steps[1] - steps[0]))


def step_bench(command, lab, rows, saved):
    """ms per training step of every model on STEP_TASKS, eager and (on CUDA) from CUDA graphs, each model alone
    on the device, each row appended to `rows`, then saved(). A GPU measures the full and depth presets' sizes, a
    CPU the smoke preset's."""
    cuda = command.device.startswith("cuda")
    on = {t: lab.PRESETS[("full" if t in lab.PRESETS["full"]["tasks"] else "depth") if cuda else "smoke"]
          for t in STEP_TASKS}
    cells = [(m, t) for t in STEP_TASKS for m in (command.models if command.chosen_models else
                                                   on[t]["tasks"][t].models or on[t]["models"])
             if not lab.is_grid(t) or lab.reads_grids(m)]
    print("training step, ms per optimiser step:")
    for m, t in cells:
        eager = step_row(lab, m, t, on[t], command.device, graphs=False, steps=(5, 45) if cuda else (2, 8))
        fast = step_row(lab, m, t, on[t], command.device, graphs=True) if cuda else None
        rows.append(dict(eager, graphs_ms_per_step=fast["ms_per_step"] if fast else None))
        saved()
        print(f"{m:16} {t}@{eager['length']} ({eager['tokens']} tokens): eager {eager['ms_per_step']:.1f} ms"
              + (f", CUDA graphs {fast['ms_per_step']:.2f} ms" if fast else ""), flush=True)


def step_table(rows, cuda, batch):
    sizes = "the full and depth presets' sizes" if cuda else "the smoke preset's sizes"
    return (f"## Training step: ms per optimiser step (batch {batch}, {sizes}, the task's longest training length), "
            "each model alone on the device\n\n" + md_table(
                ["model", "task", "tokens", "params", "eager ms/step", "CUDA graphs ms/step", "speed-up"], [
                    [r["model"], f"{r['task']}@{r['length']}", r["tokens"], f"{r['params']:,}",
                     f"{r['ms_per_step']:.2f}"] + (
                        [f"{r['graphs_ms_per_step']:.2f}", f"{r['ms_per_step'] / r['graphs_ms_per_step']:.1f}x"]
                        if r["graphs_ms_per_step"] else ["-", "-"]) for r in rows]))


def bench(command, meta, lab):
    """--bench: the length table (every model at every length), then the training-step table; printed and saved as
    they go (a stopped bench keeps its rows). The lengths go first so that their peak memory holds
    nothing left over from the step table's CUDA graphs."""
    cuda = command.device.startswith("cuda")
    lengths = command.test_lengths or ([1024, 4096, 16384, 65536] if cuda else [256, 1024, 4096])
    models = command.models if command.chosen_models else lab.PRESETS["full"]["models"]
    size = lab.PRESETS[command.preset]["size"]
    mib = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    cells = lambda r: [r["model"], f"{r['length']:,}", f"{r['state_floats']:,}"] + (  # noqa: E731
        ["out of memory", "", "", ""] if r.get("oom") else
        [f"{r['train_ms']:,.1f}", mib(r["train_mib"]), f"{r['infer_us_per_token']:.2f}", mib(r["infer_mib"])])
    head = ["# compare.py --bench: cost against length, and the cost of a training step",
            "",
            f"Command: `{meta['command']}`  ",
            f"Device: {meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, commit {meta['commit']}", "",
            f"## Cost against length: batch 1, model size {', '.join(f'{k}={v}' for k, v in size.items())}, median of "
            f"3 after a warm-up{'' if cuda else ' (peak memory is measured on CUDA only)'}", "",
            md_table(["model", "length", "state floats", "fwd+bwd ms", "fwd+bwd peak MiB", "inference us/token",
                      "inference peak MiB"], [])]
    rows, steps, md = [], [], os.path.join(command.out, "bench.md")
    batch = lab.PRESETS["full" if cuda else "smoke"]["batch_size"]

    def saved(finished=False):   # after every row: until the last, the files say the bench has not finished
        note = [] if finished else ["", "**Not finished (stopped, or still running): these are the rows measured.**"]
        save_json(os.path.join(command.out, "bench.json"), dict(meta, size=size, rows=rows, step_rows=steps,
                                                                finished=finished))
        save_text(md, "\n".join(head + [md_row(cells(r)) for r in rows] + ["", step_table(steps, cuda, batch)] + note)
                  + "\n")
    print("\n".join(head))
    try:
        for m in models:
            for T in lengths:
                rows.append(bench_row(lab, m, T, command.device, size))
                saved()
                if cuda:
                    torch.cuda.empty_cache()
                print(md_row(cells(rows[-1])), flush=True)
                if rows[-1].get("oom"):
                    break                    # longer sequences would not fit either
        print()
        step_bench(command, lab, steps, saved)
    except KeyboardInterrupt:
        print(f"\nstopped: the rows measured so far are in {md}")
        return 130
    saved(finished=True)
    print(step_table(steps, cuda, batch), flush=True)
    print(f"report: {md}")
    plot(os.path.join(command.out, "bench.png"), [
        dict(title=label, xlabel="sequence length", yscale="log", **series(rows, key))
        for key, label in [("train_ms", "fwd+bwd ms (batch 1)"), ("infer_us_per_token", "inference us / token"),
                           ("train_mib", "fwd+bwd peak MiB")]], lab.MODELS,
         title=f"{meta['device_name']}, {meta['dtype']}")
    return 0
