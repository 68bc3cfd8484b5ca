"""harness/graphs.py: the CUDA-graph training step learns what the eager loop learns (padding included), and a
stream replayed from graphs reads what the eager stream reads. Most of these need a GPU."""
import math
import threading

import pytest
import torch
import torch.nn as nn

import compare
import tasks
from harness import graphs


@pytest.mark.parametrize("name", [m for m in compare.MODELS])
def test_right_padding_changes_no_loss_and_no_gradient(name):
    """The CUDA-graph path pads a causal batch on the right with unscored positions (fewer shapes to capture):
    by causality that must leave the loss and every gradient as they were. float64, odd lengths, every model."""
    torch.manual_seed(0)
    task = tasks.FlipFlop()
    model = compare.build_model(name, task.vocab_size, d_model=16, n_layers=2).double()
    x, y = task.sample(3, 37, seed=1)
    grads = []
    for pad in (0, 27):
        model.zero_grad()
        xp, yp = nn.functional.pad(x, (0, pad)), nn.functional.pad(y, (0, pad), value=tasks.IGNORE)
        losses = [nn.functional.cross_entropy(o.flatten(0, 1), yp.flatten(), ignore_index=tasks.IGNORE)
                  for o in compare.all_logits(model, xp)]
        (sum(losses) / len(losses)).backward()
        grads.append([sum(losses).item()] + [p.grad.clone() for p in model.parameters()])
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    for g0, g1 in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12)


CELLS = [(m, "flipflop") for m in compare.MODELS] + [(m, "maze") for m in compare.MODELS if compare.reads_grids(m)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name,task_name", CELLS)
def test_cuda_graph_training_learns_what_the_eager_loop_learns(name, task_name):
    """The fast path (the whole step replayed from CUDA graphs, one per padded batch shape, the warm-up undone)
    gives the eager loop's losses and weights. Flip-flop lengths drawn from [20, 40] pad to 32 or 64 tokens: two
    graphs, each replayed several times; the maze (bidirectional, never padded) has one shape."""
    task, lengths = (tasks.Maze(canvas=9, n_train=50), [3, 4]) if task_name == "maze" else (tasks.FlipFlop(), [20, 40])
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = compare.build_model(name, task.vocab_size, d_model=32, n_layers=2,
                                    **({"causal": False} if task_name == "maze" else {}))
        losses = compare.train(model, task, steps=12, batch_size=8, lr=3e-3, train_lengths=lengths, device="cuda",
                               graphs=fast)
        results.append((torch.tensor(losses), [p.detach().float().cpu() for p in model.parameters()]))
    (eager, w_eager), (fast, w_fast) = results
    assert len(eager) == len(fast) == 12 and torch.isfinite(eager).all()
    torch.testing.assert_close(fast, eager, rtol=2e-3, atol=2e-3)
    for a, b in zip(w_fast, w_eager):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)   # Adam moves a weight ~lr a step, whatever the gradient


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["rmt", "titans"])
def test_stream_graphs_read_what_the_eager_stream_reads(name, monkeypatch):
    """--scale's reading on CUDA: a recurrent model's `stream`, replayed from CUDA graphs run by run of a span
    (the first run eager, as it fixes the state's shapes; a short tail eager too), gives the eager stream's logits
    and state, in fp32 and under bf16 autocast, with a graph captured once per shape and reused."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # Titans' conv: fp32 (cuDNN's default: TF32)
    torch.manual_seed(0)
    model = compare.build_model(name, 11, d_model=32, n_layers=2).cuda().eval()
    x = torch.randint(0, 11, (2, 5 * 64 + 32), device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        replayed = graphs.StreamGraphs(model, 64)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype == torch.bfloat16):
            eager = torch.cat([model.stream(p, s)[0] for p, s in spans(model, x, 64)], dim=1)   # the graphs' spans
            eager_state = model.stream(*spans(model, x, 64)[-1])[1]
            first, state = replayed(x[:, :192], None)
            second, state = replayed(x[:, 192:], state)
        assert len(replayed.graphs) == 1
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(torch.cat([first, second], dim=1), eager, **tol)
        for a, b in zip(graphs.tensors(state), graphs.tensors(eager_state)):
            torch.testing.assert_close(a, b, **tol)


def spans(model, x, span):
    """(piece, state before it) for each span of x, the state carried by the eager stream."""
    out, state = [], None
    for piece in x.split(span, dim=1):
        out.append((piece, state))
        state = model.stream(piece, state)[1]
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_stream_graphs_in_threads_read_what_the_eager_stream_reads(monkeypatch):
    """--scale on CUDA reads its cells in threads of one process, each on a CUDA stream of its own, one capturing
    its graphs while the others replay theirs: each reads what its eager stream reads."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)    # Titans' conv: fp32 as on the CPU
    x = torch.randint(0, 11, (2, 9 * 64 + 32), device="cuda")
    models, eager, out = {}, {}, {}
    for name in ("rmt", "titans", "rmt_again", "titans_again"):
        torch.manual_seed(len(models))
        models[name] = compare.build_model(name.split("_")[0], 11, d_model=32, n_layers=2).cuda().eval()
        with torch.no_grad():   # the same spans, eager: one call on the whole differs by fp32's rounding (Titans)
            eager[name] = torch.cat([models[name].stream(p, s)[0] for p, s in spans(models[name], x, 64)], dim=1)

    def read(name):
        with torch.no_grad(), torch.cuda.stream(torch.cuda.Stream()):
            replayed, state, logits = graphs.StreamGraphs(models[name], 64), None, []
            for piece in x.split(128, dim=1):
                y, state = replayed(piece, state)
                logits.append(y)
            torch.cuda.current_stream().synchronize()
            out[name] = torch.cat(logits, dim=1)
    threads = [threading.Thread(target=read, args=(name,)) for name in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in models:
        torch.testing.assert_close(out[name], eager[name], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_one_process_trains_with_graphs_on_one_gpu_then_another():
    """A worker process runs one run on cuda:0, the next on cuda:1 (run_one makes the run's GPU current). The
    captures must happen on the current GPU: torch.cuda.graph's default capture stream, made at the first
    capture, belongs to cuda:0, and a capture on it failed with "operation not permitted when stream is
    capturing" (the full preset on two H200s stopped so)."""
    task = tasks.FlipFlop()
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(device)
        torch.manual_seed(0)
        model = compare.build_model("rmt", task.vocab_size, d_model=32, n_layers=2)
        losses = compare.train(model, task, steps=6, batch_size=8, lr=3e-3, train_lengths=[20, 40], device=device)
        assert len(losses) == 6 and all(map(math.isfinite, losses)), device
