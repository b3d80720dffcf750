"""What a user reads when a command line or config is wrong: the key, the value, what is allowed.

jsonargparse's own messages name a parser key and list the ``Union`` members it tried
(``Does not validate against any of the Union subtypes ... Expected a <class 'NoneType'>``).
This module turns them, once read into fields by :mod:`.jsonargparse_errors`, into one line
that names the key as the user wrote it, the value received and the allowed values (the
keys of that level with a close match, the type of the argument, the subclasses of the
expected base), and names the real cause when a user module fails to import.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pydoc
import traceback
import typing
from collections.abc import Callable
from typing import Any, Literal

from ..trainer import Trainer
from .jsonargparse_errors import ParseProblem, read_group_error, read_parse_error

PROG = "accel-trainer"

# The class a class_path of each key must subclass, and an example of one (for "allowed").
_BASES = {
    "module": "accel_trainer.TrainingModule",
    "data": "accel_trainer.DataModule",
    "optimizer": "torch.optim.Optimizer",
    "trainer.callbacks": "accel_trainer.Callback",
}
_EXAMPLES = {
    "module": "accel_trainer.examples.digits.DigitsClassifier",
    "data": "accel_trainer.examples.digits.DigitsDataModule",
    "optimizer": "torch.optim.Adam",
    "trainer.callbacks": "accel_trainer.callbacks.EarlyStopping",
}


class CLIError(Exception):
    """A user error found by the CLI: printed without a traceback, exit status 2."""


def explain_parse_error(message: str, command: str | None, parser: Any, declared_type: Callable[[str], Any]) -> str:
    """Turn a jsonargparse error of ``command``'s ``parser`` into one line: key, value received, allowed.

    ``declared_type(key)`` is the type a key of the command line was declared with. Falls
    back to jsonargparse's own message when it has an unfamiliar shape.
    """
    try:
        problem = read_parse_error(message)
        summary = _summarise(problem, parser, declared_type) if problem is not None and parser is not None else None
    except Exception:  # noqa: BLE001 -- a message shape we do not know: jsonargparse's own words are still right
        summary = None
    if summary is None:
        return message.strip()
    return f"{summary}\n(`{PROG} {command} --help` lists every key; `--module.help CLASS` the arguments of a class.)"


def explain_init_args_error(message: str, key: str, cls: type) -> str:
    """A jsonargparse error from checking the arguments of ``cls`` (the lr_scheduler's) as one line."""
    problem = read_group_error(message)
    if problem is not None and problem.kind == "unknown_init_arg":
        allowed = signature_names(cls, skip={"optimizer"})
        return unknown_key(f"{key}.{problem.name}", None, allowed, f"{key} ({cls.__name__})")
    if problem is not None:
        name = problem.name
        return (f"{key}.{name}: received {problem.value!r}; allowed: {param_type(cls, name)} "
                f"(the type of {name} in {cls.__name__}).")
    return f"{key}: {message.strip()}"


def _summarise(problem: ParseProblem, parser: Any, declared_type: Callable[[str], Any]) -> str:
    """The one line for ``problem``: what jsonargparse named, completed from the parser and the classes."""
    key, value = problem.key, problem.value
    if problem.kind == "unknown_key":
        top = key.split(".")[0]
        sections = [k for k in _parser_keys(parser, "") if k != "config"]
        if "." in key and top not in sections:
            # an unknown top-level section (trainr:): name it, not the keys under it
            return unknown_key(top, None, sections, "") + f" (It holds {key}.)"
        where = key.rpartition(".")[0]
        return unknown_key(key, value, _parser_keys(parser, where), where)
    if problem.kind == "config":
        return f"--config: {problem.reason}"
    cls = locate(problem.class_path) if problem.kind in ("unknown_init_arg", "bad_init_arg") else None
    if problem.kind == "unknown_init_arg" and cls is not None:
        allowed = signature_names(cls, skip={"params"} if key == "optimizer" else set())
        return unknown_key(f"{key}.init_args.{problem.name}", value, allowed, f"{key}.init_args ({cls.__name__})")
    if problem.kind == "bad_init_arg" and cls is not None:
        name = problem.name
        return (
            f"{key}.init_args.{name}: received {show(value)}; allowed: {param_type(cls, name)} "
            f"(the type of {name} in {cls.__name__})."
        )
    if problem.kind != "bad_value":
        return _bad_class(key, problem.class_path, problem.reason)
    if key.startswith("trainer."):
        return f"{key}: received {show(value)}; allowed: {param_type(Trainer, key.partition('.')[2])}."
    hint = declared_type(key)
    return f"{key}: received {show(value)}; allowed: {'see --help' if hint is None else describe_type(hint)}."


def unknown_key(key: str, value: Any, allowed: list[str], where: str) -> str:
    """``key: unknown key (received ...). Allowed under where: ... Did you mean ...?``"""
    leaf = key.rpartition(".")[2]
    received = f" (received {key}={show(value)})" if value is not None else ""
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" Did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    scope = f"under {where}" if where else "at the top level"
    return f"{key}: unknown key{received}. Allowed {scope}: {', '.join(allowed) or '(none)'}.{hint}"


def _bad_class(key: str, class_path: Any, reason: str) -> str:
    base = _BASES.get(key, "the expected base class")
    broken = import_failure(class_path) if isinstance(class_path, str) else None
    if broken:
        return f"{key}.class_path: received {show(class_path)}, but {broken}. Fix that module, then run again."
    suggestion = ""
    if isinstance(class_path, str) and "." in class_path:
        candidates = classes_in(class_path.rpartition(".")[0], locate(base) if base in _BASES.values() else None)
        close = difflib.get_close_matches(class_path.rpartition(".")[2], candidates, n=1)
        if close:
            suggestion = f" Did you mean {class_path.rpartition('.')[0]}.{close[0]}?"
    reason = f" ({reason.rstrip('.')})" if reason else ""
    return (
        f"{key}.class_path: received {show(class_path)}{reason}; allowed: the import path of a subclass of "
        f"{base}, e.g. {_EXAMPLES.get(key, 'package.module.ClassName')}.{suggestion}"
    )


def _parser_keys(parser: Any, prefix: str) -> list[str]:
    """The keys ``parser`` accepts directly under ``prefix`` ("" for the top level), in declaration order."""
    keys: list[str] = []
    for key in list(parser.get_defaults().keys()):  # a Namespace: keys() are the dotted leaves
        if prefix:
            if not key.startswith(prefix + "."):
                continue
            key = key[len(prefix) + 1 :]
        name = key.split(".")[0]
        if name not in keys:
            keys.append(name)
    return keys


def show(value: Any) -> str:
    """A received value as the user typed it: strings quoted, anything else as is."""
    return repr(value) if isinstance(value, str) else str(value)


def param_type(cls: type, name: str) -> str:
    """The type of ``cls``'s ``__init__`` argument ``name``, as a user reads it."""
    try:
        hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    except Exception:  # noqa: BLE001 -- an annotation that does not resolve at run time: read it as written
        hints = {}
    if name in hints:
        return describe_type(hints[name])
    try:
        annotation = inspect.signature(cls).parameters[name].annotation
    except (KeyError, TypeError, ValueError):
        return "see --help"
    return "any value" if annotation is inspect.Parameter.empty else describe_type(annotation)


def describe_type(hint: Any) -> str:
    """``int | None``, ``one of 'epoch', 'step'``, ``float``: a type as a user reads it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return " | ".join(describe_type(a) for a in args)
    if hint is type(None):
        return "None"
    if hint is Any:
        return "any value"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def signature_names(cls: type, skip: typing.AbstractSet[str] = frozenset()) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, in order, without ``skip``."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def locate(class_path: Any) -> Any:
    """The object a dotted ``package.module.Name`` (or ``...Outer.Inner``) path names, or None."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    try:
        return pydoc.locate(class_path)
    except pydoc.ErrorDuringImport:  # the module raised while importing: import_failure says why
        return None


def classes_in(module_path: str, base: Any) -> list[str]:
    """The names of the classes (subclasses of ``base`` when given) a module defines or imports."""
    try:
        module = importlib.import_module(module_path)
    except Exception:  # noqa: BLE001 -- a module that does not import has no classes to suggest
        return []
    return [
        name for name, obj in vars(module).items()
        if isinstance(obj, type) and (base is None or (isinstance(base, type) and issubclass(obj, base)))
    ]


def import_failure(class_path: str) -> str | None:
    """Why importing ``class_path``'s module fails inside the user's own code, or None.

    None means the module or class simply does not exist (the usual "allowed: ..." message
    fits). Anything else -- a SyntaxError, an import the module itself makes that fails, an
    exception raised at import time -- is the real cause, and is named with its file and line.
    """
    parts = class_path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:split])
        try:
            importlib.import_module(name)
            return None
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # this prefix is not a module: try a shorter one (Outer.Inner classes)
            return f"importing {name} failed: ModuleNotFoundError: {err}"
        except SyntaxError as err:
            where = f"{err.filename}, line {err.lineno}" if err.filename else f"line {err.lineno}"
            text = f": {err.text.strip()}" if err.text and err.text.strip() else ""
            return f"importing {name} failed: {type(err).__name__}: {err.msg} ({where}){text}"
        except Exception as err:  # noqa: BLE001 -- whatever the user's module raises is the cause to name
            frames = traceback.extract_tb(err.__traceback__)
            user = [f for f in frames if "importlib" not in f.filename]
            where = f" ({user[-1].filename}, line {user[-1].lineno})" if user else ""
            return f"importing {name} failed: {type(err).__name__}: {err}{where}"
    return None
