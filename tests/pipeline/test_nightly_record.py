"""The nightly record (pipeline.nightly_record): its vectorised anti-join gives exactly the skip
decisions of reading every earlier partition into a set, across nights, reruns, backfills,
staleness of every kind, concurrent writers, and ids of either type; run_nightly uses it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.data.nightly_record import (
    RECORD_DIR, NightlyRecord, RecordSettings, _probe, _Run, _sorted_run, partition_name, record_keys, sync_record,
)
from pipeline.data.schema import OUTPUT_SCHEMA
from pipeline.data.writer import OutputWriter, committed_parts, read_output
from tests.jobs.conftest import tiny_chat_model  # noqa: F401 (fixture)


def sha(value) -> str:
    return hashlib.sha256(str(value).encode()).hexdigest()


def night(root, date: str, rows: list[tuple], *, part_rows: int = 3, overwrite: bool = False, fingerprint=None):
    """Commits rows (id, content_hash, config_hash, status) as the partition of `date`, through
    the output writer (its commit protocol and manifest)."""
    writer = OutputWriter(os.path.join(str(root), partition_name(date)), job_id=f"nightly-{date}",
                          fingerprint=fingerprint or f"fp-{date}", config={}, part_rows=part_rows,
                          overwrite=overwrite)
    for i, (doc_id, content, config, status) in enumerate(rows):
        writer.add_document([{"id": doc_id, "source_file": "c.parquet", "source_row": i, "task": "summarize",
                              "status": status, "content_hash": content, "config_hash": config,
                              "output": "s" if status == "ok" else None}])
    writer.close(complete=True)


def history(root) -> dict[str, pa.Table]:
    """Every partition's committed rows (the columns the skip decision reads)."""
    return {name: read_output(os.path.join(root, name), columns=["id", "content_hash", "config_hash", "status"])
            for name in sorted(os.listdir(root)) if name.startswith("run_date=")}


def reference(root, run_date: str, config_hash: str, tables: dict[str, pa.Table] | None = None) -> set[tuple]:
    """The skip set as the nightly computed it before the record: every earlier partition's OK
    rows with this config hash, read into a Python set."""
    done: set[tuple] = set()
    tables = history(root) if tables is None else tables
    for name, table in tables.items():
        if name >= partition_name(run_date):
            continue
        table = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["config_hash"], config_hash)))
        done.update(zip(table["id"].to_pylist(), table["content_hash"].to_pylist()))
    return done


def decided(record: NightlyRecord, pairs: list[tuple], config_hash: str, run_date: str) -> set[tuple]:
    mask = record.summarised([p[0] for p in pairs], [p[1] for p in pairs], config_hash=config_hash,
                             run_date=run_date)
    assert mask.dtype == bool and mask.shape == (len(pairs),)
    return {pair for pair, hit in zip(pairs, mask) if hit}


# --------------------------------------------------------------------------- set semantics


@pytest.mark.parametrize("seed", range(4))
def test_anti_join_equals_the_set_of_earlier_ok_rows_on_a_random_history(tmp_path, seed):
    """Nights written in a random order (backfills), random statuses, two configs, repeated and
    null ids, the same document in several partitions; after every night the record (delta runs,
    merges, small hash batches) answers every (id, content) for every date exactly as the set."""
    rng = random.Random(seed)
    root = str(tmp_path / "root")
    ids = [f"d{i}" for i in range(25)] + [None]
    contents = [sha(i) for i in range(5)]
    configs = ["cfgA", "cfgB"]
    dates = sorted({f"2026-03-{rng.randint(1, 28):02d}" for _ in range(9)})
    written = rng.sample(dates, len(dates))
    probe_dates = dates + ["2026-02-28", "2026-03-29", "2026-03-15", "2026-03-15x"]
    candidates = [(i, c) for i in ids for c in contents]
    settings = RecordSettings(max_delta_runs=2, max_runs_without_compaction=3, hash_batch_rows=7)
    actions = set()
    for date in written:
        rows = [(rng.choice(ids), rng.choice(contents), rng.choice(configs), rng.choice(["ok", "ok", "error"]))
                for _ in range(rng.randint(0, 30))]
        night(root, date, rows, part_rows=rng.randint(1, 6))
        record = sync_record(root, compact=rng.random() < 0.5, settings=settings)
        actions.add(record.report.action)
        tables = history(root)
        for run_date in probe_dates:
            for config in configs:
                expected = reference(root, run_date, config, tables) & set(candidates)
                assert decided(record, candidates, config, run_date) == expected, (date, run_date, config)
    assert {"rebuilt", "appended", "compacted"} <= actions  # every path was taken
    assert sync_record(root, settings=settings).report.action == "current"


