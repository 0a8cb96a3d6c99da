"""A sudoku solver (exact search with constraint propagation) and a seeded generator of puzzles with a unique
solution and an exact number of givens."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from reprozoo.sudoku.grid import _BOX, _CELL_UNITS, _COL, _DIGITS_OF, _FULL, _PEERS, _POPCOUNT, _ROW, _digits

# ----------------------------------------------------------------------------------------------- solver


def _search(grid: list[int], limit: int, rng: random.Random | None = None) -> tuple[int, list[int] | None]:
    """Depth-first search over the blanks of ``grid`` (digits, 0 = blank) for up to ``limit`` solutions.

    Row, column and box contents are bitmasks; each node fills the blank with the fewest candidates (minimum
    remaining values), which on its own performs naked-single propagation and keeps the tree small. With ``rng``
    the candidates are tried in random order (used to draw random full grids). Returns (number of solutions found,
    capped at ``limit``; the first solution or None).
    """
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for c, d in enumerate(grid):
        if d:
            bit = 1 << d
            r, k, b = _ROW[c], _COL[c], _BOX[c]
            if (rows[r] | cols[k] | boxes[b]) & bit:
                return 0, None  # the givens already clash
            rows[r] |= bit
            cols[k] |= bit
            boxes[b] |= bit
    cells = list(grid)
    empties = [c for c in range(81) if not grid[c]]
    n_empty = len(empties)
    count = 0
    first: list[int] | None = None

    def descend(depth: int) -> bool:  # True: stop, enough solutions
        nonlocal count, first
        if depth == n_empty:
            count += 1
            if first is None:
                first = cells[:]
            return count >= limit
        best_i, best_n, best_m = depth, 10, 0
        for i in range(depth, n_empty):
            c = empties[i]
            m = _FULL & ~(rows[_ROW[c]] | cols[_COL[c]] | boxes[_BOX[c]])
            n = _POPCOUNT[m]
            if n < best_n:
                if n == 0:
                    return False
                best_i, best_n, best_m = i, n, m
                if n == 1:
                    break
        empties[depth], empties[best_i] = empties[best_i], empties[depth]
        c = empties[depth]
        r, k, b = _ROW[c], _COL[c], _BOX[c]
        candidates = _DIGITS_OF[best_m]
        if rng is not None and best_n > 1:
            candidates = list(candidates)
            rng.shuffle(candidates)
        for d in candidates:
            bit = 1 << d
            rows[r] |= bit
            cols[k] |= bit
            boxes[b] |= bit
            cells[c] = d
            stop = descend(depth + 1)
            rows[r] ^= bit
            cols[k] ^= bit
            boxes[b] ^= bit
            if stop:
                return True
        cells[c] = 0
        return False

    descend(0)
    return count, first


def count_solutions(puzzle: str | torch.Tensor | Sequence[int], limit: int = 2) -> int:
    """Number of solutions of ``puzzle`` (string or tokens), counted up to ``limit`` (2 answers "is it unique")."""
    digits = _digits(puzzle)
    if digits is None:
        raise ValueError("count_solutions: puzzle is not an 81-cell sudoku grid")
    return _search(digits, limit)[0]


def solve(puzzle: str | torch.Tensor | Sequence[int]) -> str | None:
    """A solution of ``puzzle`` as an 81-digit string, or None if it has none."""
    digits = _digits(puzzle)
    if digits is None:
        raise ValueError("solve: puzzle is not an 81-cell sudoku grid")
    solution = _search(digits, 1)[1]
    return None if solution is None else "".join(map(str, solution))


def _still_unique_without(puzzle: list[int], cell: int, digit: int) -> bool:
    """Whether ``puzzle`` (unique, with ``digit`` at ``cell``) stays unique once ``cell`` is blanked.

    Any solution of the reduced puzzle with ``digit`` at ``cell`` solves the original one, so it is the old
    solution; uniqueness therefore fails iff some solution puts *another* digit there. Naked and hidden singles
    settle most cells without a search; otherwise each other candidate is tried with a search for one solution.
    """
    puzzle[cell] = 0
    try:
        used = 0
        for p in _PEERS[cell]:
            used |= 1 << puzzle[p]
        candidates = _FULL & ~used
        if candidates == 1 << digit:
            return True  # naked single
        bit = 1 << digit
        for unit in _CELL_UNITS[cell]:  # hidden single: no other blank of a unit may take the digit
            if all(puzzle[x] or any(puzzle[p] == digit for p in _PEERS[x]) for x in unit if x != cell):
                return True
        for other in _DIGITS_OF[candidates & ~bit]:
            puzzle[cell] = other
            if _search(puzzle, 1)[0]:
                return False
            puzzle[cell] = 0
        return True
    finally:
        puzzle[cell] = digit


def random_solution(rng: random.Random) -> list[int]:
    """A random complete valid grid (digits), by a randomised search of the empty grid."""
    return _search([0] * 81, 1, rng)[1]  # type: ignore[return-value]


def generate_puzzle(num_givens: int, rng: random.Random, max_attempts: int = 200) -> tuple[str, str]:
    """One (question, answer) pair of 81-character strings whose question has exactly ``num_givens`` givens and a
    unique solution.

    A random full grid is emptied cell by cell in random order, keeping only removals that preserve uniqueness,
    until ``num_givens`` remain. Greedy removal ends in a minimal puzzle, typically of 23-27 givens, so small
    targets may need another grid: up to ``max_attempts`` grids are tried. 24 givens and more are reached
    quickly; 22 and fewer mostly fail (no puzzle of 17 givens will come out of this in practice).
    """
    if not 17 <= num_givens <= 80:
        raise ValueError(f"generate_puzzle: num_givens must be in 17..80, got {num_givens}")
    for _ in range(max_attempts):
        solution = random_solution(rng)
        puzzle = solution[:]
        order = list(range(81))
        rng.shuffle(order)
        givens = 81
        for cell in order:
            if givens == num_givens:
                break
            if _still_unique_without(puzzle, cell, puzzle[cell]):
                puzzle[cell] = 0
                givens -= 1
        if givens == num_givens:
            return "".join(str(d) if d else "." for d in puzzle), "".join(map(str, solution))
    raise RuntimeError(
        f"generate_puzzle: no unique puzzle with {num_givens} givens in {max_attempts} grids; "
        "random removal rarely goes below ~23 givens: ask for 24 or more"
    )


def generate_puzzles(n: int, num_givens: int, seed: int | str) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs; the same ``seed`` gives the same list on every run."""
    rng = random.Random(seed)  # str seeds are hashed with sha512: stable across runs and PYTHONHASHSEED
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        question, answer = generate_puzzle(num_givens, rng)
        if question not in seen:
            seen.add(question)
            out.append((question, answer))
    return out
