"""
Tiny procedurally generated sequence tasks: the bench's test of copying against filtering.

Every task is a next-token problem: a sampler returns `x` (B, T) token ids and `y` (B, T) targets, where
y[b, t] is what the model should output after reading x[b, :t+1], and y = -100 wherever nothing is scored
(so the loss is only on answers). The answer at a scored position is never visible in x[b, :t+1]. The same
seed always gives the same batch. Nothing is downloaded; `python tasks.py` prints one example of each task.

  copy            copy a random string after a separator           copying   (Jelassi et al., arXiv 2402.01032)
  recall          multi-query associative recall, pairs the knob   the dial  (Zoology, arXiv 2312.04927)
  flipflop        remember the last written bit in a noisy stream  filtering (Liu et al., arXiv 2306.00946)
  babilong        where is a person / object, facts lost in noise  filtering (BABILong, arXiv 2406.10149)
  babilong_qa1    babilong's person questions alone, 2-10 moves    filtering (bAbI task 1, arXiv 1502.05698)
  babilong_qa2    babilong's object questions alone, 2-10 facts    filtering (bAbI task 2, arXiv 1502.05698)
  maze            mark the shortest path through a perfect maze    depth     (HRM, arXiv 2506.21734)

The maze is a grid task, not a next-token one: x is the whole grid, y marks the answer on it, and models read it
bidirectionally (`causal = False`); its training set is fixed and small (`sample_train`).

Contract: `TASKS[name](**options)` builds a task with `.vocab_size`, `.names` (a printable name per token id)
and `.sample(batch_size, length, seed=0, device="cpu") -> (x, y)`; `seed` is an int or a torch.Generator.
What `length` means is each task's own difficulty knob (the string length for copy, the sequence length for
the rest). An impossible request raises ValueError with a message that says why.
"""
import argparse
import random
from collections import deque
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100  # the target value that the loss and the metrics skip


def _generator(seed):
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _check(batch_size, length, min_length, what):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if length < min_length:
        raise ValueError(f"{what}: length {length} is too short, it needs at least {min_length}")


def render(task, x, y, b=0):
    """One example as text. A sequence: its tokens, each scored position followed by `->answer`. A grid task
    (`causal = False`: the maze): the rows of its canvas as given (x), and beside them the same rows with each scored
    square showing its target (the path)."""
    x, y = x[b].tolist(), y[b].tolist()
    if getattr(task, "causal", True):
        return " ".join(task.names[u] + (f"->{task.names[v]}" if v != IGNORE else "") for u, v in zip(x, y))
    side, answer = task.canvas, [u if v == IGNORE else v for u, v in zip(x, y)]
    return "\n".join("    ".join(" ".join(task.names[u] for u in grid[r * side:(r + 1) * side]) for grid in (x, answer))
                     for r in range(side))


class Copy:
    """Copy a string (Jelassi et al. 2024): `$ s | s`, scored on the second copy.

    length = n, the string length; x and y have T = 2n + 1 positions. Letters are a..z (n_letters of them).

    Example (n=3, scored positions shown as `input->target`):
        $ q d k |->q q->d d->k
    """
    min_length = 1

    def __init__(self, n_letters=26):
        self.n_letters = n_letters
        self.bos, self.sep = n_letters, n_letters + 1
        self.vocab_size = n_letters + 2
        self.names = [chr(ord("a") + i) for i in range(n_letters)] + ["$", "|"]

    def sample(self, batch_size, length, seed=0, device="cpu"):
        _check(batch_size, length, self.min_length, "copy")
        g = _generator(seed)
        s = torch.randint(0, self.n_letters, (batch_size, length), generator=g)
        bos, sep = torch.full((batch_size, 1), self.bos), torch.full((batch_size, 1), self.sep)
        seq = torch.cat([bos, s, sep, s], dim=1)                  # (B, 2n + 2)
        x = seq[:, :-1]                                           # the last letter is only ever a target
        y = torch.full_like(x, IGNORE)
        y[:, length + 1:] = s                                     # from `|` on, predict the next copied letter
        return x.to(device), y.to(device)


