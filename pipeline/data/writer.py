"""Parquet output, committed exactly once: parts published by atomic rename, manifest, lock (the
schema every part has is pipeline.data.schema.OUTPUT_SCHEMA).

Layout of an output directory (local filesystem):

    OUTPUT/part-00000.parquet ...   committed parts (a part exists under this name only once whole)
    OUTPUT/_manifest.json           job id, job fingerprint, list of committed parts, this run's
                                    attention backend (atomic rewrite)
    OUTPUT/_staging/                parts being written (deleted on start: never committed)
    OUTPUT/_lock                    flock held by the writing job (a second writer is refused)
    OUTPUT/_metrics.json, _metrics.png   per-run metrics (pipeline.metrics.job)

A part is written under _staging, fsynced, then renamed into place: the rename is the commit. The
manifest is rewritten after each commit; when the driver dies between the two, the next start
finds the renamed part, checks it reads, and adds it to the manifest. All rows of one document
(one per question) go into the same part, so a document is either committed or not at all.

Exactly once is keyed by the input row (`source_file`, `source_row`), never by the document id:
ids can be null or repeated, and every such row still gets its own (error) rows exactly once.

The Ray Data dataflow of the jobs (`--dataflow ray-data`, pipeline.dataflows.units) commits one
part per work unit (a slice of a row group), `part-u<unit key>.parquet`, written by a Ray task
(`commit_unit`): staged, fsynced, renamed into place. The name is the unit's completion record: a retried unit
replaces its own part, and a resume skips the units whose part exists. The manifest records the
dataflow; an output is resumed only by the dataflow that wrote it.

A fresh output starts with an empty `part-00000.parquet` (the schema, no rows), so the directory
reads as a dataset with the output schema even when nothing else was ever committed.
Readers: `pyarrow.dataset.dataset(OUTPUT)` skips the `_*` files.

The id column has the input's id type (pipeline.data.schema.output_schema), recorded in the
manifest (`id_type`); every part of one output has it. An output begun by a version that wrote
string ids keeps string ids when resumed.

Links: nothing here follows a symbolic link inside the output directory. `_lock` is opened with
O_NOFOLLOW and must be a regular file with one link; files are created with O_CREAT | O_EXCL |
O_NOFOLLOW under fresh names, then renamed into place (a rename replaces a link, never writes
through it); a `_staging`, `_manifest.json` or part that is a link is refused on one line.
Whoever can create names in a shared output tree cannot make a job overwrite another file.

Failed writes (no space left, a quota, an I/O error): the temporary file is removed and
OutputWriteError (a JobFailed: exit code 1) says which output and why on one line. What was
committed before stays committed: the rerun resumes exactly once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config.job import DATAFLOWS
from pipeline.config.validate import check_choice
from pipeline.data.schema import COLUMNS, ID_TYPES, id_type_name, output_schema
from pipeline.runtime.stops import JobFailed

MANIFEST = "_manifest.json"
STAGING = "_staging"
LOCK = "_lock"
# 2: rows carry source_file/source_row (the exactly-once key); 1 keyed by id and is not resumable.
MANIFEST_FORMAT = 2
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
# Parts of the Ray Data dataflow (--dataflow ray-data): one per work unit, named by the unit's key
# (pipeline.data.input.WorkUnit.key: file, row group, first and one-past-last row; versions
# before the last field existed named the first three only): the name is the unit's completion
# record.
_UNIT_PART_RE = re.compile(r"^part-u(\d{6}-\d{6}-\d{9}(?:-\d{9})?)\.parquet$")
# Temporary files of write_json_atomic (the manifest, the metrics) a killed writer left behind.
_TMP_RE = re.compile(r"^_(manifest|metrics)\.json\.tmp\.")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Errors that mean the output's storage is full (a disk, a quota, a size limit).
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def unit_part_name(key: str) -> str:
    return f"part-u{key}.parquet"


def committed_unit_keys(output_dir: str) -> set[str]:
    """Keys of the work units committed in an output of the ray-data dataflow (from names only)."""
    if not os.path.isdir(output_dir):
        return set()
    return {m.group(1) for m in map(_UNIT_PART_RE.match, os.listdir(output_dir)) if m}



class OutputError(RuntimeError):
    """The output directory cannot be used for this job (says why and what to do)."""


class OutputWriteError(JobFailed):
    """Writing into the output failed part-way (no space left, a quota, an I/O error): the job
    fails (exit code 1) with this one line; what was committed before stays, temporary files are
    removed, and the same command resumes once the cause is fixed."""


def write_failure(output_dir: str, what: str, error: OSError) -> OutputWriteError:
    """The one line for an OSError while writing `what` into `output_dir`."""
    reason = error.strerror or str(error)
    if error.errno in _SPACE_ERRNOS:
        reason = f"no space left for the output ({reason})"
    return OutputWriteError(
        f"output {output_dir}: cannot write {what}: {reason}; the parts committed before are intact and the "
        "temporary files were removed: free space (or fix the cause) and rerun the same command to resume"
    )


def open_new_file(path: str, mode: str = "wb"):
    """A new file opened for writing, never through a link: O_CREAT | O_EXCL | O_NOFOLLOW (an
    existing name, a symbolic link included, is an error, FileExistsError). Every file the
    writer creates goes through here (tests replace it to simulate a full disk)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, mode)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _refuse_link(path: str, what: str) -> None:
    """OutputError when `path` is a symbolic link (the writer never follows one)."""
    if os.path.islink(path):
        raise OutputError(
            f"{path} is a symbolic link; {what} is written only as a regular file and links there are never "
            "followed: remove the link, or choose another --output"
        )


