"""Parquet input: find the files, check every file's schema, then stream documents row by row.

Driver-side module: pyarrow only. A corpus is a Parquet file, a directory (searched recursively;
names starting with `_` or `.` are skipped, as pyarrow.dataset does) or a glob, on the local disk
or any filesystem pyarrow resolves from a URI (s3://, gs://, hdfs://, file://).

Nothing is read in full: `check_input` reads only file footers, `iter_documents` streams record
batches of `batch_rows` rows, one row group at a time. Row-level problems (null, empty or
non-UTF-8 text or id, a duplicate id, a bad question) become `Document`s with an error set, and so
does every row of a row group that cannot be read (a corrupt data page): the rest of the corpus is
still processed. Only file-level problems found from the footers (missing or mistyped column,
unreadable footer, no rows at all) raise `InputError`, before any model work starts.

Every Document knows its place in the corpus (`source_file`, relative to the input root, and
`source_row`): the output is committed exactly once per input row under that key, whatever the
ids are (null, repeated). `InputPlan.identity` fingerprints the corpus by content (relative file
names, sizes, Parquet footers), not by where it is mounted, so a copy of the same corpus (Ray's
working-dir copy after a cluster restart) resumes while a changed corpus does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.engine.requests import INVALID_INPUT

# error_type values for rows rejected before reaching the model (the engine's, INVALID_INPUT among
# them, are in pipeline.engine.requests).
DUPLICATE_ID = "duplicate_id"
# Rows of a row group that could not be read (a corrupt page): the file and row group are named.
UNREADABLE_INPUT = "unreadable_input"
# Error types that the input itself causes (the failure budget reports them apart from model failures).
INPUT_ERROR_TYPES = (INVALID_INPUT, DUPLICATE_ID, UNREADABLE_INPUT)

_GLOB_CHARS = "*?["


class InputError(ValueError):
    """The input cannot be used as a whole: raised before any model work, names file and column."""


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Where the corpus is and which columns hold what."""

    # A Parquet file, a directory or a glob; local path or URI (s3://bucket/prefix/*.parquet).
    path: str
    # Unique document id: a string or integer column (the output keeps its type: InputPlan.id_type).
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
    # Relative to the input root (the directory, the glob's base, or the file's own name): the
    # name rows are committed under, the same wherever the corpus is mounted.
    relative: str = ""
    size: int = 0
    # sha256 of the Parquet footer (schema, row groups, statistics): changes when the content does.
    footer_sha256: str = ""
    row_group_rows: tuple[int, ...] = ()
    # Modification time as the filesystem reports it (None where it has none): not part of the
    # identity (a copy has another), only the cache key of the content digest (file_digests).
    mtime_ns: int | None = None


@dataclass(frozen=True)
class InputPlan:
    """The checked corpus: its files in reading order, on one filesystem."""

    filesystem: pafs.FileSystem
    files: tuple[InputFile, ...]
    spec: InputSpec
    questions_are_lists: bool = False
    # The id column's type, one for the whole corpus (check_input refuses files that disagree):
    # int64 (any integer type but uint64), uint64, or string (string, large_string, string_view).
    # The output's id column has this type, so results join to the input without a cast.
    id_type: pa.DataType = pa.string()

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def identity(self) -> str:
        """Fingerprint of the corpus content: relative names, sizes and footers of its files.
        (Bytes changed in place at the same size can leave all three equal, an uncompressed
        value rewritten with one of the same length: file_digests catches those.)"""
        value = [(f.relative, f.size, f.footer_sha256) for f in self.files]
        return hashlib.sha256(json.dumps(value).encode()).hexdigest()


# Bytes hashed per read by file_digests.
_DIGEST_BLOCK = 1 << 20