def test_probe_handles_equal_first_halves_and_duplicates():
    """Entries that share h1 (a 2^-64 event between keys; the rule for a key held by several
    partitions): sorted by (h1, h2, earliest partition) and merged, and each one found."""
    h1 = np.array([5, 9, 5, 5, 9, 1], dtype=np.uint64)
    h2 = np.array([7, 1, 3, 7, 1, 2], dtype=np.uint64)
    part = np.array([2, 1, 0, 1, 0, 3], dtype=np.uint32)
    s1, s2, sp = _sorted_run(h1, h2, part)
    assert s1.tolist() == [1, 5, 5, 9] and s2.tolist() == [2, 3, 7, 1] and sp.tolist() == [3, 0, 1, 0]
    run = _Run("test", ["p0", "p1", "p2", "p3"], s1, s2, sp)
    q1 = np.array([1, 5, 5, 5, 9, 9, 10], dtype=np.uint64)
    q2 = np.array([2, 3, 7, 8, 1, 2, 0], dtype=np.uint64)
    everything = np.array([True] * 4)
    assert _probe(run, q1, q2, everything).tolist() == [True, True, True, False, True, False, False]
    # (5, 7) is held by p1 and p2: earliest p1, so it counts for a night after p1 only.
    only_p0 = np.array([True, False, False, False])
    assert _probe(run, q1, q2, only_p0).tolist() == [False, True, False, False, True, False, False]


# ------------------------------------------------------------------------------- id / hash forms


def test_integer_and_string_ids_and_40_or_64_hex_digits_compare_on_one_canonical_form(tmp_path):
    """Old partitions hold ids as strings and 64-digit hashes; a newer one integer ids (an int64
    column) and 40-digit hashes. The same document matches across the forms, nothing else does."""
    root = tmp_path / "root"
    night(root, "2026-05-01", [("42", sha(1), "c", "ok"), ("x7", sha(2), "c", "ok"), ("-3", sha(3), "c", "ok")])
    newer = root / partition_name("2026-05-02")
    os.makedirs(newer)
    table = pa.table({"id": pa.array([7, 8, None], pa.int64()), "content_hash": [sha(4)[:40], sha(5)[:40], sha(6)],
                      "config_hash": ["c"] * 3, "status": ["ok"] * 3})
    pq.write_table(table, newer / "part-00000.parquet")
    # One partition whose parts disagree on the id type (a night resumed across the change).
    mixed = root / partition_name("2026-05-03")
    os.makedirs(mixed)
    pq.write_table(table.slice(0, 1), mixed / "part-00000.parquet")
    pq.write_table(pa.table({"id": ["y1"], "content_hash": [sha(7)], "config_hash": ["c"], "status": ["ok"]}),
                   mixed / "part-00001.parquet")
    record = sync_record(str(root))
    pairs = [(42, sha(1)), ("42", sha(1)[:40]), (-3, sha(3)), ("x7", sha(2)), (7, sha(4)), ("7", sha(4)),
             (8, sha(5)[:40]), (None, sha(6)), ("y1", sha(7)),
             ("042", sha(1)), (42, sha(2)), (" 7", sha(4)), ("x7", sha(2)[:39])]
    assert decided(record, pairs, "c", "2026-05-04") == set(pairs[:9])
    assert decided(record, pairs, "c", "2026-05-03") == set(pairs[:8])
    # One probe batch of integers only, and one of mixed types, give the same answers.
    assert record.summarised([42, 7, 9], [sha(1), sha(4), sha(1)], config_hash="c", run_date="2026-06-01").tolist() \
        == [True, True, False]
    assert record.summarised([42, "x7"], [sha(1), sha(2)], config_hash="c", run_date="2026-06-01").tolist() \
        == [True, True]
    # Canonical keys: ids as Python str or int, or as Arrow string or int64, are one key.
    assert np.array_equal(np.stack(record_keys([42], [sha(1)], "c")),
                          np.stack(record_keys(pa.array(["42"]), [sha(1)[:40]], "c")))
    # A field boundary cannot be moved: (id "a", config "bc") is not (id "ab", config "c").
    assert not np.array_equal(np.stack(record_keys(["ab"], ["h"], "c")), np.stack(record_keys(["a"], ["h"], "bc")))


