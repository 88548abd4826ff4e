"""Parquet input: find the files, check every file's schema, then stream documents row by row.

Driver-side module: pyarrow only. A corpus is a Parquet file, a directory (searched recursively;
names starting with `_` or `.` are skipped, as pyarrow.dataset does) or a glob, on the local disk
or any filesystem pyarrow resolves from a URI (s3://, gs://, hdfs://, file://).

Nothing is read in full: `check_input` reads only file footers, `iter_documents` streams record
batches of `batch_rows` rows. Row-level problems (null, empty or non-UTF-8 text, a duplicate id,
a bad question) become `Document`s with an error set; only file-level problems (missing or
mistyped column, unreadable file) raise `InputError`, before any model work starts.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

# error_type values for rows rejected before reaching the model (the engine's are in requests.py).
INVALID_INPUT = "invalid_input"
DUPLICATE_ID = "duplicate_id"

_GLOB_CHARS = "*?["


class InputError(ValueError):
    """The input cannot be used as a whole: raised before any model work, names file and column."""


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Where the corpus is and which columns hold what."""

    # A Parquet file, a directory or a glob; local path or URI (s3://bucket/prefix/*.parquet).
    path: str
    # Unique document id: a string or integer column (written to the output as a string).
    id_column: str = "id"
    # The document text: a string column (binary columns are accepted and decoded as UTF-8 per row).
    text_column: str = "text"
    # QA only: a string column (one question per document) or a list<string> column (several).
    # None for summarisation.
    question_column: str | None = None
    # Rows per record batch read from a file (memory bound of the reader).
    batch_rows: int = 64

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("input path is empty")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")
        names = [self.id_column, self.text_column] + ([self.question_column] if self.question_column else [])
        if len(set(names)) != len(names):
            raise ValueError(f"id, text and question columns must differ, got {names}")


@dataclass(frozen=True)
class InputFile:
    path: str  # as the filesystem knows it
    num_rows: int


@dataclass(frozen=True)
class InputPlan:
    """The checked corpus: its files in reading order, on one filesystem."""

    filesystem: pafs.FileSystem
    files: tuple[InputFile, ...]
    spec: InputSpec
    questions_are_lists: bool = False

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


@dataclass
class Document:
    """One input row. `error_type` set: the row is answered with an error, never sent to a model."""

    id: str | None
    text: str | None
    # QA: one entry per output row (None entries are invalid questions, see question_errors).
    questions: list[str | None] | None
    source: str  # "file row N", for error messages
    content_hash: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    # Per-question error message (QA), aligned with `questions`; None where the question is fine.
    question_errors: list[str | None] = field(default_factory=list)
    # 0 for the first row with this id, 1.. for duplicates (used to resume exactly once).
    occurrence: int = 0


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------- files


def _split_glob(path: str) -> tuple[str, str | None]:
    """'dir/sub/*.parquet' -> ('dir/sub', 'dir/sub/*.parquet'); no wildcard -> (path, None)."""
    first = min((i for i, c in enumerate(path) if c in _GLOB_CHARS), default=-1)
    if first < 0:
        return path, None
    base = path[:first].rsplit("/", 1)[0] if "/" in path[:first] else "."
    return base, path


def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI; raises InputError with the reason."""
    if "://" in path:
        base, pattern = _split_glob(path)
        try:
            fs, base_on_fs = pafs.FileSystem.from_uri(base)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own message
            raise InputError(f"cannot open filesystem for {path!r}: {e}") from e
        if pattern is None:
            return fs, base_on_fs
        return fs, base_on_fs.rstrip("/") + "/" + pattern[len(base):].lstrip("/")
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _glob_regex(pattern: str) -> re.Pattern:
    """Shell-style glob: `*` and `?` stay within one path segment, `**/` spans directories."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _hidden(name: str) -> bool:
    return name.startswith("_") or name.startswith(".")


