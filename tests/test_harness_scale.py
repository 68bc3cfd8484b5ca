"""harness/scale.py: --scale's reading of long streams in pieces, its walls, its resumption, and --scale end to end."""
import json
import shutil

import pytest
import torch

import compare
import tasks
from harness import runner, scale, store


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_read_streams_on_a_gpu_reads_its_cells_as_threads(tmp_path):
    """--scale's reading on CUDA end to end: three cells at once, as threads of this process on their own streams,
    give each cell's rows, marked as sharing the GPU, and about what a cell reads alone. (A smoke test: untrained
    models' logits nearly tie, and the streams' cuBLAS workspaces differ, so a few tokens may go the other way.)"""
    cells = {}
    for m in ("rmt", "titans", "ssm"):
        torch.manual_seed(0)
        torch.save(compare.build_model(m, 5, d_model=32, n_layers=2).state_dict(), tmp_path / f"{m}.pt")
        cells[m, "flipflop"] = [dict(task_options={}, model_options=dict(d_model=32, n_layers=2), weights=f"{m}.pt",
                                     train=[32, 64], diverged_at=None)]
    together, alone = [], []
    scale.read_streams(cells, [20_000, 40_000], ["cuda:0"], str(tmp_path), together, lambda: None, compare)
    scale.read_streams({("rmt", "flipflop"): cells["rmt", "flipflop"]}, [20_000, 40_000], ["cuda:0"],
                         str(tmp_path), alone, lambda: None, compare)
    assert sorted((r["model"], r["length"], r["shared"]) for r in together) == sorted(
        (m, L, True) for m in ("rmt", "titans", "ssm") for L in (20_000, 40_000))
    rmt = [r for r in together if r["model"] == "rmt"]   # (what it reads is held to the eager stream above)
    assert not alone[0]["shared"] and all(abs(a["token_acc"] - b["token_acc"]) < 0.05 for a, b in zip(rmt, alone))


def test_a_stream_read_stops_at_its_next_piece_once_told():
    """A reading thread cannot be killed: scale_read looks at STOP before each piece and raises KeyboardInterrupt."""
    model = compare.build_model("ssm", 5, d_model=16, n_layers=1).eval()
    runner.STOP.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            scale.scale_read(model, tasks.FlipFlop(), 4000, 1, 1000, "cpu", 0)
    finally:
        runner.STOP.clear()
    assert scale.scale_read(model, tasks.FlipFlop(), 4000, 1, 1000, "cpu", 0)["scored"] > 0


@pytest.mark.parametrize("name", ["ssm", "rmt", "titans"])
def test_scale_read_in_pieces_scores_like_one_call(name):
    """--scale reads a recurrent model's test streams piece by piece, made piece by piece: the same accuracy as
    one forward call on the whole sequence, with the answers of the task's own pieces."""
    torch.manual_seed(0)
    task = tasks.TASKS["flipflop"]()
    model = compare.build_model(name, task.vocab_size, d_model=16, n_layers=1).double().eval()
    row = scale.scale_read(model, task, 1024, 2, 128, "cpu", seed=5)
    x, y = (torch.cat(t, dim=1) for t in zip(*task.pieces(2, 1024, 128, seed=5)))
    with torch.no_grad():
        pred = model(x).argmax(-1)
    mask = y != tasks.IGNORE
    assert row["scored"] == mask.sum().item() > 50
    assert row["token_acc"] == ((pred == y) & mask).sum().item() / mask.sum().item()


def test_scale_read_scores_babilong_streams_by_the_depth_of_their_deciding_fact():
    """BABILong streams read in pieces: one answer per stream, exact match per stream, and exact match in four
    bins of the deciding fact's depth, each bin holding the streams whose depth falls in it."""
    torch.manual_seed(0)
    task = tasks.TASKS["babilong_qa1"]()
    model = compare.build_model("ssm", task.vocab_size, d_model=16, n_layers=1).double().eval()
    row = scale.scale_read(model, task, 300, 40, 64, "cpu", seed=3)
    x, y = (torch.cat(t, dim=1) for t in zip(*task.pieces(40, 300, 64, seed=3)))
    with torch.no_grad():
        right = (model(x).argmax(-1)[:, -1] == y[:, -1]).double()
    bins = (task.sample_with_depth(40, 300, seed=3)[2] * 4).long()
    assert row["scored"] == 40 and row["exact"] == row["token_acc"] == right.mean().item()
    assert row["depth_counts"] == [int((bins == k).sum()) for k in range(4)] and sum(row["depth_counts"]) == 40
    assert row["by_depth"] == [right[bins == k].mean().item() if (bins == k).any() else None for k in range(4)]