# --------------------------------------------------------------------------------- staleness


def _two_nights(root):
    night(root, "2026-01-01", [("a", sha("a"), "c", "ok"), ("b", sha("b"), "c", "ok")])
    night(root, "2026-01-02", [("c", sha("c"), "c", "ok")])
    record = sync_record(str(root))
    assert decided(record, PAIRS, "c", "2026-01-03") == set(PAIRS)
    return record


PAIRS = [("a", sha("a")), ("b", sha("b")), ("c", sha("c"))]


def test_a_deleted_partition_is_never_skipped_from_a_stale_record(tmp_path):
    import shutil

    root = tmp_path / "root"
    _two_nights(root)
    shutil.rmtree(root / partition_name("2026-01-01"))
    record = sync_record(str(root))
    assert record.report.action == "rebuilt" and "run_date=2026-01-01 was deleted" in record.report.reason
    assert decided(record, PAIRS, "c", "2026-01-03") == {PAIRS[2]} == reference(str(root), "2026-01-03", "c")


def test_a_partition_overwritten_with_the_same_parts_and_row_counts_is_rebuilt(tmp_path):
    """--overwrite by the same job: the same part names and row counts, but document "a" failed
    this time. A signature of names and row counts alone would keep trusting the record."""
    root = tmp_path / "root"
    _two_nights(root)
    before = {p: pq.read_metadata(root / partition_name("2026-01-01") / p).num_rows
              for p in committed_parts(str(root / partition_name("2026-01-01")))}
    night(root, "2026-01-01", [("a", sha("a"), "c", "error"), ("b", sha("b"), "c", "ok")], overwrite=True)
    after = {p: pq.read_metadata(root / partition_name("2026-01-01") / p).num_rows
             for p in committed_parts(str(root / partition_name("2026-01-01")))}
    assert after == before
    record = sync_record(str(root))
    assert record.report.action == "rebuilt"
    assert decided(record, PAIRS, "c", "2026-01-03") == set(PAIRS[1:]) == reference(str(root), "2026-01-03", "c")


def test_a_part_replaced_by_hand_or_removed_is_rebuilt(tmp_path):
    root = tmp_path / "root"
    _two_nights(root)
    directory = root / partition_name("2026-01-02")
    part = [p for p in committed_parts(str(directory)) if pq.read_metadata(directory / p).num_rows][0]
    table = pq.read_table(directory / part, schema=OUTPUT_SCHEMA)
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(["error"] * table.num_rows))
    pq.write_table(table, directory / part)
    assert decided(sync_record(str(root)), PAIRS, "c", "2026-01-03") == set(PAIRS[:2])
    os.remove(directory / part)
    record = sync_record(str(root))
    assert record.report.action == "rebuilt" and decided(record, PAIRS, "c", "2026-01-03") == set(PAIRS[:2])


@pytest.mark.parametrize("damage", ["truncated run", "missing run", "garbage json", "truncated json",
                                    "partition index out of range"])