def file_digests(plan: InputPlan, known: dict | None = None) -> dict[str, dict]:
    """{relative name: {"size", "mtime_ns", "sha256"}} of every input file: what a resume checks
    besides the job fingerprint, so that a file rewritten in place at the same size (an
    uncompressed column, one value replaced by another of the same length: same size, same
    footer) is a changed corpus, not "unchanged".

    Local files: the sha256 of the whole file, read once per output. `known` (the entries an
    output's manifest recorded) is the cache: a file whose size and mtime_ns are those recorded
    is not read again, so a resume only stats its files; a copy of the corpus (Ray's working-dir
    copy has new mtimes) is read once and resumes when its bytes are the same. mtime_ns is the
    cache key and not the identity because a copy must resume; a rewrite that also forges the old
    mtime is not caught. Cost: about 1 s per GiB read (sha256 runs at ~1.1 GiB/s on the 2-core
    machine; the read is the rest), once per output and again only for files whose mtime moved.

    Other filesystems (s3://, gs://): no bytes are read (that would download the corpus into the
    driver); the store's modification time is recorded instead (an object rewritten in place gets
    a new one), sha256 None."""
    known = known or {}
    entries: dict[str, dict] = {}
    local = isinstance(plan.filesystem, pafs.LocalFileSystem)
    for file in plan.files:
        entry = {"size": file.size, "mtime_ns": file.mtime_ns, "sha256": None}
        if local:
            previous = known.get(file.relative)
            if isinstance(previous, dict) and previous.get("sha256") and previous.get("size") == file.size \
                    and previous.get("mtime_ns") == file.mtime_ns and file.mtime_ns is not None:
                entry["sha256"] = previous["sha256"]
            else:
                digest = hashlib.sha256()
                with open(file.path, "rb") as f:
                    while block := f.read(_DIGEST_BLOCK):
                        digest.update(block)
                entry["sha256"] = digest.hexdigest()
        entries[file.relative] = entry
    return entries


def changed_files(recorded: dict, current: dict) -> list[str]:
    """The files (relative names) whose content differs between two file_digests results: by
    sha256 where both have one, else by modification time where both have one."""
    changed = []
    for name, entry in current.items():
        before = recorded.get(name)
        if not isinstance(before, dict):
            continue
        if entry.get("sha256") and before.get("sha256"):
            if entry["sha256"] != before["sha256"]:
                changed.append(name)
        elif entry.get("mtime_ns") is not None and before.get("mtime_ns") is not None \
                and entry["mtime_ns"] != before["mtime_ns"]:
            changed.append(name)
    return sorted(changed)


@dataclass
class Document:
    """One input row. `error_type` set: the row is answered with an error, never sent to a model."""

    # The input's id: an int for an integer id column, else a string; None when null or invalid.
    id: str | int | None
    text: str | None
    # QA: one entry per output row (None entries are invalid questions, see question_errors).
    questions: list[str | None] | None
    source: str  # "file row N", for error messages
    # Where the row is: file relative to the input root, and row number in that file (from 0).
    source_file: str = ""
    source_row: int = 0
    content_hash: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    # Per-question error message (QA), aligned with `questions`; None where the question is fine.
    question_errors: list[str | None] = field(default_factory=list)
    # 0 for the first row with this id, 1.. for later rows with the same id (duplicates).
    occurrence: int = 0

    @property
    def key(self) -> tuple[str, int]:
        """The row's identity in the corpus: what the output is committed once under."""
        return self.source_file, self.source_row


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
        if pattern is not None:  # an object whose name holds glob characters is that object
            try:
                fs, on_fs = pafs.FileSystem.from_uri(path)
                if fs.get_file_info(on_fs).type != pafs.FileType.NotFound:
                    return fs, on_fs
            except Exception:  # noqa: BLE001 - not a URI pyarrow opens whole: a glob, tried below
                pass
        try:
            fs, base_on_fs = pafs.FileSystem.from_uri(base)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own message
            raise InputError(f"cannot open filesystem for {path!r}: {e}") from e
        if pattern is None:
            return fs, base_on_fs
        return fs, base_on_fs.rstrip("/") + "/" + pattern[len(base):].lstrip("/")
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _is_glob(fs: pafs.FileSystem, on_fs: str) -> bool:
    """A path with glob characters is a glob only when no file or directory has that very name:
    `data/run[1]` that exists is a path (a real name may hold brackets)."""
    if _split_glob(on_fs)[1] is None:
        return False
    return fs.get_file_info(on_fs).type == pafs.FileType.NotFound


