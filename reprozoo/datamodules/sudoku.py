"""Sudoku-Extreme, the benchmark of the Tiny Recursive Models paper (Jolicoeur-Martineau, 2025), and its recipe.

Each puzzle is a sequence of 81 tokens in row-major order, encoded as the official TRM code does it:
``0`` = pad (never used for sudoku, kept so that vocabularies line up with the other TRM tasks), ``1`` = blank,
``2..10`` = digits 1..9. The vocabulary size is therefore 11.

Three sources of puzzles:

* ``csv``: ``train.csv`` / ``test.csv`` of the Hugging Face dataset ``sapientinc/sudoku-extreme`` in ``data_dir``
  (header ``source,question,answer,rating``, ``.`` = blank), or any CSV of the same columns via
  ``train_file`` / ``test_file``.
* ``hub``: like ``csv``, but missing files are downloaded into ``data_dir`` first (unless ``REPROZOO_OFFLINE=1``).
  The hub publishes no checksum for them, so the sha256 of what was downloaded is recorded next to each file
  (``train.csv.sha256``) and checked on every later load: a file that changed after the download is refused.
* ``generate``: an own seeded generator of puzzles with a unique solution and an exact number of givens, cached in
  ``data_dir`` in the same CSV format. It needs no download, which keeps tests and smoke runs offline.

The training recipe follows the paper: a seeded subsample of ``num_train_puzzles`` (1000) training puzzles, and
on-the-fly augmentation by the validity-preserving symmetries of the official ``build_sudoku_dataset.py`` (digit
relabelling, transpose, band/row and stack/column shuffles). Every grid check in this module is vectorised, so
that validating the ~4M rows of the official files stays affordable.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from reprozoo._files import data_path, data_root, offline, publish, sha256_file, write_atomic
from reprozoo.datamodules._base import _SplitsDataModule

PAD, BLANK = 0, 1
SEQ_LEN = 81
VOCAB_SIZE = 11
CSV_HEADER = ("source", "question", "answer", "rating")
HUB_REPO = "sapientinc/sudoku-extreme"
HUB_URL = f"https://huggingface.co/datasets/{HUB_REPO}/resolve/main"
HUB_FILES = ("train.csv", "test.csv")

Source = Literal["csv", "hub", "generate"]

# ----------------------------------------------------------------------------------------------- geometry

_ROW = tuple(c // 9 for c in range(81))
_COL = tuple(c % 9 for c in range(81))
_BOX = tuple((c // 27) * 3 + (c % 9) // 3 for c in range(81))
_UNITS = tuple(
    [tuple(r * 9 + c for c in range(9)) for r in range(9)]
    + [tuple(r * 9 + c for r in range(9)) for c in range(9)]
    + [tuple(c for c in range(81) if _BOX[c] == b) for b in range(9)]
)  # 9 rows, 9 columns, 9 boxes
_UNIT_NAMES = tuple(f"{kind} {i + 1}" for kind in ("row", "column", "box") for i in range(9))
_CELL_UNITS = tuple(tuple(u for u in _UNITS if c in u) for c in range(81))  # the row, column and box of a cell
_PEERS = tuple(tuple(sorted({p for u in _CELL_UNITS[c] for p in u} - {c})) for c in range(81))
_GROUPS = np.array(_UNITS, dtype=np.int64)  # (27, 9) cell indices, for the vectorised checks

_FULL = 0x3FE  # bits 1..9: one bit per digit
_POPCOUNT = tuple(bin(m).count("1") for m in range(1024))
_DIGITS_OF = tuple(tuple(d for d in range(1, 10) if m >> d & 1) for m in range(1024))

# byte -> digit (0 = blank); 255 marks a character that is not allowed
_LUT_QUESTION = np.full(256, 255, dtype=np.uint8)
_LUT_QUESTION[ord(".")] = 0
_LUT_QUESTION[ord("0")] = 0
_LUT_ANSWER = np.full(256, 255, dtype=np.uint8)
for _d in range(1, 10):
    _LUT_QUESTION[ord(str(_d))] = _d
    _LUT_ANSWER[ord(str(_d))] = _d


# ----------------------------------------------------------------------------------------------- encoding


def encode(puzzle: str) -> torch.Tensor:
    """Tokens (LongTensor of 81) of an 81-character grid string: ``.`` or ``0`` -> 1 (blank), ``1..9`` -> 2..10."""
    if len(puzzle) != SEQ_LEN:
        raise ValueError(f"encode: a sudoku string has {SEQ_LEN} characters, got {len(puzzle)}")
    digits = _LUT_QUESTION[np.frombuffer(puzzle.encode("ascii", "replace"), dtype=np.uint8)]
    if (digits == 255).any():
        pos = int(np.argmax(digits == 255))
        raise ValueError(f"encode: character {puzzle[pos]!r} at position {pos + 1} is not '.', '0' or 1-9")
    return torch.from_numpy(digits.astype(np.int64) + 1)


def decode(tokens: torch.Tensor | Sequence[int]) -> str:
    """The grid string of 81 tokens: ``.`` for a blank, the digit otherwise. Pad tokens are an error: a sudoku
    has none, so one means the tokens are not a sudoku."""
    values = torch.as_tensor(tokens).reshape(-1).tolist()
    if len(values) != SEQ_LEN:
        raise ValueError(f"decode: a sudoku has {SEQ_LEN} tokens, got {len(values)}")
    bad = [t for t in values if not BLANK <= t <= 10]
    if bad:
        raise ValueError(f"decode: token {bad[0]} is not a sudoku token (1 = blank, 2..10 = digits 1..9)")
    return "".join(".123456789"[t - 1] for t in values)


def _digits(grid: str | torch.Tensor | Sequence[int]) -> list[int] | None:
    """Digits 0..9 (0 = blank) of a grid string or token sequence; None where it is not a sudoku grid at all."""
    if isinstance(grid, str):
        if len(grid) != SEQ_LEN:
            return None
        out = _LUT_QUESTION[np.frombuffer(grid.encode("ascii", "replace"), dtype=np.uint8)].tolist()
        return None if 255 in out else out
    values = torch.as_tensor(grid).reshape(-1).tolist()
    if len(values) != SEQ_LEN or any(not 1 <= t <= 10 for t in values):
        return None
    return [t - 1 for t in values]


_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def grid_problem(grid: str | torch.Tensor | Sequence[int], *, complete: bool = False) -> str | None:
    """What keeps ``grid`` (an 81-character string or 81 tokens) from being a sudoku grid, in words; None if nothing.

    The problems, in this order: not a string or token sequence, a wrong length, a character or token that is no
    cell, with ``complete=True`` a blank cell, and a digit twice in a row, column or box ("row 2 has two 5s"; for a
    question: givens that contradict each other). This is the one grid check: ``is_valid_solution(grid)`` is
    ``grid_problem(grid, complete=True) is None``.
    """
    if isinstance(grid, str):
        if len(grid) != SEQ_LEN:
            return f"has {len(grid)} characters, a sudoku has {SEQ_LEN}"
        # "replace" turns each non-ASCII character into one '?', so positions stay those of the string
        bad = np.flatnonzero(_LUT_QUESTION[np.frombuffer(grid.encode("ascii", "replace"), dtype=np.uint8)] == 255)
        if bad.size:
            pos = int(bad[0])
            return f"character {grid[pos]!r} at position {pos + 1} is not '.', '0' or 1-9"
    else:
        try:
            values = torch.as_tensor(grid).reshape(-1).tolist()
        except (TypeError, ValueError, RuntimeError):
            return f"is a {type(grid).__name__}, not an {SEQ_LEN}-character string or {SEQ_LEN} tokens"
        if len(values) != SEQ_LEN:
            return f"has {len(values)} tokens, a sudoku has {SEQ_LEN}"
        bad = [i for i, t in enumerate(values) if not BLANK <= t <= 10]
        if bad:
            return f"token {values[bad[0]]} at position {bad[0] + 1} is not a sudoku token (1 = blank, 2..10 = 1..9)"
    digits = _digits(grid)  # not None: length and cells were checked above
    if complete and 0 in digits:
        pos = digits.index(0)
        return f"cell {pos + 1} (row {pos // 9 + 1}, column {pos % 9 + 1}) is blank"
    for name, unit in zip(_UNIT_NAMES, _UNITS):
        filled = [digits[c] for c in unit if digits[c]]
        if len(set(filled)) < len(filled):
            digit = next(d for d in filled if filled.count(d) > 1)
            return f"{name} has {_COUNT_WORDS[filled.count(digit)]} {digit}s"
    return None


def is_valid_solution(grid: str | torch.Tensor | Sequence[int]) -> bool:
    """True iff ``grid`` (string or tokens) is a complete grid whose rows, columns and boxes each hold 1..9 once."""
    return grid_problem(grid, complete=True) is None


def _given_overwritten(question: list[int], answer: list[int]) -> str | None:
    """The first given of ``question`` that ``answer`` changes, in words (digit lists, 0 = blank); None if none."""
    for pos, (qd, ad) in enumerate(zip(question, answer)):
        if qd and qd != ad:
            return f"cell {pos + 1} (row {pos // 9 + 1}, column {pos % 9 + 1}) is given as {qd} but the answer has {ad}"
    return None


def consistent(question: str | torch.Tensor | Sequence[int], answer: str | torch.Tensor | Sequence[int]) -> bool:
    """True iff ``answer`` agrees with every given of ``question`` (blanks of the question may hold anything)."""
    q, a = _digits(question), _digits(answer)
    return q is not None and a is not None and _given_overwritten(q, a) is None


def answer_problem(
    question: str | torch.Tensor | Sequence[int], answer: str | torch.Tensor | Sequence[int]
) -> str | None:
    """Why ``answer`` does not solve ``question``, in words ("is not a valid sudoku (row 2 has two 5s)", "is
    inconsistent with the givens: cell 5 ..."); None if it is a valid grid consistent with the givens."""
    problem = grid_problem(answer, complete=True)
    if problem is not None:
        return f"is not a valid sudoku ({problem})"
    q = _digits(question)
    if q is None:
        return f"answers a question that is not a sudoku ({grid_problem(question)})"
    overwritten = _given_overwritten(q, _digits(answer))
    return None if overwritten is None else f"is inconsistent with the givens: {overwritten}"


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


# ----------------------------------------------------------------------------------------------- vectorised checks


def _invalid_units(digits: np.ndarray) -> np.ndarray:
    """(N, 27) bool: which rows/columns/boxes of each grid (digits 0..9, (N, 81)) are not a permutation of 1..9.

    A unit of 9 cells holds each of 1..9 exactly once iff the OR of its digit bits is 0x3FE (a blank sets bit 0).
    """
    bits = np.left_shift(np.uint16(1), digits.astype(np.uint16))
    return np.bitwise_or.reduce(bits[:, _GROUPS], axis=2) != _FULL


def valid_solutions(tokens: torch.Tensor) -> torch.Tensor:
    """Bool tensor (...): whether each token grid (..., 81) is a complete valid sudoku. Vectorised, for metrics."""
    flat = torch.as_tensor(tokens).reshape(-1, SEQ_LEN).cpu().numpy().astype(np.int64)
    in_range = ((flat >= 2) & (flat <= 10)).all(axis=1)
    digits = np.clip(flat - 1, 0, 9).astype(np.uint8)
    ok = in_range & ~_invalid_units(digits).any(axis=1)
    return torch.from_numpy(ok).reshape(torch.as_tensor(tokens).shape[:-1])


# ----------------------------------------------------------------------------------------------- CSV files


class SudokuTable(NamedTuple):
    """Puzzles of one CSV file: ``questions`` and ``answers`` are token tensors (N, 81), ``ratings`` (N,) holds the
    file's difficulty rating, -1 where the file gives none."""

    questions: torch.Tensor
    answers: torch.Tensor
    ratings: torch.Tensor


def _row_problem(question: str, answer: str, qd: np.ndarray, ad: np.ndarray) -> str | None:
    """What is wrong with one row (its strings and digit arrays), in words; None if nothing."""
    bad = np.flatnonzero(qd == 255)
    if bad.size:
        pos = int(bad[0])
        return f"question has character {question[pos]!r} at position {pos + 1}; allowed are '.', '0' and 1-9"
    bad = np.flatnonzero(ad == 255)
    if bad.size:
        pos = int(bad[0])
        return f"answer has character {answer[pos]!r} at position {pos + 1}; a complete answer holds only 1-9"
    units = np.flatnonzero(_invalid_units(ad[None])[0])
    if units.size:
        return f"answer is not a valid sudoku solution: {_UNIT_NAMES[int(units[0])]} does not hold 1-9 exactly once"
    bad = np.flatnonzero((qd != 0) & (qd != ad))
    if bad.size:
        pos = int(bad[0])
        return (
            f"answer is inconsistent with the question: cell {pos + 1} (row {pos // 9 + 1}, column {pos % 9 + 1}) "
            f"is given as {question[pos]} but the answer has {answer[pos]}"
        )
    return None


def _validate_chunk(
    path: Path, questions: list[str], answers: list[str], lines: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Digits (N, 81) of questions and answers, all rows checked at once; ValueError at the first bad row."""
    n = len(questions)
    q_bytes = np.frombuffer("".join(questions).encode("ascii", "replace"), dtype=np.uint8).reshape(n, SEQ_LEN)
    a_bytes = np.frombuffer("".join(answers).encode("ascii", "replace"), dtype=np.uint8).reshape(n, SEQ_LEN)
    qd, ad = _LUT_QUESTION[q_bytes], _LUT_ANSWER[a_bytes]
    bad_chars = (qd == 255).any(axis=1) | (ad == 255).any(axis=1)
    ad_checked = np.where(ad == 255, 0, ad)  # keep the shift below in range; these rows are already bad
    bad = bad_chars | _invalid_units(ad_checked).any(axis=1) | ((qd != 0) & (qd != ad_checked)).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{path}, line {lines[i]}: {_row_problem(questions[i], answers[i], qd[i], ad[i])}")
    return qd, ad


def _read_digits(
    path: str | os.PathLike, min_rating: int | None = None, limit: int | None = None, chunk_rows: int = 65_536
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(question digits, answer digits, ratings) of a sudoku CSV as compact numpy arrays (digits uint8, 0 = blank).

    Rows are read in chunks: the per-row Python work is only splitting and length checks; characters, grid
    validity and consistency are checked for a whole chunk at once. Errors name the first bad line.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"read_sudoku_csv: limit must be >= 1 or None, got {limit}")
    expected = ",".join(CSV_HEADER)
    q_parts: list[np.ndarray] = []
    a_parts: list[np.ndarray] = []
    r_parts: list[np.ndarray] = []
    kept = 0
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}, line 1: the file is empty; expected the header {expected!r}")
        if tuple(h.strip() for h in header) != CSV_HEADER:
            raise ValueError(f"{path}, line 1: header is {','.join(header)!r}, expected {expected!r}")
        done = False
        while not done:
            want = chunk_rows if limit is None or min_rating is not None else min(chunk_rows, limit - kept)
            questions: list[str] = []
            answers: list[str] = []
            ratings: list[int] = []
            lines: list[int] = []
            error: tuple[int, str] | None = None
            for row in reader:
                if not row:
                    continue  # a blank line, e.g. at the end of the file
                line = reader.line_num
                if len(row) != len(CSV_HEADER):
                    error = (line, f"{len(row)} columns, expected {len(CSV_HEADER)} ({expected})")
                    break
                _, question, answer, rating = row
                if len(question) != SEQ_LEN:
                    error = (line, f"question has {len(question)} characters, expected {SEQ_LEN}")
                    break
                if len(answer) != SEQ_LEN:
                    error = (line, f"answer has {len(answer)} characters, expected {SEQ_LEN}")
                    break
                rating = rating.strip()
                if not rating:
                    value = -1
                elif rating.isascii() and rating.isdigit():
                    value = int(rating)
                else:
                    error = (line, f"rating {rating!r} is not a non-negative integer (or empty)")
                    break
                if min_rating is not None and value < 0:
                    error = (line, f"min_rating={min_rating} was asked for, but this row has no rating")
                    break
                questions.append(question)
                answers.append(answer)
                ratings.append(value)
                lines.append(line)
                if len(questions) >= want:
                    break
            else:
                done = True  # the reader is exhausted
            if questions:  # earlier rows first: their errors come before a structural error further down
                qd, ad = _validate_chunk(path, questions, answers, lines)
                rt = np.asarray(ratings, dtype=np.int64)
                if min_rating is not None:
                    keep = rt >= min_rating
                    qd, ad, rt = qd[keep], ad[keep], rt[keep]
                q_parts.append(qd)
                a_parts.append(ad)
                r_parts.append(rt)
                kept += len(rt)
            if error is not None:
                raise ValueError(f"{path}, line {error[0]}: {error[1]}")
            if limit is not None and kept >= limit:
                done = True
    if not q_parts:
        empty = np.zeros((0, SEQ_LEN), dtype=np.uint8)
        return empty, empty.copy(), np.zeros(0, dtype=np.int64)
    qd, ad, rt = np.concatenate(q_parts), np.concatenate(a_parts), np.concatenate(r_parts)
    if limit is not None:
        qd, ad, rt = qd[:limit], ad[:limit], rt[:limit]
    return qd, ad, rt


def read_sudoku_csv(path: str | os.PathLike, min_rating: int | None = None, limit: int | None = None) -> SudokuTable:
    """Read and validate a CSV of the official format (``source,question,answer,rating``).

    Every row read is checked: 4 columns, 81-character question (``.`` or ``0`` blank, 1-9) and answer (1-9 only),
    the answer a valid complete grid that agrees with every given of the question, the rating an integer or empty.
    A problem raises ValueError naming the file and the line. ``min_rating`` keeps the rows rated at least that
    (rows without a rating are then an error); ``limit`` stops after that many rows have been kept.
    Returns LongTensors of tokens (1 = blank, 2..10 = digits).
    """
    qd, ad, rt = _read_digits(path, min_rating=min_rating, limit=limit)
    return SudokuTable(
        torch.from_numpy(qd.astype(np.int64) + 1), torch.from_numpy(ad.astype(np.int64) + 1), torch.from_numpy(rt)
    )


def write_sudoku_csv(path: str | os.PathLike, rows: Sequence[tuple[str, str]], source: str) -> None:
    """Write (question, answer) strings in the official format, atomically: readers never see a partial file."""
    path = Path(path)
    body = "".join(f"{source},{q},{a},\n" for q, a in rows)
    write_atomic(path, (",".join(CSV_HEADER) + "\n" + body).encode("ascii"))


# ----------------------------------------------------------------------------------------------- the hub


def sha256_sidecar(path: str | os.PathLike) -> Path:
    """Where the sha256 recorded at download time of ``path`` lives: ``{path}.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def verify_recorded_sha256(path: str | os.PathLike) -> None:
    """If a download recorded a sha256 for ``path``, check the file still has it (a file placed by hand has no
    record and is trusted as is: the hub publishes no checksum to compare with)."""
    path = Path(path)
    sidecar = sha256_sidecar(path)
    if not sidecar.is_file():
        return
    expected = sidecar.read_text().split()[0].lower() if sidecar.read_text().split() else ""
    got = sha256_file(path)
    if got != expected:
        raise ValueError(
            f"{path} has sha256 {got}, but {sidecar} recorded {expected or '(nothing)'} when it was downloaded: "
            f"the file changed or is truncated. Delete both files to download it again."
        )


def download_from_hub(name: str, data_dir: str | os.PathLike, hub_url: str = HUB_URL) -> Path:
    """Download ``{hub_url}/{name}`` to ``data_dir/name`` atomically and record its sha256 in ``{name}.sha256``.

    The data goes to a temporary file in ``data_dir`` first and is renamed into place only once complete and
    starting with the expected CSV header, so an interrupted or wrong download never looks like the dataset.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    dest = data_dir / name
    url = f"{hub_url.rstrip('/')}/{name}"
    fd, tmp_name = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=data_dir)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
        with open(tmp_name, "rb") as fh:
            first = fh.readline().decode("utf-8-sig", "replace").strip()
        if tuple(first.split(",")) != CSV_HEADER:
            raise ValueError(f"{url} does not start with the header {','.join(CSV_HEADER)!r} (got {first[:80]!r})")
        # the record first: a crash between the two renames leaves a record without a file, which the next
        # download overwrites, never a file without its record
        write_atomic(sha256_sidecar(dest), f"{digest.hexdigest()}  {name}\n".encode())
        publish(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return dest


def _where_to_put(paths: Sequence[Path], data_dir: Path) -> str:
    places = "; ".join(f"{p.name} at {p}" for p in paths)
    return (
        f"Put {places}. They are the files of the Hugging Face dataset {HUB_REPO} "
        f"({', '.join(f'{HUB_URL}/{p.name}' for p in paths)}), e.g. "
        f"`huggingface-cli download {HUB_REPO} --repo-type dataset --local-dir {data_dir}`."
    )


# ----------------------------------------------------------------------------------------------- augmentation


def augment_sudoku(
    question: torch.Tensor, answer: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random symmetry of the sudoku applied identically to question and answer tokens (..., 81).

    The symmetries of the official ``build_sudoku_dataset.py``: relabel the digits by a random permutation (pad
    and blank stay), transpose with probability 1/2, permute the three bands and the rows inside each band, and
    the three stacks and the columns inside each stack. Each maps valid grids to valid grids and givens to givens.
    """
    token_map = torch.arange(VOCAB_SIZE)
    token_map[2:] = torch.from_numpy(rng.permutation(9) + 2)
    rows = np.concatenate([3 * band + rng.permutation(3) for band in rng.permutation(3)])
    cols = np.concatenate([3 * stack + rng.permutation(3) for stack in rng.permutation(3)])
    if rng.random() < 0.5:  # transpose, then permute: new (r, c) takes old (cols[c], rows[r])
        source = cols[None, :] * 9 + rows[:, None]
    else:  # new (r, c) takes old (rows[r], cols[c])
        source = rows[:, None] * 9 + cols[None, :]
    index = torch.from_numpy(source.reshape(-1))
    return token_map[question[..., index]], token_map[answer[..., index]]


class SudokuDataset(Dataset):
    """Token grids (stored as uint8) served as ``{"inputs", "labels", "puzzle_identifiers"}``.

    With ``augment`` each item is a random symmetry of its puzzle, drawn from a generator seeded by
    ``(seed, round, index)`` where an item key is ``round * len(self) + index``. A plain loader asks for keys
    0..N-1 (round 0); :class:`EpochSampler` asks for later rounds in later epochs. The augmentation of an item is
    therefore a function of its key only: the same in every worker, process and run.
    """

    def __init__(self, questions: torch.Tensor, answers: torch.Tensor, augment: bool = False, seed: int = 0):
        if questions.shape != answers.shape or questions.ndim != 2 or questions.shape[1] != SEQ_LEN:
            raise ValueError(
                "SudokuDataset: questions and answers must both be (N, 81), "
                f"got {tuple(questions.shape)} and {tuple(answers.shape)}"
            )
        self.questions, self.answers = questions, answers
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        n = len(self.questions)
        key = int(key)
        if key < 0 or n == 0:
            raise IndexError(f"SudokuDataset: key {key} out of range")
        round_, index = divmod(key, n)
        question, answer = self.questions[index].long(), self.answers[index].long()
        if self.augment:
            question, answer = augment_sudoku(question, answer, np.random.default_rng((self.seed, round_, index)))
        return {"inputs": question, "labels": answer, "puzzle_identifiers": torch.zeros((), dtype=torch.long)}


class EpochSampler(Sampler[int]):
    """Shuffled keys for :class:`SudokuDataset`: epoch ``e`` visits each puzzle ``repeats`` times, as keys of rounds
    ``e * repeats .. e * repeats + repeats - 1``, so each visit gets a fresh augmentation.

    The order is seeded by (seed, epoch). Lightning calls ``set_epoch`` on a loader's sampler at the start of every
    training epoch; in a hand-written loop call it yourself, or every epoch repeats epoch 0. The sampler runs in
    the main process, which is why the epoch reaches workers (persistent or not) without any shared state.
    """

    def __init__(self, num_puzzles: int, repeats: int = 1, shuffle: bool = True, seed: int = 0):
        self.num_puzzles, self.repeats, self.shuffle, self.seed = num_puzzles, repeats, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_puzzles * self.repeats

    def __iter__(self) -> Iterator[int]:
        total = len(self)
        order = np.random.default_rng((self.seed, self.epoch)).permutation(total) if self.shuffle else np.arange(total)
        base = self.epoch * total
        return iter((base + order).tolist())


# ----------------------------------------------------------------------------------------------- the datamodule


def default_data_dir() -> Path:
    """``<data root>/sudoku-extreme`` (:func:`reprozoo._files.data_root`)."""
    return data_root() / "sudoku-extreme"


class SudokuExtremeDataModule(_SplitsDataModule):
    """Sudoku-Extreme puzzles with the TRM training recipe.

    Splits: ``train`` is a seeded subsample of ``num_train_puzzles`` training puzzles. ``val`` (``num_val``
    puzzles) is a seeded draw from the training puzzles *not* in that subsample, so that model selection never
    looks at the test split; only where those are too few (e.g. ``num_train_puzzles=None``, all of them) is it
    drawn from the test split instead, and ``self.val_source`` says which. ``test`` is the test file as is (first
    ``limit_test`` rows if given); ``predict`` is the test split too.

    Args:
        source: ``csv`` (files in ``data_dir`` or ``train_file``/``test_file``), ``hub`` (download missing files
            from the Hugging Face dataset ``sapientinc/sudoku-extreme``) or ``generate`` (own unique-solution
            puzzles with ``num_givens`` givens, cached in ``data_dir``).
        data_dir: where ``train.csv``/``test.csv`` are, or go, or where generated puzzles are cached; default
            ``<data root>/sudoku-extreme`` (``$REPROZOO_DATA/sudoku-extreme``, see README).
        train_file, test_file: for ``csv``, any CSV of the official columns instead of ``data_dir/{train,test}.csv``.
        hub_url: base URL of the hub files (a ``file://`` URL works, which is how the download is tested).
        num_givens: givens per generated puzzle (17..80; the generator is fast from ~24 up).
        n_train_generated, n_test_generated: generated puzzles per split (train and test use different seeds and
            are deduplicated: a training puzzle that also is a test question is dropped).
        num_train_puzzles: training puzzles used (paper: 1000); None = all.
        num_val: validation puzzles (0 = no validation split).
        limit_test: cap on the test split's size (its first rows).
        min_rating: keep only puzzles rated at least this, in both splits (needs ratings: not for ``generate``).
        augment: random sudoku symmetries on the training split, fresh in each epoch and each repeat.
        train_repeats: visits of each training puzzle per epoch (each a different augmentation); TRM pre-computes
            1000 augmentations per puzzle, which ``train_repeats=1000`` mimics without the disk cost.
        batch_size, num_workers: for all loaders; train is shuffled (seeded by seed and epoch).
        seed: subsample, validation draw, generation, shuffling and augmentation all derive from it.
    """

    def __init__(
        self,
        source: Source = "generate",
        data_dir: str | None = None,
        train_file: str | None = None,
        test_file: str | None = None,
        hub_url: str = HUB_URL,
        num_givens: int = 30,
        n_train_generated: int = 2000,
        n_test_generated: int = 500,
        num_train_puzzles: int | None = 1000,
        num_val: int = 500,
        limit_test: int | None = None,
        min_rating: int | None = None,
        augment: bool = True,
        train_repeats: int = 1,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        name = type(self).__name__
        if source not in ("csv", "hub", "generate"):
            raise ValueError(f"{name}: source must be 'csv', 'hub' or 'generate', got {source!r}")
        if not 17 <= num_givens <= 80:
            raise ValueError(
                f"{name}: num_givens must be in 17..80 (a unique sudoku needs at least 17), got {num_givens}"
            )
        for field, value in {
            "n_train_generated": n_train_generated,
            "n_test_generated": n_test_generated,
            "train_repeats": train_repeats,
            "batch_size": batch_size,
        }.items():
            if value < 1:
                raise ValueError(f"{name}: {field} must be >= 1, got {value}")
        for field, value in {"num_train_puzzles": num_train_puzzles, "limit_test": limit_test}.items():
            if value is not None and value < 1:
                raise ValueError(f"{name}: {field} must be >= 1 or None, got {value}")
        for field, value in {"num_val": num_val, "num_workers": num_workers, "seed": seed}.items():
            if value < 0:
                raise ValueError(f"{name}: {field} must be >= 0, got {value}")
        if min_rating is not None and source == "generate":
            raise ValueError(
                f"{name}: min_rating needs rated puzzles; generated ones have no rating (source='generate')"
            )
        if (train_file is not None or test_file is not None) and source != "csv":
            field = "train_file" if train_file is not None else "test_file"
            raise ValueError(f"{name}: {field} is only used with source='csv', got source={source!r}")
        self.save_hyperparameters()
        self.data_dir = data_path(data_dir) if data_dir is not None else default_data_dir()
        self.splits: dict[str, SudokuDataset] = {}
        self.val_source: str | None = None
        self._verified: set[Path] = set()

    # ------------------------------------------------------------------------------------ files

    def generated_path(self, split: str) -> Path:
        hp = self.hparams
        n = hp.n_train_generated if split == "train" else hp.n_test_generated
        return self.data_dir / f"generated_g{hp.num_givens}_n{n}_s{hp.seed}_{split}.csv"

    def _csv_files(self) -> tuple[Path, Path]:
        hp = self.hparams
        train = Path(hp.train_file) if hp.train_file is not None else self.data_dir / "train.csv"
        test = Path(hp.test_file) if hp.test_file is not None else self.data_dir / "test.csv"
        return train, test

    def files(self) -> tuple[Path, Path]:
        """Paths of the (train, test) CSV files, after generating or downloading whatever is missing."""
        hp = self.hparams
        if hp.source == "generate":
            paths = self.generated_path("train"), self.generated_path("test")
            for split, path in zip(("train", "test"), paths):
                if not path.is_file():
                    n = hp.n_train_generated if split == "train" else hp.n_test_generated
                    rows = generate_puzzles(n, hp.num_givens, seed=f"reprozoo.sudoku:{hp.seed}:{split}")
                    write_sudoku_csv(path, rows, source=f"generated_g{hp.num_givens}_s{hp.seed}")
            return paths
        paths = self._csv_files()
        missing = [p for p in paths if not p.is_file()]
        if missing and hp.source == "csv":
            raise FileNotFoundError(
                f"{type(self).__name__}: missing {', '.join(map(str, missing))}. "
                + _where_to_put(missing, self.data_dir)
                + " Or use source='hub' to download them, or source='generate' for puzzles made locally."
            )
        if missing:
            if offline():
                raise FileNotFoundError(
                    f"{type(self).__name__}: missing {', '.join(map(str, missing))} and offline mode is on "
                    f"(REPROZOO_OFFLINE), so nothing was downloaded. " + _where_to_put(missing, self.data_dir)
                )
            for path in missing:
                try:
                    download_from_hub(path.name, self.data_dir, hub_url=hp.hub_url)
                except Exception as err:  # network errors come in many types; all mean the same to the user
                    raise FileNotFoundError(
                        f"{type(self).__name__}: could not download {hp.hub_url.rstrip('/')}/{path.name}: {err}. "
                        + _where_to_put(missing, self.data_dir)
                    ) from err
        for path in paths:
            if path not in self._verified:  # prepare_data and setup both ask: hash a large file once
                verify_recorded_sha256(path)
                self._verified.add(path)
        return paths

    # ------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        self.files()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        name = type(self).__name__
        train_path, test_path = self.files()
        train_q, train_a, _ = _read_digits(train_path, min_rating=hp.min_rating)
        test_q, test_a, _ = _read_digits(test_path, min_rating=hp.min_rating, limit=hp.limit_test)
        if hp.source == "generate":
            for path, digits in ((train_path, train_q), (test_path, test_q)):
                counts = (digits > 0).sum(axis=1)
                if (counts != hp.num_givens).any():  # the name promises the givens: a cache that breaks it is stale
                    raise ValueError(
                        f"{name}: {path} has a puzzle with {int(counts[counts != hp.num_givens][0])} givens, "
                        f"expected num_givens={hp.num_givens}; delete the file to generate it again"
                    )
            # the two seeds make overlaps astronomically rare; rule them out anyway
            test_keys = {row.tobytes() for row in test_q}
            keep = np.fromiter((row.tobytes() not in test_keys for row in train_q), dtype=bool, count=len(train_q))
            train_q, train_a = train_q[keep], train_a[keep]
        n_train = len(train_q)
        k = n_train if hp.num_train_puzzles is None else hp.num_train_puzzles
        if k > n_train or n_train == 0:
            raise ValueError(
                f"{name}: num_train_puzzles={hp.num_train_puzzles} but {train_path} has {n_train} usable puzzles"
            )
        if len(test_q) == 0:
            raise ValueError(f"{name}: the test split {test_path} has no usable puzzles")
        order = np.random.default_rng((hp.seed, 1)).permutation(n_train)
        train_idx, rest = order[:k], order[k:]
        if len(rest) >= hp.num_val:
            val_q, val_a, self.val_source = train_q[rest[: hp.num_val]], train_a[rest[: hp.num_val]], "train"
        elif hp.num_val <= len(test_q):
            pick = np.random.default_rng((hp.seed, 2)).permutation(len(test_q))[: hp.num_val]
            val_q, val_a, self.val_source = test_q[pick], test_a[pick], "test"
        else:
            raise ValueError(
                f"{name}: num_val={hp.num_val} is more than the {len(rest)} training puzzles left over and the "
                f"{len(test_q)} test puzzles"
            )

        def tokens(digits: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(digits + 1)  # uint8: blank 1, digits 2..10

        self.splits["train"] = SudokuDataset(
            tokens(train_q[train_idx]), tokens(train_a[train_idx]), hp.augment, hp.seed
        )
        self.splits["val"] = SudokuDataset(tokens(val_q), tokens(val_a))
        self.splits["test"] = SudokuDataset(tokens(test_q), tokens(test_a))

    def _train_sampler(self, seed: int) -> Sampler[int]:
        hp = self.hparams  # the order has its own seed: it also picks each visit's augmentation
        return EpochSampler(len(self.splits["train"]), hp.train_repeats, True, hp.seed)