class CommittedIndex:
    """Which input rows already have committed output, for resuming exactly once.

    Keyed by (source_file, source_row): one entry per input row, however many output rows (QA
    questions) it has and whatever its id. Row numbers are kept per file.
    """

    def __init__(self) -> None:
        self._rows: dict[str, set[int]] = {}

    @classmethod
    def empty(cls) -> CommittedIndex:
        return cls()

    def add_rows(self, source_files, source_rows) -> None:
        for source_file, source_row in zip(source_files, source_rows):
            self._rows.setdefault(source_file, set()).add(source_row)

    def is_committed(self, key: tuple[str, int]) -> bool:
        return key[1] in self._rows.get(key[0], ())

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._rows.values())


def fsync_dir(path: str) -> None:
    """Makes a rename (a commit) in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, value: dict) -> None:
    """Replaces a JSON file whole (written aside under a fresh name, fsynced, renamed): readers
    never see half of it, and a link at its name is replaced, never written through. On a failed
    write the file aside is removed and OutputWriteError says why."""
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    directory = os.path.dirname(path) or "."
    try:
        with open_new_file(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        _remove_quietly(tmp)
        raise write_failure(directory, os.path.basename(path), error) from None
    fsync_dir(directory)


def read_manifest(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.lexists(path):
        return None
    _refuse_link(path, MANIFEST)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def output_id_type(output_dir: str) -> pa.DataType:
    """The type of an output's id column: the manifest's `id_type`, else (an output of an earlier
    version) its first part's, else string."""
    try:
        manifest = read_manifest(output_dir)
    except (OSError, ValueError, OutputError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("id_type") in ID_TYPES:
        return ID_TYPES[manifest["id_type"]]
    for name in committed_parts(output_dir):
        try:
            field = pq.read_schema(os.path.join(output_dir, name)).field("id")
        except (OSError, KeyError, pa.ArrowException):
            continue
        return field.type if field.type in ID_TYPES.values() else pa.string()
    return pa.string()


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Output rows as a table of `schema`. Integer ids go into a string id column as their digits
    (an output begun with string ids keeps them when resumed)."""
    if pa.types.is_string(schema.field("id").type):
        for row in rows:
            if isinstance(row.get("id"), int):
                row["id"] = str(row["id"])
    return pa.Table.from_pylist(rows, schema=schema)


def committed_parts(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if _PART_RE.match(name) or _UNIT_PART_RE.match(name))


def read_output(output_dir: str, columns=None) -> pa.Table:
    """All committed rows of an output directory (a convenience for tests and users), the id
    column in the output's id type."""
    schema = output_schema(output_id_type(output_dir))
    parts = [os.path.join(output_dir, p) for p in committed_parts(output_dir)]
    if not parts:
        return schema.empty_table().select(list(columns) if columns else list(COLUMNS))
    return pa.concat_tables(pq.read_table(p, columns=columns, schema=schema) for p in parts)


class _LockFile:
    """The open OUTPUT/_lock: holds the flock until closed (or the process dies)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock_output(output_dir: str) -> _LockFile:
    """An exclusive flock on OUTPUT/_lock for the writer's lifetime: two jobs writing the same
    directory would overwrite each other's parts. The kernel drops it when the process dies
    (even by SIGKILL), so it never goes stale. The file is opened with O_NOFOLLOW and must be a
    regular file with one link: a link planted at that name (to any file the job can write) is
    refused, never truncated or written through."""
    import fcntl
    import socket

    path = os.path.join(output_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            _refuse_link(path, LOCK)
        raise
    lock = _LockFile(fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OutputError(
                f"{path} is not a plain file of its own ({'a hard link' if stat.S_ISREG(st.st_mode) else 'not a regular file'}); "
                "the job's lock is written only into a regular file with one link: remove it, or choose another --output"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputError(
                f"output {output_dir} is being written by another job ({holder}); wait for it to finish or "
                "choose another --output"
            ) from None
        try:  # who holds it, for the message above: best effort (a full disk must not stop here)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass
    except BaseException:
        lock.close()
        raise
    return lock


class OutputWriter:
    """Buffers rows by document and commits them in parts. Not thread-safe: one caller at a time.

    Opening an existing output directory:
    - no manifest and no parts: a fresh job;
    - a manifest with the same fingerprint: resume (`committed` says what to skip), unless an
      input file's content changed since (`input_files`: pipeline.data.input.file_digests),
      which makes it a different job;
    - a different fingerprint: OutputError, unless overwrite=True, which deletes the previous
      parts, manifest and metrics (only files this writer owns) first.

    id_type: the input's id type (the output's id column; pipeline.data.schema.output_schema).
    input_files: the input's file_digests, recorded in the manifest and checked on resume.
    """

    def __init__(
        self, output_dir: str, *, job_id: str, fingerprint: str, config: dict,
        overwrite: bool = False, part_rows: int = 512, part_seconds: float = 60.0, dataflow: str = "driver",
        id_type: pa.DataType | str = "string", input_files: dict | None = None,
    ) -> None:
        check_choice("dataflow", dataflow, DATAFLOWS)
        self.dataflow = dataflow
        if "://" in output_dir:
            raise OutputError(
                f"output {output_dir!r}: only local (or mounted shared) directories are supported for output; "
                "the commit protocol relies on an atomic rename"
            )
        if not os.path.isabs(output_dir):
            raise OutputError(f"output {output_dir!r} must be an absolute path")
        self.output_dir = output_dir
        self.job_id = job_id
        self.fingerprint = fingerprint
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.schema = output_schema(id_type)
        self._input_files = input_files
        self._config = config
        self._buffer: list[dict] = []
        self._buffer_docs = 0
        self._last_commit = time.monotonic()
        self.rows_committed_this_run = 0
        self.parts_committed_this_run = 0
        # The first failed write (OutputWriteError): later flushes do not try again.
        self.failed: OutputWriteError | None = None

        try:
            os.makedirs(output_dir, exist_ok=True)
            self._lock = _lock_output(output_dir)
        except OSError as error:  # a file in the way, no permission, a read-only filesystem
            raise OutputError(
                f"output {output_dir} cannot be used as a directory to write results: "
                f"{error.strerror or error} ({error.filename or output_dir}); choose another --output"
            ) from None
        try:
            self._open(overwrite)
        except BaseException:
            if not os.path.islink(self._staging):
                shutil.rmtree(self._staging, ignore_errors=True)
            self._lock.close()
            raise

    @property
    def _staging(self) -> str:
        return os.path.join(self.output_dir, STAGING)

    def _open(self, overwrite: bool) -> None:
        output_dir, job_id, fingerprint = self.output_dir, self.job_id, self.fingerprint
        config = self._config
        for name in os.listdir(output_dir):  # left by a writer killed mid-write
            if _TMP_RE.match(name):
                _remove_quietly(os.path.join(output_dir, name))
        _refuse_link(self._staging, STAGING)
        manifest = read_manifest(output_dir)
        parts = committed_parts(output_dir)
        for name in parts:
            _refuse_link(os.path.join(output_dir, name), "a committed part")
        if overwrite:
            self._clear()
            manifest, parts = None, []
        elif manifest is None and parts:
            raise OutputError(
                f"output {output_dir} holds part files but no {MANIFEST}: not written by this pipeline or damaged; "
                "choose another --output, or pass --overwrite to replace its contents"
            )
        elif manifest is not None and manifest.get("format") != MANIFEST_FORMAT:
            raise OutputError(
                f"output {output_dir} was written by another version of this pipeline (manifest format "
                f"{manifest.get('format')}, this version writes {MANIFEST_FORMAT}) and cannot be resumed; choose "
                "another --output, or pass --overwrite to replace it"
            )
        elif manifest is not None and manifest.get("dataflow", "driver") != self.dataflow:
            raise OutputError(
                f"output {output_dir} was written by the {manifest.get('dataflow', 'driver')} dataflow and this job "
                f"runs --dataflow {self.dataflow}; the two commit differently and are never mixed: rerun with "
                f"--dataflow {manifest.get('dataflow', 'driver')} to resume it, choose another --output, or pass "
                "--overwrite to replace it"
            )
        elif manifest is not None and manifest.get("fingerprint") != fingerprint:
            raise OutputError(
                f"output {output_dir} holds results of a different job (job_id {manifest.get('job_id')}, "
                f"different input, model, prompt or generation settings). Rerun with the same settings to "
                f"resume it, choose another --output, or pass --overwrite to replace it"
            )
        elif manifest is not None and self._input_files is not None:
            from pipeline.data.input import changed_files

            changed = changed_files(manifest.get("input_files") or {}, self._input_files)
            if changed:
                raise OutputError(
                    f"output {output_dir} holds results of a different job: input file {changed[0]} changed since "
                    f"it was started ({len(changed)} file(s) with the same name, size and Parquet footer but other "
                    "bytes). Choose another --output, or pass --overwrite to replace it"
                )
        if os.path.isdir(self._staging):
            shutil.rmtree(self._staging, ignore_errors=True)
        elif os.path.lexists(self._staging):
            raise OutputError(f"{self._staging} is not a directory; {STAGING} is the writer's own: remove it, or "
                              "choose another --output")
        os.makedirs(self._staging)
        if manifest is not None and manifest.get("id_type") in ID_TYPES:
            id_type = ID_TYPES[manifest["id_type"]]
        elif manifest is not None:  # begun by a version that did not record it: its parts say
            id_type = output_id_type(output_dir)
        else:
            id_type = self.schema.field("id").type
        if id_type != self.schema.field("id").type:
            import logging

            logging.getLogger("pipeline.job").warning(
                "output %s was begun with %s ids; its remaining rows keep that type (--overwrite starts it again "
                "with the input's %s ids)", output_dir, id_type, self.schema.field("id").type)
            self.schema = output_schema(id_type)
        self.manifest = manifest or {
            "format": MANIFEST_FORMAT, "job_id": job_id, "fingerprint": fingerprint, "config": config,
            "parts": [], "complete": False, "runs": 0, "dataflow": self.dataflow,
        }
        self.manifest["id_type"] = id_type_name(id_type)
        if self._input_files is not None:
            self.manifest["input_files"] = self._input_files
        self.manifest["runs"] = int(self.manifest.get("runs", 0)) + 1
        self.manifest["complete"] = False
        # This run's attention backend, once its engine has started (record_attention_backend);
        # earlier runs' are in _metrics.json ("runs") and every row carries its own.
        self.manifest["attention_backend"] = None
        self.committed = CommittedIndex.empty()
        listed = {p["file"] for p in self.manifest["parts"]}
        missing = sorted(listed - set(parts))
        if missing:
            raise OutputError(
                f"output {output_dir}: parts listed in {MANIFEST} are missing ({missing[:3]}...); "
                "the directory was modified by hand. Pass --overwrite to start over"
            )
        self.committed_units: set[str] = set()
        if self.dataflow == "ray-data":
            # Completion records are the unit part names: nothing is read, no row key is held.
            self.committed_units = committed_unit_keys(output_dir)
            parts = [p for p in parts if _PART_RE.match(p)]
        for name in parts:
            path = os.path.join(output_dir, name)
            try:
                table = pq.read_table(path, columns=["source_file", "source_row"])
            except Exception as e:
                raise OutputError(f"committed part {path} cannot be read ({e}); remove it or pass --overwrite") from e
            self.committed.add_rows(table.column("source_file").to_pylist(), table.column("source_row").to_pylist())
            if name not in listed:  # renamed, but the driver died before the manifest update
                self.manifest["parts"].append({"file": name, "rows": table.num_rows, "recovered": True})
        self.resumed = len(self.committed) > 0 or bool(self.committed_units)
        self._next_part = max((int(_PART_RE.match(p).group(1)) + 1 for p in parts if _PART_RE.match(p)), default=0)
        write_json_atomic(os.path.join(output_dir, MANIFEST), self.manifest)
        if not parts:
            self._commit(self.schema.empty_table(), documents=0)  # the schema, readable from the start

    def record_attention_backend(self, record: dict | None) -> None:
        """The engine's attention backend for this run (pipeline.engine.attention_record.
        engine_record: what ran, why it fell back, per replica and rank), into the manifest now."""
        self.manifest["attention_backend"] = record
        write_json_atomic(os.path.join(self.output_dir, MANIFEST), self.manifest)

    def _clear(self) -> None:
        for name in os.listdir(self.output_dir):
            if _PART_RE.match(name) or _UNIT_PART_RE.match(name) or name in (MANIFEST, "_metrics.json", "_metrics.png"):  # not _lock
                os.remove(os.path.join(self.output_dir, name))

    def add_document(self, rows: list[dict]) -> None:
        """All output rows of one document; committed together."""
        for row in rows:
            row.setdefault("job_id", self.job_id)
        self._buffer.extend(rows)
        self._buffer_docs += 1
        if len(self._buffer) >= self.part_rows or time.monotonic() - self._last_commit >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        """Commits the buffered documents as one part. After a failed write (self.failed) nothing
        is tried again: those documents are not committed, and a rerun answers them."""
        if self._buffer and self.failed is None:
            rows, documents = self._buffer, self._buffer_docs
            # Taken out first: a part whose write fails is not committed and must not be tried
            # again by a later flush; one renamed into place must not be committed twice.
            self._buffer, self._buffer_docs = [], 0
            self._commit(rows_table(rows, self.schema), documents=documents)

    def _commit(self, table: pa.Table, *, documents: int) -> None:
        name = f"part-{self._next_part:05d}.parquet"
        staged = os.path.join(self._staging, name)
        try:
            try:
                with open_new_file(staged) as f:
                    pq.write_table(table, f, compression="zstd")
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(staged, os.path.join(self.output_dir, name))  # the commit
            except OSError as error:
                _remove_quietly(staged)
                raise write_failure(self.output_dir, name, error) from None
            fsync_dir(self.output_dir)
            self._next_part += 1
            self.committed.add_rows(table.column("source_file").to_pylist(), table.column("source_row").to_pylist())
            self.manifest["parts"].append({"file": name, "rows": table.num_rows, "documents": documents})
            self.rows_committed_this_run += table.num_rows
            self.parts_committed_this_run += table.num_rows > 0
            self._last_commit = time.monotonic()
            # A manifest that fails to update here is completed by the next start (the part is in place).
            write_json_atomic(os.path.join(self.output_dir, MANIFEST), self.manifest)
        except OutputWriteError as error:
            self.failed = self.failed or error
            raise

    def close(self, *, complete: bool, summary: dict | None = None) -> None:
        """Commits what is buffered, records the run in the manifest, removes the staging
        directory and releases the lock; the last two happen whatever fails before them."""
        try:
            self.flush()
            self.manifest["complete"] = complete and self.failed is None
            if summary is not None:
                self.manifest["last_run"] = summary
            write_json_atomic(os.path.join(self.output_dir, MANIFEST), self.manifest)
        finally:
            if not os.path.islink(self._staging):
                shutil.rmtree(self._staging, ignore_errors=True)
            self._lock.close()  # releases the flock


def commit_unit(output_dir: str, key: str, rows: list[dict], id_type: pa.DataType | str = "string") -> int:
    """A unit's rows as `part-u<key>.parquet`: staged, fsynced, renamed into place (replacing the
    part of an earlier attempt of the same unit, never adding a second one). A failed write
    removes the staged file and raises OutputWriteError."""
    rows.sort(key=lambda r: (r["source_file"], r["source_row"],
                             -1 if r["question_index"] is None else r["question_index"]))
    table = rows_table(rows, output_schema(id_type))
    staging = os.path.join(output_dir, STAGING)
    _refuse_link(staging, STAGING)
    name = unit_part_name(key)
    staged = os.path.join(staging, f"{name}.{uuid.uuid4().hex}")
    try:
        os.makedirs(staging, exist_ok=True)
        with open_new_file(staged) as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, os.path.join(output_dir, name))  # the commit
    except OSError as error:
        _remove_quietly(staged)
        raise write_failure(output_dir, name, error) from None
    fsync_dir(output_dir)
    return table.num_rows


__all__ = [
    "OutputWriter", "OutputError", "OutputWriteError", "CommittedIndex", "read_output", "read_manifest",
    "committed_parts", "committed_unit_keys", "unit_part_name", "commit_unit", "fsync_dir", "write_json_atomic",
    "open_new_file", "output_id_type", "rows_table", "write_failure",
]
