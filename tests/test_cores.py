"""Every vectorised core does the work itself, in the way its docstring allows, on its inputs' device.

The rules, the same for the original solutions and a student's:
1. A core never calls its reference loop (`attention_ref`, `ssd_scan_ref`, `neural_memory_ref`).
2. No loop over time steps. The operations a core dispatches to PyTorch are counted (a TorchDispatchMode) at a
   length T and at 4T with the same number of chunks (the chunk size 4x larger too): the count may grow at most
   2x. A loop over chunks keeps it flat, a loop over time steps (or a call of the loop) makes it 4x.
3. Work linear in T at a fixed chunk size (`ssd_scan`, `neural_memory`): the tensor elements its operations
   write may grow at most 8x from T to 4T. The chunked algorithms grow about 4x; a form that ignores the
   chunks and builds (T, T) matrices grows 16x, and is slower than the loop it replaces.
4. `attention.attention` runs on F.scaled_dot_product_attention, as its docstring says.
5. On other devices: every core runs on 'meta' (a device without data, on any machine) and on 'cuda' when
   the tests run on a GPU (grade.py hides CUDA: it grades on the CPU), and every tensor of more than one element
   that it builds is on its inputs' device (a mask built on the CPU fails); on CUDA the results must also equal
   the reference's. RMT and HRM run whole.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

import attention
import hrm
import rmt
import ssm
import titans
from conftest import Calls, Trace, close   # (the counters live there: the grader binds them before a submission)

DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


def attention_inputs(T, device="cpu", seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, 1, 2, T, 8, generator=g, dtype=torch.float64).to(device).unbind(0)
    return (q, k, v), options


def ssm_inputs(T, device="cpu", chunk_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    A = -torch.rand(2, generator=g, dtype=torch.float64).to(device) - 0.1
    return (r(1, T, 2, 4), F.softplus(r(1, T, 2) - 1), A, r(1, T, 4), r(1, T, 4)), \
        dict(chunk_size=chunk_size, initial_state=r(1, 2, 4, 4))


def titans_inputs(T, device="cpu", chunk_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64).to(device)   # noqa: E731
    q, k = F.normalize(r(1, 2, T, 4), dim=-1), F.normalize(r(1, 2, T, 4), dim=-1)
    weights, momentum = (0.5 * r(1, 2, 4, 6), 0.3 * r(1, 2, 6, 4)), (0.1 * r(1, 2, 4, 6), 0.1 * r(1, 2, 6, 4))
    return (q, k, r(1, 2, T, 4), 0.03 * u(1, 2, T), 0.05 + 0.9 * u(1, 2, T), 0.1 * u(1, 2, T), weights,
            momentum), dict(chunk_size=chunk_size)


# (module, core, reference, inputs, (T, chunk) pairs with equal numbers of chunks, (T, chunk) for the work rule)
CORES = {
    "attention": (attention, "attention", "attention_ref", attention_inputs, [(16, {}), (64, {})], None),
    "attention_window": (attention, "attention", "attention_ref", attention_inputs,
                         [(16, dict(window=4)), (64, dict(window=4))], None),
    "attention_bidirectional": (attention, "attention", "attention_ref", attention_inputs,
                                [(16, dict(causal=False, window=4)), (64, dict(causal=False, window=4))], None),
    "ssm": (ssm, "ssd_scan", "ssd_scan_ref", ssm_inputs, [(64, dict(chunk_size=4)), (256, dict(chunk_size=16))],
            [(512, dict(chunk_size=16)), (2048, dict(chunk_size=16))]),
    "titans": (titans, "neural_memory", "neural_memory_ref", titans_inputs,
               [(32, dict(chunk_size=4)), (128, dict(chunk_size=16))],
               [(64, dict(chunk_size=16)), (256, dict(chunk_size=16))]),
}


def described(options):
    return f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""


def run(name, T, options, mode=None, device="cpu"):
    module, core, _, make, _, _ = CORES[name]
    args, kwargs = make(T, device, **options)
    with mode or Trace():
        return getattr(module, core)(*args, **kwargs)


@pytest.mark.parametrize("name", list(CORES))
def test_core_does_not_call_its_reference_or_loop_over_time(name, monkeypatch):
    module, core, ref, _, lengths, _ = CORES[name]
    def called_ref(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{core} called {ref}, the reference loop: write the vectorised form")
    monkeypatch.setattr(module, ref, called_ref)
    (T1, o1), (T2, o2) = lengths
    counts = []
    for T, options in lengths:
        trace = Trace()
        run(name, T, options, trace)
        counts.append(trace.ops)
    assert counts[1] <= 2 * counts[0], (
        f"{module.__name__}.{core} dispatched {counts[0]} operations at T={T1}{described(o1)} and {counts[1]} at "
        f"T={T2}{described(o2)}: {counts[1] / counts[0]:.1f}x for 4x the length (with the same number of chunks). "
        f"It loops over time steps; the vectorised form does a fixed number of batched operations (per chunk, "
        f"where the docstring has chunks)")


@pytest.mark.parametrize("name", [n for n in CORES if CORES[n][5]])
def test_core_work_is_linear_in_length(name):
    module, core, _, _, _, lengths = CORES[name]
    (T1, o1), (T2, o2) = lengths
    written = []
    for T, options in lengths:
        trace = Trace()
        run(name, T, options, trace)
        written.append(trace.elements)
    assert written[1] <= 8 * written[0], (
        f"{module.__name__}.{core} wrote {written[0]:,} tensor elements at T={T1} and {written[1]:,} at T={T2} "
        f"(chunk_size {o1['chunk_size']}): {written[1] / written[0]:.1f}x for 4x the length, so its work grows like "
        f"T^2. Inside a chunk the (C, C) products are fine; across chunks carry a state, not a (T, T) matrix")


def test_attention_runs_on_sdpa():
    for options in [{}, dict(window=4), dict(causal=False)]:
        calls = Calls()
        run("attention", 16, options, calls)
        assert "scaled_dot_product_attention" in calls.names, (
            f"attention.attention{described(options) or ' (causal, no window)'} does not call "
            f"F.scaled_dot_product_attention; its docstring asks for the fused kernel (the mask is the point)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, defaults", [("attention", False), ("attention_window", False),
                                            ("attention_bidirectional", False), ("ssm", False), ("ssm", True),
                                            ("titans", False), ("titans", True)])
def test_core_builds_every_tensor_on_its_inputs_device(name, defaults, device):
    """defaults: the state a core fills in itself when it is None (ssd_scan's initial_state, neural_memory's
    momentum), which must be built on the inputs' device too."""
    module, core, ref, make, lengths, _ = CORES[name]
    T, options = 37, dict(lengths[0][1])
    trace = Trace(device)
    args, kwargs = make(T, device, **options)
    if defaults:
        args, kwargs = (args[:7] + (None,), kwargs) if name == "titans" else (args, {**kwargs, "initial_state": None})
    what = f"{module.__name__}.{core}" + (" (with the default zero state)" if defaults else "")
    try:
        with trace:
            out = getattr(module, core)(*args, **kwargs)
    except NotImplementedError as e:
        if "see the docstring" in str(e):
            raise
        if device == "meta":
            pytest.skip(f"{what} reads values back ({str(e)[:80]}), so it cannot run on 'meta'")
        raise AssertionError(f"{what} failed on {device}: {e}") from e
    except RuntimeError as e:
        if device == "meta" and "device" not in str(e):
            pytest.skip(f"{what} reads values back ({str(e)[:80]}), so it cannot run on 'meta'")
        raise AssertionError(f"{what} failed on {device}: {e}") from e
    off = sorted(set(trace.off_device))
    assert not off, (
        f"{what} on {device} inputs built {len(off)} kind(s) of tensor on another device: "
        f"{'; '.join(off[:3])}. Create tensors with device= the inputs' device (torch.arange(T, device=q.device))")
    outs = tree_flatten(out)[0]
    assert all(t.device.type == device for t in outs), f"{module.__name__}.{core}: an output left {device}"
    if device != "meta":
        for i, (a, b) in enumerate(zip(outs, tree_flatten(getattr(module, ref)(*args, **kwargs))[0])):
            close(a, b, f"{module.__name__}.{core} on {device}: output {i} against {ref}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["rmt", "hrm"])
def test_model_runs_on_device(name, device):
    torch.manual_seed(0)
    if name == "rmt":
        model = rmt.RMT(rmt.RMTConfig(vocab_size=13, d_model=16, n_heads=2, n_mem=3, segment_len=5)).double()
    else:
        model = hrm.HRM(hrm.HRMConfig(vocab_size=13, d_model=16, n_layers=4, n_heads=2)).double()
    tokens = torch.randint(0, 13, (2, 12))
    try:
        out = model.to(device)(tokens.to(device))
    except NotImplementedError as e:
        if "see the docstring" in str(e):
            raise
        raise AssertionError(f"{name}: the model failed on {device}: {str(e)[:200]}" + (
            " (on 'meta' a tensor has no values: a core that reads one back, with .item(), .tolist(), int() or an "
            "if on a tensor, cannot run there; the model's cores must not need to)" if device == "meta" else "")) \
            from e
    except RuntimeError as e:
        raise AssertionError(f"{name}: the model failed on {device}: {e}") from e
    assert out.device.type == device, f"{name}: the logits came back on {out.device}, not {device}"
    if device != "meta":
        close(out, model.cpu()(tokens).to(device), f"{name} on {device}: the logits against the CPU's", "BTV",
              rtol=1e-6, atol=1e-8)