def _walk_local(root: str) -> list[str]:
    """The files under a local directory, recursively, names starting with `_` or `.` skipped (as
    pyarrow.dataset's discovery does). Symbolic links are followed, but each real directory is
    entered once and each real file listed once (under its first path in sorted order): a link
    back up the tree (a loop) or two links to one file never read a file twice. Written here
    because pyarrow's discovery (and os.walk(followlinks=True)) follows a loop until the path is
    too long: 2 files were read 82 times."""
    import os

    seen_dirs: set[tuple[int, int]] = set()
    files: dict[tuple[int, int], str] = {}

    def visit(directory: str) -> None:
        try:
            st = os.stat(directory)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen_dirs:
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if _hidden(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    visit(entry.path)
                elif entry.is_file(follow_symlinks=True):
                    fst = entry.stat(follow_symlinks=True)
                    key = (fst.st_dev, fst.st_ino)
                    if key not in files or entry.path < files[key]:
                        files[key] = entry.path
            except OSError:  # a dangling link: nothing to read
                continue

    visit(root)
    return sorted(files.values())


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


def discover_files(path: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, input root, the Parquet files of a file, directory or glob, sorted)."""
    fs, on_fs = resolve_filesystem(path)
    local = isinstance(fs, pafs.LocalFileSystem)
    if not _is_glob(fs, on_fs):
        info = fs.get_file_info(on_fs)
        if info.type == pafs.FileType.File:
            return fs, on_fs.rsplit("/", 1)[0] if "/" in on_fs else "", [on_fs]
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input {path!r} does not exist")
        if local:
            files = _walk_local(on_fs)
        else:  # pyarrow.dataset's own discovery (recursive, skips _* and .* names)
            dataset = ds.dataset(on_fs, filesystem=fs, format="parquet", exclude_invalid_files=False)
            files = sorted(dataset.files)
        base = on_fs
    else:
        base, pattern = _split_glob(on_fs)
        regex = _glob_regex(pattern)
        if local:
            import os

            candidates = _walk_local(base) if os.path.isdir(base) else []
        else:
            selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
            candidates = [i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
        files = sorted(
            p for p in candidates
            if regex.match(p) and not any(_hidden(part) for part in p[len(base):].split("/") if part)
        )
    if not files:
        raise InputError(f"input {path!r} matches no Parquet files")
    return fs, base, files


# Names an output's parts take (pipeline.data.writer): what a glob over the input must not match.
_PART_SAMPLES = ("part-00000.parquet", "part-u000000-000000-000000000-000000064.parquet")


def check_output_apart(input_path: str, output_dir: str) -> None:
    """Refuses an output that overlaps the input, before anything is written or removed: an
    output directory inside a directory input (or one the input's glob would match the parts
    of), or input files inside the output directory (the same directory included). Either way
    the output's parts are read as input on the next run (a rerun, the second nightly night),
    and --overwrite, which deletes the output's part files, could delete input files named like
    them. Raises InputError (one line). Paths are compared after resolving symbolic links. A
    directory whose name starts with `_` or `.` inside an input directory is skipped by the
    reader, so an output there does not overlap. Only local inputs can overlap the (local)
    output; others are not checked."""
    import os

    if "://" in input_path and not input_path.startswith("file://"):
        return
    fs, on_fs = resolve_filesystem(input_path[len("file://"):] if input_path.startswith("file://") else input_path)
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    outs = {os.path.abspath(output_dir), os.path.realpath(output_dir)}

    def inside(path: str, directory: str) -> bool:
        return path == directory or path.startswith(directory.rstrip("/") + "/")

    def visible(path: str, base: str) -> bool:
        return not any(_hidden(part) for part in path[len(base):].split("/") if part)

    why = None
    if _is_glob(fs, on_fs):
        base, pattern = _split_glob(on_fs)
        regex = _glob_regex(pattern)
        for out in sorted(outs):
            hits = [f"{out}/{name}" for name in _PART_SAMPLES
                    if inside(f"{out}/{name}", base) and regex.match(f"{out}/{name}") and visible(f"{out}/{name}", base)]
            if hits:
                why = f"the input glob matches the output's part files ({hits[0]})"
                break
    else:
        root = os.path.realpath(on_fs)
        out = os.path.realpath(output_dir)
        if os.path.isdir(root) and inside(out, root) and visible(out, root):
            why = ("the output is the input directory" if out == root
                   else "the output directory is inside the input directory")
    if why is None:
        try:
            _, _, files = discover_files(input_path)
        except InputError:  # no input files: check_input says so
            files = []
        out = os.path.realpath(output_dir)
        inner = next((f for f in files if inside(os.path.realpath(f), out)), None)
        if inner is not None:
            why = f"the input file {inner} is inside the output directory"
    if why:
        raise InputError(
            f"--output {output_dir} overlaps --input {input_path}: {why}, so the output's parts would be read as "
            "input and --overwrite could delete input files; nothing was written. Choose an --output outside the "
            "input (inside an input directory, only a directory whose name starts with '_' or '.' is skipped by "
            "the reader)"
        )


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1:] if root and path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def _footer_sha256(fs: pafs.FileSystem, path: str, size: int) -> str:
    """sha256 of the file's Parquet footer: one small ranged read. (FileMetaData.to_dict would
    decode string statistics and fails on the very non-UTF-8 values this reader must survive.)"""
    with fs.open_input_file(path) as f:
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        f.seek(max(0, size - 8 - length))
        return hashlib.sha256(f.read(length) + tail).hexdigest()


# -------------------------------------------------------------------------------------- schema


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_id(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(t)


def _is_question_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text(t.value_type)


def _output_id_type(t: pa.DataType) -> pa.DataType:
    """The output's id type for an input id column of type t (see InputPlan.id_type)."""
    if pa.types.is_integer(t):
        return pa.uint64() if pa.types.is_uint64(t) else pa.int64()
    return pa.string()


