"""tasks.py: determinism, vocabularies, answers that follow from the prefix alone, no leak, clear errors."""
from collections import Counter

import numpy as np
import pytest
import torch

from tasks import IGNORE, TASKS, BabiLong, Maze, _canonical

LENGTHS = {"copy": 9, "mqar": 64, "recall": 13, "flipflop": 41, "flipflop_sparse": 41, "selective_copy": 37, "babilong": 60,
           "maze": 5}
SEQUENCE_TASKS = [name for name in TASKS if getattr(TASKS[name], "causal", True)]  # the maze is a grid task


def oracle_copy(task, x, t):
    sep = (x == task.sep).nonzero()[0, 0]
    return x[1 + t - sep]


def oracle_mqar(task, x, t):
    pairs = x[:2 * task.n_pairs].view(-1, 2)
    return pairs[(pairs[:, 0] == x[t]).nonzero()[0, 0], 1]


def oracle_recall(task, x, t):   # length = P pairs: they fill the first 2P tokens
    pairs = x[:2 * LENGTHS["recall"]].view(-1, 2)
    return pairs[(pairs[:, 0] == x[t]).nonzero()[0, 0], 1]


def oracle_flipflop(task, x, t):
    writes = [j for j in range(0, t, 2) if x[j] == task.w]
    return x[writes[-1] + 1]


def oracle_selective_copy(task, x, t):
    first_marker = (x == task.marker).nonzero()[0, 0]
    data = x[:first_marker][x[:first_marker] != 0]
    return data[t - first_marker]


def oracle_babilong(task, x, t):
    """Replay the story read from x[:t+1]: persons move, grab and drop; then answer the question."""
    where, holder, obj_at = {}, {}, {}
    i = 0
    while i < t - 2:
        if x[i] in task.person:
            p, verb, arg = x[i].item(), x[i + 1].item(), x[i + 2].item()
            if verb == task.move:
                where[p] = arg
            elif verb == task.grab:
                holder[arg] = p
            else:
                obj_at[arg] = where[holder.pop(arg)]
            i += 3
        else:
            i += 1
    assert x[t - 2] == task.question and x[t] == task.answer
    e = x[t - 1].item()
    return where[e] if e in task.person else where[holder[e]] if e in holder else obj_at[e]


ORACLES = {"copy": oracle_copy, "mqar": oracle_mqar, "recall": oracle_recall, "flipflop": oracle_flipflop,
           "flipflop_sparse": oracle_flipflop, "selective_copy": oracle_selective_copy,
           "babilong": oracle_babilong}


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_batch(name):
    task = TASKS[name]()
    a, b = task.sample(4, LENGTHS[name], seed=3), task.sample(4, LENGTHS[name], seed=3)
    c = task.sample(4, LENGTHS[name], seed=torch.Generator().manual_seed(3))
    d = task.sample(4, LENGTHS[name], seed=4)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)
    assert not torch.equal(a[0], d[0])


@pytest.mark.parametrize("name", list(TASKS))
def test_shapes_and_vocabulary(name):
    task = TASKS[name]()
    x, y = task.sample(8, LENGTHS[name], seed=0)
    assert x.shape == y.shape and x.dtype == y.dtype == torch.long
    assert x.min() >= 0 and x.max() < task.vocab_size
    scored = y != IGNORE
    assert scored.any() and y[scored].min() >= 0 and y[scored].max() < task.vocab_size
    assert len(task.names) == task.vocab_size


@pytest.mark.parametrize("name", SEQUENCE_TASKS)
def test_every_answer_follows_from_the_prefix(name):
    """An oracle that reads only x[b, :t+1] reproduces y[b, t] at every scored position."""
    task = TASKS[name]()
    x, y = task.sample(64, LENGTHS[name], seed=1)
    n = 0
    for b, t in (y != IGNORE).nonzero().tolist():
        assert ORACLES[name](task, x[b, :t + 1], t) == y[b, t], (name, b, t)
        n += 1
    assert n >= 8


@pytest.mark.parametrize("name", SEQUENCE_TASKS)
def test_answer_not_visible_at_the_scored_position(name):
    """If the answer leaked into x at its own position (an off-by-one in the shift), a lookup table from
    x[b, t] to y[b, t] would score near 1. It must stay near chance."""
    task = TASKS[name]()
    x, y = task.sample(256, LENGTHS[name], seed=2)
    scored = y != IGNORE
    pairs = Counter(zip(x[scored].tolist(), y[scored].tolist()))
    best = Counter()
    for (inp, ans), c in pairs.items():
        best[inp] = max(best[inp], c)
    assert sum(best.values()) / scored.sum().item() < 0.6


def test_babilong_depth_points_at_the_deciding_fact():
    task = BabiLong()
    x, y, depth = task.sample_with_depth(32, 80, seed=0)
    assert ((depth >= 0) & (depth < 1)).all()
    starts = (depth * 80).round().long()
    assert all(x[b, starts[b]] in task.person for b in range(32))


@pytest.mark.parametrize("name, options, length", [
    ("copy", {}, 0),
    ("mqar", dict(n_pairs=8), 31),
    ("flipflop", {}, 3),
    ("selective_copy", dict(n_data=8), 15),
    ("babilong", dict(max_facts=8), 26),
    ("maze", {}, 1),
])
def test_impossible_lengths_raise(name, options, length):
    with pytest.raises(ValueError, match="too short"):
        TASKS[name](**options).sample(2, length)