def discover_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a file, directory or glob, sorted (the reading order)."""
    fs, on_fs = resolve_filesystem(path)
    base, pattern = _split_glob(on_fs)
    if pattern is None:
        info = fs.get_file_info(on_fs)
        if info.type == pafs.FileType.File:
            return fs, [on_fs]
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input {path!r} does not exist")
        # A directory: pyarrow.dataset's own discovery (recursive, skips _* and .* names).
        dataset = ds.dataset(on_fs, filesystem=fs, format="parquet", exclude_invalid_files=False)
        files = sorted(dataset.files)
    else:
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        regex = _glob_regex(pattern)
        files = sorted(
            i.path for i in fs.get_file_info(selector)
            if i.type == pafs.FileType.File
            and regex.match(i.path)
            and not any(_hidden(part) for part in i.path[len(base):].split("/") if part)
        )
    if not files:
        raise InputError(f"input {path!r} matches no Parquet files")
    return fs, files


# -------------------------------------------------------------------------------------- schema


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_id(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(t)


def _is_question_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text(t.value_type)


def check_input(spec: InputSpec) -> InputPlan:
    """Checks the schema of every file (footers only) and returns the plan to read them.

    Raises InputError naming the file and the column on the first problem found.
    """
    fs, paths = discover_files(spec.path)
    files: list[InputFile] = []
    list_kinds: set[bool] = set()
    errors: list[str] = []
    for path in paths:
        where = path if "://" not in spec.path else spec.path.split("://", 1)[0] + "://" + path
        try:
            fragment = next(iter(ds.dataset(path, filesystem=fs, format="parquet").get_fragments()))
            schema = fragment.physical_schema
            num_rows = fragment.metadata.num_rows
        except Exception as e:
            errors.append(f"{where}: not a readable Parquet file ({e})")
            continue
        problems = []
        for column, ok, expected in (
            (spec.id_column, _is_id, "string or integer (the document id)"),
            (spec.text_column, lambda t: _is_text(t) or _is_bytes(t), "string (the document text)"),
        ):
            if column not in schema.names:
                problems.append(f"column {column!r} is missing (columns: {schema.names})")
            elif not ok(schema.field(column).type):
                problems.append(f"column {column!r} has type {schema.field(column).type}, expected {expected}")
        if spec.question_column:
            q = spec.question_column
            if q not in schema.names:
                problems.append(f"column {q!r} is missing (columns: {schema.names})")
            else:
                t = schema.field(q).type
                if _is_text(t):
                    list_kinds.add(False)
                elif _is_question_list(t):
                    list_kinds.add(True)
                else:
                    problems.append(f"column {q!r} has type {t}, expected string or list<string>")
        if problems:
            errors.append(f"{where}: " + "; ".join(problems))
        files.append(InputFile(path, num_rows))
    if errors:
        hint = (
            "Choose the columns with --id-column / --text-column"
            + (" / --question-column" if spec.question_column else "")
            + ", or fix or remove the file(s)."
        )
        shown = errors[:10] + ([f"... and {len(errors) - 10} more file(s)"] if len(errors) > 10 else [])
        raise InputError(
            f"{len(errors)} of {len(paths)} input file(s) cannot be used (no model work was started):\n  "
            + "\n  ".join(shown) + "\n" + hint
        )
    return InputPlan(fs, tuple(files), spec, questions_are_lists=True in list_kinds)


# ------------------------------------------------------------------------------------- reading


def _decode_text(value) -> tuple[str | None, str | None]:
    """-> (text, error message)."""
    if value is None:
        return None, "text is null"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"text is not valid UTF-8 ({e.reason} at byte {e.start})"
    if not isinstance(value, str):
        return None, f"text is a {type(value).__name__}, not a string"
    if not value.strip():
        return None, "text is empty"
    return value, None


def _questions(value, is_list: bool) -> tuple[list[str | None], list[str | None]]:
    """-> (questions, per-question error messages); one entry at least (the output row)."""
    if value is None:
        return [None], ["question is null" if not is_list else "questions list is null"]
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        return [None], ["questions list is empty"]
    questions: list[str | None] = []
    errors: list[str | None] = []
    for i, q in enumerate(items):
        name = f"question {i}" if isinstance(value, (list, tuple)) else "question"
        if q is None:
            questions.append(None)
            errors.append(f"{name} is null")
        elif not isinstance(q, str) or not q.strip():
            questions.append(None)
            errors.append(f"{name} is empty")
        else:
            questions.append(q)
            errors.append(None)
    return questions, errors


def iter_documents(plan: InputPlan) -> Iterator[Document]:
    """Streams the corpus as Documents, in file order then row order.

    Keeps only the set of ids seen (for duplicate detection), never the texts.
    """
    spec = plan.spec
    columns = [spec.id_column, spec.text_column] + ([spec.question_column] if spec.question_column else [])
    seen: Counter = Counter()
    for file in plan.files:
        fragment = next(iter(ds.dataset(file.path, filesystem=plan.filesystem, format="parquet").get_fragments()))
        row = 0
        for batch in fragment.to_batches(columns=columns, batch_size=spec.batch_rows, use_threads=False):
            ids = batch.column(0).to_pylist()
            texts = batch.column(1).to_pylist()
            qs = batch.column(2).to_pylist() if spec.question_column else [None] * len(ids)
            for raw_id, raw_text, raw_q in zip(ids, texts, qs):
                source = f"{file.path} row {row}"
                row += 1
                doc_id = None if raw_id is None else str(raw_id)
                occurrence = seen[doc_id]
                seen[doc_id] += 1
                text, text_error = _decode_text(raw_text)
                questions, q_errors = (None, [])
                if spec.question_column:
                    questions, q_errors = _questions(raw_q, plan.questions_are_lists)
                doc = Document(
                    id=doc_id, text=text, questions=questions, source=source,
                    content_hash=content_hash(text) if text is not None else None,
                    question_errors=q_errors, occurrence=occurrence,
                )
                if doc_id is None:
                    doc.error_type, doc.error_message = INVALID_INPUT, f"{source}: id is null"
                elif occurrence > 0:
                    doc.error_type = DUPLICATE_ID
                    doc.error_message = (
                        f"{source}: id {doc_id!r} already appeared earlier in the input "
                        f"(occurrence {occurrence + 1}); only the first row with an id is processed"
                    )
                elif text_error:
                    doc.error_type, doc.error_message = INVALID_INPUT, f"{source}: {text_error}"
                yield doc