def _one_id_type(id_types: dict[str, pa.DataType], column: str) -> pa.DataType:
    """The corpus's id type from each file's (file -> output id type); InputError naming a file
    of each kind when they disagree: one output column cannot hold both, and guessing (casting
    integers to strings, or strings to integers) would break the join back to the input."""
    kinds: dict[pa.DataType, str] = {}
    for where, t in id_types.items():
        kinds.setdefault(t, where)
    if len(kinds) > 1:
        (first, first_type), (second, second_type) = [(w, t) for t, w in kinds.items()][:2]
        raise InputError(
            f"the id column {column!r} has another type in each of two input files: {first} holds "
            f"{first_type} ids and {second} holds {second_type} ids; the output keeps the input's id type, so "
            "every file must agree (no model work was started): rewrite one of them with the other's type"
        )
    return next(iter(kinds), pa.string())


def check_input(spec: InputSpec) -> InputPlan:
    """Checks the schema of every file (footers only) and returns the plan to read them.

    Raises InputError naming the file and the column on the first problem found.
    """
    fs, root, paths = discover_files(spec.path)
    files: list[InputFile] = []
    list_kinds: set[bool] = set()
    id_types: dict[str, pa.DataType] = {}
    errors: list[str] = []
    unreadable = column_problems = 0
    for path in paths:
        where = path if "://" not in spec.path else spec.path.split("://", 1)[0] + "://" + path
        try:
            fragment = next(iter(ds.dataset(path, filesystem=fs, format="parquet").get_fragments()))
            schema = fragment.physical_schema
            metadata = fragment.metadata
            info = fs.get_file_info(path)
            size = info.size
            footer = _footer_sha256(fs, path, size)
        except Exception as e:
            errors.append(f"{where}: not a readable Parquet file ({e})")
            unreadable += 1
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
        if spec.id_column in schema.names and _is_id(schema.field(spec.id_column).type):
            id_types[where] = _output_id_type(schema.field(spec.id_column).type)
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
            column_problems += 1
        mtime = info.mtime_ns if info.mtime is not None else None
        files.append(InputFile(
            path, metadata.num_rows, relative=_relative(path, root), size=size, footer_sha256=footer,
            row_group_rows=tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)),
            mtime_ns=mtime,
        ))
    if errors:
        # The hint fits the errors: column flags for column problems, what --input takes for
        # files that are not Parquet at all.
        hints = []
        if unreadable:
            hints.append("--input takes Parquet files: a .parquet file, a directory of them or a glob such as "
                         "'corpus/*.parquet'; convert or remove the file(s) that are not Parquet")
        if column_problems:
            hints.append("choose the columns with --id-column / --text-column"
                         + (" / --question-column" if spec.question_column else "") + ", or fix or remove the file(s)")
        hint = "; ".join(hints)
        shown = errors[:10] + ([f"... and {len(errors) - 10} more file(s)"] if len(errors) > 10 else [])
        raise InputError(
            f"{len(errors)} of {len(paths)} input file(s) cannot be used (no model work was started):\n  "
            + "\n  ".join(shown) + "\n" + hint[0].upper() + hint[1:] + "."
        )
    plan = InputPlan(fs, tuple(files), spec, questions_are_lists=True in list_kinds,
                     id_type=_one_id_type(id_types, spec.id_column))
    if plan.num_rows == 0:
        raise InputError(
            f"input {spec.path!r} has no rows ({len(files)} Parquet file(s), all empty): nothing to do, "
            "no model work was started"
        )
    return plan