def test_a_damaged_record_is_rebuilt_and_answers_right(tmp_path, damage):
    root = tmp_path / "root"
    _two_nights(root)
    record_dir = root / RECORD_DIR
    run = sorted(name for name in os.listdir(record_dir) if name.endswith(".h1.npy"))[0][:-len(".h1.npy")]
    # The damage makes the record claim nothing was summarised, or everything: only the rebuild
    # gives the right answer, and "a" is now an error row, so a stale entry would be a false skip.
    night(root, "2026-01-01", [("a", sha("a"), "c", "error"), ("b", sha("b"), "c", "ok")], overwrite=True)
    state = json.loads((record_dir / "record.json").read_text())
    state["partitions"] = {name: {p: [os.stat(root / name / p).st_size, os.stat(root / name / p).st_mtime_ns,
                                      os.stat(root / name / p).st_ino] for p in committed_parts(str(root / name))}
                           for name in state["partitions"]}  # as if the record were current
    (record_dir / "record.json").write_text(json.dumps(state))
    if damage == "truncated run":
        with open(record_dir / f"{run}.h1.npy", "r+b") as f:
            f.truncate(os.path.getsize(record_dir / f"{run}.h1.npy") - 8)
    elif damage == "missing run":
        os.remove(record_dir / f"{run}.h2.npy")
    elif damage == "garbage json":
        (record_dir / "record.json").write_text("{not json")
    elif damage == "truncated json":
        (record_dir / "record.json").write_text(json.dumps(state)[:40])
    else:  # the file's size and header are right, its values are not
        part = np.load(record_dir / f"{run}.part.npy")
        np.save(record_dir / f"{run}.part.npy", np.full_like(part, 999))
    record = sync_record(str(root))
    assert decided(record, PAIRS, "c", "2026-01-03") == set(PAIRS[1:]) == reference(str(root), "2026-01-03", "c")
    assert record.report.action == "rebuilt"  # for the index damage: found by the probe, which rebuilt it
    again = sync_record(str(root))  # the rebuilt record is current and whole
    assert again.report.action == "current" and decided(again, PAIRS, "c", "2026-01-03") == set(PAIRS[1:])


def test_an_unreadable_part_fails_the_sync_naming_the_file(tmp_path):
    from pipeline.data.writer import OutputError

    root = tmp_path / "root"
    _two_nights(root)
    directory = root / partition_name("2026-01-02")
    part = committed_parts(str(directory))[-1]
    (directory / part).write_bytes(b"not parquet at all")
    with pytest.raises(OutputError, match=f"committed part {directory / part} cannot be read"):
        sync_record(str(root))


def test_a_record_of_another_config_hash_skips_nothing(tmp_path):
    root = tmp_path / "root"
    record = _two_nights(root)
    assert decided(record, PAIRS, "c-new", "2026-01-03") == set() == reference(str(root), "2026-01-03", "c-new")
    night(root, "2026-01-03", [("a", sha("a"), "c-new", "ok")])
    record = sync_record(str(root))
    assert decided(record, PAIRS, "c-new", "2026-01-04") == {PAIRS[0]}
    assert decided(record, PAIRS, "c", "2026-01-04") == set(PAIRS)


def test_a_record_of_an_older_key_scheme_is_rebuilt(tmp_path):
    root = tmp_path / "root"
    _two_nights(root)
    path = root / RECORD_DIR / "record.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "key": "md5-64/v0"}))
    record = sync_record(str(root))
    assert record.report.action == "rebuilt" and "key scheme" in record.report.reason
    assert decided(record, PAIRS, "c", "2026-01-03") == set(PAIRS)


# ------------------------------------------------------------------------ incremental / reruns


