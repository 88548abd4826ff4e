"""Issue 22, the data plane: what a hostile input or a faulty disk still did to a job, tried in
process against the job driver with a fake engine (each test says which item it covers): the
content hash, the id type, a file that is not Parquet, an output that overlaps its input, a full
disk while committing, links planted in the output, non-UTF-8 values in large string types, and
the weak spots (a same-size rewrite, nightly ids, a symlink loop, blank ids, config values, a path
with brackets)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.job import JobConfig
from pipeline.config.model import ModelSpec
from pipeline.data.input import InputError, InputSpec, check_input, iter_documents
from pipeline.data.writer import OutputError, committed_parts, read_manifest, read_output
from pipeline.job import nightly_submission_id, run_job, run_nightly
from tests.jobs.conftest import TINY_DCA, FakePool, load_tiny_tokenizer, tiny_chat_model, words  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return load_tiny_tokenizer(tiny_chat_model)


def _config(model, tmp_path, **kw):
    kw.setdefault("task", "summarize")
    kw.setdefault("input_path", str(tmp_path / "corpus"))
    kw.setdefault("output_dir", str(tmp_path / "out"))
    kw.setdefault("max_input_tokens", 120)
    kw.setdefault("progress", False)
    kw.setdefault("max_error_fraction", 1.0)
    return JobConfig(model_spec=ModelSpec(model=model, dca=TINY_DCA), **kw)


def _run(config, tokenizer, pool=None, **kw):
    pool = pool or FakePool()
    return run_job(config, pool_factory=lambda c: pool, tokenizer=tokenizer, **kw)


def _corpus(path, ids, texts=None, name="c.parquet", id_type=None, **pq_kw) -> None:
    os.makedirs(path, exist_ok=True)
    texts = texts or [f"w{5 + i % 90} w{6 + i % 90} w7 w8" for i in range(len(ids))]
    pq.write_table(pa.table({"id": pa.array(ids, id_type), "text": pa.array(texts, pa.string())}),
                   os.path.join(path, name), **pq_kw)


def _keys(table) -> Counter:
    return Counter((r["source_file"], r["source_row"], r["question_index"]) for r in table.to_pylist())


# ------------------------------------------------------------------------- item 5: content_hash


def test_content_hash_is_the_full_sha256_and_nightly_matches_old_40_digit_partitions(tiny_chat_model, tokenizer,
                                                                                       tmp_path):
    """The output holds all 64 hex digits of the sha256 of the text's UTF-8 bytes (as docs/jobs.md
    says); a nightly root whose earlier partition holds 40-digit hashes (written so by an older
    version) still skips the unchanged documents and redoes the changed one."""
    texts = [f"w{5 + i} w9 w10 caf\u00e9" for i in range(6)]
    _corpus(str(tmp_path / "corpus"), [f"d{i}" for i in range(6)], texts)
    config = _config(tiny_chat_model, tmp_path)
    root = str(tmp_path / "nightly")
    run_nightly(config, output_root=root, run_date="2026-11-24", pool_factory=lambda c: FakePool(),
                tokenizer=tokenizer)
    first = os.path.join(root, "run_date=2026-11-24")
    table = read_output(first)
    assert [len(h) for h in table["content_hash"].to_pylist()] == [64] * 6
    assert table["content_hash"].to_pylist() == [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]

    # The older version's partition: the same rows with the hashes cut to 40 digits.
    for part in committed_parts(first):
        path = os.path.join(first, part)
        old = pq.read_table(path)
        cut = pa.array([h[:40] for h in old["content_hash"].to_pylist()], pa.string())
        pq.write_table(old.set_column(old.schema.get_field_index("content_hash"), "content_hash", cut), path)
    assert {len(h) for h in read_output(first)["content_hash"].to_pylist()} == {40}

    texts[2] = "w30 w31 changed"
    _corpus(str(tmp_path / "corpus"), [f"d{i}" for i in range(6)], texts)
    pool = FakePool()
    summary = run_nightly(config, output_root=root, run_date="2026-11-25", pool_factory=lambda c: pool,
                          tokenizer=tokenizer)
    assert pool.order == ["d2"] and summary["documents"]["skipped"] == 5


# ------------------------------------------------------------------------------ item 6: id type


def test_integer_ids_come_back_as_integers_and_join_without_a_cast(tiny_chat_model, tokenizer, tmp_path, capsys):
    from jobs.show import main as show

    _corpus(str(tmp_path / "corpus"), [10, 20, 30, 40], id_type=pa.int64())
    config = _config(tiny_chat_model, tmp_path, part_rows=1)
    _run(config, tokenizer)
    table = read_output(config.output_dir)
    assert table.schema.field("id").type == pa.int64()
    assert all(pq.read_schema(os.path.join(config.output_dir, p)).field("id").type == pa.int64()
               for p in committed_parts(config.output_dir))  # every part of the output agrees
    corpus = pq.read_table(tmp_path / "corpus" / "c.parquet")
    joined = corpus.join(table.select(["id", "output"]), "id")  # no cast
    assert sorted(joined["id"].to_pylist()) == [10, 20, 30, 40] and joined["output"].null_count == 0
    assert read_manifest(config.output_dir)["id_type"] == "int64"

    # jobs.show prints the integer's digits and --id finds it.
    assert show([config.output_dir, "--id", "30", "--no-metrics"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("30  [ok]") and "\n10  [ok]" not in out

    # Strings stay strings (also digit strings).
    _corpus(str(tmp_path / "strings"), ["10", "x"])
    strings = _config(tiny_chat_model, tmp_path, input_path=str(tmp_path / "strings"),
                      output_dir=str(tmp_path / "out-s"))
    _run(strings, tokenizer)
    assert read_output(strings.output_dir)["id"].to_pylist() == ["10", "x"]
    assert read_output(strings.output_dir).schema.field("id").type == pa.string()


def test_an_integer_id_output_resumes_and_nightly_skips_across_id_types(tiny_chat_model, tokenizer, tmp_path):
    """A crash and a resume keep int64 in every part; a nightly partition of an older version
    (string ids) and a new one (integer ids) are the same documents to the skip decision."""
    from tests.pipeline.test_trust import _Crash, _CrashingPool

    _corpus(str(tmp_path / "corpus"), list(range(12)), id_type=pa.int32())
    config = _config(tiny_chat_model, tmp_path, part_rows=2, max_in_flight=2)
    with pytest.raises(_Crash):
        _run(config, tokenizer, _CrashingPool(after=4))
    _run(config, tokenizer)
    table = read_output(config.output_dir)
    assert table.schema.field("id").type == pa.int64() and sorted(table["id"].to_pylist()) == list(range(12))
    assert set(_keys(table).values()) == {1}

    root = str(tmp_path / "nightly")
    night = os.path.join(root, "run_date=2026-11-24")
    run_nightly(config, output_root=root, run_date="2026-11-24", pool_factory=lambda c: FakePool(),
                tokenizer=tokenizer)
    for part in committed_parts(night):  # as an older version wrote it: ids as strings
        path = os.path.join(night, part)
        old = pq.read_table(path)
        pq.write_table(old.set_column(0, "id", old["id"].cast(pa.string())), path)
    manifest = read_manifest(night)
    manifest.pop("id_type")
    (tmp_path / "nightly" / "run_date=2026-11-24" / "_manifest.json").write_text(json.dumps(manifest))
    pool = FakePool()
    summary = run_nightly(config, output_root=root, run_date="2026-11-25", pool_factory=lambda c: pool,
                          tokenizer=tokenizer)
    assert pool.order == [] and summary["documents"]["skipped"] == 12


def test_an_output_begun_with_string_ids_keeps_them_when_resumed(tiny_chat_model, tokenizer, tmp_path):
    """An output an older version began (string ids, no id_type in its manifest) is resumed with
    string ids: one output, one id type in every part."""
    from tests.pipeline.test_trust import _Crash, _CrashingPool

    _corpus(str(tmp_path / "corpus"), list(range(10)), id_type=pa.int64())
    config = _config(tiny_chat_model, tmp_path, part_rows=2, max_in_flight=2)
    with pytest.raises(_Crash):
        _run(config, tokenizer, _CrashingPool(after=4))
    out = config.output_dir
    for part in committed_parts(out):
        path = os.path.join(out, part)
        old = pq.read_table(path)
        pq.write_table(old.set_column(0, "id", old["id"].cast(pa.string())), path)
    manifest = read_manifest(out)
    manifest.pop("id_type")
    (tmp_path / "out" / "_manifest.json").write_text(json.dumps(manifest))
    _run(config, tokenizer)
    assert {pq.read_schema(os.path.join(out, p)).field("id").type for p in committed_parts(out)} == {pa.string()}
    table = read_output(out)
    assert sorted(table["id"].to_pylist(), key=int) == [str(i) for i in range(10)]
    assert set(_keys(table).values()) == {1} and table.num_rows == 10


def test_files_with_integer_and_string_ids_are_refused_naming_both(tiny_chat_model, tokenizer, tmp_path):
    _corpus(str(tmp_path / "corpus"), [1, 2], name="a.parquet", id_type=pa.int64())
    _corpus(str(tmp_path / "corpus"), ["x", "y"], name="b.parquet")
    with pytest.raises(InputError) as refused:
        _run(_config(tiny_chat_model, tmp_path), tokenizer, pytest.fail)
    message = str(refused.value)
    assert "a.parquet holds int64 ids" in message and "b.parquet holds string ids" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_the_processor_keeps_the_input_id_column_type(tiny_chat_model):
    """The processor carries the input's own columns: an int64 id column stays int64 beside its
    output columns (stages called in process, with an engine stand-in)."""
    from pipeline.config.processor import DCAProcessorConfig
    from pipeline.dataflows.processor import EngineStage, PromptStage

    class _Engine(EngineStage):
        def _start_engine(self):
            return FakePool()

    config = DCAProcessorConfig(model=tiny_chat_model, dca=TINY_DCA, max_input_tokens=120, max_new_tokens=4,
                                device="cpu").to_dict()
    batch = pa.table({"id": pa.array([7, 8, None], pa.int64()), "text": ["w5 w6 w7", "w8 w9", "w10"]})
    out = _Engine(config, run_id="t")(PromptStage(config)(batch))
    assert out.schema.field("id").type == pa.int64() and out["id"].to_pylist() == [7, 8, None]
    assert out["status"].to_pylist() == ["ok", "ok", "error"]  # a null id is an error row


# ------------------------------------------------------------ item 12: --unit-rows changed between runs


def test_units_are_cut_from_the_rows_committed_parts_do_not_hold(tmp_path):
    """The resume plan of the ray-data dataflow in rows (the end-to-end run is in
    test_ray_data_jobs): committed parts cut 5 rows a unit leave gaps that a plan of 10 rows a
    unit fills exactly, and a part named by an earlier version (no last row in its key) is read
    for the rows it holds."""
    from pipeline.data.input import plan_units
    from pipeline.data.schema import OUTPUT_SCHEMA
    from pipeline.data.writer import committed_unit_keys, unit_part_name
    from pipeline.dataflows.units import committed_unit_ranges

    os.makedirs(tmp_path / "corpus")
    table = pa.table({"id": [f"d{i}" for i in range(23)], "text": ["w5 w6"] * 23})
    pq.write_table(table, tmp_path / "corpus" / "c.parquet", row_group_size=20)  # groups of 20 and 3 rows
    plan = check_input(InputSpec(path=str(tmp_path / "corpus")))
    assert plan.files[0].row_group_rows == (20, 3)
    out = tmp_path / "out"
    out.mkdir()

    def part(key: str, rows: range) -> None:
        values = [{"id": f"d{r}", "source_file": "c.parquet", "source_row": r, "status": "ok", "job_id": "j",
                   "task": "summarize"}
                  for r in rows]
        pq.write_table(pa.Table.from_pylist(values, schema=OUTPUT_SCHEMA), out / unit_part_name(key))

    part("000000-000000-000000000-000000005", range(0, 5))
    part("000000-000000-000000010", range(10, 15))  # an earlier version's name: no last row
    part("000000-000001-000000000-000000003", range(20, 23))
    ranges = committed_unit_ranges(str(out), plan, committed_unit_keys(str(out)))
    assert ranges == {(0, 0): [(0, 5), (10, 15)], (0, 1): [(0, 3)]}
    units = plan_units(plan, 10, ranges)
    assert [(u.row_group, u.start, u.stop, u.first_row) for u in units] == [(0, 5, 10, 5), (0, 15, 20, 15)]
    assert [(u.start, u.stop) for u in plan_units(plan, 2, ranges)] == [(5, 7), (7, 9), (9, 10), (15, 17),
                                                                       (17, 19), (19, 20)]
    covered = [r for u in units for r in range(u.first_row, u.first_row + u.num_rows)]
    assert sorted(covered + list(range(0, 5)) + list(range(10, 15)) + list(range(20, 23))) == list(range(23))


# --------------------------------------------------------------- item 8: a file that is not Parquet


def test_a_text_file_as_input_gets_a_hint_about_parquet_not_columns(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(InputError) as refused:
        check_input(InputSpec(path=str(tmp_path / "notes.txt")))
    message = str(refused.value)
    assert "notes.txt: not a readable Parquet file" in message
    assert "--input takes Parquet files" in message and "--id-column" not in message
    # A column problem still gets the column hint.
    _corpus(str(tmp_path / "corpus"), ["a"])
    with pytest.raises(InputError, match="--id-column") as refused:
        check_input(InputSpec(path=str(tmp_path / "corpus"), text_column="body"))
    assert "--input takes Parquet files" not in str(refused.value)


# ---------------------------------------------------- items 13 and 18: an output overlapping the input


@pytest.mark.parametrize("dataflow", ["driver", "ray-data"])
@pytest.mark.parametrize("layout", ["inside", "same", "glob", "input-inside-output"])
def test_an_output_overlapping_the_input_is_refused_before_anything_is_written(tiny_chat_model, tokenizer, tmp_path,
                                                                              layout, dataflow):
    """Item 13 (an output inside the input directory, a glob matching the output's parts) and 18
    (input and output the same directory, corpus files named like parts: --overwrite deleted the
    corpus), on both dataflows: one line, nothing written or removed, before Ray or a model."""
    corpus = tmp_path / "corpus"
    names = ["part-00000.parquet", "part-00001.parquet"] if layout == "same" else ["a.parquet", "b.parquet"]
    for i, name in enumerate(names):
        _corpus(str(corpus), [f"d{i}"], name=name)
    before = {p: p.read_bytes() for p in corpus.rglob("*")}
    input_path, output = {
        "inside": (str(corpus), corpus / "out"),
        "same": (str(corpus), corpus),
        "glob": (str(corpus) + "/**/*.parquet", corpus / "summaries"),
        "input-inside-output": (str(corpus), tmp_path),
    }[layout]
    config = _config(tiny_chat_model, tmp_path, input_path=input_path, output_dir=str(output), overwrite=True,
                     dataflow=dataflow)
    with pytest.raises(InputError) as refused:
        _run(config, tokenizer, pytest.fail)
    message = str(refused.value)
    assert "overlaps --input" in message and "\n" not in message
    assert {p: p.read_bytes() for p in corpus.rglob("*")} == before  # nothing written or removed
    assert not (output / "_manifest.json").exists()


def test_an_output_in_a_hidden_directory_inside_the_input_reruns_and_runs_a_second_night(tiny_chat_model,
                                                                                          tokenizer, tmp_path):
    """A `_name` directory inside the input is skipped by the reader, so an output there does not
    overlap: a rerun resumes and a second nightly night skips what the first did."""
    _corpus(str(tmp_path / "corpus"), [f"d{i}" for i in range(4)])
    config = _config(tiny_chat_model, tmp_path, output_dir=str(tmp_path / "corpus" / "_out"))
    _run(config, tokenizer)
    pool = FakePool()
    again = _run(config, tokenizer, pool)
    assert pool.order == [] and again["documents"]["already_committed"] == 4
    root = str(tmp_path / "corpus" / "_nightly")
    run_nightly(config, output_root=root, run_date="2026-11-24", pool_factory=lambda c: FakePool(),
                tokenizer=tokenizer)
    pool = FakePool()
    second = run_nightly(config, output_root=root, run_date="2026-11-25", pool_factory=lambda c: pool,
                         tokenizer=tokenizer)
    assert pool.order == [] and second["documents"]["skipped"] == 4


# ------------------------------------------------------------------- item 14: disk full while committing


class _FullDisk:
    """Stands in for pipeline.data.writer.open_new_file on a disk that holds `capacity` bytes in
    `directory`: a write that would take the files under it past that raises OSError(ENOSPC) from
    write(), as the kernel's write(2) does when the filesystem fills; the file keeps what was
    written before. Space is what the files there hold now, so removing a file frees its bytes."""

    def __init__(self, directory: str, free_bytes: int, *, fills_at: str | None = None) -> None:
        from pipeline.data.writer import open_new_file

        self._open_new_file = open_new_file  # the real one, taken before the test replaces it
        self.directory = directory
        self.free_bytes = free_bytes
        # fills_at: the disk has room until a file of this name is first opened (the job's
        # start fits), then free_bytes more.
        self.fills_at = fills_at
        self.capacity = None if fills_at else self._used() + free_bytes
        self.failures = 0

    def _used(self) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.directory) for f in files)

    def __call__(self, path: str, mode: str = "wb"):
        if self.capacity is None and os.path.basename(path).startswith(self.fills_at):
            self.capacity = self._used() + self.free_bytes
        disk, real = self, self._open_new_file(path, mode)

        class _File:
            def write(self, data):
                size = len(data.encode() if isinstance(data, str) else data)
                if disk.capacity is not None and disk._used() + size > disk.capacity:
                    disk.failures += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
                n = real.write(data)
                real.flush()  # on disk now: _used() sees it
                return n

            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

        return _File()


def _disk_full_run(tiny_chat_model, tokenizer, tmp_path, monkeypatch, free_bytes: int, fills_at: str | None = None):
    from pipeline.data.writer import OutputWriteError

    _corpus(str(tmp_path / "corpus"), [f"d{i}" for i in range(40)],
            [words_of(i) for i in range(40)])
    config = _config(tiny_chat_model, tmp_path, part_rows=4)
    os.makedirs(config.output_dir)
    disk = _FullDisk(config.output_dir, free_bytes, fills_at=fills_at)
    monkeypatch.setattr("pipeline.data.writer.open_new_file", disk)
    with pytest.raises(OutputWriteError) as failed:
        _run(config, tokenizer)
    monkeypatch.undo()
    return config, disk, str(failed.value)


def words_of(i: int) -> str:
    import random

    return words(random.Random(i), 40)


def test_a_full_disk_while_committing_is_one_line_leaves_no_temporary_files_and_resumes(
        tiny_chat_model, tokenizer, tmp_path, monkeypatch):
    """Space for a few parts, then not for another: the job fails with one line naming the output
    and the lack of space, no `_manifest.json.tmp.*` or `_staging` is left, _metrics.json says
    what happened (it fits once the failed part is removed), and the rerun is exactly once."""
    # The sizes of this job's files, from a run on a disk with room: the disk fills at the third
    # part with room for the metrics and a manifest rewrite, but not for a part.
    _corpus(str(tmp_path / "corpus"), [f"d{i}" for i in range(40)], [words_of(i) for i in range(40)])
    reference = _config(tiny_chat_model, tmp_path, part_rows=4, output_dir=str(tmp_path / "reference"))
    _run(reference, tokenizer)
    size = {name: os.path.getsize(os.path.join(reference.output_dir, name)) for name in os.listdir(reference.output_dir)}
    room = size["_metrics.json"] + 2 * size["_manifest.json"] + 1000
    smallest_part = min(n for name, n in size.items() if name.startswith("part-") and name != "part-00000.parquet")
    assert room < smallest_part, (room, smallest_part)  # the test's premise: a part does not fit
    config, disk, message = _disk_full_run(tiny_chat_model, tokenizer, tmp_path, monkeypatch, free_bytes=room,
                                           fills_at="part-00003")
    out = config.output_dir
    assert disk.failures >= 1
    assert message.startswith(f"output {out}: cannot write part-") and "no space left for the output" in message
    assert "rerun the same command" in message and "\n" not in message
    assert sorted(n for n in os.listdir(out) if ".tmp" in n or n == "_staging") == []
    committed = read_output(out)
    assert 0 < committed.num_rows < 40 and set(_keys(committed).values()) == {1}
    metrics = json.loads((tmp_path / "out" / "_metrics.json").read_text())
    assert metrics["status"] == "failed" and "no space left" in metrics["message"]
    assert read_manifest(out)["complete"] is False

    summary = _run(config, tokenizer)
    table = read_output(out)
    assert table.num_rows == 40 and set(_keys(table).values()) == {1}
    assert summary["documents"]["already_committed"] == committed.num_rows
    assert summary["status"] == "complete"


def test_a_disk_that_stays_full_says_in_its_one_line_that_the_metrics_could_not_be_written(
        tiny_chat_model, tokenizer, tmp_path, monkeypatch):
    """The job starts (its manifest and schema part fit), then the disk is full for good: the one
    line names the failed part and says the metrics and manifest could not be written either."""
    config, _, message = _disk_full_run(tiny_chat_model, tokenizer, tmp_path, monkeypatch, free_bytes=0,
                                        fills_at="part-00001")
    assert message.startswith(f"output {config.output_dir}: cannot write part-00001.parquet")
    assert "no space left for the output" in message and "\n" not in message
    assert message.endswith("(_metrics.json and _manifest.json could not be written either)")
    out = config.output_dir
    assert sorted(n for n in os.listdir(out) if ".tmp" in n or n == "_staging") == []
    _run(config, tokenizer)
    table = read_output(out)
    assert table.num_rows == 40 and set(_keys(table).values()) == {1}


def test_a_full_disk_while_a_unit_commits_is_one_line_through_ray(tmp_path, monkeypatch):
    """The ray-data dataflow's commit (commit_unit, in a Ray Data sink task): the staged file is
    removed and OutputWriteError names the output; the driver finds it however Ray wraps it (a
    RayTaskError around it, chained under Ray Data's own error) and keeps its one line."""
    from ray.exceptions import RayTaskError

    from pipeline.data.writer import OutputWriteError, commit_unit
    from pipeline.dataflows.units import _write_error_in  # noqa: PLC2701 - the unwrapping itself

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr("pipeline.data.writer.open_new_file", _FullDisk(str(out), free_bytes=100))
    row = {"id": "a", "source_file": "c.parquet", "source_row": 0, "question_index": None, "status": "ok",
           "job_id": "j", "task": "summarize"}
    with pytest.raises(OutputWriteError) as failed:
        commit_unit(str(out), "000000-000000-000000000-000000001", [row])
    message = str(failed.value)
    assert message.startswith(f"output {out}: cannot write part-u000000-000000-000000000-000000001.parquet: no space")
    assert "\n" not in message and os.listdir(out / "_staging") == [] and sorted(os.listdir(out)) == ["_staging"]

    wrapped = RayTaskError("write", "Traceback (most recent call last):\n  ...\nOutputWriteError: " + message,
                           failed.value).as_instanceof_cause()
    try:
        try:
            raise wrapped
        except Exception as inner:
            raise RuntimeError("Ray Data: the write failed") from inner
    except RuntimeError as outer:
        found = _write_error_in(outer)
    assert isinstance(found, OutputWriteError) and str(found) == message
    assert _write_error_in(RuntimeError("something else")) is None


# -------------------------------------------------------------------- item 19: links in the output


@pytest.mark.parametrize("name", ["_lock", "_staging", "_manifest.json", "part-00000.parquet"])
def test_links_planted_in_the_output_are_refused_never_followed(tiny_chat_model, tokenizer, tmp_path, name):
    _corpus(str(tmp_path / "corpus"), ["a", "b"])
    config = _config(tiny_chat_model, tmp_path)
    if name in ("_manifest.json", "part-00000.parquet"):
        _run(config, tokenizer)  # an output to resume, whose file is then replaced by a link
        os.remove(os.path.join(config.output_dir, name))
    victim = tmp_path / "victim"
    victim.mkdir() if name == "_staging" else victim.write_text("precious\n")
    os.makedirs(config.output_dir, exist_ok=True)
    os.symlink(victim, os.path.join(config.output_dir, name))
    with pytest.raises(OutputError) as refused:
        _run(config, tokenizer)
    assert "symbolic link" in str(refused.value) and "\n" not in str(refused.value)
    if name == "_staging":
        assert os.listdir(victim) == []
    else:
        assert victim.read_text() == "precious\n"
    assert os.path.islink(os.path.join(config.output_dir, name))


# ------------------------------------------------------- item 20: non-UTF-8 values in large string types


def _bad_questions(kind: str) -> pa.Array:
    """8 documents' question lists, question 0 of document 3 not UTF-8, as `kind`."""
    values = [[f"w{10 + i} w11".encode()] for i in range(8)]
    values[3] = [b"w12 \xff\xfe", b"w13"]
    flat = [q for qs in values for q in qs]
    offsets = [0]
    for qs in values:
        offsets.append(offsets[-1] + len(qs))
    string_type = {"list<large_string>": pa.large_string(), "large_list<string>": pa.string(),
                   "large_list<large_string>": pa.large_string(), "list<string>": pa.string(),
                   "list<string_view>": pa.string_view()}[kind]
    strings = pa.array(flat, pa.binary() if string_type == pa.string() else pa.large_binary()
                       if string_type == pa.large_string() else pa.binary_view()).view(string_type)
    make = pa.LargeListArray if kind.startswith("large_list") else pa.ListArray
    return make.from_arrays(pa.array(offsets, pa.int64() if kind.startswith("large_list") else pa.int32()), strings)


@pytest.mark.parametrize("kind", ["list<string>", "list<large_string>", "large_list<string>",
                                  "large_list<large_string>"])
def test_one_bad_question_costs_one_row_whatever_the_string_type(tiny_chat_model, tokenizer, tmp_path, kind):
    os.makedirs(tmp_path / "corpus")
    questions = _bad_questions(kind)
    assert str(questions.type).startswith(kind.split("<")[0])
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(8)], "text": [f"w{5 + i} w6 w7" for i in range(8)],
                             "questions": questions}), tmp_path / "corpus" / "q.parquet")
    config = _config(tiny_chat_model, tmp_path, task="qa")
    _run(config, tokenizer)
    rows = read_output(config.output_dir).to_pylist()
    assert Counter(r["status"] for r in rows) == Counter({"ok": 8, "error": 1})
    bad = next(r for r in rows if r["status"] == "error")
    assert bad["id"] == "d3" and bad["question_index"] == 0 and bad["error_type"] == "invalid_input"
    assert "question 0 is not valid UTF-8" in bad["error_message"]


