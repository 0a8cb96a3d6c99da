"""Sudoku CSV files in the layout of the Hugging Face dataset ``sapientinc/sudoku-extreme``
(``source,question,answer,rating``, ``.`` = blank): read with every row validated, and written atomically."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from reprozoo._files import write_atomic
from reprozoo.sudoku.grid import _LUT_ANSWER, _LUT_QUESTION, _UNIT_NAMES, SEQ_LEN, _invalid_units

# ----------------------------------------------------------------------------------------------- CSV files

CSV_HEADER = ("source", "question", "answer", "rating")


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


def read_digits(
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
    qd, ad, rt = read_digits(path, min_rating=min_rating, limit=limit)
    return SudokuTable(
        torch.from_numpy(qd.astype(np.int64) + 1), torch.from_numpy(ad.astype(np.int64) + 1), torch.from_numpy(rt)
    )


def write_sudoku_csv(path: str | os.PathLike, rows: Sequence[tuple[str, str]], source: str) -> None:
    """Write (question, answer) strings in the official format, atomically: readers never see a partial file."""
    path = Path(path)
    body = "".join(f"{source},{q},{a},\n" for q, a in rows)
    write_atomic(path, (",".join(CSV_HEADER) + "\n" + body).encode("ascii"))
