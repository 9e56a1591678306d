"""Checks of command-line input that run before anything is loaded, read or computed.

* :class:`CLIError`: a refusal with a one-line message for the user (``covsvd VERB: error: ...``, exit 1).
* :func:`positive_int`: an argparse ``type`` for counts and sizes (``--r``, ``--seq-len``, ``--max-tokens``).
* :func:`target_spec`: ``--targets`` values -> a :func:`covsvd.find_targets` spec, following peft's
  ``target_modules``: module names (a list) or one regular expression (a string).
* :func:`check_input` / :func:`check_output`: an input file exists; an output path can be written (its type,
  an existing entry, the directory it is created in).

Only the standard library is imported, so the parser stays instant.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: A module name as peft's ``target_modules`` lists it: word characters, optionally dotted (``q_proj``,
#: ``mlp.down_proj``, ``model.layers.0.self_attn.q_proj``). Anything else given alone is a regex.
NAME = re.compile(r"\w+(?:\.\w+)*")


class CLIError(Exception):
    """A refusal with a message for the user (printed on stderr as one line; exit status 1)."""


def positive_int(text: str) -> int:
    """``int(text)`` when it is 1 or more; else ``argparse.ArgumentTypeError`` (argparse exits 2 with it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give a whole number, 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive: give 1 or more")
    return value


def target_spec(values: Sequence[str] | None) -> list[str] | str | None:
    """The :func:`covsvd.find_targets` spec for ``--targets VALUE ...``.

    ``None`` (not given) -> ``None`` (the default targets). Values that are all module names (:data:`NAME`)
    -> that list (peft's convention: every module whose full name is one of them or ends with ``"." + name``;
    one bare name is a list of one, so ``--targets q_proj`` selects every ``*.q_proj``). One value with any
    other character -> that string, a regex matched against the full name (``re.fullmatch``). Raises
    :class:`CLIError` for a regex that does not compile and for a regex given beside other values.
    """
    if values is None:
        return None
    values = list(values)
    not_names = [v for v in values if not NAME.fullmatch(v)]
    if not not_names:
        return values
    if len(values) > 1:
        raise CLIError(f"--targets {not_names[0]!r} is not a module name (letters, digits, '_' and '.'): give one "
                       "regular expression alone, or module names such as --targets q_proj v_proj")
    try:
        re.compile(values[0])
    except re.error as e:
        raise CLIError(f"--targets {values[0]!r} is not a valid regular expression ({e}): fix it, or give module "
                       "names such as --targets q_proj v_proj") from None
    return values[0]


def check_input(path: str | os.PathLike | None, flag: str) -> None:
    """Raise :class:`CLIError` unless ``path`` (when given) is an existing file."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{flag} {path}: no such file: check the path")
    if not path.is_file():
        raise CLIError(f"{flag} {path} is {'a directory' if path.is_dir() else 'not a regular file'}: give a file")


def check_output(path: str | os.PathLike, flag: str, *, directory: bool = False, overwrite: bool = False,
                 reuse: bool = False) -> Path:
    """Refuse an output ``path`` that the run could not write, before the run starts; returns ``Path(path)``.

    ``directory``: the output is a directory (else a file); an existing entry of the other type is refused.
    An existing entry of the right type is refused unless ``overwrite`` (the writer replaces it) or ``reuse``
    (the writer adds files inside it, e.g. ``--moments-dir``). The directory the writer creates its entries
    in (the path itself when reused, else its parent, or the nearest existing ancestor when the writer has
    parents to create) must be a directory this process can write: ``os.access(W_OK | X_OK)``, and an unnamed
    temporary file created and closed there (root passes ``os.access`` in places it cannot write, such as
    ``/proc`` and ``/sys``). Raises :class:`CLIError` naming the path and the fix.
    """
    path = Path(path)
    want = "directory" if directory else "file"
    if path.exists():
        if path.is_dir() != directory:
            have = "a directory" if path.is_dir() else "a file"
            raise CLIError(f"{flag} {path} is {have}, but {flag} names a {want} here: choose another {flag}")
        if not (overwrite or reuse):
            raise CLIError(f"{flag} {path} exists: pass --overwrite to replace it, or choose another {flag}")
    where = path.absolute() if reuse and path.is_dir() else path.absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise CLIError(f"{flag} {path}: {where} is a file, not a directory: choose another {flag}")
    try:
        if not os.access(where, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot create files in {where} ({e.strerror or e}): choose a {flag} in a "
                       "directory you can write") from None
    return path