def test_impossible_options_raise():
    with pytest.raises(ValueError, match="distinct keys"):
        TASKS["mqar"](n_pairs=200, vocab_size=256)
    with pytest.raises(ValueError):
        TASKS["flipflop"](p_ignore=1.0)
    with pytest.raises(ValueError):
        TASKS["babilong"](min_facts=5, max_facts=2)
    with pytest.raises(ValueError, match="batch_size"):
        TASKS["copy"]().sample(0, 5)


# ---------------------------------------------------------------------------------------------------------
# The maze: a grid task, checked with its own oracle (a breadth-first search written here)
# ---------------------------------------------------------------------------------------------------------

def bfs_path(grid, start, goal):
    """The squares of a shortest path from start to goal over non-wall squares, by breadth-first search."""
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for r, c in frontier:
            for q in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if grid[q] != Maze.WALL and q not in parent:
                    parent[q] = (r, c)
                    nxt.append(q)
        frontier = nxt
    path, q = set(), goal
    while q is not None:
        path.add(q)
        q = parent[q]
    return path, len(parent)


@pytest.mark.parametrize("split", ["sample", "sample_train"])
@pytest.mark.parametrize("n", [2, 3, 6])
def test_maze_is_perfect_and_the_target_is_the_shortest_path(split, n):
    task = Maze(canvas=15, n_train=20)
    x, y = getattr(task, split)(16, n, seed=5)
    side = 2 * n + 1
    for b in range(16):
        grid, target = x[b].view(15, 15), y[b].view(15, 15)
        assert (grid[side:] == Maze.WALL).all() and (grid[:, side:] == Maze.WALL).all()  # the canvas is wall
        open_ = grid != Maze.WALL
        n_open = open_.sum().item()
        assert n_open == 2 * n * n - 1     # n^2 cells + (n^2 - 1) knocked-down walls: a spanning tree of cells
        edges = (open_[1:] & open_[:-1]).sum() + (open_[:, 1:] & open_[:, :-1]).sum()
        assert edges == n_open - 1         # a tree on the open squares: no loops, so exactly one path
        start = tuple((grid == Maze.START).nonzero()[0].tolist())
        goal = tuple((grid == Maze.GOAL).nonzero()[0].tolist())
        path, reached = bfs_path(grid, start, goal)
        assert reached == n_open           # connected
        marked = {tuple(q) for q in (target == Maze.PATH).nonzero().tolist()} | {start, goal}
        assert marked == path
        assert ((target != IGNORE) == (grid == Maze.OPEN)).all()   # only open squares are scored
        assert (grid != Maze.PATH).all()                             # the answer is not in the input


def test_maze_same_seed_same_mazes_and_test_mazes_are_not_training_mazes():
    task = Maze(canvas=11, n_train=50)
    for split in (task.sample, task.sample_train):
        a, b = split(8, 4, seed=1), split(8, 4, seed=1)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], split(8, 4, seed=2)[0])
    train = {_canonical(g.numpy()) for g in task.sample_train(400, 4, seed=0)[0].view(-1, 11, 11)[:, :9, :9]}
    assert len(train) <= 50                                         # a fixed pool, seen under symmetries
    test = {_canonical(g.numpy()) for g in task.sample(200, 4, seed=0)[0].view(-1, 11, 11)[:, :9, :9]}
    assert not train & test


def test_maze_training_batches_are_the_training_mazes_under_symmetries():
    """sample_train's examples are the fixed training mazes, each with its path under one of the 8 rotations /
    reflections: a large batch shows all of them and nothing else."""
    task = Maze(canvas=11, n_train=5)
    x, y = task.sample_train(400, 4, seed=0)
    assert x.dtype == y.dtype == torch.long
    expected = set()
    for maze in task.train_set(4):
        for k in range(4):
            for flip in range(2):
                grid, path = (np.rot90(a, k).T if flip else np.rot90(a, k) for a in maze)
                ex, ey = task._batch([grid], [path], "cpu")
                expected.add((tuple(ex[0].tolist()), tuple(ey[0].tolist())))
    assert {(tuple(a.tolist()), tuple(b.tolist())) for a, b in zip(x, y)} == expected


def test_maze_bad_sizes_raise():
    with pytest.raises(ValueError, match="canvas"):
        Maze(canvas=11).sample(2, 6)
    with pytest.raises(ValueError, match="no path"):
        Maze(canvas=7, min_path=40).sample(2, 3)


def test_flipflop_in_one_piece_is_sample():
    task = TASKS["flipflop"]()
    for length in (40, 41):
        x, y = task.sample(4, length, seed=5)
        (px, py), = task.pieces(4, length, length, seed=5)
        assert torch.equal(x, px) and torch.equal(y, py)


@pytest.mark.parametrize("name, length, piece", [("flipflop", 301, 12), ("flipflop_sparse", 300, 30),
                                                 ("babilong", 301, 16), ("babilong", 60, 7)])
def test_pieces_make_valid_examples(name, length, piece):
    """Streams made piece by piece (the scale run's test sequences): pieces of the asked length, and the whole
    sequence, put together, answers every scored position from its prefix alone, as `sample`'s do."""
    task = TASKS[name](max_facts=12) if name == "babilong" else TASKS[name]()
    parts = list(task.pieces(8, length, piece, seed=3))
    assert [p[0].shape[1] for p in parts] == [piece] * (length // piece) + ([length % piece] if length % piece else [])
    x, y = (torch.cat(t, dim=1) for t in zip(*parts))
    assert x.max() < task.vocab_size and x.min() >= 0
    n = 0
    for b, t in (y != IGNORE).nonzero().tolist():
        assert ORACLES[name](task, x[b, :t + 1], t) == y[b, t], (name, b, t)
        n += 1
    assert n >= 8
    again = torch.cat([p[0] for p in task.pieces(8, length, piece, seed=3)], dim=1)
    assert torch.equal(again, x)
