"""Grading on unseen cases, for instructors (README, "For instructors"), the tests' one comparison helper, and the
operation counters of tests/test_cores.py (here, so that grade.py binds them before a submission's code runs).

    GRADE_SEED=<int> pytest

draws the random inputs and weights of the core-versus-reference tests from that seed and adds three random
lengths (some odd, some past a chunk) to the ones written in the tests, so a student's core is checked on cases
the student has not seen. Without GRADE_SEED the tests are exactly as written (seed 0). The inputs are scaled so
that every seed and every length drawn here is well-conditioned: a correct core never fails on a seed.
"""
import os
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:
    GRADE_SEED = int(os.environ.get("GRADE_SEED") or 0)
except ValueError:
    raise pytest.UsageError(f"GRADE_SEED must be an integer, not {os.environ['GRADE_SEED']!r}") from None


@pytest.hookimpl(trylast=True)                  # after -k and -m have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    """tests/test_assignment.py grades submissions in a background process: the tests that wait for it go last, and
    it starts now, so that the other tests run meanwhile (the student copy has none of them)."""
    waiting = [item for item in items if "done" in getattr(item, "fixturenames", ())]
    items[:] = [item for item in items if item not in waiting] + waiting
    if waiting and not config.option.collectonly:
        torch.set_num_threads(1)            # the other cores are the background's: one thread here and in the
        os.environ["OMP_NUM_THREADS"] = "1"  # processes the tests start (a thread waiting for a busy core spins)
        waiting[0].module.start(waiting)


def pytest_sessionfinish(session):
    for module in {item.module for item in session.items if "done" in getattr(item, "fixturenames", ())}:
        module.stop()


def lengths(written, most=150):
    """The sequence lengths a test was written with, plus three drawn from GRADE_SEED when it is set."""
    if not GRADE_SEED:
        return written
    return written + sorted(random.Random(GRADE_SEED).sample(range(1, most), 3))


def close(actual, expected, what, dims="", rtol=1e-10, atol=1e-10):
    """Assert actual == expected within rtol and atol, or fail with one paragraph: what differs, where (indices
    named by the letters of `dims`, e.g. "BTHK") and by how much, instead of pytest's dump of two tensors."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.device == expected.device, f"{what}: on {actual.device}, expected {expected.device}"
    actual, expected = actual.detach().double(), expected.detach().double()
    err = (actual - expected).abs()
    bad = ~(err <= atol + rtol * expected.abs())                    # NaN counts as bad
    if not bad.any():
        return
    worst = torch.where(bad, torch.nan_to_num(err, nan=float("inf")), -1.0).flatten().argmax().item()
    index = torch.unravel_index(torch.tensor(worst), tuple(err.shape))
    where = ", ".join(f"{d.lower()}={i.item()}" for d, i in zip(dims or "?" * err.dim(), index))
    first = ""
    if "T" in dims:                                                  # the first time step that is off
        t_axis = dims.index("T")
        first = f"; the first wrong time step is t={bad.movedim(t_axis, 0).flatten(1).any(1).nonzero()[0].item()}"
    raise AssertionError(
        f"{what}: {bad.sum().item()} of {bad.numel()} values differ{first}; the worst at [{where}] is "
        f"{actual.flatten()[worst].item():.10g}, expected {expected.flatten()[worst].item():.10g} (|diff| "
        f"{err.flatten()[worst].item():.3g}, allowed {atol:.0e} + {rtol:.0e} x |expected|)")


def causal_logits(a, b, t, what, atol=1e-7):
    """The logits a and b (B, T, V) of two inputs that differ from position t + 1 on: equal up to t (what differs,
    the first wrong step and by how much, when the future leaks), and different after it (else the later tokens
    are ignored)."""
    close(a[:, :t + 1], b[:, :t + 1], f"{what}: the logits at positions 0..{t} changed when only tokens after {t} "
          "did (the future leaks into the past)", "BTV", rtol=atol, atol=atol)
    moved = (a[:, t + 1:] - b[:, t + 1:]).abs().max().item()
    assert moved > 1e-6, (f"{what}: the logits after position {t} moved by at most {moved:.3g} when the tokens there "
                          "changed: the model ignores its later tokens")


class Trace(TorchDispatchMode):
    """Counts the operations dispatched and the tensor elements they write; notes tensors off `device`."""

    def __init__(self, device=None):
        super().__init__()
        self.device, self.ops, self.elements, self.off_device = device, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
                if self.device is not None and t.device.type != self.device and t.numel() > 1:
                    self.off_device.append(f"{func.overloadpacket.__name__} -> {t.device.type} {tuple(t.shape)}")
        return out


class Calls(TorchFunctionMode):
    """The names of the torch functions called."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))
