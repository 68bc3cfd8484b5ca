"""harness/bench.py: --bench's cost against length, its cores against their loops, its training-step table."""
import json

import pytest
import torch

import compare
from harness import bench


def test_bench_records_cost_and_state_against_length(tmp_path):
    assert compare.main(["--bench", "--models", "attention,ssm,hrm", "--test-lengths", "16,48",
                         "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    md = (tmp_path / "bench.md").read_text()
    assert json.load(open(tmp_path / "bench.json"))["finished"] and "Not finished" not in md
    assert [(r["model"], r["length"]) for r in rows] == [(m, L) for m in ("attention", "ssm", "hrm") for L in (16, 48)]
    assert all({"train_ms", "infer_us_per_token"} <= set(r) for r in rows)     # every row measured both
    state = {(r["model"], r["length"]): r["state_floats"] for r in rows}
    assert state["attention", 48] == 3 * state["attention", 16]      # the KV cache grows with the sequence
    assert state["ssm", 48] == state["ssm", 16]                        # the recurrent state does not
    assert "| ssm | 48 |" in (tmp_path / "bench.md").read_text()
    cores = json.load(open(tmp_path / "bench.json"))["core_rows"]   # the cores of the models asked for (hrm: none)
    assert [(r["core"], r["length"], "ref_ms" in r) for r in cores] == [
        ("attention", 16, True), ("attention", 48, False), ("ssd_scan", 16, True), ("ssd_scan", 48, False)]
    assert "| ssd_scan | 16 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("core", list(bench.CORES))
def test_each_core_is_timed_against_its_own_reference_on_inputs_they_agree_on(core):
    """The core table's pairs: the fast core and the loop the tests hold it to, on core_inputs' valid inputs."""
    model, fast, ref = bench.CORES[core]
    assert (fast.__module__, ref.__name__) == (compare.MODELS[model][0].__module__, fast.__name__ + "_ref")
    inputs = bench.core_inputs(core, 37, "cpu", b=2, H=2, K=8, N=4)
    first = lambda out: out if core == "attention" else out[0]  # noqa: E731
    torch.testing.assert_close(first(fast(*inputs)), first(ref(*inputs)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("at", ["step_row", "core_inputs", "bench_row"])
def test_a_stopped_bench_keeps_the_rows_it_measured(tmp_path, monkeypatch, at):
    """Stopped in any of its three tables (Ctrl-C; any other stop leaves the files of the last row measured): the
    rows measured before are saved and the report says that it did not finish; exit 130."""
    real, calls = getattr(bench, at), []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) > (2 if at == "core_inputs" else 1):   # each table stopped at its second row
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(bench, at, stop)
    assert compare.main(["--bench", "--models", "ssm", "--test-lengths", "16,24", "--out", str(tmp_path)]) == 130
    saved = json.load(open(tmp_path / "bench.json"))
    assert not saved["finished"] and [r["length"] for r in saved["rows"]] == [16, 24][:2 if at != "bench_row" else 1]
    assert len(saved["core_rows"]) == {"bench_row": 0, "core_inputs": 1, "step_row": 2}[at]
    assert len(saved["step_rows"]) == (at == "step_row")
    md = (tmp_path / "bench.md").read_text()
    assert "| ssm | 16 |" in md and "Not finished" in md
