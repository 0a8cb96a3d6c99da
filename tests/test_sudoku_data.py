import hashlib
import time
import urllib.request

import pytest
import torch

from reprozoo.datamodules import SudokuExtremeDataModule, sudoku
from reprozoo.datamodules.sudoku import EpochSampler, SudokuDataset
from reprozoo.sudoku import (
    consistent,
    count_solutions,
    decode,
    encode,
    generate_puzzles,
    is_valid_solution,
    read_sudoku_csv,
    solve,
)
from tests.conftest import real_data

HEADER = "source,question,answer,rating"


def shared_sudoku(name: str, limit: int):
    return read_sudoku_csv(real_data("sudoku", name), limit=limit)


def raw_rows(name: str, n: int) -> list[str]:
    """The first n data lines of a shared CSV, verbatim (official format, CRLF stripped)."""
    with open(real_data("sudoku", name), encoding="utf-8") as fh:
        lines = fh.read(200_000).splitlines()
    assert lines[0] == HEADER
    return lines[1 : n + 1]


# ------------------------------------------------------------------ independent checks (no code of the module)


def grids_valid(tokens: torch.Tensor) -> torch.Tensor:
    """(N,) bool: every row, column and box of each (N, 81) token grid sorts to the tokens 2..10."""
    g = tokens.reshape(-1, 9, 9)
    boxes = g.reshape(-1, 3, 3, 3, 3).permute(0, 1, 3, 2, 4).reshape(-1, 9, 9)
    want = torch.arange(2, 11)
    return torch.stack([(u.sort(dim=-1).values == want).all(-1).all(-1) for u in (g, g.transpose(1, 2), boxes)]).all(0)


def brute_count(puzzle: str, limit: int = 2) -> int:
    """Solutions of a puzzle string, up to limit: backtracking over sets, most-constrained cell first."""
    grid = [0 if ch == "." else int(ch) for ch in puzzle]

    def candidates(i: int) -> set[int]:
        r, c = divmod(i, 9)
        br, bc = r - r % 3, c - c % 3
        used = {grid[r * 9 + k] for k in range(9)} | {grid[k * 9 + c] for k in range(9)}
        used |= {grid[(br + a) * 9 + bc + b] for a in range(3) for b in range(3)}
        return set(range(1, 10)) - used

    def count() -> int:
        empties = [i for i in range(81) if grid[i] == 0]
        if not empties:
            return 1
        options = {i: candidates(i) for i in empties}
        cell = min(empties, key=lambda i: len(options[i]))
        total = 0
        for d in sorted(options[cell]):
            grid[cell] = d
            total += count()
            grid[cell] = 0
            if total >= limit:
                break
        return total

    return count()


# ------------------------------------------------------------------ encoding and checks


def test_encode_decode_round_trip():
    table = shared_sudoku("forum_hardest_1905.csv", 50)
    for q, a in zip(table.questions, table.answers):
        s = decode(q)
        assert len(s) == 81 and set(s) <= set(".123456789") and torch.equal(encode(s), q)
        assert encode(s).dtype == torch.long and encode(s).shape == (81,)
        assert torch.equal(encode(s.replace(".", "0")), q)  # '0' is a blank too
        assert torch.equal(encode(decode(a)), a) and "." not in decode(a)
    assert encode("." * 80 + "9").tolist() == [1] * 80 + [10]
    with pytest.raises(ValueError, match="81 characters"):
        encode("." * 80)
    with pytest.raises(ValueError, match="'x' at position 3"):
        encode("12x" + "." * 78)
    with pytest.raises(ValueError, match="token 0"):
        decode(torch.zeros(81, dtype=torch.long))


def test_is_valid_solution_and_consistent():
    table = shared_sudoku("seventeen_clue.csv", 20)
    for q, a in zip(table.questions, table.answers):
        assert is_valid_solution(a) and is_valid_solution(decode(a)) and not is_valid_solution(q)
        assert consistent(q, a) and consistent(decode(q), decode(a))
        broken = a.clone()
        broken[[0, 1]] = broken[[1, 0]]  # two different digits of row 1 swapped: columns break
        assert not is_valid_solution(broken)
        given = int(torch.nonzero(q > 1)[0])
        x = int(a[given])
        y = 2 if x != 2 else 3
        relabelled = torch.where(a == x, y, torch.where(a == y, x, a))  # swap two digits everywhere
        assert is_valid_solution(relabelled) and not consistent(q, relabelled)  # valid, but not this puzzle's