# ------------------------------------------------------------------------------------- reading


def decode_cell(value, what: str) -> tuple[str | None, str | None]:
    """A cell read as bytes (string columns are read as binary, so one bad value cannot stop the
    reader) -> (text, error message)."""
    if value is None:
        return None, f"{what} is null"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})"
    return value, None


def decode_id(value) -> tuple[str | int | None, str | None]:
    """An id cell (bytes for string columns, int for integer ones) -> (id, error message). An
    integer stays an integer (the output keeps the input's id type); a string id must hold
    something besides whitespace: an empty id names no document, as a null one does."""
    value, error = decode_cell(value, "id")
    if error:
        return None, error
    if isinstance(value, str):
        if not value.strip():
            return None, "id is empty" if not value else "id is blank (only whitespace)"
        return value, None
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    return str(value), None


def decode_text(value) -> tuple[str | None, str | None]:
    """-> (text, error message)."""
    value, error = decode_cell(value, "text")
    if error:
        return None, error
    if not isinstance(value, str):
        return None, f"text is a {type(value).__name__}, not a string"
    if not value.strip():
        return None, "text is empty"
    return value, None


def decode_questions(value, is_list: bool) -> tuple[list[str | None], list[str | None]]:
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
        q, error = decode_cell(q, name)
        if error:
            questions.append(None)
            errors.append(error)
        elif not isinstance(q, str) or not q.strip():
            questions.append(None)
            errors.append(f"{name} is empty")
        else:
            questions.append(q)
            errors.append(None)
    return questions, errors


