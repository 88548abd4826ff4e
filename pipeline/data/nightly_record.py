"""The nightly record: what an output root summarised OK, kept so that a night's skip decision reads
O(this night's input), not O(every earlier partition).

    record = sync_record("/data/summaries")            # brings the record up to date (cheap when current)
    mask = record.summarised(ids, content_hashes, config_hash=cfg, run_date="2026-11-25")  # bool per doc

Skip semantics (exactly those of reading every earlier partition): a document is summarised iff an
earlier partition (a `run_date=` directory whose name sorts before tonight's, Python string
order) holds a committed row with status "ok" and the same id, content hash and config hash.

Layout (OUTPUT_ROOT/_nightly_record/; the leading "_" keeps it out of
`pyarrow.dataset.dataset(OUTPUT_ROOT, partitioning="hive")` and of `jobs.show`):

    record.json              format, key scheme, the runs, and every covered partition with the
                             signature of each committed part it holds ([size, mtime_ns, inode])
    run-<hex>.h1.npy         uint64, sorted: first 64 bits of each entry's key
    run-<hex>.h2.npy         uint64: last 64 bits, aligned with h1
    run-<hex>.part.npy       uint32: index into the run's own sorted list of partition names: the
                             EARLIEST partition holding the key (duplicates within a run are merged)
    _lock                    flock held by a process that changes the record

KEYS. An entry is the 128-bit BLAKE2b digest (hashlib, RFC 7693: its output never changes with a
library version, which matters for a file kept for years) of a canonical byte string of
(config_hash, content_hash, id), split into two uint64 halves h1, h2 (numpy has no 128-bit
integer; the two halves of one cryptographic digest are two independent 64-bit hashes).
- config_hash and content_hash are written as `s<byte length>:<bytes>` (`n` for null), then the
  id as `s<bytes>` (`n` for null) to the end: a prefix-free code, so no two different triples
  share a string whatever bytes they hold.
- id: a string as it is; an integer as its decimal string (pyarrow's cast, the same digits as
  Python's str()), so "42" in an old partition (ids were written as strings) and 42 in a newer one
  (integer ids kept as integers) are the same document. Other types go through pyarrow's cast to
  string.
- content_hash: its first 40 bytes (hex digits: characters). Outputs hold the sha256 hex digest;
  whether a version stores 40 or all 64 digits, old and new partitions compare equal on the first
  40 (160 bits: two different texts share them with probability 2^-160).
- False skips: a night of n documents meets a record of N entries; a document is wrongly skipped
  only if its 128-bit key equals another triple's: probability <= n*N/2^128, 1.5e-27 per night
  at n = 50,000 and N = 10 million. One 64-bit hash would give n*N/2^64 = 2.7e-8 per night (1e-5
  a year, growing with history), and a false skip silently drops a changed document forever:
  hence two.

WHY SORTED ARRAYS ON DISK (not a Parquet record joined with pyarrow, not a Python set): an Arrow
hash join (`Table.join(..., "left anti")`) and a set both build a hash table of the whole record,
every night: O(history) reads and memory; a Parquet record sorted by key, read with a filter,
prunes nothing, since a night's keys are spread over every row group. Sorted fixed-width keys
memory-mapped from .npy files and probed with np.searchsorted touch O(n log N) pages and copy
nothing else into the process; np.load(mmap_mode="r") opens them in microseconds. (A night of
50,000 documents against 10 million entries touches most of the record's 200 MB of pages, from
the page cache; a small night touches a small part.) New nights append small sorted delta runs; when there are more than
`max_delta_runs`, an update merges every run into one base (LSM style): numpy's stable sort
(timsort) merges the already sorted runs in about linear time.

STALENESS. record.json lists every partition it covers with the signature of each committed part
(pipeline.output.committed_parts, the files readers read). Each sync lists the root, the parts of
every partition and stats them (metadata only, no row read; with record.json's parsing, 0.3 s for
20,075 part files in benchmarks/nightly_startup.py: it grows with the number of part files):
- a partition or part the record does not know: read those parts only, add them as a delta run
  (a new night; or a night that crashed after committing parts, rerun on the same date);
- a covered part removed or changed (size, mtime or inode: a partition deleted, rerun with
  --overwrite, edited by hand): the entries cannot be trusted (a key's earliest partition may be
  gone), so the whole record is rebuilt from the partitions;
- no record, an unreadable or truncated record.json or run file, another format or key scheme:
  rebuilt. Existing outputs with no record work: the first sync builds it.
A part is stat-ed before and after it is read; a part replaced in between (a concurrent
--overwrite) restarts the sync. A committed part that cannot be read fails the sync with an
OutputError naming the file. What is NOT detected: bytes of a run file altered in place without
changing its size (a checksum would read the whole record every night), except partition indices
out of range, which the probe finds (it then rebuilds the record); nothing here or in
pipeline.output writes a file in place.

CONCURRENCY. Changes hold an exclusive flock on _nightly_record/_lock: two nights of one root that both
update the record run one after the other (the second waits, then re-reads the listing and adds
what the first did not). Run files are written under new names, fsynced, then record.json is
replaced atomically (os.replace): a reader sees the old record or the new one, never a mix; a
reader whose run files were merged away meanwhile re-reads record.json. Files no record.json names
(left by a writer that died) are removed by the next writer, under the lock. Where the record
cannot be written (a read-only root), the sync logs it and answers from a record built in memory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.writer import OutputError, committed_parts, open_new_file

log = logging.getLogger("pipeline.nightly_record")

RECORD_DIR = "_nightly_record"
RECORD_FILE = "record.json"
PARTITION_PREFIX = "run_date="
RECORD_FORMAT = 1
# Names the key scheme; a record written under another scheme is rebuilt, never compared.
KEY_SCHEME = "blake2b-128/person=dca-nightly-v1/s<len>:config_hash|n,s<len>:content_hash[:40 bytes]|n,s<id>|n"
_PERSON = b"dca-nightly-v1"
_COLUMNS = ("h1", "h2", "part")
_DTYPES = {"h1": np.dtype("<u8"), "h2": np.dtype("<u8"), "part": np.dtype("<u4")}
_READ_COLUMNS = ["id", "content_hash", "config_hash", "status"]
_CONTENT_PREFIX = 40


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordSettings:
    """How the record is kept (the defaults suit a nightly root; tests use small values)."""

    # Delta runs (one per night) beyond which an update with compact=True merges all runs into one.
    max_delta_runs: int = 8
    # A sync at start-up does not merge (it delays the night), unless runs pile up past this many
    # (post-job updates that never ran: every night stopped or killed).
    max_runs_without_compaction: int = 32
    # Rows canonicalised and hashed at a time while reading partitions (bounds transient memory).
    hash_batch_rows: int = 262_144

    def __post_init__(self) -> None:
        for name in ("max_delta_runs", "max_runs_without_compaction", "hash_batch_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RecordSettings.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_runs_without_compaction <= self.max_delta_runs:
            raise ValueError("RecordSettings.max_runs_without_compaction must be above max_delta_runs")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyncReport:
    """What one sync did."""

    action: str  # "current" | "appended" | "rebuilt" (also the first build) | "compacted"
    reason: str | None  # why it was rebuilt ("no record", "run_date=... was deleted", ...)
    partitions: int  # partitions covered
    parts_read: int  # part files read by this sync
    rows_read: int  # rows in them
    entries: int  # entries in the record after the sync
    runs: int  # runs after the sync
    persisted: bool  # False: the record could not be written and lives in memory only
    seconds: float


def partition_name(run_date: str) -> str:
    """The directory of a run date under the output root (`run_date=YYYY-MM-DD`)."""
    return f"{PARTITION_PREFIX}{run_date}"


# ------------------------------------------------------------------------------------------ keys


def _field(values: pa.Array) -> pa.Array:
    """Each value as `s<byte length>:<bytes>`, null as `n` (a prefix-free code: see the docstring)."""
    values = values.cast(pa.binary())
    encoded = pc.binary_join_element_wise(
        pa.scalar(b"s"), pc.binary_length(values).cast(pa.string()).cast(pa.binary()), pa.scalar(b":"), values,
        pa.scalar(b""))
    return pc.if_else(pc.is_null(values), pa.scalar(b"n"), encoded)


def _as_array(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    values = list(values)
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        # A mix (ints and strings in one batch): ints take their decimal string, the canonical
        # form of an integer id, so the key does not depend on what else is in the batch.
        return pa.array([v if v is None or isinstance(v, (str, bytes)) else str(v) for v in values], pa.string())


def _canonical_ids(ids: pa.Array) -> pa.Array:
    if pa.types.is_null(ids.type):
        return ids.cast(pa.string())
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_binary(ids.type) \
            or pa.types.is_large_binary(ids.type):
        return ids
    return ids.cast(pa.string())  # integers: decimal digits, as Python's str()


def _canonical_content(hashes: pa.Array) -> pa.Array:
    """The first 40 bytes (of hex digits: 40 characters)."""
    return pc.binary_slice(hashes.cast(pa.binary()), 0, _CONTENT_PREFIX)


def record_keys(ids, content_hashes, config_hashes) -> tuple[np.ndarray, np.ndarray]:
    """The record's keys of documents: (h1, h2), two uint64 arrays of len(ids).

    ids: strings or integers (a pyarrow array or a sequence; None for null); content_hashes: hex
    strings (compared on their first 40 characters); config_hashes: one string for all rows, or
    one per row. Records and probes use this one function, so they agree by construction."""
    ids = _canonical_ids(_as_array(ids))
    content = _as_array(content_hashes)
    if len(content) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(content)} content hashes")
    if isinstance(config_hashes, str):
        configs, config_of_row = [config_hashes], None
    else:
        encoded = pc.dictionary_encode(_as_array(config_hashes))
        if len(encoded) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(encoded)} config hashes")
        configs = encoded.dictionary.to_pylist()
        config_of_row = encoded.indices.fill_null(len(configs)).to_numpy(zero_copy_only=False).tolist()
        configs.append(None)
    # The canonical string is field(config) + field(content[:40]) + id tail. The config part is
    # hashed once per distinct config (a hasher state copied per row); the rest per row.
    ids = ids.cast(pa.binary())
    tails = pc.binary_join_element_wise(
        _field(_canonical_content(content)),
        pc.if_else(pc.is_null(ids), pa.scalar(b"n"), pc.binary_join_element_wise(pa.scalar(b"s"), ids, pa.scalar(b""))),
        pa.scalar(b""))
    bases = []
    for config in configs:
        base = hashlib.blake2b(digest_size=16, person=_PERSON)
        config = config.encode() if isinstance(config, str) else config
        base.update(b"n" if config is None else b"s%d:%s" % (len(config), config))
        bases.append(base)
    # Written by hand: neither pyarrow nor numpy has a vectorised cryptographic hash of
    # variable-length strings (pandas.util.hash_array is a 64-bit SipHash whose output no
    # standard fixes); hashlib's BLAKE2b is one C call per row (~1 us), which matters only when
    # the record is built from the whole history.
    digests = bytearray()
    if config_of_row is None:
        base = bases[0]
        for tail in tails.to_pylist():
            h = base.copy()
            h.update(tail)
            digests += h.digest()
    else:
        for tail, config in zip(tails.to_pylist(), config_of_row):
            h = bases[config].copy()
            h.update(tail)
            digests += h.digest()
    pairs = np.frombuffer(bytes(digests), dtype="<u8").reshape(-1, 2)  # (n, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


# ------------------------------------------------------------------------------------------ runs


@dataclasses.dataclass
class _Run:
    """Entries sorted by h1 (then h2), unique (h1, h2), part = the earliest partition holding it."""

    name: str | None  # file stem; None while only in memory
    partitions: list[str]  # sorted
    h1: np.ndarray
    h2: np.ndarray
    part: np.ndarray

    def __len__(self) -> int:
        return len(self.h1)


def _sorted_run(h1: np.ndarray, h2: np.ndarray, part: np.ndarray, *, nearly_sorted: bool = False):
    """(h1, h2, part) sorted by h1, then h2 and part, with duplicate keys merged into the first
    (smallest part index = earliest partition). nearly_sorted: concatenated sorted runs, for
    which the stable sort (timsort) merges in about linear time."""
    order = np.argsort(h1, kind="stable" if nearly_sorted else None)
    h1, h2, part = h1[order], h2[order], part[order]
    same_h1 = h1[1:] == h1[:-1]
    if same_h1.any():
        # Rare (duplicate keys, or 64-bit collisions of h1): order just those groups by (h2,
        # part). The rows of the groups are in h1 order already, so sorting them together by
        # (h1, h2, part) and writing them back keeps the whole array sorted.
        rows = np.flatnonzero(np.concatenate([same_h1, [False]]) | np.concatenate([[False], same_h1]))
        sub = np.lexsort((part[rows], h2[rows], h1[rows]))
        h1[rows], h2[rows], part[rows] = h1[rows][sub], h2[rows][sub], part[rows][sub]
        keep = np.concatenate([[True], (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])])
        h1, h2, part = h1[keep], h2[keep], part[keep]
    return h1, h2, part


def _merge_runs(runs: list[_Run]) -> _Run:
    partitions = sorted(set().union(*(run.partitions for run in runs)))
    index = {name: i for i, name in enumerate(partitions)}
    remapped = [np.array([index[p] for p in run.partitions], dtype=np.uint32)[np.asarray(run.part)] for run in runs]
    h1, h2, part = _sorted_run(np.concatenate([np.asarray(r.h1) for r in runs]),
                               np.concatenate([np.asarray(r.h2) for r in runs]),
                               np.concatenate(remapped), nearly_sorted=True)
    return _Run(None, partitions, h1, h2, part)


def _probe(run: _Run, q1: np.ndarray, q2: np.ndarray, earlier: np.ndarray) -> np.ndarray:
    """Which sorted queries (q1 ascending) have an entry in the run from an earlier partition."""
    n = len(run)
    found = np.zeros(len(q1), dtype=bool)
    if n == 0 or len(q1) == 0:
        return found
    lo = np.searchsorted(run.h1, q1)  # (n_queries,): O(log N) page touches each, nothing else read
    pos = np.minimum(lo, n - 1)
    candidates = np.flatnonzero((lo < n) & (np.asarray(run.h1[pos]) == q1))
    at = pos[candidates]
    part = np.asarray(run.part[at])
    if len(part) and int(part.max()) >= len(earlier):
        raise _Corrupt(f"run {run.name}: a partition index out of range")
    found[candidates] = (np.asarray(run.h2[at]) == q2[candidates]) & earlier[part]
    # Entries sharing h1 with the first one (a 2^-64 event per pair): checked one by one.
    after = at + 1
    has_next = after < n
    group = candidates[has_next][np.asarray(run.h1[after[has_next]]) == q1[candidates[has_next]]]
    for i in group:
        k = int(pos[i])
        while k < n and run.h1[k] == q1[i]:
            if run.h2[k] == q2[i] and earlier[int(run.part[k])]:
                found[i] = True
                break
            k += 1
    return found


class _Corrupt(Exception):
    """The stored record cannot be used (rebuild it)."""


class _Changed(Exception):
    """A part changed while it was being read (restart the sync)."""


# ----------------------------------------------------------------------------------- the record


class NightlyRecord:
    """A consistent snapshot of an output root's record (from sync_record). Read-only; the run
    files it maps stay valid even if another process replaces the record meanwhile."""

    def __init__(self, output_root: str, runs: list[_Run], report: SyncReport, settings: RecordSettings) -> None:
        self.output_root = output_root
        self.report = report
        self._runs = runs
        self._settings = settings

    @property
    def entries(self) -> int:
        return sum(len(run) for run in self._runs)

    @property
    def partitions(self) -> list[str]:
        return sorted(set().union(*(run.partitions for run in self._runs))) if self._runs else []

    def summarised(self, ids, content_hashes, *, config_hash: str, run_date: str) -> np.ndarray:
        """bool per document: an earlier partition than run_date's holds an OK row with the same
        id, content hash and config_hash. ids / content_hashes: aligned, as in record_keys."""
        if not isinstance(config_hash, str) or not config_hash:
            raise ValueError(f"config_hash must be a non-empty string, got {config_hash!r}")
        return self._summarised(ids, content_hashes, config_hash, run_date, rebuild_if_damaged=True)

    def _summarised(self, ids, content_hashes, config_hash: str, run_date: str, *, rebuild_if_damaged: bool):
        q1, q2 = record_keys(ids, content_hashes, config_hash)
        tonight = partition_name(run_date)
        order = np.argsort(q1)  # ascending probes walk each run's pages once, in order
        s1, s2 = q1[order], q2[order]
        hit = np.zeros(len(q1), dtype=bool)
        try:
            for run in self._runs:
                earlier = np.array([name < tonight for name in run.partitions], dtype=bool)
                if earlier.any():
                    hit |= _probe(run, s1, s2, earlier)
        except _Corrupt as e:
            if not rebuild_if_damaged:
                raise OutputError(f"nightly record of {self.output_root} is damaged right after a rebuild ({e})") from e
            log.warning("nightly record of %s is damaged (%s): rebuilding it from the partitions", self.output_root, e)
            fresh = _sync(self.output_root, compact=False, settings=self._settings, force_rebuild=str(e))
            self._runs, self.report = fresh._runs, fresh.report
            return self._summarised(ids, content_hashes, config_hash, run_date, rebuild_if_damaged=False)
        out = np.zeros(len(q1), dtype=bool)
        out[order] = hit
        return out

    def summarised_pairs(self, pairs: Iterable[tuple[object, str | None]], *, config_hash: str, run_date: str,
                         batch_rows: int = 100_000) -> set[tuple]:
        """The (id, content_hash) pairs of `pairs` that are summarised (see summarised), probed in
        vectorised batches of batch_rows: memory is O(batch + matches), whatever the input."""
        done: set[tuple] = set()
        batch: list[tuple] = []

        def probe() -> None:
            if batch:
                ids, hashes = zip(*batch)
                mask = self.summarised(list(ids), list(hashes), config_hash=config_hash, run_date=run_date)
                done.update(pair for pair, hit in zip(batch, mask) if hit)
                batch.clear()

        for pair in pairs:
            batch.append(pair)
            if len(batch) >= batch_rows:
                probe()
        probe()
        return done


# ------------------------------------------------------------------------------- on disk: state


def _record_dir(output_root: str) -> str:
    return os.path.join(output_root, RECORD_DIR)


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _list_partitions(output_root: str) -> dict[str, dict[str, list[int]]]:
    """Every partition directory and the signature of each committed part in it (metadata only)."""
    listing: dict[str, dict[str, list[int]]] = {}
    if not os.path.isdir(output_root):
        return listing
    for name in sorted(os.listdir(output_root)):
        directory = os.path.join(output_root, name)
        if not name.startswith(PARTITION_PREFIX) or not os.path.isdir(directory):
            continue
        parts = {}
        for part in committed_parts(directory):
            try:
                parts[part] = _signature(os.stat(os.path.join(directory, part)))
            except FileNotFoundError:  # removed between the listing and the stat (an --overwrite)
                raise _Changed(f"{name}/{part} disappeared while listing") from None
        listing[name] = parts
    return listing


def _read_state(record_dir: str) -> tuple[dict | None, str]:
    """(record.json, "") or (None, why it cannot be used)."""
    path = os.path.join(record_dir, RECORD_FILE)
    if not os.path.exists(path):
        return None, "no record"
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"{RECORD_FILE} unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or state.get("format") != RECORD_FORMAT or state.get("key") != KEY_SCHEME:
        return None, f"{RECORD_FILE} has another format or key scheme"
    if not isinstance(state.get("runs"), list) or not isinstance(state.get("partitions"), dict):
        return None, f"{RECORD_FILE} is incomplete"
    return state, ""


def _load_runs(record_dir: str, state: dict) -> list[_Run]:
    runs = []
    try:
        for meta in state["runs"]:
            arrays = {}
            for column in _COLUMNS:
                path = os.path.join(record_dir, f"{meta['name']}.{column}.npy")
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                if array.dtype != _DTYPES[column] or array.shape != (int(meta["entries"]),):
                    raise _Corrupt(f"{os.path.basename(path)} holds {array.dtype}{array.shape}, "
                                   f"expected {meta['entries']} entries")
                arrays[column] = array
            runs.append(_Run(meta["name"], list(meta["partitions"]), arrays["h1"], arrays["h2"], arrays["part"]))
    except FileNotFoundError as e:
        raise _Corrupt(f"run file {os.path.basename(e.filename or '')} is missing") from None
    except (ValueError, OSError, KeyError, TypeError) as e:  # truncated (mmap past the end), bad header
        raise _Corrupt(f"a run file cannot be read ({type(e).__name__}: {e})") from None
    return runs


def _plan(state: dict | None, listing: dict[str, dict[str, list[int]]]) -> tuple[str | None, dict[str, list[str]]]:
    """(why the record must be rebuilt or None, {partition: parts it does not cover yet})."""
    if state is None:
        return "no record", {}
    covered: dict[str, dict[str, list[int]]] = state["partitions"]
    for name, parts in covered.items():
        if name not in listing:
            return f"{name} was deleted", {}
        for part, signature in parts.items():
            if listing[name].get(part) != signature:
                return f"{name}/{part} was changed or removed (--overwrite or by hand)", {}
    new = {name: [p for p in parts if p not in covered.get(name, {})] for name, parts in listing.items()}
    return None, {name: parts for name, parts in new.items() if parts or name not in covered}


# ------------------------------------------------------------------------------ reading partitions


def _read_part(path: str, name: str, part: str) -> pa.Table:
    try:
        table = pq.read_table(path, columns=_READ_COLUMNS)
    except FileNotFoundError:
        raise _Changed(f"{name}/{part} disappeared while reading") from None
    except Exception as e:  # a damaged part: the night cannot decide what it already did
        raise OutputError(
            f"committed part {path} cannot be read for the nightly skip decision ({type(e).__name__}: {e}); "
            "remove or repair that partition") from e
    table = table.filter(pc.equal(table["status"], "ok"))
    return table.set_column(table.schema.get_field_index("id"), "id", _canonical_ids(table["id"].combine_chunks()))


def _read_partition(output_root: str, name: str, parts: list[str]) -> tuple[pa.Table, int]:
    """(id, content_hash, config_hash of the OK rows of these parts of one partition, rows read).

    pyarrow.dataset reads the parts together (threads, one call); a partition whose parts do not
    share a schema (ids written as strings, then as integers) or with a damaged part is read part
    by part, which names the file that fails."""
    import pyarrow.dataset as ds

    paths = [os.path.join(output_root, name, part) for part in parts]
    try:
        table = ds.dataset(paths, format="parquet").to_table(columns=_READ_COLUMNS)
        rows = table.num_rows
        table = table.filter(pc.equal(table["status"], "ok")).select(_READ_COLUMNS[:3])
        table = table.set_column(0, "id", _canonical_ids(table["id"].combine_chunks()))
    except Exception:  # noqa: BLE001 - read again part by part, which says what is wrong
        tables = [_read_part(path, name, part) for path, part in zip(paths, parts)]
        rows = sum(pq.read_metadata(path).num_rows for path in paths)
        tables = [t.select(_READ_COLUMNS[:3]).set_column(0, "id", t["id"].cast(pa.large_binary())) for t in tables]
        table = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in _READ_COLUMNS[:3]})
    return table, rows


def _read_parts(output_root: str, wanted: dict[str, Iterable[str]], listing, settings: RecordSettings):
    """Entries of the OK rows of the given parts, as one sorted run; (run, parts read, rows read).
    Each part's signature is checked after reading against the listing's, taken before: a part
    replaced in between raises _Changed (the sync starts again)."""
    partitions = sorted(wanted)
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pending: list[pa.Table] = []
    pending_part: list[np.ndarray] = []
    pending_rows = parts_read = rows_read = 0

    def flush() -> None:
        nonlocal pending_rows
        if pending:
            table = pa.concat_tables(pending, promote_options="permissive")
            h1, h2 = record_keys(table["id"], table["content_hash"], table["config_hash"])
            chunks.append((h1, h2, np.concatenate(pending_part)))
            pending.clear()
            pending_part.clear()
            pending_rows = 0

    for index, name in enumerate(partitions):
        parts = list(wanted[name])
        if not parts:
            continue
        table, rows = _read_partition(output_root, name, parts)
        for part in parts:
            try:
                after = _signature(os.stat(os.path.join(output_root, name, part)))
            except FileNotFoundError:
                after = None
            if after != listing[name][part]:  # replaced since it was listed: the rows may be another job's
                raise _Changed(f"{name}/{part} changed while reading")
        parts_read += len(parts)
        rows_read += rows
        if table.num_rows:
            # One id type for the batch: large_binary holds strings and the integers' digits.
            pending.append(table.set_column(0, "id", table["id"].cast(pa.large_binary())))
            pending_part.append(np.full(table.num_rows, index, dtype=np.uint32))
            pending_rows += table.num_rows
            if pending_rows >= settings.hash_batch_rows:
                flush()
    flush()
    if chunks:
        h1, h2, part = _sorted_run(*(np.concatenate(c) for c in zip(*chunks)))
    else:
        h1 = h2 = np.empty(0, np.uint64)
        part = np.empty(0, np.uint32)
    return _Run(None, partitions, h1, h2, part), parts_read, rows_read


# ---------------------------------------------------------------------------------- writing


def _open_lock(record_dir: str):
    """The record's lock file, opened (OSError where the root cannot be written), never through a
    link (O_NOFOLLOW: a link planted at its name is an error, ELOOP). Nothing is written into it."""
    if os.path.islink(record_dir):
        raise OSError(f"{record_dir} is a symbolic link")
    os.makedirs(record_dir, exist_ok=True)
    fd = os.open(os.path.join(record_dir, "_lock"),
                 os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "rb")


@contextmanager
def _locked(handle):
    """Exclusive flock of the record for the block: waits for another writer (the kernel drops
    it when a process dies, so it never goes stale)."""
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_run(record_dir: str, run: _Run) -> None:
    run.name = f"run-{uuid.uuid4().hex[:16]}"
    for column in _COLUMNS:
        final = os.path.join(record_dir, f"{run.name}.{column}.npy")
        tmp = f"{final}.tmp.{uuid.uuid4().hex[:8]}"
        with open_new_file(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(getattr(run, column), dtype=_DTYPES[column]), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)


def _publish(record_dir: str, runs: list[_Run], listing: dict) -> None:
    """Writes the runs not yet on disk, then replaces record.json (the commit), then removes what
    no record names. Called under the lock."""
    for run in runs:
        if run.name is None:
            _write_run(record_dir, run)
    _fsync_dir(record_dir)
    state = {
        "format": RECORD_FORMAT, "key": KEY_SCHEME, "written_at": time.time(),
        "runs": [{"name": r.name, "entries": len(r), "partitions": r.partitions} for r in runs],
        "partitions": listing,
    }
    path = os.path.join(record_dir, RECORD_FILE)
    tmp = f"{path}.tmp.{uuid.uuid4().hex[:8]}"
    with open_new_file(tmp, "w") as f:
        json.dump(state, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(record_dir)
    named = {f"{r.name}.{c}.npy" for r in runs for c in _COLUMNS} | {RECORD_FILE, "_lock"}
    for leftover in set(os.listdir(record_dir)) - named:
        try:
            os.remove(os.path.join(record_dir, leftover))
        except OSError:
            pass


# ------------------------------------------------------------------------------------- sync


def sync_record(output_root: str, *, compact: bool = False, settings: RecordSettings | None = None) -> NightlyRecord:
    """Brings OUTPUT_ROOT's record up to date with the committed parts of every `run_date=`
    partition and returns a snapshot of it (record.report says what was done).

    Current record: lists and stats the parts, reads no row. New parts or partitions: reads only
    those and adds them as a delta run. A covered part changed or removed, or no usable record:
    rebuilds it from all partitions. compact=True merges the runs into one when there are more
    than settings.max_delta_runs. Raises OutputError when a committed part cannot be read."""
    return _sync(output_root, compact=compact, settings=settings or RecordSettings(), force_rebuild=None)


def _sync(output_root: str, *, compact: bool, settings: RecordSettings, force_rebuild: str | None) -> NightlyRecord:
    start = time.monotonic()
    record_dir = _record_dir(output_root)
    if not os.path.isdir(output_root):  # nothing summarised yet; nothing is created here
        return NightlyRecord(output_root, [], SyncReport(
            action="current", reason=None, partitions=0, parts_read=0, rows_read=0, entries=0, runs=0,
            persisted=False, seconds=time.monotonic() - start), settings)
    for attempt in range(5):
        try:
            if force_rebuild is None:
                snapshot = _current_snapshot(output_root, record_dir, compact, settings, start)
                if snapshot is not None:
                    return snapshot
            return _update(output_root, record_dir, compact, settings, start, force_rebuild)
        except _Changed as e:
            if attempt == 4:
                raise OutputError(f"output root {output_root} kept changing while the nightly record was read "
                                  f"({e}); is another job overwriting its partitions?") from None
            log.info("nightly record of %s: %s; listing again", output_root, e)
    raise AssertionError("unreachable")


def _current_snapshot(output_root, record_dir, compact, settings, start) -> NightlyRecord | None:
    """The record as it is, without the lock, when it covers exactly what is on disk."""
    state, _ = _read_state(record_dir)
    if state is None:
        return None
    listing = _list_partitions(output_root)
    reason, new = _plan(state, listing)
    if reason is not None or new:
        return None
    limit = settings.max_delta_runs + 1 if compact else settings.max_runs_without_compaction
    if len(state["runs"]) > limit:
        return None
    try:
        runs = _load_runs(record_dir, state)
    except _Corrupt:
        return None  # merged away by a concurrent writer, or damaged: decided under the lock
    report = SyncReport(action="current", reason=None, partitions=len(listing), parts_read=0, rows_read=0,
                        entries=sum(map(len, runs)), runs=len(runs), persisted=True,
                        seconds=time.monotonic() - start)
    return NightlyRecord(output_root, runs, report, settings)


def _update(output_root, record_dir, compact, settings, start, force_rebuild) -> NightlyRecord:
    try:
        handle = _open_lock(record_dir)
    except OSError as e:  # a read-only root: answer from memory, say so
        log.warning("nightly record of %s cannot be written (%s); building it in memory for this run",
                    output_root, e.strerror or e)
        return _in_memory(output_root, settings, start, f"record not writable ({e.strerror or e})")
    with _locked(handle):
        state, why = _read_state(record_dir)
        listing = _list_partitions(output_root)
        reason, new = _plan(state, listing) if force_rebuild is None else (force_rebuild, {})
        if state is None and force_rebuild is None:
            reason = why
        runs: list[_Run] = []
        if reason is None:
            try:
                runs = _load_runs(record_dir, state)
            except _Corrupt as e:
                reason = str(e)
        parts_read = rows_read = 0
        if reason is not None:
            action = "rebuilt"
            run, parts_read, rows_read = _read_parts(output_root, listing, listing, settings)
            runs = [run] if len(run) else []
        else:
            action = "current"
            if new:
                delta, parts_read, rows_read = _read_parts(output_root, new, listing, settings)
                if len(delta):
                    runs.append(delta)
                action = "appended"
            limit = settings.max_delta_runs + 1 if compact else settings.max_runs_without_compaction
            if len(runs) > limit:
                runs = [_merge_runs(runs)]
                action = "compacted"
        persisted = True
        if action != "current":
            try:
                _publish(record_dir, runs, listing)
                runs = _load_runs(record_dir, {"runs": [
                    {"name": r.name, "entries": len(r), "partitions": r.partitions} for r in runs]})
            except OSError as e:
                log.warning("nightly record of %s cannot be written (%s); using it from memory for this run",
                            output_root, e.strerror or e)
                persisted = False
        report = SyncReport(action=action, reason=reason, partitions=len(listing), parts_read=parts_read,
                            rows_read=rows_read, entries=sum(map(len, runs)), runs=len(runs), persisted=persisted,
                            seconds=time.monotonic() - start)
    if action != "current":
        log.info("nightly record of %s %s%s: %d partitions, %d parts read (%d rows), %d entries in %d run(s), %.1f s",
                 output_root, action, f" ({reason})" if reason else "", report.partitions, parts_read, rows_read,
                 report.entries, report.runs, report.seconds)
    return NightlyRecord(output_root, runs, report, settings)


def _in_memory(output_root, settings, start, reason) -> NightlyRecord:
    listing = _list_partitions(output_root)
    run, parts_read, rows_read = _read_parts(output_root, listing, listing, settings)
    runs = [run] if len(run) else []
    report = SyncReport(action="rebuilt", reason=reason, partitions=len(listing), parts_read=parts_read,
                        rows_read=rows_read, entries=len(run), runs=len(runs), persisted=False,
                        seconds=time.monotonic() - start)
    return NightlyRecord(output_root, runs, report, settings)


__all__ = [
    "RECORD_DIR", "PARTITION_PREFIX", "RecordSettings", "SyncReport", "NightlyRecord", "partition_name",
    "record_keys", "sync_record",
]