# ------------------------------------------------------------------ augmentation


def test_augmentation_keeps_grids_valid_and_consistent():
    tables = [shared_sudoku(name, 100) for name in ("forum_hardest_1905.csv", "seventeen_clue.csv")]
    questions = torch.cat([t.questions for t in tables])
    answers = torch.cat([t.answers for t in tables])
    n = len(questions)
    data = SudokuDataset(questions.to(torch.uint8), answers.to(torch.uint8), augment=True, seed=5)
    rounds = 8
    items = [data[key] for key in range(n * rounds)]
    q = torch.stack([item["inputs"] for item in items]).reshape(rounds, n, 81)
    a = torch.stack([item["labels"] for item in items]).reshape(rounds, n, 81)
    assert q.dtype == a.dtype == torch.long
    assert grids_valid(a.reshape(-1, 81)).all()
    assert ((q == 1) | (q == a)).all()  # every given agrees with the answer
    assert ((q == 1).sum(-1) == (questions == 1).sum(-1)).all()  # as many blanks as the original

    # the givens' digit histogram is the original's up to relabelling
    def histogram(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(x == t).sum(-1) for t in range(2, 11)], -1).sort(-1).values

    assert torch.equal(histogram(q), histogram(questions).expand(rounds, n, 9))
    changed = (q != questions).any(-1)
    assert changed.float().mean() > 0.99  # the identity is one of ~1.2e12 symmetries
    assert ((q[0] != q[1]).any(-1)).float().mean() > 0.99  # rounds differ
    assert torch.equal(data[3]["inputs"], q[0, 3])  # a key always gives the same augmentation
    plain = SudokuDataset(questions.to(torch.uint8), answers.to(torch.uint8), augment=False)
    assert torch.equal(plain[7]["inputs"], questions[7]) and torch.equal(plain[7]["labels"], answers[7])
    assert plain[7]["puzzle_identifiers"].shape == () and plain[7]["puzzle_identifiers"].item() == 0


def test_epoch_sampler_seeded_and_epoch_dependent():
    a, b = EpochSampler(10, repeats=3, seed=1), EpochSampler(10, repeats=3, seed=1)
    assert len(a) == 30 and list(a) == list(b) and sorted(a) == list(range(30))
    a.set_epoch(2)
    assert sorted(a) == list(range(60, 90)) and list(a) != [k + 60 for k in b]
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ generator


@pytest.mark.parametrize("num_givens", [26, 45])
def test_generated_puzzles_are_unique_with_the_requested_givens(num_givens):
    rows = generate_puzzles(12, num_givens, seed=3)
    assert len({q for q, _ in rows}) == 12
    for question, answer in rows:
        assert sum(ch != "." for ch in question) == num_givens
        assert brute_count(question) == 1
        assert is_valid_solution(answer) and consistent(question, answer)
        assert solve(question) == answer and count_solutions(question) == 1
    assert generate_puzzles(12, num_givens, seed=3) == rows
    assert generate_puzzles(12, num_givens, seed=4) != rows


def test_solver_counts_multiple_solutions():
    answer = decode(shared_sudoku("seventeen_clue.csv", 1).answers[0])
    # blank a "deadly rectangle": four cells in two rows, two columns and two boxes holding x/y, y/x
    for r1 in range(9):
        for r2 in range(r1 + 1, 9):
            if r1 // 3 == r2 // 3:
                continue  # rows in two bands, columns in one stack: each pair of cells shares a box
            for c1 in range(9):
                for c2 in range(c1 + 1, 9):
                    cells = [r1 * 9 + c1, r1 * 9 + c2, r2 * 9 + c1, r2 * 9 + c2]
                    if (
                        c1 // 3 == c2 // 3
                        and answer[cells[0]] == answer[cells[3]]
                        and answer[cells[1]] == answer[cells[2]]
                    ):
                        puzzle = "".join("." if i in cells else ch for i, ch in enumerate(answer))
                        assert count_solutions(puzzle) == 2 == brute_count(puzzle)
                        assert count_solutions(puzzle, limit=1) == 1
                        return
    pytest.fail("no deadly rectangle found in this (fixed) grid: the test lost its subject")


