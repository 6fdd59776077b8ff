"""The one JSON reader for text from a peer (RFC 8259), with size and nesting limits, sans-I/O.

Every JSON document a daemon or client reads from the network -- request
bodies of the KMF and MD APIs, the KMF's answers and events to the KD and
the endpoint, identity assertions, signed answers, problems -- goes through
:func:`loads`.  Python's ``json`` recurses once per nesting level and raises
``RecursionError`` (not a ``ValueError``) around level 1000, so ``[`` x 30000
escaped every ``except ValueError`` and became a 500 with a traceback.  Here
the nesting depth is measured *before* parsing, without recursion (strings
are skipped, brackets counted), and anything deeper than ``max_depth`` is
refused; so is a text longer than ``max_size``, text that is not UTF-8
(RFC 8259 s8.1), NaN/Infinity (not JSON, s6) and, with ``unique_keys``,
duplicate member names (s4 leaves them to the reader; JOSE refuses them,
RFC 7515 s5.2).  Every refusal is a :class:`JsonError`, both a
:class:`~perc_daemons.protocol.errors.ProtocolError` and a ``ValueError``.

It does not bound numbers or string lengths beyond ``max_size`` (Python
reads big integers up to ``sys.get_int_max_str_digits`` and raises
ValueError beyond).
"""

from __future__ import annotations

import json
import re
from typing import Any

from perc_daemons.protocol.errors import ProtocolError

__all__ = ["MAX_DEPTH", "MAX_SIZE", "JsonError", "loads"]

#: Deepest nesting of arrays and objects accepted; our documents use fewer than 8 levels.
MAX_DEPTH = 64
#: Longest text accepted, in bytes (or characters for ``str`` input).
MAX_SIZE = 1 << 20

# A JSON string (RFC 8259 s7), escapes included, in the "unrolled loop" form.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class JsonError(ProtocolError, ValueError):
    """Text that is not acceptable JSON: malformed, too large, too deep, not UTF-8."""

    reason = "malformed_json"


def _too_deep(text: str, limit: int) -> bool:
    """Whether ``[``/``{`` outside strings nest deeper than ``limit``; linear, no recursion.

    A guard before parsing: brackets of malformed text (after an
    unterminated string, say) are counted as they come.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _BRACKETS.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _refuse_constant(name: str) -> Any:
    raise JsonError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise JsonError(f"duplicate member {key!r}")
        result[key] = value
    return result


def loads(data: str | bytes | bytearray, *, max_size: int = MAX_SIZE,
          max_depth: int = MAX_DEPTH, unique_keys: bool = False) -> Any:
    """The JSON value of ``data`` (UTF-8 bytes or text); :class:`JsonError` otherwise.

    Refuses more than ``max_size`` bytes, nesting deeper than ``max_depth``,
    NaN/Infinity, and with ``unique_keys`` duplicate member names.  The
    error message is one line, fit for a problem ``detail`` or a log.
    """
    if len(data) > max_size:
        raise JsonError(f"JSON text larger than {max_size} bytes")
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise JsonError("JSON text is not UTF-8") from None
    elif isinstance(data, str):
        text = data
    else:
        raise JsonError("JSON text must be str or bytes")
    if _too_deep(text, max_depth):
        raise JsonError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_refuse_constant,
                          object_pairs_hook=_unique if unique_keys else None)
    except JsonError:
        raise
    except RecursionError:  # only when called near the stack's end already
        raise JsonError(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as e:
        raise JsonError(f"malformed JSON: {e}") from None
