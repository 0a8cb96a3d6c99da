"""User errors of the command line: which exceptions are the user's (a bad option or value, config file, data
file, checkpoint, zoo name, a refused resume, a non-finite loss) rather than bugs, and jsonargparse's error trees
turned into one ``error: ...`` line with a hint."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from argparse import ArgumentError
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from reprozoo import _checks
from reprozoo.zoo import registry

DEBUG_ENV = "REPROZOO_DEBUG"
_PHASE = "_reprozoo_phase"  # set on an exception: where in the run it was raised ("config", "setup" or "run")


class ResumeError(ValueError):
    """``--ckpt_path`` cannot resume as asked: nothing to resume, or the config contradicts the checkpoint."""


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


@rank_zero_only
def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _mark(err: BaseException, phase: str) -> None:
    try:
        setattr(err, _PHASE, phase)
    except AttributeError:  # an exception type with __slots__: left unmarked (treated as a bug)
        pass


def _unwrap_union_error(err: BaseException) -> BaseException:
    """The exception a class raised while jsonargparse instantiated it: jsonargparse wraps it in a ValueError that
    lists every type the option allows (``Union[LightningModule, None]``), raised from the first one's error."""
    while (
        isinstance(err, ValueError)
        and str(err).startswith("Does not validate against any of the Union subtypes")
        and isinstance(err.__cause__, Exception)
        and not str(err.__cause__).startswith("Expected a ")
    ):
        err = err.__cause__
    return err


def _raised_by_data_code(err: BaseException) -> bool:
    """Whether ``err`` was raised by a reprozoo datamodule (its data checks, e.g. an image read lazily)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("reprozoo.datamodules")


def _is_user_error(err: BaseException) -> bool:
    """A problem with the input (config, command line, data, checkpoint, zoo file) rather than a bug.

    These types are only raised about input; ValueError and OSError count while the config is turned into objects
    or the trainer sets up (data files, checkpoint restore), later only from our datamodules' data checks."""
    if isinstance(
        err,
        (
            ArgumentError,
            ResumeError,
            _checks.CheckpointError,
            registry.WeightsError,
            FloatingPointError,
            MisconfigurationException,
        ),
    ):
        return True
    phase = getattr(err, _PHASE, None)
    if isinstance(err, (ValueError, OSError)):
        return phase in ("config", "setup") or (phase == "run" and _raised_by_data_code(err))
    return phase == "setup" and isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict")


def _user_message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return (
            f"the checkpoint's weights do not fit the model the config builds: {' '.join(lines[:2])}{more}. A config "
            "value that changes the architecture cannot be applied to a checkpoint: drop it, or use a checkpoint of "
            "this architecture"
        )
    if isinstance(err, ArgumentError):
        return _argument_message(text, None)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _refuse_arguments(message: str, err: BaseException | None = None):
    """A parse error: one line on stderr and exit status 2 (REPROZOO_DEBUG=1: jsonargparse's exception)."""
    if _debug():
        raise ArgumentError(None, message) from err
    if message.startswith("--config:") and "does not exist" in message:
        message += " (neither here nor among the configs shipped with reprozoo: `python cli.py configs` lists those)"
    _say(f"error: {message}")
    raise SystemExit(2)


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Expected a path but",  # every class option also takes a config file's path
    "Expected a <class 'NoneType'>",
)
_GROUPS = {"trainer": L.Trainer, "checkpoint": ModelCheckpoint}
_TOP_LEVEL = [
    "trainer",
    "model",
    "data",
    "checkpoint",
    "optimizer",
    "lr_scheduler",
    "ckpt_path",
    "seed_everything",
    "test_after_fit",
    "config",
    "print_config",
]