def small_generated(tmp_path, **kwargs) -> SudokuExtremeDataModule:
    defaults = dict(
        source="generate",
        data_dir=str(tmp_path / "data"),
        num_givens=30,
        n_train_generated=60,
        n_test_generated=20,
        num_train_puzzles=40,
        num_val=10,
        batch_size=16,
        seed=0,
    )
    defaults.update(kwargs)
    return SudokuExtremeDataModule(**defaults)


def test_generation_is_seeded_and_cached(tmp_path, monkeypatch):
    a, b = small_generated(tmp_path / "a"), small_generated(tmp_path / "b")
    a.setup(), b.setup()
    for split in ("train", "test"):
        path = a.generated_path(split)
        assert path.name == f"generated_g30_n{60 if split == 'train' else 20}_s0_{split}.csv"
        assert path.read_bytes() == b.generated_path(split).read_bytes()
        assert path.read_text().splitlines()[0] == HEADER
    train_questions = {decode(q) for q in read_sudoku_csv(a.generated_path("train")).questions}
    test_questions = {decode(q) for q in read_sudoku_csv(a.generated_path("test")).questions}
    assert not train_questions & test_questions and len(train_questions) == 60 and len(test_questions) == 20
    c = small_generated(tmp_path / "c", seed=1)
    c.setup()
    assert c.generated_path("train").read_bytes() != a.generated_path("train").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    real_generate = sudoku.generate_puzzles
    monkeypatch.setattr(sudoku, "generate_puzzles", refuse)
    again = small_generated(tmp_path / "a")
    again.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(again.splits[split].questions, a.splits[split].questions)
    assert not list((tmp_path / "a" / "data").glob("*.part"))
    monkeypatch.setattr(sudoku, "generate_puzzles", real_generate)
    stale = small_generated(tmp_path / "a", num_givens=31)
    stale.generated_path("train").write_bytes(a.generated_path("train").read_bytes())  # a cache that lies
    with pytest.raises(ValueError, match=r"generated_g31_n60_s0_train\.csv has a puzzle with 30 givens"):
        stale.setup()


# ------------------------------------------------------------------ real files


def test_read_shared_csvs_and_solve_them():
    start = time.perf_counter()
    full = {
        name: read_sudoku_csv(real_data("sudoku", name)) for name in ("forum_hardest_1905.csv", "seventeen_clue.csv")
    }
    elapsed = time.perf_counter() - start
    assert (
        len(full["forum_hardest_1905.csv"].questions) == 48_766 and len(full["seventeen_clue.csv"].questions) == 49_158
    )
    assert elapsed < 15, f"reading ~100k rows took {elapsed:.1f}s: validation is no longer vectorised?"
    for _name, table in full.items():
        assert table.questions.dtype == table.answers.dtype == torch.long and table.questions.shape[1] == 81
        assert (table.ratings == -1).all()  # no ratings in these files
        assert (
            grids_valid(table.answers[:5000]).all()
            and ((table.questions == 1) | (table.questions == table.answers)).all()
        )
    assert ((full["seventeen_clue.csv"].questions > 1).sum(-1) == 17).all()
    limited = shared_sudoku("forum_hardest_1905.csv", 3000)
    assert torch.equal(limited.questions, full["forum_hardest_1905.csv"].questions[:3000])
    for table in full.values():
        for i in range(0, 3000, 600):
            assert solve(table.questions[i]) == decode(table.answers[i])


# ------------------------------------------------------------------ malformed files


def swap_answer_cells(line: str) -> str:
    source, question, answer, rating = line.split(",")
    for i in range(80):  # two neighbours in a row, both blank in the question, different digits
        if i % 9 != 8 and question[i] == question[i + 1] == "." and answer[i] != answer[i + 1]:
            answer = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
            return ",".join((source, question, answer, rating))
    raise AssertionError("no pair to swap")