def _bytes_type(t: pa.DataType) -> pa.DataType | None:
    """The type holding the same values as raw bytes: each string type as its binary twin, inside
    lists too (list, large_list, list views, fixed-size lists, nested); None when `t` holds no
    strings."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_string_view(t):
        return pa.binary_view()
    if pa.types.is_dictionary(t):
        return _bytes_type(t.value_type)
    makers = (
        (pa.types.is_list, pa.list_), (pa.types.is_large_list, pa.large_list),
        (pa.types.is_list_view, pa.list_view), (pa.types.is_large_list_view, pa.large_list_view),
    )
    for is_kind, make in makers:
        if is_kind(t):
            inner = _bytes_type(t.value_type)
            return None if inner is None else make(t.value_field.with_type(inner))
    if pa.types.is_fixed_size_list(t):
        inner = _bytes_type(t.value_type)
        return None if inner is None else pa.list_(t.value_field.with_type(inner), t.list_size)
    return None


def cells_as_bytes(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """String values (also inside lists: list<string>, list<large_string>, large_list<...>,
    string_view) as binary: Arrow does not validate UTF-8 when it reads Parquet, and to_pylist()
    would raise on the first bad value, stopping the whole batch; as bytes, each value is decoded
    on its own (decode_cell) and one bad value costs its own row."""
    t = column.type
    if pa.types.is_dictionary(t):
        column = column.cast(t.value_type) if isinstance(column, pa.ChunkedArray) else column.dictionary_decode()
        t = column.type
    target = _bytes_type(t)
    return column if target is None else column.cast(target)


class _Rows:
    """Raw cells of one input row; ids are decoded here so duplicates are found among good ids."""

    __slots__ = ("raw_id", "raw_text", "raw_question", "unreadable")

    def __init__(self, raw_id, raw_text, raw_question, unreadable: str | None = None) -> None:
        self.raw_id, self.raw_text, self.raw_question, self.unreadable = raw_id, raw_text, raw_question, unreadable


def _read_row_group(parquet: pq.ParquetFile, group: int, group_rows: int, columns: list[str], batch_rows: int,
                    stop: int | None = None) -> Iterator[_Rows]:
    """The rows of one row group, from its first row up to `stop` (None: all). A row group that
    cannot be read (a corrupt page behind a valid footer) yields its remaining rows as unreadable,
    with their ids when the id column alone still reads."""
    stop = group_rows if stop is None else min(stop, group_rows)
    done = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns,
                                          use_threads=False):
            cells = [cells_as_bytes(batch.column(i)).to_pylist() for i in range(len(columns))]
            if len(cells) < 3:
                cells.append([None] * batch.num_rows)
            for raw_id, raw_text, raw_q in zip(*cells):
                if done >= stop:
                    return
                done += 1
                yield _Rows(raw_id, raw_text, raw_q)
            if done >= stop:
                return
    except Exception as error:  # noqa: BLE001 - any decoding failure of the file's pages
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        try:
            ids = cells_as_bytes(parquet.read_row_group(group, columns=[columns[0]]).column(0)).to_pylist()
        except Exception:  # noqa: BLE001 - the id column is unreadable too
            ids = [None] * group_rows
        for raw_id in ids[done:stop]:
            yield _Rows(raw_id, None, None, unreadable=f"row group {group} cannot be read ({reason})")


def _read_file(plan: InputPlan, file: InputFile, columns: list[str]) -> Iterator[_Rows]:
    """The rows of one file, a row group at a time; reading goes on after an unreadable row group."""
    spec = plan.spec
    with plan.filesystem.open_input_file(file.path) as handle:
        parquet = pq.ParquetFile(handle)
        for group, group_rows in enumerate(file.row_group_rows):
            yield from _read_row_group(parquet, group, group_rows, columns, spec.batch_rows)


def _columns(spec: InputSpec) -> list[str]:
    return [spec.id_column, spec.text_column] + ([spec.question_column] if spec.question_column else [])


def _document(plan: InputPlan, file: InputFile, row: int, cells: _Rows, occurrence_of) -> Document:
    """One input row of a corpus file as a Document. occurrence_of(doc_id) -> how many rows before
    this one (in corpus order) had the same id."""
    return document_from_cells(
        cells.raw_id, cells.raw_text, cells.raw_question, source=f"{file.path} row {row}", source_file=file.relative,
        source_row=row, has_questions=bool(plan.spec.question_column), questions_are_lists=plan.questions_are_lists,
        occurrence_of=occurrence_of, unreadable=cells.unreadable,
    )


def document_from_cells(raw_id, raw_text, raw_question, *, source: str, source_file: str = "", source_row: int = 0,
                        has_questions: bool, questions_are_lists: bool, occurrence_of=lambda doc_id: 0,
                        unreadable: str | None = None) -> Document:
    """The row checks, once for every reader (the corpus reader here, the Ray Data processor's
    batches): raw cells (bytes for text columns, see cells_as_bytes) -> a Document, with its error
    set when the row cannot be sent to a model. `source` names the row in messages ("file row N").

    Precedence: an unreadable row group, then a bad id, then a repeated id (occurrence_of(doc_id)
    counts the earlier rows with the id), then a bad text. Bad questions are per question
    (question_errors); has_questions: the input has a question column (QA)."""
    doc_id, id_error = decode_id(raw_id)
    occurrence = occurrence_of(doc_id) if doc_id is not None else 0
    if unreadable:
        text, text_error = None, unreadable
    else:
        text, text_error = decode_text(raw_text)
    questions, q_errors = (None, [])
    if has_questions:
        questions, q_errors = decode_questions(raw_question, questions_are_lists)
    doc = Document(
        id=doc_id, text=text, questions=questions, source=source, source_file=source_file,
        source_row=source_row, content_hash=content_hash(text) if text is not None else None,
        question_errors=q_errors, occurrence=occurrence,
    )
    if unreadable:
        doc.error_type, doc.error_message = UNREADABLE_INPUT, f"{source}: {unreadable}"
    elif id_error:
        doc.error_type, doc.error_message = INVALID_INPUT, f"{source}: {id_error}"
    elif occurrence > 0:
        doc.error_type = DUPLICATE_ID
        doc.error_message = (
            f"{source}: id {doc_id!r} already appeared earlier in the input "
            f"(occurrence {occurrence + 1}); only the first row with an id is processed"
        )
    elif text_error:
        doc.error_type, doc.error_message = INVALID_INPUT, f"{source}: {text_error}"
    return doc


def iter_documents(plan: InputPlan) -> Iterator[Document]:
    """Streams the corpus as Documents, in file order then row order.

    Keeps only the set of ids seen (for duplicate detection), never the texts.
    """
    columns = _columns(plan.spec)
    seen: Counter = Counter()

    def occurrence_of(doc_id: str) -> int:
        occurrence = seen[doc_id]
        seen[doc_id] += 1
        return occurrence

    for file in plan.files:
        for row, cells in enumerate(_read_file(plan, file, columns)):
            yield _document(plan, file, row, cells, occurrence_of)


# ------------------------------------------------------------------------------- work units


@dataclass(frozen=True)
class WorkUnit:
    """A slice of at most unit_rows rows of one row group: what the Ray Data dataflow of the jobs
    reads, prompts, answers and commits as one piece (`part-u<key>.parquet`)."""

    file_index: int
    row_group: int
    start: int  # first row inside the row group
    stop: int  # one past the last row inside the row group
    first_row: int  # source_row of the unit's first row (row number in the file)

    @property
    def key(self) -> str:
        """Deterministic and sortable in corpus order: file, row group, first and one-past-last row
        in the group. The rows are in the name, so a committed part says which rows it holds
        whatever --unit-rows cut it (see plan_units)."""
        return f"{self.file_index:06d}-{self.row_group:06d}-{self.start:09d}-{self.stop:09d}"

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def parse_unit_key(key: str) -> tuple[int, int, int, int | None]:
    """(file index, row group, start, stop) of a unit key; stop None for the keys of earlier
    versions (`file-group-start`), which did not name it."""
    fields = [int(x) for x in key.split("-")]
    return fields[0], fields[1], fields[2], fields[3] if len(fields) > 3 else None


def _uncovered(group_rows: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The row ranges [start, stop) of a row group of group_rows rows that no covered range holds."""
    gaps, at = [], 0
    for start, stop in sorted(covered):
        if start > at:
            gaps.append((at, min(start, group_rows)))
        at = max(at, stop)
    if at < group_rows:
        gaps.append((at, group_rows))
    return [(a, b) for a, b in gaps if b > a]