def test_wilson_interval_matches_its_formula_and_holds_the_estimate():
    """The 95% Wilson interval, against values worked out by hand: 8/10 -> [0.490, 0.943]; 0/64 -> [0, 0.0566]
    (z^2 / (n + z^2)); 64/64 -> [0.9434, 1]; none seen -> [0, 1]."""
    assert scale.wilson(0.8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert scale.wilson(0.0, 64) == pytest.approx((0.0, 0.0566), abs=1e-4)
    assert scale.wilson(1.0, 64) == pytest.approx((0.9434, 1.0), abs=1e-4)
    assert scale.wilson(0.5, 0) == (0.0, 1.0)


def test_attention_stops_at_the_predicted_time_cap_even_after_a_fast_read(tmp_path, monkeypatch):
    """--scale's attention reads until a call is predicted (time ~ T^2) to take over the cap. A read of 4 ms at 1,000
    tokens predicts 40 s at 100,000: a wall, even though the row shows its time rounded to 0.0 s."""
    model = compare.build_model("attention", 5, d_model=16, n_layers=1)
    torch.save(model.state_dict(), tmp_path / "attention.pt")
    run = dict(task_options={}, model_options=dict(d_model=16, n_layers=1), weights="attention.pt", train=[32, 64])
    read = []

    def timed_read(model, task, length, batch, piece, device, seed, shared, stream=None):   # 4 ms at 1,000 tokens
        read.append(length)
        seconds = 4e-3 * (length / 1000) ** 2
        return dict(token_acc=1.0, scored=1, tokens_per_s=batch * length / seconds, seconds=round(seconds, 2),
                    peak_mib=None)

    monkeypatch.setattr(scale, "scale_read", timed_read)
    rows = []
    scale.read_streams({("attention", "flipflop"): [run]}, [1000, 100_000, 400_000], ["cpu"], str(tmp_path),
                         rows, lambda: None, compare)
    assert read == [1000, 1000]                                     # the warm-up, then the first length only
    assert [r["length"] for r in rows] == [1000, 100_000] and rows[0]["seconds"] == 0.0
    assert "40 s predicted" in rows[1]["wall"]
    marks = scale.streams_report(rows, compare)[1]["streams"][0]["marks"]   # the figure: where it trained, stopped
    assert marks == [(64, "attention", "trained"), (100_000, "attention", "wall")]


def test_read_streams_reads_every_length_with_the_trained_weights(tmp_path, monkeypatch):
    """--scale's reading, with the reads faked: each cell's trained weights are loaded and read at every length,
    warm-up first, the same test streams (seeds) for every model and other ones at each length; the recurrent
    model reads even where a call is slow, attention stops at its first predicted wall or out-of-memory; a cell
    that diverged at every lr gets a row that says so; every row is saved as it comes."""
    monkeypatch.setitem(scale.SCALE, "attention_cap_s", 1.0)
    cells, trained = {}, {}
    for m in ("ssm", "attention"):
        model = compare.build_model(m, 5, d_model=16, n_layers=1)
        torch.save(model.state_dict(), tmp_path / f"{m}.pt")
        trained[type(model).__name__] = model.embed.weight.detach().clone()
        cells[m, "flipflop"] = [dict(task_options={}, model_options=dict(d_model=16, n_layers=1), weights=f"{m}.pt",
                                     train=[32, 64],
                                     diverged_at=None)]
    cells["rmt", "flipflop"] = [dict(diverged_at=7, train=compare.CURRICULUM)]
    calls, saved = [], []

    def fake_read(model, task, length, batch, piece, device, seed, shared, stream=None):
        name = type(model).__name__
        assert torch.equal(model.embed.weight, trained[name]) and not model.training
        assert isinstance(task, tasks.FlipFlop)
        calls.append((name, length, batch, piece, device, seed))
        if name == "Transformer" and length == 4000:
            raise torch.OutOfMemoryError("fake")
        seconds = 0.6 if length == 1000 else 2.0                    # attention: 0.6 s at 1,000 predicts 2.4 s at 2,000
        return dict(token_acc=0.5, scored=3, tokens_per_s=batch * length / seconds, seconds=seconds, peak_mib=None)

    monkeypatch.setattr(scale, "scale_read", fake_read)
    rows = []
    scale.read_streams(cells, [1000, 2000, 4000], ["cpu"], str(tmp_path), rows, lambda: saved.append(len(rows)),
                       compare)
    batch, piece = scale.SCALE["examples"]["flipflop"], scale.SCALE["piece"]
    warm_ups, reads = [c for c in calls if c[5] == calls[0][5]], [c for c in calls if c[5] != calls[0][5]]
    assert [c[:5] for c in warm_ups] == [(name, 1000, batch, piece, "cpu") for name in ("Mamba", "Transformer")]
    assert [c[:2] for c in reads] == [("Mamba", 1000), ("Mamba", 2000), ("Mamba", 4000), ("Transformer", 1000)]
    assert all(c[2:5] == (batch, piece, "cpu") for c in reads)
    seeds = {L: {c[5] for c in reads if c[1] == L} for L in (1000, 2000, 4000)}
    assert len(seeds[1000]) == 1 and len(set.union(*seeds.values())) == 3   # the same streams, others per length
    assert [(r["model"], r["length"], r.get("wall", "")[:5]) for r in rows] == [   # by model, whatever ends first
        ("attention", 1000, ""), ("attention", 2000, "time:"), ("ssm", 1000, ""), ("ssm", 2000, ""), ("ssm", 4000, ""),
        ("rmt", compare.CURRICULUM[-1][1], "every")]
    assert saved == [3, 5, 6] and all(r["task"] == "flipflop" for r in rows)     # saved as each cell ends
    ssm = compare.build_model("ssm", 5, d_model=16, n_layers=1)
    assert [r["state_floats"] for r in rows[2:5]] == [ssm.state_size(L) for L in (1000, 2000, 4000)]
    assert rows[2]["token_acc"] == 0.5 and rows[2]["batch"] == batch

    rows = []                                                        # a wall of memory stops attention too
    monkeypatch.setitem(scale.SCALE, "attention_cap_s", 100.0)
    scale.read_streams({("attention", "flipflop"): cells["attention", "flipflop"]}, [1000, 4000, 8000], ["cpu"],
                         str(tmp_path), rows, lambda: None, compare)
    assert [(r["length"], r.get("wall")) for r in rows] == [(1000, None), (4000, "out of memory")]


def test_babilong_is_read_from_16k_to_11m_tokens_with_64_questions_a_length():
    """C2's long gap: each BABILong task is read at 16k to 11M tokens, 64 streams (questions) or more a length, so
    that each accuracy has a 95% interval of at most about +-0.12."""
    for t in ("babilong_qa1", "babilong_qa2"):
        lengths = scale.SCALE["lengths"][t]
        assert lengths[0] <= 16_384 and lengths[-1] >= 11_000_000 and scale.SCALE["examples"][t] >= 64
        low, high = scale.wilson(0.5, scale.SCALE["examples"][t])
        assert high - low <= 0.25


def test_a_babilong_cell_stops_reading_once_it_answers_at_chance_twice(tmp_path, monkeypatch):
    """BABILong (six places: chance 1/6): a cell reads on until two lengths in a row have 95% intervals that reach
    down to chance (or below), then marks the next length not read (not a wall in the figure); at chance at the last
    length, nothing more; stored, its rows are reused whole. Flip-flop has no such stop."""
    for t in ("babilong_qa1", "flipflop"):
        model = compare.build_model("ssm", tasks.TASKS[t]().vocab_size, d_model=16, n_layers=1)
        torch.save(model.state_dict(), tmp_path / f"{t}.pt")
    lengths, read = [1000, 2000, 4000, 8000, 16000], []

    def fake_read(model, task, length, batch, piece, device, seed, shared, stream=None):
        read.append(length)
        return dict(token_acc=accuracy[length], scored=64, tokens_per_s=1.0, seconds=1.0, peak_mib=None)

    monkeypatch.setattr(scale, "scale_read", fake_read)
    # 64 streams: 0.3 is [0.20, 0.42], 0.2 reaches 1/6, 0.02 lies below it
    for t, accuracy, want in [("babilong_qa1", {1000: 0.5, 2000: 0.2, 4000: 0.3, 8000: 0.2, 16000: 0.02},
                               [1000, 2000, 4000, 8000, 16000]),
                              ("babilong_qa1", {1000: 0.2, 2000: 0.02, 4000: 0.9}, [1000, 2000, 4000]),
                              ("babilong_qa1", {1000: 0.5, 2000: 0.5, 4000: 0.5, 8000: 0.2, 16000: 0.2}, lengths),
                              ("flipflop", dict.fromkeys(lengths, 0.0), lengths)]:
        rows, run = [], dict(task_options={}, model_options=dict(d_model=16, n_layers=1), weights=f"{t}.pt",
                             train=[32, 64], train_time_s=1.0)
        scale.read_streams({("ssm", t): [run]}, lengths, ["cpu"], str(tmp_path), rows, lambda: None, compare)
        assert [r["length"] for r in rows] == want
        stopped = [r for r in rows if r.get("wall")]
        assert all(r.get("at_chance") and "not read: at or below chance" in r["wall"] for r in stopped)
        assert len(stopped) == (want[-1] == 4000)
        figures = scale.streams_report(rows, compare)[1]
        assert figures["streams"][0]["marks"] == [(64, "ssm", "trained")]   # no wall drawn
        assert [p["lines"] for p in figures["gap"]] == ([figures["streams"][0]["lines"]] if t != "flipflop" else [])
        read.clear()   # stored, the rows are the cell's whole reading: nothing is read again
        again = []
        scale.read_streams({("ssm", t): [run]}, lengths, ["cpu"], str(tmp_path), again, lambda: None, compare, rows)
        assert read == [] and again == rows


def test_read_streams_resumes_reusing_the_cells_an_earlier_command_read(tmp_path, monkeypatch):
    """A stopped --scale resumes its reading: a cell whose rows are stored (the same weights and batch, every length
    asked, or the lengths up to a wall) is not read again and its rows are kept; a cell stored with other weights,
    another batch or fewer lengths is read."""
    cells = {}
    for m in ("ssm", "attention", "rmt"):
        torch.save(compare.build_model(m, 5, d_model=16, n_layers=1).state_dict(), tmp_path / f"{m}.pt")
        cells[m, "flipflop"] = [dict(task_options={}, model_options=dict(d_model=16, n_layers=1), weights=f"{m}.pt",
                                     train=[32, 64], diverged_at=None, train_time_s=1.5)]
    batch = scale.SCALE["examples"]["flipflop"]

    def row(m, L, weights=None, wall=None, b=batch, trained_in=1.5):
        return dict(model=m, task="flipflop", length=L, batch=b, weights=weights or f"{m}.pt", token_acc=0.25,
                    scored=4, trained_in=trained_in, **({"wall": wall} if wall else {}))
    others = [dict(row(m, L), task="babilong_qa1") for m in ("ssm", "attention") for L in (1000, 2000)]  # not read
    stored = [*others, row("ssm", 1000), row("ssm", 2000), row("ssm", 4000),     # all read: reused
              row("attention", 1000), row("attention", 2000, wall="out of memory"),   # read to a wall: reused
              row("rmt", 1000), row("rmt", 2000)]                              # not to the last length: read
    read = []

    def fake_read(model, task, length, batch, piece, device, seed, shared, stream=None):
        read.append((type(model).__name__, length))
        return dict(token_acc=1.0, scored=3, tokens_per_s=1e6, seconds=0.1, peak_mib=None)
    monkeypatch.setattr(scale, "scale_read", fake_read)
    rows = []
    scale.read_streams(cells, [1000, 2000, 4000], ["cpu"], str(tmp_path), rows, lambda: None, compare, stored)
    assert {name for name, _ in read} == {"RMT"}
    kept = [r for m in ("attention", "ssm") for r in stored[4:] if r["model"] == m]  # (rows go by model, length)
    assert rows[:4] == [others[2], others[3], others[0], others[1]]   # the cells not read now kept, in that order too
    assert [r for r in rows[4:] if r["model"] != "rmt"] == kept
    assert [(r["length"], r["token_acc"]) for r in rows if r["model"] == "rmt"] == [(L, 1.0) for L in (1000, 2000,
                                                                                                       4000)]
    for changed in ([row("ssm", L, weights="other.pt") for L in (1000, 2000, 4000)],   # another training
                    [row("ssm", L, b=batch + 1) for L in (1000, 2000, 4000)],       # other streams
                    [row("ssm", L, trained_in=2.5) for L in (1000, 2000, 4000)]):   # the file trained again
        read.clear()
        scale.read_streams({("ssm", "flipflop"): cells["ssm", "flipflop"]}, [1000, 2000, 4000], ["cpu"],
                             str(tmp_path), [], lambda: None, compare, changed)
        assert [L for _, L in read[1:]] == [1000, 2000, 4000]                    # (after the warm-up)


@pytest.mark.slow
def test_scale_trains_keeps_the_weights_and_reads_streams(tmp_path, capsys, monkeypatch):
    """--scale: the scale preset's runs through the usual protocol (stored, resumable, a second seed as a
    follow-up), their weights kept beside them, then every chosen model reads every stream length; the same
    command on a copy of the folder elsewhere reuses the training and reads the same streams again."""
    argv = ["--scale", "--models", "ssm,attention", "--tasks", "flipflop", "--seeds", "0,1", "--steps", "3",
            "--test-lengths", "512,1024", "--workers", "1"]
    monkeypatch.setitem(compare.PRESETS["scale"], "batch_size", 16)       # (the plumbing, not the science)
    monkeypatch.setitem(compare.PRESETS["scale"], "eval_examples", 32)
    assert compare.main(argv + ["--out", str(tmp_path / "a")]) == 0
    saved = json.load(open(tmp_path / "a" / "scale.json"))
    assert len(saved["runs"]) == 2 * len(compare.PRESETS["scale"]["lrs"]) + 2      # the sweep, then seed 1
    assert all((tmp_path / "a" / r["weights"]).exists() for r in saved["runs"].values())
    assert len({r["weights"] for r in saved["runs"].values()}) == len(saved["runs"])
    streams = saved["streams"]
    assert [(r["model"], r["length"]) for r in streams] == [(m, L) for m in ("attention", "ssm") for L in (512, 1024)]
    assert all(r["scored"] > 0 and r["tokens_per_s"] > 0 for r in streams)
    assert streams[2]["state_floats"] == streams[3]["state_floats"] < streams[1]["state_floats"]  # SSM vs KV cache
    assert "## Streams" in (tmp_path / "a" / "scale.md").read_text()
    capsys.readouterr()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copied = json.load(open(tmp_path / "b" / "scale.json"))
    store.save_json(tmp_path / "b" / "scale.json", {**copied, "streams": []})   # the streams to be read again
    assert compare.main(argv + ["--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "lr sweep: 4 stored runs reused, 0 to train now" in out and "seeds: 2 stored runs reused, 0 to" in out
    assert "0 cells read by an earlier command reused, 2 to" in out
    again = json.load(open(tmp_path / "b" / "scale.json"))["streams"]    # the same weights read the same streams
    assert [(r["token_acc"], r["scored"]) for r in again] == [(r["token_acc"], r["scored"]) for r in streams]
    assert compare.main(argv + ["--out", str(tmp_path / "b")]) == 0         # and, read, are not read a third time
    assert "2 cells read by an earlier command reused, 0 to read now" in capsys.readouterr().out