def relabel_answer(line: str) -> str:
    source, question, answer, rating = line.split(",")
    d = next(ch for ch in question if ch != ".")  # swap a given digit with another everywhere: valid, inconsistent
    e = "1" if d != "1" else "2"
    answer = answer.translate(str.maketrans({d: e, e: d}))
    return ",".join((source, question, answer, rating))


def replace_field(index: int, new) -> callable:
    def corrupt(line: str) -> str:
        fields = line.split(",")
        fields[index] = new(fields[index])
        return ",".join(fields)

    return corrupt


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (replace_field(1, lambda q: q[:-1]), "question has 80 characters"),
        (replace_field(2, lambda a: a + "1"), "answer has 82 characters"),
        (replace_field(1, lambda q: "x" + q[1:]), "question has character 'x' at position 1"),
        (replace_field(2, lambda a: a[:40] + "." + a[41:]), "answer has character '.' at position 41"),
        (replace_field(2, lambda a: a[:40] + "0" + a[41:]), "answer has character '0'"),
        (swap_answer_cells, "answer is not a valid sudoku solution: column"),
        (relabel_answer, "answer is inconsistent with the question"),
        (lambda line: line + ",extra", "5 columns, expected 4"),
        (replace_field(3, lambda r: "hard"), "rating 'hard'"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, corrupt, message):
    rows = raw_rows("forum_hardest_1905.csv", 4)
    path = tmp_path / "bad.csv"
    path.write_text("\r\n".join([HEADER, rows[0], rows[1], corrupt(rows[2]), rows[3]]) + "\r\n")
    with pytest.raises(ValueError, match=rf"bad\.csv, line 4: {message}"):
        read_sudoku_csv(path)
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    assert len(read_sudoku_csv(path).questions) == 4  # the uncorrupted file reads


def test_malformed_header_and_first_bad_line_wins(tmp_path):
    rows = raw_rows("seventeen_clue.csv", 3)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(["source,question,solution,rating", *rows]) + "\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 1: header is 'source,question,solution,rating'"):
        read_sudoku_csv(path)
    path.write_text("")
    with pytest.raises(ValueError, match=r"bad\.csv, line 1: the file is empty"):
        read_sudoku_csv(path)
    # a bad character on line 3 is found by the vectorised pass, a missing column on line 4 by the row loop:
    # the earlier line is reported
    bad_char = replace_field(1, lambda q: q[:10] + "?" + q[11:])(rows[1])
    path.write_text("\n".join([HEADER, rows[0], bad_char, "17_clue,only,three"]) + "\n")
    with pytest.raises(ValueError, match=r"line 3: question has character '\?'"):
        read_sudoku_csv(path)


def test_min_rating_and_limit(tmp_path):
    rows = raw_rows("forum_hardest_1905.csv", 4)
    path = tmp_path / "rated.csv"
    path.write_text("\n".join([HEADER] + [row + str(rating) for row, rating in zip(rows, (0, 7, 3, 12))]) + "\n")
    table = read_sudoku_csv(path, min_rating=5)
    assert table.ratings.tolist() == [7, 12] and torch.equal(table.questions[0], encode(rows[1].split(",")[1]))
    assert read_sudoku_csv(path, min_rating=5, limit=1).ratings.tolist() == [7]
    assert read_sudoku_csv(path, limit=3).ratings.tolist() == [0, 7, 3]
    with pytest.raises(ValueError, match=r"line 2: min_rating=1 was asked for, but this row has no rating"):
        read_sudoku_csv(real_data("sudoku", "seventeen_clue.csv"), min_rating=1)


# ------------------------------------------------------------------ missing files and the hub


