"""The one way the testbed reads JSON and TOML it did not just write: bounded, typed, one line when malformed.

Files and attributes come from strangers (zoos, poisoned datasets, results shared for ``compare``), so a
reader bounds its work before it starts and checks what it uses:

- size: a file larger than ``TESTBED_MAX_JSON_BYTES`` (default 64 MiB) is refused before it is read;
- depth: nesting deeper than ``TESTBED_MAX_JSON_DEPTH`` (default 64) is refused — Python's parsers would
  otherwise raise ``RecursionError`` on ``'[' * 100000``;
- numbers: ``NaN``/``Infinity`` (which Python's json accepts, JSON does not) are refused, as are integers with
  more than 4300 digits (Python's own limit, a ``ValueError``);
- fields: :func:`field` takes a value out of a parsed object with its type (and, for numbers, finiteness)
  checked, naming the file and the field in the error.

Every failure is a :class:`~testbed.core.errors.UserError` naming the file (and field): one line, exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from testbed.core.errors import UserError

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_DEPTH = 64
_MISSING = object()


def max_bytes() -> int:
    return _env_int("TESTBED_MAX_JSON_BYTES", DEFAULT_MAX_BYTES)


def max_depth() -> int:
    return _env_int("TESTBED_MAX_JSON_DEPTH", DEFAULT_MAX_DEPTH)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not an integer") from None
    if value < 1:
        raise UserError(f"environment variable {name}={text!r} must be at least 1")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def depth(obj: Any, limit: int) -> int:
    """Nesting depth of a parsed value (iteratively: no recursion), stopping once it exceeds ``limit``."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if not isinstance(x, (dict, list)):
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def _check_depth(obj: Any, what: str) -> Any:
    limit = max_depth()
    if depth(obj, limit) > limit:
        raise UserError(f"{what}: nested deeper than {limit} levels (TESTBED_MAX_JSON_DEPTH); refusing it as damaged "
                        "or hostile")
    return obj


def loads(text: str | bytes, what: str) -> Any:
    """Parse JSON text; ``what`` names where it came from (a file, an attribute) in the error."""
    if len(text) > max_bytes():
        raise UserError(f"{what}: {len(text)} bytes of JSON, more than {max_bytes()} (TESTBED_MAX_JSON_BYTES)")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise UserError(f"{what}: nested too deeply to read (more than {max_depth()} levels); refusing it as damaged "
                        "or hostile") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    return _check_depth(obj, what)


def _read_bounded(path: Path) -> bytes:
    size = os.stat(path).st_size
    if size > max_bytes():
        raise UserError(f"{path}: {size} bytes, more than the {max_bytes()} a JSON/TOML file may have "
                        "(TESTBED_MAX_JSON_BYTES); refusing to read it")
    with open(path, "rb") as f:
        return f.read(max_bytes() + 1)


def load_json(path: str | os.PathLike, missing_ok: bool = False) -> Any:
    """The parsed content of a JSON file (None when it does not exist and ``missing_ok``)."""
    path = Path(path)
    try:
        data = _read_bounded(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a directory, not a JSON file") from None
    return loads(data, str(path))


def load_object(path: str | os.PathLike, fix: str, prefix: str = "") -> dict[str, Any]:
    """The JSON object in ``path``, read as :func:`load_json` reads; malformed JSON, an unreadable file or a value
    that is not an object is one UserError, ``"{prefix}<what is wrong>; {fix}"`` (``fix``: what to do about it)."""
    path = Path(path)
    try:
        doc = load_json(path)
    except UserError as e:
        raise UserError(f"{prefix}{e}; {fix}") from None
    except OSError as e:
        raise UserError(f"{prefix}cannot read {path} ({e.strerror}); {fix}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{prefix}{path} does not hold a JSON object; {fix}")
    return doc


def loads_toml(text: str, what: str) -> dict[str, Any]:
    """Parse TOML text (``tomllib.TOMLDecodeError`` propagates for the caller's own message)."""
    if len(text) > max_bytes():
        raise UserError(f"{what}: {len(text)} bytes of TOML, more than {max_bytes()} (TESTBED_MAX_JSON_BYTES)")
    try:
        obj = tomllib.loads(text)
    except RecursionError:
        raise UserError(f"{what}: nested too deeply to read (more than {max_depth()} levels)") from None
    return _check_depth(obj, what)


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in ts)


def field(obj: Any, key: str, types: type | tuple[type, ...], what: str, default: Any = _MISSING) -> Any:
    """``obj[key]`` checked to be of ``types`` (bools are not numbers; numbers must be finite).

    ``what`` names the file; the error names ``what`` and ``key``.  A missing key gives ``default`` when one is
    given, else an error."""
    if not isinstance(obj, dict):
        raise UserError(f"{what}: expected a JSON object holding {key!r}, got {type(obj).__name__}")
    if key not in obj:
        if default is not _MISSING:
            return default
        raise UserError(f"{what}: field {key!r} is missing")
    value = obj[key]
    ts = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, ts) and not (isinstance(value, bool) and bool not in ts)
    if isinstance(value, float) and float in ts and not math.isfinite(value):
        ok = False
    if not ok:
        raise UserError(f"{what}: field {key!r} must be {_type_name(types)}, got {str(json.dumps(value))[:60]}")
    return value


def number(value: Any, what: str, limit: float = 1e15) -> float:
    """A finite number with ``|value| <= limit`` (sums of a few such never overflow), else one line naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {str(value)[:60]!r}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or abs(v) > limit:
        raise UserError(f"{what} must be a finite number of magnitude at most {limit:g}, got {str(value)[:60]}")
    return v


def bounded_numbers(obj: Any, what: str, limit: float = 1e15) -> None:
    """Refuse any number in ``obj`` (at any depth) whose magnitude exceeds ``limit``, naming its field: sums and
    differences of a few such stay finite (1e308 + 1e308 would overflow to inf)."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        x, where = stack.pop()
        if isinstance(x, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in x.items())
        elif isinstance(x, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(x))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            number(x, f"{what}: field {where!r}", limit)


def check_records(records: Any, what: str, types: dict[str, type | tuple[type, ...]]) -> None:
    """Each record of the list ``records`` holds, for each key of ``types`` it has, a value of those types; and no
    number anywhere beyond :func:`bounded_numbers`' limit.  Errors name the file, the record and the field."""
    for i, rec in enumerate(records if isinstance(records, list) else []):
        for key, t in types.items():
            if isinstance(rec, dict) and key in rec:
                field(rec, key, t, f"{what}: record {i}")
    bounded_numbers(records, what)
