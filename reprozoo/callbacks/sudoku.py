"""Show a solved sudoku at the end of testing: a picture says more than an accuracy."""

from __future__ import annotations

import inspect

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from reprozoo.sudoku import consistent, decode, format_grid, is_valid_solution


class PrintSolvedSudoku(L.Callback):
    """After ``test``, solve the first ``num_examples`` puzzles of the test set with the module's
    ``solve(puzzles)`` (e.g. :class:`~reprozoo.methods.trm.TRMModule`) and print puzzle and answer side by side,
    with the verdict (valid, consistent with the givens). Needs a module with a ``solve`` method and a test
    loader yielding ``{"inputs": (B, 81)}`` sudoku tokens."""

    def __init__(self, num_examples: int = 1):
        self.num_examples = num_examples

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "solve") or trainer.test_dataloaders is None:
            return
        loader = trainer.test_dataloaders[0] if isinstance(trainer.test_dataloaders, list) else trainer.test_dataloaders
        inputs = next(iter(loader))["inputs"][: self.num_examples]
        puzzles = [decode(row) for row in inputs]
        # The point is to show the answer, right or wrong, with its verdict: ask a solve() that raises on wrong
        # answers by default (TRMModule's strict=True) not to.
        lenient = {"strict": False} if "strict" in inspect.signature(pl_module.solve).parameters else {}
        with torch.no_grad():
            answers = pl_module.solve(puzzles, **lenient)
        for puzzle, answer in zip(puzzles, answers):
            ok = is_valid_solution(answer) and consistent(puzzle, answer)
            left, right = format_grid(puzzle).splitlines(), format_grid(answer).splitlines()
            print(f"\n{'puzzle':<24}    {'answer (' + ('solved' if ok else 'NOT a valid solution') + ')'}")
            print("\n".join(f"{a:<24}    {b}" for a, b in zip(left, right)), flush=True)