def forbid_network(monkeypatch):
    def no_network(*args, **kwargs):
        pytest.fail("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def test_offline_missing_files_name_the_paths(tmp_path, monkeypatch):
    forbid_network(monkeypatch)  # conftest already sets REPROZOO_OFFLINE=1
    dm = SudokuExtremeDataModule(source="hub", data_dir=str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    text = str(info.value)
    for name in ("train.csv", "test.csv"):
        assert f"{name} at {tmp_path / 'd' / name}" in text
    assert "offline" in text and "sapientinc/sudoku-extreme" in text
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "train.csv").write_text(HEADER + "\n")
    with pytest.raises(FileNotFoundError) as info:
        SudokuExtremeDataModule(source="csv", data_dir=str(tmp_path / "d")).setup()
    assert f"test.csv at {tmp_path / 'd' / 'test.csv'}" in str(info.value) and "train.csv at" not in str(info.value)


def test_hub_download_is_atomic_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROZOO_OFFLINE", "0")
    hub = tmp_path / "hub"
    hub.mkdir()
    rows = raw_rows("seventeen_clue.csv", 30)
    (hub / "train.csv").write_text("\n".join([HEADER, *rows[:24]]) + "\n")
    (hub / "test.csv").write_text("\n".join([HEADER, *rows[24:]]) + "\n")
    data_dir = tmp_path / "data"
    real_urlopen = urllib.request.urlopen
    calls = []

    class Watched:
        """A response whose reads check that nothing has appeared under the destination name yet."""

        def __init__(self, url):
            self.inner, self.dest = real_urlopen(url), data_dir / url.rsplit("/", 1)[1]

        def read(self, n=-1):
            assert not self.dest.exists(), "the download was written in place"
            return self.inner.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

    def watched_urlopen(url, timeout=None):
        calls.append(url)
        return Watched(url)

    monkeypatch.setattr(urllib.request, "urlopen", watched_urlopen)
    kwargs = dict(
        source="hub", data_dir=str(data_dir), hub_url=hub.as_uri(), num_train_puzzles=20, num_val=4, batch_size=8
    )
    dm = SudokuExtremeDataModule(**kwargs)
    dm.setup()
    assert calls == [f"{hub.as_uri()}/train.csv", f"{hub.as_uri()}/test.csv"]
    for name in ("train.csv", "test.csv"):
        assert (data_dir / name).read_bytes() == (hub / name).read_bytes()
        digest = hashlib.sha256((hub / name).read_bytes()).hexdigest()
        assert (data_dir / f"{name}.sha256").read_text().split()[0] == digest
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "test.csv",
        "test.csv.sha256",
        "train.csv",
        "train.csv.sha256",
    ]
    assert len(dm.splits["train"]) == 20 and len(dm.splits["val"]) == 4 and len(dm.splits["test"]) == 6
    SudokuExtremeDataModule(**kwargs).setup()
    assert len(calls) == 2  # present and verified: not downloaded again
    with open(data_dir / "test.csv", "a") as fh:
        fh.write(rows[0] + "\n")  # changed after the download
    with pytest.raises(ValueError, match=r"test\.csv has sha256 .* recorded .* when it was downloaded"):
        SudokuExtremeDataModule(**kwargs).setup()


def test_hub_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROZOO_OFFLINE", "0")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.csv").write_text("<html>not found</html>\n")  # an error page served as the file
    data_dir = tmp_path / "data"
    dm = SudokuExtremeDataModule(source="hub", data_dir=str(data_dir), hub_url=hub.as_uri())
    with pytest.raises(FileNotFoundError, match=r"could not download .*train\.csv: .*header") as info:
        dm.setup()
    assert f"train.csv at {data_dir / 'train.csv'}" in str(info.value)
    assert list(data_dir.iterdir()) == []  # no partial file, no record
    (hub / "train.csv").write_text(HEADER + "\n")
    with pytest.raises(FileNotFoundError, match=r"could not download .*test\.csv"):
        dm.setup()  # test.csv is absent from the hub
    assert sorted(p.name for p in data_dir.iterdir()) == ["train.csv", "train.csv.sha256"]


# ------------------------------------------------------------------ the datamodule