def _argument_message(message: str, subcommand: str | None) -> str:
    """jsonargparse's error (a tree of the alternatives it tried for every key) as one line: the deepest key that
    failed, what it expected and what it got, and for an unknown option the closest known one."""
    first = message.strip().splitlines()[0] if message.strip() else message
    if first.startswith("unrecognized arguments:"):
        words = first.split(":", 1)[1].split()
        if words and words[0] == subcommand:
            words = words[1:]
        hints = [h for h in map(_suggest_option, (w for w in words if w.startswith("--"))) if h]
        help_cmd = f"python cli.py {subcommand or 'fit'} --help"
        hint = f"; did you mean {' / '.join(hints)}?" if hints else ""
        return f"unrecognized arguments: {' '.join(words)}{hint} (`{help_cmd}` lists the options)"
    stack: list[tuple[int, str, str]] = []  # (indent, "key" or "class", name)
    leaves: list[tuple[int, str, str | None, bool, str]] = []  # (depth, key, class path, directly under it, text)
    given: dict[str, str] = {}
    for raw in message.splitlines():
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip()) + (2 if text.startswith("- ") else 0)
        text = text.removeprefix("- ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        for kind, pattern in (
            ("key", r'Parser key "([^"]+)":\s*(.*)'),
            ("class", r"Problem with given class_path '([^']+)':\s*(.*)"),
        ):
            match = re.fullmatch(pattern, text)
            if match:
                stack.append((indent, kind, match[1]))
                text = match[2]
                break
        if not text or text.startswith(_NOISE):
            continue
        key = ".".join(name if kind == "key" else "init_args" for _, kind, name in stack)
        if text.startswith("Given value:"):
            given.setdefault(key, text.split(":", 1)[1].strip())
            continue
        class_path = next((name for _, kind, name in reversed(stack) if kind == "class"), None)
        leaves.append((len(stack), key, class_path, bool(stack) and stack[-1][1] == "class", text))
    if not leaves:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    depth = max(leaf[0] for leaf in leaves)
    shown, expected, key = [], [], ""
    for _, key, class_path, under_class, text in (leaf for leaf in leaves if leaf[0] == depth):
        line = _leaf_message(key, class_path, under_class, text, expected)
        if line and line not in shown:
            shown.append(line)
    if expected:
        got = given.get(key)
        shown.append(f"--{key}: expected {' or '.join(dict.fromkeys(expected))}" + (f", got {got!r}" if got else ""))
    return "; ".join(shown)


def _leaf_message(key: str, class_path: str | None, under_class: bool, text: str, expected: list[str]) -> str | None:
    option = re.fullmatch(r"Option '([^']+)' is not accepted", text)
    if option and class_path:
        name, class_key = option[1], key.removesuffix(".init_args")
        cls, short = _import(class_path), class_path.rsplit(".", 1)[-1]
        known = list(inspect.signature(cls).parameters) if cls is not None else []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"--{key}.{name}: {short} has no option {name!r}{hint} (`--{class_key}.help {short}` lists them)"
    got = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", text, flags=re.DOTALL)
    if got:
        return f"--{key}: expected {_type_name(got[1])}, got {got[2]!r}"
    alternative = re.fullmatch(r"Expected a (.+)", text)
    if alternative:
        expected.append(_type_name(alternative[1]))
        return None
    if under_class and class_path:
        return f"--{key.removesuffix('.init_args')}: cannot use class_path {class_path!r}: {text}"
    return f"--{key}: {text}" if key else text


def _type_name(text: str) -> str:
    simple = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", text)
    if simple:
        return simple[1]
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    return f"one of {literal[1]}" if literal else text


def _import(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _suggest_option(word: str) -> str | None:
    """The closest known option to an unrecognised ``--head.tail``: a top-level group, or a Trainer /
    ModelCheckpoint argument (the model's and data's options are checked by their class, with hints)."""
    head, dot, tail = word[2:].split("=", 1)[0].partition(".")
    if head not in _TOP_LEVEL:
        close = difflib.get_close_matches(head, _TOP_LEVEL, n=1)
        return f"--{close[0]}{dot}{tail}" if close else None
    if head in _GROUPS and tail:
        close = difflib.get_close_matches(tail, list(inspect.signature(_GROUPS[head]).parameters), n=1)
        return f"--{head}.{close[0]}" if close else None
    return None


def _config_files(words: list) -> list[str]:
    """The existing files given to ``--config`` / ``-c`` (a config may also be given inline, as YAML text)."""
    found = []
    for i, word in enumerate(map(str, words)):
        value = None
        if word in ("--config", "-c") and i + 1 < len(words):
            value = str(words[i + 1])
        elif word.startswith("--config="):
            value = word.split("=", 1)[1]
        if value is not None and os.path.isfile(value):
            found.append(value)
    return found


def _yaml_problem(path: str) -> str | None:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            yaml.compose(fh, Loader=yaml.SafeLoader)  # syntax only: no tags are constructed
    except yaml.MarkedYAMLError as err:
        where = f"line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}" if err.problem_mark else ""
        context = ""
        if err.context and err.context_mark:
            context = f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
        return f"config file {path} is not valid YAML: {where}: {err.problem}{context}"
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        return f"config file {path} is not valid YAML: {' '.join(str(err).split())}"
    return None