def test_nights_append_only_their_parts_and_a_rerun_of_the_same_date_adds_what_it_committed(tmp_path):
    root = tmp_path / "root"
    settings = RecordSettings(max_delta_runs=2, max_runs_without_compaction=3)
    night(root, "2026-02-01", [("a", sha("a"), "c", "ok")])
    first = sync_record(str(root), settings=settings)
    assert first.report.action == "rebuilt" and first.report.reason == "no record"
    # Night 2 crashes after committing "b" (its partition holds a part); the record takes it in.
    night(root, "2026-02-02", [("b", sha("b"), "c", "ok")], fingerprint="night-2")
    crashed = sync_record(str(root), settings=settings)
    assert crashed.report.action == "appended" and crashed.report.parts_read == 2  # the empty part + "b"
    # Rerun on the same date: its own committed rows are not "summarised before" tonight.
    assert decided(crashed, PAIRS, "c", "2026-02-02") == {PAIRS[0]}
    writer = OutputWriter(str(root / partition_name("2026-02-02")), job_id="nightly-2", fingerprint="night-2",
                          config={}, part_rows=1)
    assert writer.resumed
    writer.add_document([{"id": "c", "source_file": "c.parquet", "source_row": 9, "task": "summarize",
                          "status": "ok", "content_hash": sha("c"), "config_hash": "c"}])
    writer.close(complete=True)
    rerun = sync_record(str(root), settings=settings, compact=True)
    assert rerun.report.action == "appended" and rerun.report.parts_read == 1
    assert decided(rerun, PAIRS, "c", "2026-02-02") == {PAIRS[0]}
    assert decided(rerun, PAIRS, "c", "2026-02-03") == set(PAIRS) == reference(str(root), "2026-02-03", "c")
    # Quiet nights add delta runs until the merge; the merged record answers the same.
    for day in range(3, 7):
        night(root, f"2026-02-{day:02d}", [(f"n{day}", sha(day), "c", "ok")])
        record = sync_record(str(root), settings=settings, compact=True)
        assert record.report.runs <= settings.max_delta_runs + 1
    assert record.report.action == "compacted" and record.report.runs == 1 and record.entries == 7
    assert len(os.listdir(root / RECORD_DIR)) == 3 + 2  # one run's 3 files, record.json, _lock
    assert decided(record, PAIRS + [(f"n{d}", sha(d)) for d in range(3, 7)], "c", "2026-02-06") \
        == set(PAIRS) | {(f"n{d}", sha(d)) for d in range(3, 6)}


def test_empty_roots(tmp_path):
    missing = sync_record(str(tmp_path / "nowhere"))
    assert missing.entries == 0 and not (tmp_path / "nowhere").exists()
    assert missing.summarised(["a"], [sha("a")], config_hash="c", run_date="2026-01-01").tolist() == [False]
    assert missing.summarised([], [], config_hash="c", run_date="2026-01-01").shape == (0,)
    root = tmp_path / "root"
    os.makedirs(root / "not-a-partition")
    (root / "run_date=2026-01-01.txt").write_text("a file, not a partition")
    os.makedirs(root / partition_name("2026-01-01"))  # no parts yet
    night(root, "2026-01-02", [])  # only the writer's empty part-00000
    record = sync_record(str(root))
    assert record.entries == 0 and record.report.partitions == 2 and record.partitions == []
    assert record.summarised(["a"], [sha("a")], config_hash="c", run_date="2026-01-03").tolist() == [False]
    assert sync_record(str(root)).report.action == "current"


# ------------------------------------------------------------------------------- concurrency


