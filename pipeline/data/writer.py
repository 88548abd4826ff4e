"""Parquet output, committed exactly once: parts published by atomic rename, manifest, lock (the
schema every part has is pipeline.data.schema.OUTPUT_SCHEMA).

Layout of an output directory (local filesystem):

    OUTPUT/part-00000.parquet ...   committed parts (a part exists under this name only once whole)
    OUTPUT/_manifest.json           job id, job fingerprint, list of committed parts (atomic rewrite)
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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config.job import DATAFLOWS
from pipeline.config.validate import check_choice
from pipeline.data.schema import COLUMNS, OUTPUT_SCHEMA

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


def unit_part_name(key: str) -> str:
    return f"part-u{key}.parquet"


def committed_unit_keys(output_dir: str) -> set[str]:
    """Keys of the work units committed in an output of the ray-data dataflow (from names only)."""
    if not os.path.isdir(output_dir):
        return set()
    return {m.group(1) for m in map(_UNIT_PART_RE.match, os.listdir(output_dir)) if m}



class OutputError(RuntimeError):
    """The output directory cannot be used for this job (says why and what to do)."""


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
    """Replaces a JSON file whole (written aside, fsynced, renamed): readers never see half of it."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def read_manifest(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def committed_parts(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if _PART_RE.match(name) or _UNIT_PART_RE.match(name))


def read_output(output_dir: str, columns=None) -> pa.Table:
    """All committed rows of an output directory (a convenience for tests and users)."""
    parts = [os.path.join(output_dir, p) for p in committed_parts(output_dir)]
    if not parts:
        return OUTPUT_SCHEMA.empty_table().select(list(columns) if columns else list(COLUMNS))
    return pa.concat_tables(pq.read_table(p, columns=columns, schema=OUTPUT_SCHEMA) for p in parts)


def _lock_output(output_dir: str):
    """An exclusive flock on OUTPUT/_lock for the writer's lifetime: two jobs writing the same
    directory would overwrite each other's parts. The kernel drops it when the process dies
    (even by SIGKILL), so it never goes stale."""
    import fcntl
    import socket

    handle = open(os.path.join(output_dir, LOCK), "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputError(
            f"output {output_dir} is being written by another job ({holder}); wait for it to finish or "
            "choose another --output"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


class OutputWriter:
    """Buffers rows by document and commits them in parts. Not thread-safe: one caller at a time.

    Opening an existing output directory:
    - no manifest and no parts: a fresh job;
    - a manifest with the same fingerprint: resume (`committed` says what to skip);
    - a different fingerprint: OutputError, unless overwrite=True, which deletes the previous
      parts, manifest and metrics (only files this writer owns) first.
    """

    def __init__(
        self, output_dir: str, *, job_id: str, fingerprint: str, config: dict,
        overwrite: bool = False, part_rows: int = 512, part_seconds: float = 60.0, dataflow: str = "driver",
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
        self._config = config
        self._buffer: list[dict] = []
        self._buffer_docs = 0
        self._last_commit = time.monotonic()
        self.rows_committed_this_run = 0
        self.parts_committed_this_run = 0

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
            self._lock.close()
            raise

    def _open(self, overwrite: bool) -> None:
        output_dir, job_id, fingerprint = self.output_dir, self.job_id, self.fingerprint
        config = self._config
        manifest = read_manifest(output_dir)
        parts = committed_parts(output_dir)
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
        shutil.rmtree(os.path.join(output_dir, STAGING), ignore_errors=True)
        os.makedirs(os.path.join(output_dir, STAGING))
        self.manifest = manifest or {
            "format": MANIFEST_FORMAT, "job_id": job_id, "fingerprint": fingerprint, "config": config,
            "parts": [], "complete": False, "runs": 0, "dataflow": self.dataflow,
        }
        self.manifest["runs"] = int(self.manifest.get("runs", 0)) + 1
        self.manifest["complete"] = False
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
            self._commit(OUTPUT_SCHEMA.empty_table(), documents=0)  # the schema, readable from the start

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
        if self._buffer:
            self._commit(pa.Table.from_pylist(self._buffer, schema=OUTPUT_SCHEMA), documents=self._buffer_docs)
            self._buffer.clear()
            self._buffer_docs = 0

    def _commit(self, table: pa.Table, *, documents: int) -> None:
        name = f"part-{self._next_part:05d}.parquet"
        staged = os.path.join(self.output_dir, STAGING, name)
        with open(staged, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.rename(staged, os.path.join(self.output_dir, name))  # the commit
        fsync_dir(self.output_dir)
        self.committed.add_rows(table.column("source_file").to_pylist(), table.column("source_row").to_pylist())
        self.manifest["parts"].append({"file": name, "rows": table.num_rows, "documents": documents})
        write_json_atomic(os.path.join(self.output_dir, MANIFEST), self.manifest)
        self._next_part += 1
        self.rows_committed_this_run += table.num_rows
        self.parts_committed_this_run += table.num_rows > 0
        self._last_commit = time.monotonic()

    def close(self, *, complete: bool, summary: dict | None = None) -> None:
        self.flush()
        self.manifest["complete"] = complete
        if summary is not None:
            self.manifest["last_run"] = summary
        write_json_atomic(os.path.join(self.output_dir, MANIFEST), self.manifest)
        shutil.rmtree(os.path.join(self.output_dir, STAGING), ignore_errors=True)
        self._lock.close()  # releases the flock


def commit_unit(output_dir: str, key: str, rows: list[dict]) -> int:
    """A unit's rows as `part-u<key>.parquet`: staged, fsynced, renamed into place (replacing the
    part of an earlier attempt of the same unit, never adding a second one)."""
    rows.sort(key=lambda r: (r["source_file"], r["source_row"],
                             -1 if r["question_index"] is None else r["question_index"]))
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    staging = os.path.join(output_dir, STAGING)
    os.makedirs(staging, exist_ok=True)
    staged = os.path.join(staging, f"{unit_part_name(key)}.{uuid.uuid4().hex}")
    with open(staged, "wb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, os.path.join(output_dir, unit_part_name(key)))  # the commit
    fsync_dir(output_dir)
    return table.num_rows


__all__ = [
    "OutputWriter", "OutputError", "CommittedIndex", "read_output", "read_manifest", "committed_parts",
    "committed_unit_keys", "unit_part_name", "commit_unit", "fsync_dir", "write_json_atomic",
]
