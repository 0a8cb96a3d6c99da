"""The sudoku domain, shared by the datamodule, ``TRMModule.solve`` and the ``PrintSolvedSudoku`` callback:
the token encoding of the official TRM code and grid checks (:mod:`~reprozoo.sudoku.grid`), an exact solver and a
generator of unique-solution puzzles (:mod:`~reprozoo.sudoku.solver`), and the CSV files of Sudoku-Extreme
(:mod:`~reprozoo.sudoku.files`). It imports nothing of reprozoo but the file primitives."""

from reprozoo.sudoku.files import CSV_HEADER, SudokuTable, read_digits, read_sudoku_csv, write_sudoku_csv
from reprozoo.sudoku.grid import (
    BLANK,
    PAD,
    SEQ_LEN,
    VOCAB_SIZE,
    answer_problem,
    augment_sudoku,
    consistent,
    decode,
    encode,
    format_grid,
    grid_problem,
    is_valid_solution,
    valid_solutions,
)
from reprozoo.sudoku.solver import count_solutions, generate_puzzle, generate_puzzles, random_solution, solve

__all__ = [
    "CSV_HEADER",
    "BLANK",
    "PAD",
    "SEQ_LEN",
    "SudokuTable",
    "VOCAB_SIZE",
    "answer_problem",
    "augment_sudoku",
    "consistent",
    "count_solutions",
    "decode",
    "encode",
    "format_grid",
    "generate_puzzle",
    "generate_puzzles",
    "grid_problem",
    "is_valid_solution",
    "random_solution",
    "read_digits",
    "read_sudoku_csv",
    "solve",
    "valid_solutions",
    "write_sudoku_csv",
]
