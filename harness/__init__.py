"""The engineering behind compare.py, which a reader of the lesson need not open.

    graphs.py   the training step and a stream replayed as CUDA graphs (the fast path on a GPU)
    store.py    the results file: one command at a time, each run written as it finishes
    runner.py   runs in worker processes (or threads) side by side, stopped cleanly
    cli.py      the command line, every flag checked before any training
    report.py   the markdown tables and the figures
    bench.py    --bench: time and memory against length
    scale.py    --scale: the trained models read streams of up to 11M tokens

Imports go one way: compare.py imports these files, never the reverse. Where a file needs the bench's models,
presets or protocol, compare.py hands itself over as `lab` (so `python compare.py` loads it once).
"""
