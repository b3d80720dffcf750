"""The one place that reads jsonargparse's error text: an ``ArgumentError`` message as fields.

Why text: jsonargparse (4.53 and earlier) raises ``argparse.ArgumentError(None, message)``
with nothing structured on it. The key, the value given and the class a ``class_path``
names exist only inside the English message, and its ``__cause__`` chain follows the *last*
member of a ``Union`` that failed (``NoneType`` on jsonargparse < 4.51), not the one that
explains the mistake. So the message is read here, and nowhere else: everything the CLI
says about a bad config is built from the :class:`ParseProblem` this module returns.

When jsonargparse changes its wording, ``tests/test_cli_jsonargparse_errors.py`` fails (it
feeds real errors of the installed jsonargparse through :func:`read_parse_error` and
:func:`read_group_error`); a message this module does not recognise is shown to the user in
jsonargparse's own words, never dropped.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["unknown_key", "config", "unknown_init_arg", "bad_init_arg", "bad_class", "bad_value"]

# jsonargparse's phrases, one constant each.
_UNKNOWN_OPTION = re.compile(r"does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"nrecognized arguments: (\S+)(?: (\S+))?")
_PARSER_KEY = re.compile(r'\s*Parser key "([^"]+)":\s*(.*)', re.DOTALL)
_NESTED_PARSER_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)', re.DOTALL)
_CLASS_PATH_PROBLEM = re.compile(r"^([ \t]*)(?:- )?Problem with given class_path '([^']+)':[ \t]*(.*)$", re.MULTILINE)
_NOT_ACCEPTED = re.compile(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)")
_GROUP_NOT_ACCEPTED = re.compile(
    r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)|does not accept (?:option|nested key) '([^']+)'"
)
_GOT_VALUE = re.compile(r"Got value: (.*)")
_GIVEN_VALUE = re.compile(r"Given value: (.*)")
_NESTED_ARG = re.compile(r"NestedArg\(key='[^']*', val=(.*)\)$")
_NOT_A_CLASS = re.compile(
    r"Expected a path but|dot import path|does not correspond to a subclass|Not a valid subclass|"
    r"not a valid class_path|No module named|has no attribute"
)
_NOT_A_CLASS_REASON = re.compile(
    r"(does not correspond to a subclass of \w+|No module named [^\n]+|has no attribute [^\n]+)"
)


@dataclass(frozen=True)
class ParseProblem:
    """What one jsonargparse error says.

    Attributes:
        kind: ``unknown_key`` (an option no parser declares), ``config`` (the ``--config``
            file itself), ``unknown_init_arg`` / ``bad_init_arg`` (an argument of the class
            ``class_path`` names: not in its signature / of the wrong type), ``bad_class``
            (``class_path`` names no suitable class), ``bad_value`` (a value of the wrong type).
        key: the key as the user wrote it (``trainer.max_epoch``), or the section holding
            the class (``module``, ``trainer.callbacks``).
        value: the value given, when the message shows it.
        class_path: the class named, for the class kinds.
        name: the ``__init__`` argument, for the init-arg kinds.
        reason: jsonargparse's own words for the cause (an import error, the file problem).
    """

    kind: Kind
    key: str = ""
    value: Any = None
    class_path: Any = None
    name: str = ""
    reason: str = ""


def read_parse_error(message: str) -> ParseProblem | None:
    """The problem an error of ``parse_args`` describes, or None for a message of another shape."""
    unknown = _UNKNOWN_OPTION.search(message) or _UNRECOGNIZED.search(message)
    if unknown:
        key = unknown.group(1).lstrip("-")
        value = unknown.group(2) if unknown.lastindex and unknown.lastindex >= 2 else None
        if "=" in key:
            key, value = key.split("=", 1)
        return ParseProblem("unknown_key", key=key, value=value)
    head = _PARSER_KEY.match(message)
    if not head:
        return None
    key, body = head.group(1), head.group(2)
    if key == "config":
        return ParseProblem("config", key=key, reason=body.strip())
    given = _given_value(body)
    problem = _class_path_problem(body)
    if problem:
        class_path, inner = problem
        first_line = inner.splitlines()[0].strip() if inner else ""
        bad_option = _NOT_ACCEPTED.search(inner)
        nested = _NESTED_PARSER_KEY.search(inner)
        if bad_option:
            name = bad_option.group(1)
            return ParseProblem("unknown_init_arg", key, _init_arg_value(given, name), class_path, name, first_line)
        if nested:
            name = nested.group(1)
            got = _GOT_VALUE.search(nested.group(2))
            value = got.group(1).strip() if got else _init_arg_value(given, name)
            return ParseProblem("bad_init_arg", key, value, class_path, name, first_line)
        return ParseProblem("bad_class", key, class_path=class_path, reason=first_line)
    if _NOT_A_CLASS.search(body):
        cause = _NOT_A_CLASS_REASON.search(body)
        named = given.get("class_path") if isinstance(given, dict) else given
        return ParseProblem("bad_class", key, class_path=named, reason=cause.group(1) if cause else "")
    got = _GOT_VALUE.search(body)
    return ParseProblem("bad_value", key, value=got.group(1).strip() if got and given is None else given)


def read_group_error(message: str) -> ParseProblem | None:
    """The problem an error of a class group's ``parse_object`` describes (its ``init_args``).

    ``key`` is left empty and ``name`` is the argument; the value is the text the message shows.
    """
    bad_option = _GROUP_NOT_ACCEPTED.search(message)
    if bad_option:
        return ParseProblem("unknown_init_arg", name=(bad_option.group(1) or bad_option.group(2)).rpartition(".")[2])
    nested = _NESTED_PARSER_KEY.search(message)
    if nested:
        got = _GOT_VALUE.search(nested.group(2)) or _GIVEN_VALUE.search(nested.group(2))
        return ParseProblem("bad_init_arg", value=got.group(1).strip() if got else "?",
                            name=nested.group(1).rpartition(".")[2])
    return None


def _class_path_problem(body: str) -> tuple[str, str] | None:
    """``(class_path, the lines indented under it)`` of a "Problem with given class_path" entry.

    The entry is one member of a ``Union``'s error list; its lines end where the indentation
    returns to the list's level, whatever member comes next (the order changed in 4.51).
    """
    found = _CLASS_PATH_PROBLEM.search(body)
    if not found:
        return None
    indent = len(found.group(1))
    block = [found.group(3)]
    for line in body[found.end():].split("\n")[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line)
    return found.group(2), "\n".join(block).strip()


def _given_value(body: str) -> Any:
    found = _GIVEN_VALUE.findall(body)
    if not found:
        return None
    text = found[-1].strip()
    nested = _NESTED_ARG.match(text)
    if nested:
        text = nested.group(1)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _init_arg_value(given: Any, name: str) -> Any:
    if isinstance(given, dict):
        return (given.get("init_args") or {}).get(name, given.get(name))
    return given
