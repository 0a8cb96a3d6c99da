"""Sudoku grids as the official TRM code encodes them, and their validity checks.

Each puzzle is a sequence of 81 tokens in row-major order: ``0`` = pad (never used for sudoku, kept so that
vocabularies line up with the other TRM tasks), ``1`` = blank, ``2..10`` = digits 1..9; the vocabulary size is 11.
The checks come in two kinds: per grid, with a sentence saying what is wrong (:func:`grid_problem`), and
vectorised over many grids (:func:`valid_solutions`), fast enough for the ~4M rows of the official files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

PAD, BLANK = 0, 1
SEQ_LEN = 81
VOCAB_SIZE = 11

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


def format_grid(grid: str) -> str:
    """An 81-character grid as 9 lines with box separators ('.' for blanks)."""
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        cells = []
        for c in range(9):
            ch = grid[r * 9 + c]
            cells.append(ch if ch not in "0" else ".")
            if c in (2, 5):
                cells.append("|")
        lines.append(" ".join(cells))
    return "\n".join(lines)