def test_concurrent_syncs_of_one_root_keep_a_whole_record(tmp_path):
    """Writers of one root take turns (flock): syncs racing with each other and with new nights
    all answer right, and the record left behind is current and names every partition."""
    root = tmp_path / "root"
    for day in range(1, 4):
        night(root, f"2026-04-{day:02d}", [(f"d{day}", sha(day), "c", "ok")])
    settings = RecordSettings(max_delta_runs=1, max_runs_without_compaction=2)
    errors, answers = [], []

    def sync(compact):
        try:
            for _ in range(3):
                record = sync_record(str(root), compact=compact, settings=settings)
                answers.append(decided(record, [("d1", sha(1)), ("d2", sha(2))], "c", "2026-04-03"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=sync, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for day in range(4, 7):
        night(root, f"2026-04-{day:02d}", [(f"d{day}", sha(day), "c", "ok")])
    for t in threads:
        t.join()
    assert errors == [] and len(answers) == 12 and all(a == {("d1", sha(1)), ("d2", sha(2))} for a in answers)
    final = sync_record(str(root), settings=settings)
    pairs = [(f"d{d}", sha(d)) for d in range(1, 7)]
    assert decided(final, pairs, "c", "2026-04-07") == set(pairs)
    assert sorted(json.loads((root / RECORD_DIR / "record.json").read_text())["partitions"]) \
        == [partition_name(f"2026-04-{d:02d}") for d in range(1, 7)]


def test_a_snapshot_survives_a_merge_by_another_writer(tmp_path):
    root = tmp_path / "root"
    _two_nights(root)
    snapshot = sync_record(str(root))
    settings = RecordSettings(max_delta_runs=1)
    night(root, "2026-01-05", [("d", sha("d"), "c", "ok")])
    assert sync_record(str(root), compact=True, settings=settings).report.runs == 2  # base + 1 delta
    night(root, "2026-01-06", [("e", sha("e"), "c", "ok")])
    merged = sync_record(str(root), compact=True, settings=settings)
    assert merged.report.action == "compacted" and merged.report.runs == 1
    assert not any(name.startswith(snapshot._runs[0].name) for name in os.listdir(root / RECORD_DIR))
    assert decided(snapshot, PAIRS, "c", "2026-01-03") == set(PAIRS)  # its files were unlinked, still mapped


# ---------------------------------------------------------------------------- run_nightly wiring


def test_run_nightly_skips_from_the_record_and_updates_it_after_each_night(tiny_chat_model, tokenizer, tmp_path):
    from pipeline.config.job import JobConfig
    from pipeline.config.model import ModelSpec
    from pipeline.job import run_nightly
    from tests.jobs.conftest import TINY_DCA, FakePool, words
    from tests.pipeline.test_trust import _Crash, _CrashingPool

    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    os.makedirs(corpus)
    rows = [{"id": f"doc{i}", "text": words(rng, 20)} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), corpus / "c.parquet")
    root = str(tmp_path / "out")
    config = JobConfig(task="summarize", input_path=str(corpus), output_dir=root, max_input_tokens=120,
                       progress=False, part_rows=2, model_spec=ModelSpec(model=tiny_chat_model, dca=TINY_DCA))

    def run(date, pool):
        return run_nightly(config, output_root=root, run_date=date, pool_factory=lambda c: pool, tokenizer=tokenizer)

    first = run("2026-07-01", FakePool())
    assert first["documents"]["ok"] == 12 and first["documents"]["skipped"] == 0
    state = json.loads((tmp_path / "out" / RECORD_DIR / "record.json").read_text())
    assert list(state["partitions"]) == [partition_name("2026-07-01")]  # taken in after the night
    # Night 2: 4 documents changed; it crashes after answering some of them.
    for row in rows[:4]:
        row["text"] += " w5"
    pq.write_table(pa.Table.from_pylist(rows), corpus / "c.parquet")
    with pytest.raises(_Crash):
        run("2026-07-02", _CrashingPool(after=2))
    committed = read_output(os.path.join(root, partition_name("2026-07-02")))
    state = json.loads((tmp_path / "out" / RECORD_DIR / "record.json").read_text())
    assert sorted(state["partitions"][partition_name("2026-07-02")]) == committed_parts(
        os.path.join(root, partition_name("2026-07-02")))  # what the failed night committed is recorded
    assert 0 < committed.num_rows < 4
    again = run("2026-07-02", FakePool())
    assert again["documents"]["skipped"] == 8 and again["documents"]["ok"] == 4 - committed.num_rows
    third = FakePool()
    quiet = run("2026-07-03", third)
    assert quiet["documents"]["skipped"] == 12 and third.order == []


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    from tests.jobs.conftest import load_tiny_tokenizer

    return load_tiny_tokenizer(tiny_chat_model)