@pytest.mark.parametrize("kind", ["list<large_string>", "large_list<string>", "list<string_view>"])
def test_the_processor_answers_a_bad_question_with_one_error_row(tiny_chat_model, kind):
    from pipeline.config.processor import DCAProcessorConfig
    from pipeline.dataflows.processor import PREPARED_COLUMN, PromptStage

    config = DCAProcessorConfig(model=tiny_chat_model, task="qa", dca=TINY_DCA, max_input_tokens=120,
                                max_new_tokens=4, device="cpu").to_dict()
    batch = pa.table({"id": [f"d{i}" for i in range(8)], "text": [f"w{5 + i} w6 w7" for i in range(8)],
                      "questions": _bad_questions(kind)})
    import pickle

    prepared = [pickle.loads(p) for p in PromptStage(config)(batch)[PREPARED_COLUMN].to_pylist()]
    errors = [row for p in prepared for row in p.rows] + [row for p in prepared if p.pending
                                                          for row in p.pending.invalid_rows]
    assert all(p.request is not None for p in prepared)  # every document still goes to the model
    assert len(errors) == 1 and "question 0 is not valid UTF-8" in errors[0]["error_message"]


# ------------------------------------------------------------------------------- item 22: weak spots


def test_a_file_rewritten_in_place_at_the_same_size_is_a_changed_corpus(tiny_chat_model, tokenizer, tmp_path):
    """Uncompressed, no statistics: one text replaced by another of the same length leaves the
    size and the Parquet footer as they were. The resume must see the change; a byte-identical
    copy elsewhere (new mtimes, as Ray's working-dir copy has) still resumes."""
    from pipeline.data.input import _footer_sha256  # noqa: PLC2701 - the test shows the footer is the same

    texts = ["w5 w6 w7 w8", "w9 w10 w11", "w12 w13 w14"]
    kw = dict(compression="none", write_statistics=False, use_dictionary=False)
    _corpus(str(tmp_path / "corpus"), ["a", "b", "c"], texts, **kw)
    path = str(tmp_path / "corpus" / "c.parquet")
    config = _config(tiny_chat_model, tmp_path)
    _run(config, tokenizer)
    shutil.copytree(tmp_path / "corpus", tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes
    size, footer = os.path.getsize(path), _footer_sha256(__import__("pyarrow.fs").fs.LocalFileSystem(), path,
                                                        os.path.getsize(path))
    texts[1] = "w9 w10 w99"
    _corpus(str(tmp_path / "corpus"), ["a", "b", "c"], texts, **kw)
    assert os.path.getsize(path) == size
    assert _footer_sha256(__import__("pyarrow.fs").fs.LocalFileSystem(), path, size) == footer
    with pytest.raises(OutputError, match="input file c.parquet changed since"):
        _run(config, tokenizer)

    pool = FakePool()
    summary = _run(_config(tiny_chat_model, tmp_path, input_path=str(tmp_path / "copy")), tokenizer, pool)
    assert pool.order == [] and summary["documents"]["already_committed"] == 3


def test_nightly_ids_and_partitions_do_not_depend_on_spelling(tiny_chat_model, tokenizer, tmp_path, capsys,
                                                              monkeypatch):
    from jobs.nightly import main

    monkeypatch.chdir(tmp_path)
    ids = set()
    for path in ("corpus", "corpus/", "./corpus", "corpus//"):
        for date in ("2026-11-27", "20261127", " 2026-11-27"):
            main(["--input", path, "--date", date, "--print-submission-id"])
            ids.add(capsys.readouterr().out.strip())
    assert ids == {nightly_submission_id("corpus", "2026-11-27")}
    assert nightly_submission_id("s3://b/corpus/", "2026-11-27") == nightly_submission_id("s3://b/corpus", "2026-11-27")

    _corpus(str(tmp_path / "corpus"), ["a", "b"])
    config = _config(tiny_chat_model, tmp_path)
    root = str(tmp_path / "nightly")
    run_nightly(config, output_root=root, run_date="20261127", pool_factory=lambda c: FakePool(), tokenizer=tokenizer)
    pool = FakePool()
    summary = run_nightly(config, output_root=root, run_date="2026-11-27", pool_factory=lambda c: pool,
                          tokenizer=tokenizer)
    assert os.listdir(root) == ["_nightly_record", "run_date=2026-11-27"] or sorted(os.listdir(root)) == [
        "_nightly_record", "run_date=2026-11-27"]
    assert pool.order == [] and summary["documents"]["already_committed"] == 2  # the same night, resumed
    with pytest.raises(ValueError, match="--date must be a date written YYYY-MM-DD, got '27/11/2026'"):
        run_nightly(config, output_root=root, run_date="27/11/2026", pool_factory=lambda c: FakePool(),
                    tokenizer=tokenizer)


def test_a_symlink_loop_in_the_input_reads_each_file_once(tiny_chat_model, tokenizer, tmp_path):
    _corpus(str(tmp_path / "corpus"), ["a"], name="a.parquet")
    _corpus(str(tmp_path / "corpus" / "sub"), ["b"], name="b.parquet")
    os.symlink(tmp_path / "corpus", tmp_path / "corpus" / "sub" / "loop")  # back up the tree
    os.symlink(tmp_path / "corpus" / "a.parquet", tmp_path / "corpus" / "again.parquet")  # a second name
    plan = check_input(InputSpec(path=str(tmp_path / "corpus")))
    assert [f.relative for f in plan.files] == ["a.parquet", "sub/b.parquet"]
    glob = check_input(InputSpec(path=str(tmp_path / "corpus") + "/**/*.parquet"))
    assert [f.relative for f in glob.files] == ["a.parquet", "sub/b.parquet"]
    config = _config(tiny_chat_model, tmp_path)
    _run(config, tokenizer)
    assert sorted(read_output(config.output_dir)["id"].to_pylist()) == ["a", "b"]


def test_empty_and_blank_ids_are_invalid_input_rows(tiny_chat_model, tokenizer, tmp_path):
    _corpus(str(tmp_path / "corpus"), ["", "  ", "\t", "ok", None])
    config = _config(tiny_chat_model, tmp_path)
    pool = FakePool()
    _run(config, tokenizer, pool)
    rows = {r["source_row"]: r for r in read_output(config.output_dir).to_pylist()}
    assert pool.order == ["ok"]
    for row in (0, 1, 2, 4):
        assert rows[row]["status"] == "error" and rows[row]["error_type"] == "invalid_input" and rows[row]["id"] is None
    assert "row 0: id is empty" in rows[0]["error_message"] and "row 1: id is blank" in rows[1]["error_message"]
    # The Ray Data dataflow's id-only pass counts them as no id too (never a duplicate of each other).
    from pipeline.data.input import plan_units, unit_duplicates

    plan = check_input(InputSpec(path=str(tmp_path / "corpus")))
    assert unit_duplicates(plan, plan_units(plan, 2)) == {}
    assert [d.error_type for d in iter_documents(plan)] == ["invalid_input"] * 3 + [None, "invalid_input"]


def test_a_real_path_with_brackets_is_a_path(tiny_chat_model, tokenizer, tmp_path):
    _corpus(str(tmp_path / "run[1]"), ["a", "b"])
    config = _config(tiny_chat_model, tmp_path, input_path=str(tmp_path / "run[1]"))
    _run(config, tokenizer)
    assert sorted(read_output(config.output_dir)["id"].to_pylist()) == ["a", "b"]
    # A glob is still a glob when no such path exists.
    _corpus(str(tmp_path / "run2"), ["c"])
    plan = check_input(InputSpec(path=str(tmp_path / "run[2]") + "/*.parquet"))
    assert [f.relative for f in plan.files] == ["run2/c.parquet"]  # relative to the glob's base