def test_splits_are_seeded_disjoint_and_batched(tmp_path):
    def make(seed=0, **kwargs):
        dm = SudokuExtremeDataModule(
            source="csv",
            train_file=str(real_data("sudoku", "forum_hardest_1905.csv")),
            test_file=str(real_data("sudoku", "seventeen_clue.csv")),
            data_dir=str(tmp_path),
            num_train_puzzles=1000,
            num_val=200,
            limit_test=300,
            batch_size=64,
            seed=seed,
            **kwargs,
        )
        dm.setup()
        return dm

    a, b, c = make(), make(), make(seed=1)
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split].questions, b.splits[split].questions)
    assert not torch.equal(a.splits["train"].questions, c.splits["train"].questions)
    assert torch.equal(a.splits["test"].questions, c.splits["test"].questions)  # the test split is untouched
    assert len(a.splits["train"]) == 1000 and len(a.splits["val"]) == 200 and len(a.splits["test"]) == 300
    assert a.val_source == "train"
    train_keys = {row.numpy().tobytes() for row in a.splits["train"].questions}
    assert len(train_keys) == 1000 and not train_keys & {row.numpy().tobytes() for row in a.splits["val"].questions}
    first = read_sudoku_csv(real_data("sudoku", "seventeen_clue.csv"), limit=300)
    assert torch.equal(a.splits["test"].questions.long(), first.questions)

    loader = a.train_dataloader()
    batches = list(loader)
    assert (
        len(batches) == 15 and sum(len(x["inputs"]) for x in batches) == 960
    )  # drop_last: the carry needs full batches
    batch = batches[0]
    assert batch["inputs"].shape == batch["labels"].shape == (64, 81) and batch["puzzle_identifiers"].shape == (64,)
    assert batch["inputs"].dtype == batch["labels"].dtype == batch["puzzle_identifiers"].dtype == torch.long
    assert (batch["puzzle_identifiers"] == 0).all() and grids_valid(batch["labels"]).all()
    assert torch.equal(next(iter(b.train_dataloader()))["inputs"], batch["inputs"])  # reproducible
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["inputs"], batch["inputs"])  # a new epoch, new order and symmetries
    for loader in (a.val_dataloader(), a.test_dataloader(), a.predict_dataloader()):
        x = next(iter(loader))
        assert x["inputs"].shape == (64, 81) and ((x["inputs"] == 1) | (x["inputs"] == x["labels"])).all()
    assert torch.equal(next(iter(a.predict_dataloader()))["inputs"], first.questions[:64])  # not augmented

    repeated = make(train_repeats=3)
    assert len(repeated.train_dataloader().sampler) == 3000


def test_val_falls_back_to_test_and_too_many_puzzles(tmp_path):
    dm = small_generated(tmp_path, num_train_puzzles=None)
    dm.setup()
    assert dm.val_source == "test" and len(dm.splits["train"]) == 60 and len(dm.splits["val"]) == 10
    test_keys = {row.numpy().tobytes() for row in dm.splits["test"].questions}
    assert all(row.numpy().tobytes() in test_keys for row in dm.splits["val"].questions)
    with pytest.raises(ValueError, match="num_train_puzzles=61"):
        small_generated(tmp_path, num_train_puzzles=61).setup()
    with pytest.raises(ValueError, match="num_val=25"):
        small_generated(tmp_path, num_train_puzzles=50, num_val=25).setup()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_givens": 16}, "num_givens"),
        ({"num_givens": 81}, "num_givens"),
        ({"batch_size": 0}, "batch_size"),
        ({"source": "web"}, "source"),
        ({"num_val": -1}, "num_val"),
        ({"num_train_puzzles": 0}, "num_train_puzzles"),
        ({"n_train_generated": 0}, "n_train_generated"),
        ({"train_repeats": 0}, "train_repeats"),
        ({"limit_test": 0}, "limit_test"),
        ({"min_rating": 3}, "min_rating"),
        ({"source": "hub", "train_file": "x.csv"}, "train_file"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SudokuExtremeDataModule(**kwargs)


def test_lightning_advances_the_epoch_reproducibly(tmp_path):
    """The Trainer calls set_epoch on the train sampler: each epoch sees new symmetries, the same in every run."""
    import lightning as L

    class Record(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(81, 1)
            self.first_items = []

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.first_items.append(batch["inputs"][0].clone())
            return self.layer(batch["inputs"].float()).mean()

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def run() -> list[torch.Tensor]:
        model = Record()
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=3,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, small_generated(tmp_path))
        return model.first_items

    first, second = run(), run()
    assert len(first) == 3 and all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
