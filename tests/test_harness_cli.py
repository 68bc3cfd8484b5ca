"""harness/cli.py: every flag checked before any training, bad input as one line and exit status 2."""
import os
import subprocess
import sys

import pytest

import compare
from harness import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    return cli.parse_args(argv, compare)


def test_runs_go_to_an_untracked_folder_by_default():
    """A fresh clone's `python compare.py` trains: it never reads or writes the committed reference results."""
    out = parse(["--preset", "smoke"]).out
    assert out == os.path.join(ROOT, "runs") and "reference" not in out
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(out, "smoke.json")], cwd=ROOT)
    assert ignored.returncode in (0, 128)    # ignored (0), or not a git checkout (128): never tracked (1)


@pytest.mark.parametrize("args, message", [
    (["--models", "lstm"], "unknown model 'lstm'"),
    (["--tasks", "sorting"], "unknown task 'sorting'"),
    (["--test-lengths", "-5"], "--test-lengths: expected comma-separated positive integers"),
    (["--seeds", "1,x"], "expected comma-separated integers"),
    (["--tasks", "maze", "--models", "ssm"], "none of ssm can run maze: a grid task (the maze) is read both ways"),
    (["--tasks", "flipflop", "--test-lengths", "3"], "too short"),
    (["--device", "tpu9"], "device"),
    (["--steps", "0"], "--steps"),
    (["--lrs", "inf"], "--lrs: expected comma-separated learning rates from 1e-06 to 1, got 'inf'"),
    (["--lrs", "1e9"], "--lrs: expected comma-separated learning rates from 1e-06 to 1, got '1e9'"),
    (["--lrs", "1e-3,0.001"], "--lrs: 0.001 is given twice in '1e-3,0.001'"),
    (["--seeds", "0,0"], "--seeds: 0 is given twice in '0,0'; expected comma-separated integers from 0 to 4294967295"),
    (["--seeds", "99999999999999999999"], "--seeds: expected comma-separated integers from 0 to 4294967295, got"),
    (["--models", "ssm,ssm"], "--models: ssm is given twice"),
    (["--models", "attention,", "ssm"], "got 'attention,' (if a space followed the comma, it cut the list there"),
    (["--lrs", "1e-3,"], "--lrs: expected comma-separated learning rates from 1e-06 to 1, got '1e-3,'"),
    (["--model", "ssm"], "unrecognized arguments: --model ssm"),      # no prefix of --models is taken for it
    (["--preset", "scale"], "--preset: expected one of smoke, quick, full, depth, got 'scale' (--scale and --bench"),
    (["--bench", "--tasks", "copy", "--seeds", "1"], "--bench trains nothing and stores no runs: it takes --models, "
                                                      "--test-lengths, --preset (the model size), --device and --out, "
                                                      "not --tasks, --seeds"),
    (["--tasks", "babilong_qa1"], "no settings in preset 'smoke'; it has copy"),
    (["--tasks", "babilong_qa1"], "(try --scale)"),
    (["--device", "gpu"], "unknown device 'gpu'; expected cpu, cuda or cuda:N"),
    (["--device", ""], "unknown device ''"),                                  # not the default device
    (["--tasks", "recall", "--test-lengths", "64"], "length 64 of recall (--test-lengths, or the preset's): recall:"),
    (["--preset", "quick", "--tasks", "maze"], "no settings in preset 'quick'; it has copy, flipflop (try --preset "
                                               "smoke or --preset depth)"),
    (["--preset", "quick", "--tasks", "maze", "--models", "ssm"], "no settings in preset 'quick'; it has copy, "
     "flipflop, and none of ssm can run it: a grid task (the maze) is read both ways"),   # (no preset to try: none would do)
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        compare.main(["--preset", "smoke"] + args)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_maze_size_with_no_fresh_test_maze_is_one_line(monkeypatch, capsys):
    """The argument check asks each task for its lengths; a maze size whose training set holds every maze (2x2
    cells, 1,000 training mazes) stops it with the task's one line, before any training."""
    monkeypatch.setitem(compare.PRESETS["smoke"]["tasks"]["maze"].options, "n_train", 1000)
    with pytest.raises(SystemExit) as exit:
        compare.main(["--preset", "smoke", "--tasks", "maze", "--models", "hrm", "--test-lengths", "2"])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and "no 2x2 maze outside the training set" in err and "\n" not in err


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    cases = [(tmp_path / "a_file", ": file exists;"), (tmp_path / "a_file" / "below", ": not a directory;")]
    if os.path.isdir("/proc"):                      # a folder where no file can be made (Linux)
        cases.append(("/proc", ": "))
    for out, why in cases:
        with pytest.raises(SystemExit) as exit:
            compare.main(["--preset", "smoke", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and f"--out {str(out)!r}" in err and why in err and "\n" not in err
        assert "expected a folder (new or existing) that this process can write to" in err


def test_bad_input_from_the_shell_has_no_traceback():
    out = subprocess.run([sys.executable, "compare.py", "--models", "nope"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "unknown model" in out.stderr


@pytest.mark.slow   # (it trains: in a student copy, it stops at a blank core like the other end-to-end runs)
def test_a_reader_that_leaves_early_stops_nothing(tmp_path):
    """`python compare.py 2>&1 | head -1`: the pipe closes after the first line; the command still finishes, its
    report written, with exit status 0 (it died on BrokenPipeError: in the progress bar, on stderr, or after the old
    plots were removed, losing them)."""
    run = subprocess.Popen([sys.executable, "compare.py", "--preset", "smoke", "--models", "attention", "--tasks",
                            "copy", "--steps", "2", "--lrs", "1e-3", "--seeds", "0", "--workers", "1", "--out",
                            str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert run.stdout.readline()
    run.stdout.close()
    assert run.wait(timeout=120) == 0 and (tmp_path / "smoke.md").exists()


def test_a_test_length_past_one_evaluation_batch_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """evaluate reads at most cli.MAX_TEST_TOKENS tokens at once; a longer test sequence is --scale's to read in
    pieces. Refused before any training (and without making the sequence), the --out folder not made."""
    monkeypatch.setattr(compare, "run_one", lambda spec: pytest.fail("trained"))
    for length, tokens in [(10 ** 8, "at least 100,000,000"), (32_768, "at least 65,537")]:   # copy: 2L + 1
        with pytest.raises(SystemExit) as exit:
            compare.main(["--preset", "smoke", "--models", "ssm", "--tasks", "copy", "--test-lengths", f"6,{length}",
                          "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and "\n" not in err and not (tmp_path / "out").exists()
        assert f"--test-lengths {length}: copy at that length is {tokens} tokens" in err and "--scale" in err
    assert parse(["--preset", "smoke", "--tasks", "flipflop", "--test-lengths", "65536"]).test_lengths == [65536]


def test_test_lengths_are_read_shortest_first():
    """A wall (out of memory, a time cap, chance twice) at one length ends the lengths after it, so they go shortest
    first whatever order they are given in, as every preset lists them; a report's lines and its dial's largest
    content read them in that order too."""
    assert parse(["--preset", "smoke", "--tasks", "flipflop", "--test-lengths", "128,32,64"]).test_lengths == [32, 64,
                                                                                                            128]
    assert parse(["--scale", "--tasks", "babilong_qa1", "--test-lengths", "1048576,16384"]).stream_lengths == [
        16384, 1048576]
    assert all(b.test == sorted(b.test) for p in compare.PRESETS.values() for b in p["tasks"].values())


def test_scale_trains_on_streams_longer_than_one_evaluation_batch(capsys):
    """--scale's BABILong stages reach past cli.MAX_TEST_TOKENS (a batch of one such stream trains); its stream
    lengths may be shorter than its longest training stream, but not shorter than a task can make."""
    longest = compare.stages(compare.PRESETS["scale"]["tasks"]["babilong_qa1"].train)[-1][1]
    assert longest > cli.MAX_TEST_TOKENS
    assert parse(["--scale", "--tasks", "babilong_qa1", "--test-lengths", "16384,1048576"]).stream_lengths == [
        16384, 1048576]
    with pytest.raises(SystemExit) as exit:
        parse(["--scale", "--tasks", "babilong_qa1", "--test-lengths", "20"])
    assert exit.value.code == 2 and "length 20 of babilong_qa1" in capsys.readouterr().err


def test_the_command_line_is_recorded_as_typed():
    assert cli.parse_args([], compare).line == "python compare.py"
    assert cli.parse_args(["--seeds", "0,1"], compare).line == "python compare.py --seeds 0,1"


def test_a_chosen_model_that_cannot_run_a_grid_task_is_named_not_dropped_silently(tmp_path, capsys):
    parse = lambda *a: cli.parse_args(["--preset", "smoke", "--out", str(tmp_path), *a], compare)  # noqa: E731
    command = parse("--models", "ssm,attention,rmt", "--tasks", "copy,maze")
    assert compare.task_models(command, "maze") == ["attention"]
    assert capsys.readouterr().out == "note: not run, since only models that read both ways run a grid task: " \
                                      "ssm on maze, rmt on maze\n"
    parse("--tasks", "copy,maze")   # each task's own models: nothing asked for is left out
    parse("--bench", "--models", "ssm")
    assert capsys.readouterr().out == ""
