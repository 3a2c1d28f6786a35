"""Is a user's data file what its extension says? One line naming the file (and line) if not.

Text and JSON files are checked to be UTF-8 text before they are read: `datasets` takes NUL bytes
as text, pyarrow puts bytes that are not UTF-8 into string columns (which then fail far away),
and neither names the file or the line. The JSON structure and Parquet files are only diagnosed
after `datasets` failed on them, so a good corpus is parsed once, by `datasets`.
"""

from __future__ import annotations

import codecs
import json
import os

BLOCK = 1 << 20
NEWLINE = b"\n"
TEXT_FIX = "save it as UTF-8 text (e.g. iconv -f <its encoding> -t UTF-8)"


def check_text_file(path: str) -> None:
    """A .txt/.json/.jsonl file must be UTF-8 text without NUL bytes: anything else is binary or
    another encoding. Costs one read of the file, at UTF-8 decoding speed."""
    problem = _text_problem(path)
    if problem:
        raise ValueError(f"data.paths: {path}: {problem}")


def _text_problem(path: str) -> str | None:
    """'line N: ...' for the first byte that is not UTF-8 text, or None. Reads in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # strict; keeps a character cut by a block end
    line, offset = 1, 0  # line number and file offset at the start of `block`
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block (no newline)
            nul = block.find(b"\0")
            try:
                decoder.decode(block if nul < 0 else block[:nul], final=not block or nul >= 0)
            except UnicodeDecodeError as err:
                data = pending + block
                where = f"line {line + data.count(NEWLINE, 0, err.start)}"
                return (
                    f"{where}: byte 0x{data[err.start]:02x} at offset {offset - len(pending) + err.start} "
                    f"is not UTF-8; {TEXT_FIX}"
                )
            if nul >= 0:
                return (
                    f"line {line + block.count(NEWLINE, 0, nul)}: a NUL byte at offset {offset + nul}: "
                    "binary data, not text"
                )
            if not block:
                return None
            line += block.count(NEWLINE)
            offset += len(block)


def diagnose(path: str, text_field: str) -> str | None:
    """Why `datasets` could not read a file: 'data.paths: FILE: ...', or None if no reason is found."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        problem = _parquet_problem(path)
    elif ext in (".json", ".jsonl"):
        problem = _json_problem(path, text_field)
    else:
        problem = _text_problem(path)
    return f"data.paths: {path}: {problem}" if problem else None


def _parquet_problem(path: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError, with a one-line reason
        return f"not a Parquet file ({str(err).splitlines()[0]})"
    return None


def _json_problem(path: str, text_field: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(BLOCK).lstrip(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):  # one JSON document: an array of rows (what datasets reads besides JSON Lines)
        return _json_array_problem(path, text_field)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as err:
                return f"line {number}: byte 0x{raw[err.start]:02x} is not UTF-8; {TEXT_FIX}"
            except json.JSONDecodeError as err:
                return f"line {number}: not JSON ({err.msg} at column {err.colno}); expected one JSON object per line"
            problem = _row_problem(row, text_field)
            if problem:
                return f"line {number}: {problem}"
    return None


def _json_array_problem(path: str, text_field: str) -> str | None:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        rows = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        return f"byte 0x{raw[err.start]:02x} at offset {err.start} is not UTF-8; {TEXT_FIX}"
    except json.JSONDecodeError as err:
        return f"line {err.lineno}: not JSON ({err.msg} at column {err.colno})"
    for number, row in enumerate(rows, 1):
        problem = None if isinstance(row, str) else _row_problem(row, text_field)
        if problem:
            return f"array item {number}: {problem}"
    return None


def _row_problem(row, text_field: str) -> str | None:
    if not isinstance(row, dict):
        return f"a JSON object (one row) expected, got {_kind(row)}"
    value = row.get(text_field)
    if value is not None and not isinstance(value, str):
        return f"data.text_field {text_field!r} holds {_kind(value)}, not text"
    return None


def _kind(value) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
