"""--bench: what each model costs: the time and memory of one untrained model against sequence length (a training
step's forward and backward, and a no-grad forward over the whole sequence). Saved as bench.json/.md/.png."""
import os
import time

import torch

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


def bench(command, meta, lab):
    """--bench: every model at every length, each row printed and saved as it is measured (a stopped bench keeps
    its rows)."""
    cuda = command.device.startswith("cuda")
    lengths = command.test_lengths or ([1024, 4096, 16384, 65536] if cuda else [256, 1024, 4096])
    models = command.models if command.chosen_models else lab.PRESETS["full"]["models"]
    size = lab.PRESETS[command.preset]["size"]
    mib = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    cells = lambda r: [r["model"], f"{r['length']:,}", f"{r['state_floats']:,}"] + (  # noqa: E731
        ["out of memory", "", "", ""] if r.get("oom") else
        [f"{r['train_ms']:,.1f}", mib(r["train_mib"]), f"{r['infer_us_per_token']:.2f}", mib(r["infer_mib"])])
    head = ["# compare.py --bench: cost against length",
            "",
            f"Command: `{meta['command']}`  ",
            f"Device: {meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, commit {meta['commit']}", "",
            f"## Cost against length: batch 1, model size {', '.join(f'{k}={v}' for k, v in size.items())}, median of "
            f"3 after a warm-up{'' if cuda else ' (peak memory is measured on CUDA only)'}", "",
            md_table(["model", "length", "state floats", "fwd+bwd ms", "fwd+bwd peak MiB", "inference us/token",
                      "inference peak MiB"], [])]
    rows, md = [], os.path.join(command.out, "bench.md")

    def saved(finished=False):   # after every row: until the last, the files say the bench has not finished
        note = [] if finished else ["", "**Not finished (stopped, or still running): these are the rows measured.**"]
        save_json(os.path.join(command.out, "bench.json"), dict(meta, size=size, rows=rows, finished=finished))
        save_text(md, "\n".join(head + [md_row(cells(r)) for r in rows] + note) + "\n")
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
    except KeyboardInterrupt:
        print(f"\nstopped: the rows measured so far are in {md}")
        return 130
    saved(finished=True)
    print(f"report: {md}")
    plot(os.path.join(command.out, "bench.png"), [
        dict(title=label, xlabel="sequence length", yscale="log", **series(rows, key))
        for key, label in [("train_ms", "fwd+bwd ms (batch 1)"), ("infer_us_per_token", "inference us / token"),
                           ("train_mib", "fwd+bwd peak MiB")]], lab.MODELS,
         title=f"{meta['device_name']}, {meta['dtype']}")
    return 0