def plan_units(plan: InputPlan, unit_rows: int,
               committed: dict[tuple[int, int], list[tuple[int, int]]] | None = None) -> list[WorkUnit]:
    """The corpus cut into work units, from the footers alone (no row is read).

    committed: {(file index, row group): [(start, stop), ...]}, the rows committed parts already
    hold (pipeline.dataflows.units.committed_unit_ranges). Only the rows outside them are cut into
    units, unit_rows at a time from the start of each gap: a resume works in rows, so changing
    --unit-rows between runs neither skips rows a shorter unit left (a run killed with 5 rows a
    unit and resumed with 10) nor redoes rows a longer one committed (10, then 4)."""
    if unit_rows < 1:
        raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
    committed = committed or {}
    units = []
    for index, file in enumerate(plan.files):
        offset = 0
        for group, group_rows in enumerate(file.row_group_rows):
            for gap_start, gap_stop in _uncovered(group_rows, committed.get((index, group), [])):
                for start in range(gap_start, gap_stop, unit_rows):
                    units.append(WorkUnit(index, group, start, min(start + unit_rows, gap_stop), offset + start))
            offset += group_rows
    return units


def _read_ids(plan: InputPlan, file: InputFile) -> Iterator[str | int | None]:
    """The decoded ids of one file (None for a null, empty, non-UTF-8 or unreadable id), row by
    row, as document_from_cells decodes them."""
    column = [plan.spec.id_column]
    with plan.filesystem.open_input_file(file.path) as handle:
        parquet = pq.ParquetFile(handle)
        for group, group_rows in enumerate(file.row_group_rows):
            try:
                values = cells_as_bytes(parquet.read_row_group(group, columns=column).column(0)).to_pylist()
            except Exception:  # noqa: BLE001 - unreadable ids are no duplicates of anything
                values = [None] * group_rows
            for value in values:
                yield decode_id(value)[0]