class Recall:
    """Multi-query associative recall (Zoology's `multiquery_ar`) with the content as the knob: P key-value pairs,
    then the P keys again as queries, each followed by a 0; at each query, output its value. Keys are distinct, from
    [1, V/2), so P <= V/2 - 1; values come from [V/2, V). length = P, the number of pairs, in a sequence of 4P
    tokens. Trained on a mixture of P (each batch draws its own), tested at each P, it asks how much a model can
    hold: a KV cache grows with P, a fixed recurrent state does not (the dial in compare.py).
    Zoology's own task has both of these (its `multiquery_ar` always; off here by default, an easier variant):
    `random_non_queries` puts random tokens of the whole vocabulary after the queries instead of zeros (a query no
    longer stands out, and the noise must not be stored), and `distinct_values` draws the values without
    replacement, as the keys are. The queries' order comes from Zoology's draw of query gaps (a
    power law, power_a): at 4P tokens every slot holds a query, and the draw tends to ask the pairs in the order
    they were given (the first pair first 37% of the time at P = 8, against 12.5% for a shuffle).

    Example (V=16, P=2): keys 3, 5 -> values 12, 9:
        3 12 5 9 5->9 0 3->12 0
    and with random_non_queries, say:
        3 12 5 9 5->9 14 3->12 7
    """
    min_length = 1

    def __init__(self, vocab_size=256, power_a=0.01, random_non_queries=False, distinct_values=False):
        self.vocab_size, self.power_a = vocab_size, power_a
        self.random_non_queries, self.distinct_values = random_non_queries, distinct_values
        self.names = [str(i) for i in range(vocab_size)]

    def sample(self, batch_size, length, seed=0, device="cpu"):
        if length > self.vocab_size // 2 - 1:
            raise ValueError(f"recall: {length} pairs need {length} distinct keys, but vocab_size "
                             f"{self.vocab_size} has only {self.vocab_size // 2 - 1}")
        _check(batch_size, length, self.min_length, "recall")
        g = _generator(seed)
        B, P, V = batch_size, length, self.vocab_size
        keys = torch.rand(B, V // 2 - 1, generator=g).argsort(dim=1)[:, :P] + 1       # distinct, in [1, V/2)
        if self.distinct_values:
            values = torch.rand(B, V - V // 2, generator=g).argsort(dim=1)[:, :P] + V // 2  # distinct, in [V/2, V)
        else:
            values = torch.randint(V // 2, V, (B, P), generator=g)
        context = torch.stack([keys, values], dim=2).reshape(B, 2 * P)               # k1 v1 k2 v2 ...
        gaps = torch.arange(1, P + 1, dtype=torch.float64)                          # P query slots, even offsets
        slots = torch.multinomial((gaps ** (self.power_a - 1)).expand(B, P), P, replacement=False, generator=g)
        queries = torch.zeros(B, 2 * P, dtype=torch.long)
        targets = torch.full((B, 2 * P), IGNORE)
        queries.scatter_(1, 2 * slots, keys)                                        # query i asks for key i
        targets.scatter_(1, 2 * slots, values)
        if self.random_non_queries:                                                 # noise wherever no query is
            queries = torch.where(targets == IGNORE, torch.randint(0, V, queries.shape, generator=g), queries)
        x = torch.cat([context, queries], dim=1)
        y = torch.cat([torch.full((B, 2 * P), IGNORE), targets], dim=1)
        return x.to(device), y.to(device)


class FlipFlop:
    """Flip-flop language (Liu et al. 2023): pairs (instruction, bit) with instructions write / ignore / read.
    After `r`, the next bit is the bit of the last `w`; everything else is noise. p_ignore sets the sparsity:
    0.8 is the paper's training distribution, 0.98 its sparse test, 0.1 its dense test.

    length = T. The first instruction is always a write, so every read has an answer.

    Example (T=11):
        w 1 i 0 r->1 1 w 0 i 1 r->0
    """
    min_length = 4

    def __init__(self, p_ignore=0.8):
        if not 0 <= p_ignore < 1:
            raise ValueError(f"flipflop: p_ignore must be in [0, 1), got {p_ignore}")
        self.p_ignore = p_ignore
        self.w, self.i, self.r, self.zero = 0, 1, 2, 3
        self.vocab_size = 5
        self.names = ["w", "i", "r", "0", "1"]

    def sample(self, batch_size, length, seed=0, device="cpu"):
        return next(self.pieces(batch_size, length, length, seed, device))

    def pieces(self, batch_size, length, piece, seed=0, device="cpu"):
        """A batch like `sample`'s, made and yielded `piece` tokens at a time, so that a stream of millions of
        tokens never sits whole on the host: (x, y) pieces of (B, piece), the last one shorter. The bit of the
        latest write is carried from piece to piece. Each piece draws its own numbers, so only one piece of the
        whole length is `sample`'s batch itself."""
        _check(batch_size, length, self.min_length, "flipflop")
        if piece < length and (piece < 2 or piece % 2):
            raise ValueError(f"flipflop: pieces must hold whole (instruction, bit) pairs, got piece={piece}")
        g = _generator(seed)
        p_rw = (1 - self.p_ignore) / 2
        latest = None                                             # (B,) the bit of the latest write so far
        for start in range(0, length, piece):
            n = min(piece, length - start)
            n_pairs = n // 2 + 1 if start + n == length else n // 2  # the last piece: T + 1 tokens, as targets
            u = torch.rand(batch_size, n_pairs, generator=g)
            instr = torch.where(u < p_rw, self.w, torch.where(u < 2 * p_rw, self.r, self.i))
            if start == 0:
                instr[:, 0] = self.w
            bits = torch.randint(0, 2, (batch_size, n_pairs), generator=g)
            # The bit of the last write so far: carry the index of the latest write forward with cummax
            # (-1: none yet in this piece, then the bit carried from the pieces before).
            idx = torch.arange(n_pairs).expand(batch_size, n_pairs)
            last_write = torch.where(instr == self.w, idx, -1).cummax(dim=1).values
            written = bits.gather(1, last_write.clamp(min=0))
            if latest is not None:
                written = torch.where(last_write >= 0, written, latest[:, None])
            latest = written[:, -1]
            bits = torch.where(instr == self.r, written, bits)
            seq = torch.stack([instr, bits + self.zero], dim=2).reshape(batch_size, 2 * n_pairs)[:, :n + 1]
            x, nxt = seq[:, :n], F.pad(seq[:, 1:], (0, n + 1 - seq.shape[1]))   # a piece never ends on `r`
            y = torch.where(x == self.r, nxt, IGNORE)             # x[t] = r is always an instruction (even t)
            yield x.contiguous().to(device), y.to(device)


class BabiLong:
    """A tiny BABILong: 3-token facts in a long stream of noise, then a question about the latest state.

    Facts: `P move L` (person P goes to place L), `P grab O`, `P drop O` (the object stays where P is).
    Persons move repeatedly, so the latest fact wins. Questions, asked after all facts:
      `? P =` where is person P (qa1: their last move);
      `? O =` where is object O (qa2: its holder's place now, or where it was dropped), a two-fact chain.
    qa=1 tells stories of moves only and asks qa1 (bAbI's task 1, "single supporting fact"); qa=2 always asks
    qa2, its second fact a grab so that some object has a story (bAbI's task 2, "two supporting facts"); qa=None
    mixes them (moves, grabs and drops alike; an object question half the time when there is one).
    The answer, one of the places, is scored at the `=` token. `sample_with_depth` also returns, per example,
    the relative depth in [0, 1) of the deciding fact (0 = the start of the stream), for accuracy by depth.

    length = T; facts per example are drawn from [min_facts, max_facts]; T must hold 3 * max_facts + 3.

    Example (T=20, noise shown as `.`):
        . P1 move L3 . P0 move L1 . P1 grab O2 P1 move L0 . . ? O2 =->L0
    """

    def __init__(self, n_persons=4, n_places=6, n_objects=4, n_noise=16, min_facts=2, max_facts=8, qa=None):
        if not 1 <= min_facts <= max_facts:
            raise ValueError(f"babilong needs 1 <= min_facts <= max_facts, got {min_facts}, {max_facts}")
        if qa not in (None, 1, 2) or qa == 2 and min_facts < 2:
            raise ValueError(f"babilong: qa is None, 1 or 2 (qa=2 with min_facts >= 2), got qa={qa}, "
                             f"min_facts={min_facts}")
        self.qa = qa
        self.min_facts, self.max_facts = min_facts, max_facts
        self.n_persons, self.n_places, self.n_objects = n_persons, n_places, n_objects
        self.names = ["."] * n_noise
        self.person = self._add([f"P{i}" for i in range(n_persons)])
        self.place = self._add([f"L{i}" for i in range(n_places)])
        self.object = self._add([f"O{i}" for i in range(n_objects)])
        self.move, self.grab, self.drop, self.question, self.answer = self._add(["move", "grab", "drop", "?", "="])
        self.vocab_size = len(self.names)
        self.n_noise = n_noise
        self.min_length = 3 * max_facts + 3

    def _add(self, names):
        """Append names to the vocabulary; their token ids, a range (a single person, place or object too)."""
        first = len(self.names)
        self.names += names
        return range(first, first + len(names))

    def _stories(self, batch_size, length, g):
        """The stories of a whole batch at once (their plain-Python reference, one story at a time, is `story` in
        tests/test_tasks.py, which checks that the two draw alike), and where each goes in `length` tokens.
        One step per fact slot (S = max_facts of them) with the batch's state as tensors, so a batch costs a
        few hundred small tensor ops, not a Python loop per example (the sampler is paid at every training
        step). Returns the positions and tokens (B, 3S + 3) of the facts and the question (the slots past an
        example's k facts repeat its question, so writing them changes nothing), the answer token (B,) and the
        position of the deciding fact (B,)."""
        B, S = batch_size, self.max_facts
        slot, persons = torch.arange(S), torch.arange(self.n_persons)
        k = torch.randint(self.min_facts, S + 1, (B,), generator=g)
        # Every choice drawn up front, one per slot. "Uniform among the allowed ones" (persons who have moved,
        # free or held objects) is the argmax of random scores with the others masked out.
        kind = torch.randint(0, 3, (B, S), generator=g)           # 0 move, 1 grab, 2 drop: what is tried
        kind[:, 0] = 0                                            # the first fact is always a move
        if self.qa == 1:
            kind.zero_()                                          # qa1: moves only
        elif self.qa == 2:
            kind[:, 1] = 1                                        # qa2: the second fact a grab (always possible)
        try_grab, try_drop = kind == 1, kind == 2
        mover = torch.randint(0, self.n_persons, (B, S), generator=g)
        place = torch.randint(0, self.n_places, (B, S), generator=g)
        person_score = torch.rand(B, S, self.n_persons, generator=g)
        object_score = torch.rand(B, S, self.n_objects, generator=g)
        # Only what decides which facts are possible is carried from slot to slot: who has moved and who holds
        # what. Every example runs all S slots; those past its k facts come after the story and change nothing
        # in it, and everything below reads only the first k.
        person, obj = mover.clone(), torch.zeros(B, S, dtype=torch.long)  # each fact's person and object
        moved = persons == mover[:, :1]                           # (B, n_persons), after the first fact (a move)
        holder = torch.full((B, self.n_objects), -1)              # -1: not held
        for f in range(1, S):
            held = holder >= 0                                    # (B, n_objects)
            grab = try_grab[:, f] & ~held.all(1)                  # a grab needs a free object, a drop a held one;
            drop = try_drop[:, f] & held.any(1)                   # without one, the fact is a move
            move = ~(grab | drop)
            o = object_score[:, f].masked_fill(held == grab[:, None], -1).argmax(1)   # a grab's free, else a held one
            grabber = person_score[:, f].masked_fill(~moved, -1).argmax(1)
            o_holder = holder.gather(1, o[:, None])[:, 0]
            p = torch.where(grab, grabber, torch.where(drop, o_holder, mover[:, f]))
            moved |= move[:, None] & (persons == p[:, None])
            holder.scatter_(1, o[:, None], torch.where(grab, p, torch.where(drop, -1, o_holder))[:, None])
            kind[:, f].masked_fill_(move, 0)                      # from here on, kind is what happened
            person[:, f], obj[:, f] = p, o
        # The state after each story's k facts: the latest fact about each person (their last move) and about
        # each object (its last grab or drop), (B, n_persons) and (B, n_objects); -1: none.
        live = slot < k[:, None]                                  # (B, S)
        is_move = (kind == 0) & live
        last_move = torch.where(is_move[:, :, None] & (person[:, :, None] == persons), slot[:, None], -1).amax(1)
        obj_fact = torch.where((live & ~is_move)[:, :, None] & (obj[:, :, None] == torch.arange(self.n_objects)),
                               slot[:, None], -1).amax(1)
        # The question: qa2 (an object) half the time when some object has a fact, else qa1 (a person who moved).
        qa2 = (obj_fact >= 0).any(1) & (torch.randint(0, 2, (B,), generator=g) == 1)
        if self.qa is not None:
            qa2.fill_(self.qa == 2)
        o = torch.rand(B, self.n_objects, generator=g).masked_fill(obj_fact < 0, -1).argmax(1)
        asked = torch.rand(B, self.n_persons, generator=g).masked_fill(last_move < 0, -1).argmax(1)
        # The answer is a person's place: qa1 the asked one's now; qa2 the place of the object's latest fact's
        # person, now if that fact is a grab (it carries the object), at that fact if it is a drop. So it is
        # the place of that person's latest move before `until`, and the deciding fact the later of the two.
        o_fact = torch.where(qa2, obj_fact.gather(1, o[:, None])[:, 0], -1)          # (B,) -1 for qa1
        who = torch.where(qa2, person.gather(1, o_fact.clamp(min=0)[:, None])[:, 0], asked)
        dropped = qa2 & (kind.gather(1, o_fact.clamp(min=0)[:, None])[:, 0] == 2)
        until = torch.where(dropped, o_fact, k)
        move_slot = torch.where(is_move & (person == who[:, None]) & (slot < until[:, None]), slot, -1).amax(1)
        answer = place.gather(1, move_slot[:, None])[:, 0]
        deciding = move_slot.maximum(o_fact)
        entity = torch.where(qa2, self.object.start + o, self.person.start + asked)
        question = torch.stack([torch.full((B,), self.question), entity, torch.full((B,), self.answer)], dim=1)
        facts = torch.stack([self.person.start + person, self.move + kind,
                             torch.where(kind == 0, self.place.start + place, self.object.start + obj)], dim=2)
        # Noise before each fact: k draws from [0, length - 3 - 3k], sorted (a 62-bit draw modulo the bound,
        # whose bias is nil; the empty slots sort last).
        gaps = torch.randint(0, 2 ** 62, (B, S), generator=g) % (length - 2 - 3 * k)[:, None]
        starts = gaps.masked_fill(~live, length).sort(dim=1).values + 3 * slot
        positions = torch.where(live, starts, length - 3)[:, :, None] + torch.arange(3)             # (B, S, 3)
        tokens = torch.where(live[:, :, None], facts, question[:, None])
        positions = torch.cat([positions.flatten(1), length - 3 + torch.arange(3).expand(B, 3)], dim=1)
        return positions, torch.cat([tokens.flatten(1), question], dim=1), self.place.start + answer, \
            starts.gather(1, deciding[:, None])[:, 0]

    def sample_with_depth(self, batch_size, length, seed=0, device="cpu"):
        _check(batch_size, length, self.min_length, f"babilong with up to {self.max_facts} facts")
        g = _generator(seed)
        positions, tokens, answer, deciding = self._stories(batch_size, length, g)
        x = torch.randint(0, self.n_noise, (batch_size, length), generator=g).scatter_(1, positions, tokens)
        y = torch.full((batch_size, length), IGNORE)
        y[:, -1] = answer
        return x.to(device), y.to(device), (deciding / length).to(device)

    def sample(self, batch_size, length, seed=0, device="cpu"):
        x, y, _ = self.sample_with_depth(batch_size, length, seed, device)
        return x, y

    def depths(self, batch_size, length, seed=0):
        """The relative depth of each example's deciding fact in `pieces(batch_size, length, piece, seed)`, as
        `sample_with_depth` gives it: the stories come first from the generator, so this draws them alone. (B,)"""
        _check(batch_size, length, self.min_length, f"babilong with up to {self.max_facts} facts")
        return self._stories(batch_size, length, _generator(seed))[3] / length

    def pieces(self, batch_size, length, piece, seed=0, device="cpu"):
        """Examples like `sample`'s, made and yielded `piece` tokens at a time, so that a stream of millions of
        tokens never sits whole on the host: (x, y) pieces of (B, piece), the last one shorter. The stories and
        the facts' positions are drawn first (a few numbers per example), then the noise piece by piece: the
        stories are `sample`'s for the same seed, the noise differs unless piece >= length (then the one piece
        is `sample`'s batch); the question and its answer come at the end."""
        _check(batch_size, length, self.min_length, f"babilong with up to {self.max_facts} facts")
        if piece < 1:
            raise ValueError(f"babilong: piece must be >= 1, got {piece}")
        g = _generator(seed)
        positions, tokens, answer, _ = self._stories(batch_size, length, g)
        for start in range(0, length, piece):
            n = min(piece, length - start)
            x = F.pad(torch.randint(0, self.n_noise, (batch_size, n), generator=g), (0, 1))
            here = (positions >= start) & (positions < start + n)  # a fact may straddle two pieces
            x = x.scatter_(1, torch.where(here, positions - start, n), tokens)[:, :n]  # the rest: a spare column
            y = torch.full((batch_size, n), IGNORE)
            if start + n == length:
                y[:, -1] = answer
            yield x.contiguous().to(device), y.to(device)


class Maze:
    """Mark the shortest path through a perfect maze (HRM §3.1, after Lehnert et al. arXiv 2402.14083): a grid task.

    length = n: a maze of n x n cells made by a randomised depth-first search, written into a (2n+1) x (2n+1)
    grid of walls `#` and open squares `.`, with a start S and a goal G on two distinct cells. A perfect maze has
    exactly one path between any two squares, so the shortest path (found by breadth-first search) is the only
    one and the label is unambiguous. The grid sits in the top-left corner of a fixed `canvas` x `canvas` of walls
    (T = canvas**2 tokens, read row by row), so mazes of every size share one row stride and a position offset
    means the same thing at every size: a model trained on small mazes can be tested on larger ones.
    y marks every open square `.` as `o` (on the path) or `.` (not); walls, S and G are not scored.
    `min_path` and `path_lengths` count the squares of that path, S and G included (a path of k cells is 2k - 1
    squares): the depth by which the maze is graded.
    Nothing is causal here (`causal = False`): a model reads the whole grid at once, and x never contains `o`.

    Data-scarce by design (HRM, TRM): `sample_train` draws from a fixed set of `n_train` mazes per size, under
    one of the 8 symmetries of the square; `sample` draws fresh mazes that are in no training set, and raises
    ValueError when the training set leaves none (at 2x2 cells there are 6 mazes in all).

    Example (n=2, canvas 5):  x  # # # # #    y  . . . . .    (y shown with walls and S, G as `.`:
                                 # S . . #       . . o o .     they are not scored)
                                 # # # . #       . . . o .
                                 # G . . #       . . o o .
                                 # # # # #       . . . . .
    """
    causal = False
    min_length = 2
    max_misses = 2000   # `sample` stops after this many training mazes in a row: 2x2 cells make only 6 mazes; at 3x3,
                        # 27% of draws are new to 1,000 training mazes, so 2,000 misses in a row never come by chance
    WALL, OPEN, START, GOAL, PATH = range(5)

    def __init__(self, canvas=17, n_train=1000, min_path=0, train_seed=1234):
        if canvas < 5 or n_train < 1:
            raise ValueError(f"maze: canvas must be >= 5 and n_train >= 1, got {canvas} and {n_train}")
        self.canvas, self.n_train, self.min_path, self.train_seed = canvas, n_train, min_path, train_seed
        self.vocab_size = 5
        self.names = ["#", ".", "S", "G", "o"]
        self._train_sets = {}     # n -> [(grid, path)] of the fixed training mazes
        self._train_keys = {}     # n -> their keys up to symmetry, which test mazes must avoid
        self._train_batches = {}  # n -> (x, y) of every training maze under each of the 8 symmetries

    def _maze(self, n, rng):
        """One (2n+1) x (2n+1) grid of token ids (walls, open, S, G) and its path mask (open squares only)."""
        for _ in range(100):                                      # resample until the path is long enough
            grid = np.full((2 * n + 1, 2 * n + 1), self.WALL)
            seen = np.zeros((n, n), bool)
            stack = [(rng.randrange(n), rng.randrange(n))]
            seen[stack[0]] = True
            grid[2 * stack[0][0] + 1, 2 * stack[0][1] + 1] = self.OPEN
            while stack:                                          # recursive backtracker, without recursion
                r, c = stack[-1]
                nbrs = [(r + dr, c + dc) for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0))
                        if 0 <= r + dr < n and 0 <= c + dc < n and not seen[r + dr, c + dc]]
                if not nbrs:
                    stack.pop()
                    continue
                nr, nc = rng.choice(nbrs)
                grid[r + nr + 1, c + nc + 1] = grid[2 * nr + 1, 2 * nc + 1] = self.OPEN  # knock the wall down
                seen[nr, nc] = True
                stack.append((nr, nc))
            (sr, sc), (gr, gc) = [(2 * (i // n) + 1, 2 * (i % n) + 1) for i in rng.sample(range(n * n), 2)]
            parent = {(sr, sc): None}                             # breadth-first search from S
            queue = deque([(sr, sc)])
            while queue:
                r, c = queue.popleft()
                for rr, cc in ((r, c + 1), (r + 1, c), (r, c - 1), (r - 1, c)):
                    if grid[rr, cc] != self.WALL and (rr, cc) not in parent:
                        parent[rr, cc] = (r, c)
                        queue.append((rr, cc))
            path, square = np.zeros(grid.shape, bool), (gr, gc)
            while square is not None:                             # walk back from G
                path[square] = True
                square = parent[square]
            if path.sum() >= self.min_path:
                grid[sr, sc], grid[gr, gc] = self.START, self.GOAL
                return grid, path
        raise ValueError(f"maze: no path of >= {self.min_path} squares found in 100 mazes of {n}x{n} cells")

    def path_lengths(self, x):
        """The squares on each maze's S-G path, S and G included, read from the input alone: one more than the
        rounds of a flood fill from S until it reaches G. This is the sequential depth the maze asks for: a solver
        that passes what it knows from a square to its neighbours once a round (a layer, a loop, a segment) needs
        about that many rounds to join S to G (half as many if it grows from both ends). x: (B, canvas**2) -> (B,)"""
        grid = x.reshape(len(x), self.canvas, self.canvas)
        open_, goal = grid != self.WALL, grid == self.GOAL
        reached, lengths = grid == self.START, torch.ones(len(x), dtype=torch.long, device=x.device)
        while not (done := (reached & goal).any((1, 2))).all():
            lengths += ~done
            # the four neighbours of every reached square; `roll` wraps around the edge, but the canvas's edge is
            # wall, never reached, so nothing comes back round
            grown = open_ & (reached | reached.roll(1, 1) | reached.roll(-1, 1)
                             | reached.roll(1, 2) | reached.roll(-1, 2))
            if torch.equal(grown, reached):
                raise ValueError("maze: a grid whose G cannot be reached from S")
            reached = grown
        return lengths

    def _batch(self, grids, paths, device):
        """Place (2n+1)-sized grids in the canvas; y scores the open squares only."""
        B, side = len(grids), grids[0].shape[0]
        x = np.full((B, self.canvas, self.canvas), self.WALL)
        x[:, :side, :side] = grids
        y = np.full(x.shape, IGNORE)
        y[:, :side, :side] = np.where(np.array(grids) == self.OPEN, np.where(paths, self.PATH, self.OPEN), IGNORE)
        to = lambda a: torch.from_numpy(a.reshape(B, -1)).long().to(device)  # noqa: E731
        return to(x), to(y)

    def _check_size(self, batch_size, n):
        _check(batch_size, n, self.min_length, "maze")
        if 2 * n + 1 > self.canvas:
            raise ValueError(f"maze: {n}x{n} cells need a canvas of {2 * n + 1}, this one is {self.canvas}")

    def train_set(self, n):
        """The fixed training mazes of size n: lists of grids and path masks (made once, seed `train_seed`)."""
        if n not in self._train_sets:
            rng = random.Random(self.train_seed * 1000 + n)
            self._train_sets[n] = [self._maze(n, rng) for _ in range(self.n_train)]
            self._train_keys[n] = {_canonical(grid) for grid, _ in self._train_sets[n]}
        return self._train_sets[n]

    def sample_train(self, batch_size, length, seed=0, device="cpu"):
        """A batch from the fixed training set, each maze under a random rotation / reflection."""
        self._check_size(batch_size, length)
        if length not in self._train_batches:
            # Placed on the canvas once, all 8 symmetries of each maze side by side: a batch is then one index,
            # not a Python loop of rotations (the sampler is paid at every training step). (8 n_train, canvas^2)
            # each for x and y, as int8: 4.6 MB for 1000 mazes on a canvas of 17.
            grids, paths = zip(*[[np.rot90(a, k).T if flip else np.rot90(a, k) for a in maze]
                                 for maze in self.train_set(length) for k in range(4) for flip in range(2)])
            self._train_batches[length] = tuple(t.to(torch.int8) for t in self._batch(grids, paths, "cpu"))
        x, y = self._train_batches[length]
        i = torch.randint(0, len(x), (batch_size,), generator=_generator(seed))  # a maze and a symmetry, uniform
        return x[i].long().to(device), y[i].long().to(device)

    def sample(self, batch_size, length, seed=0, device="cpu"):
        """Fresh mazes, none of them (up to symmetry) in the training set: the test set."""
        self._check_size(batch_size, length)
        rng = random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=_generator(seed))))
        self.train_set(length)
        seen = self._train_keys[length]
        grids, paths, misses = [], [], 0
        while len(grids) < batch_size:
            grid, path = self._maze(length, rng)
            if _canonical(grid) not in seen:
                grids.append(grid)
                paths.append(path)
                misses = 0
            else:
                misses += 1
                if misses == self.max_misses:     # small mazes: the training set can hold every one of them
                    raise ValueError(f"maze: no {length}x{length} maze outside the training set in {misses:,} draws "
                                     f"in a row; its {self.n_train:,} mazes ({len(seen):,} distinct up to symmetry) "
                                     f"cover (nearly) every maze of this size: test on larger mazes or train on fewer")
        return self._batch(grids, paths, device)


def _canonical(grid):
    """The same key for a grid and its 8 rotations / reflections."""
    return min(np.ascontiguousarray(t).tobytes() for k in range(4) for t in (np.rot90(grid, k), np.rot90(grid, k).T))


TASKS = {
    "copy": Copy,
    "recall": Recall,
    "flipflop": FlipFlop,
    "babilong": BabiLong,
    "babilong_qa1": partial(BabiLong, qa=1, max_facts=10),   # bAbI's qa1 and qa2 told apart, with 2-10 facts
    "babilong_qa2": partial(BabiLong, qa=2, max_facts=10),
    "maze": Maze,
}


if __name__ == "__main__":
    argparse.ArgumentParser(description="Prints one example of each task.").parse_args()   # no options but --help
    lengths = {"copy": 5, "recall": 4, "flipflop": 24, "babilong": 40, "babilong_qa1": 40, "babilong_qa2": 40, "maze": 4}
    for name, make in TASKS.items():
        n = lengths[name]
        task = make(canvas=9) if name == "maze" else make()
        # The first seed whose example scores something: a short flip-flop stream may have no read.
        seed = next(s for s in range(100) if (task.sample(1, n, s)[1] != IGNORE).any())
        what = f"{n}x{n} cells, canvas 9, the maze and its path drawn as o" if name == "maze" else f"length {n}"
        text = render(task, *task.sample(1, n, seed)).replace("\n", "\n    ")
        print(f"{name} (vocab {task.vocab_size}, {what}, seed {seed}):\n    {text}")