def unit_duplicates(plan: InputPlan, units: list[WorkUnit]) -> dict[str, dict[int, int]]:
    """Duplicate ids in corpus order, as iter_documents finds them: {unit key: {source_row:
    occurrence}} for the rows of `units` whose id appeared earlier in the corpus (occurrence >=
    1; every row counts as an earlier one, also the rows of units not listed). Reads the id column
    only; meant to run in one Ray task, so only this small map travels back."""
    by_row = {}
    for unit in units:
        by_row.setdefault(unit.file_index, []).append(unit)
    seen: Counter = Counter()
    found: dict[str, dict[int, int]] = {}
    for index, file in enumerate(plan.files):
        starts = sorted(by_row.get(index, ()), key=lambda u: u.first_row)
        u = 0
        for row, doc_id in enumerate(_read_ids(plan, file)):
            if doc_id is None:
                continue
            occurrence = seen[doc_id]
            seen[doc_id] += 1
            if occurrence:
                while u + 1 < len(starts) and starts[u + 1].first_row <= row:
                    u += 1
                # Rows outside every unit (committed by an earlier run) are nobody's to answer.
                if starts and starts[u].first_row <= row < starts[u].first_row + starts[u].num_rows:
                    found.setdefault(starts[u].key, {})[row] = occurrence
    return found


def read_unit(plan: InputPlan, unit: WorkUnit, duplicates: dict[int, int] | None = None) -> list[Document]:
    """The Documents of one work unit, as iter_documents would yield them: the same per-row checks
    (error rows naming file, row and column; `unreadable_input` rows for an unreadable row group)
    and, given `unit_duplicates`' map for this unit, the same duplicate-id rows."""
    file = plan.files[unit.file_index]
    duplicates = duplicates or {}
    docs = []
    with plan.filesystem.open_input_file(file.path) as handle:
        parquet = pq.ParquetFile(handle)
        rows = _read_row_group(parquet, unit.row_group, file.row_group_rows[unit.row_group], _columns(plan.spec),
                               plan.spec.batch_rows, stop=unit.stop)
        for position, cells in enumerate(rows):
            if position < unit.start:
                continue
            row = unit.first_row + position - unit.start
            docs.append(_document(plan, file, row, cells, lambda doc_id, row=row: duplicates.get(row, 0)))
    return docs
