"""The output's one schema: every committed part has exactly these columns and types, and the Ray
Data processor adds the same columns (less those only a job has) to its input's.

The id column takes the input's id type (output_schema): integers stay integers, strings strings.

Adding a column: declare it here and fill it in the row builder (pipeline.data.rows); readers, the
writer, the units' commits and the processor all follow.
"""

from __future__ import annotations

import pyarrow as pa

# The output of each call made for a row answered in sections (pipeline.data.long_documents).
SECTION_OUTPUTS_TYPE = pa.list_(pa.struct([
    pa.field("level", pa.int32()), pa.field("index", pa.int32()), pa.field("first_token", pa.int64()),
    pa.field("end_token", pa.int64()), pa.field("output", pa.string()),
    # The model's confidence in the output: mean log-probability per output token.
    pa.field("mean_logprob", pa.float64()),
]))

# One row per (document, question). Declared up front: every part has exactly this schema, even
# a part whose rows are all ok (error columns typed and null) or all errors.
OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), metadata={"doc": "document id from the input, in the input's type (output_schema)"}),
    pa.field("source_file", pa.string(), nullable=False,
             metadata={"doc": "input file of the row, relative to the input root"}),
    pa.field("source_row", pa.int64(), nullable=False, metadata={"doc": "row number in source_file, from 0"}),
    pa.field("task", pa.string(), nullable=False, metadata={"doc": "summarize | qa"}),
    pa.field("question_index", pa.int32(), metadata={"doc": "position of the question in the document's list (QA), else null"}),
    pa.field("question", pa.string()),
    pa.field("output", pa.string(), metadata={"doc": "generated text; null on error"}),
    pa.field("status", pa.string(), nullable=False, metadata={"doc": "ok | error"}),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("prompt_tokens", pa.int64(), metadata={"doc": "tokens sent to the model (after truncation; summed over calls)"}),
    pa.field("output_tokens", pa.int64()),
    pa.field("truncated_tokens", pa.int64(), metadata={"doc": "document tokens dropped to fit max_input_tokens"}),
    pa.field("sections", pa.int32(), metadata={
        "doc": "sections the document was answered in: 1 for one prompt, more under truncation=hierarchical"}),
    pa.field("levels", pa.int32(), metadata={
        "doc": "levels of engine calls: 1 = one prompt or the sections only, 2 = sections then one combine, ..."}),
    pa.field("calls", pa.int32(), metadata={
        "doc": "engine calls made for the row; tokens and times of the row are summed over them"}),
    pa.field("section_outputs", SECTION_OUTPUTS_TYPE, metadata={
        "doc": "hierarchical: every call's output for the row (level 0: a section; k: a combination of "
               "level k-1), with the document tokens it covers and the model's mean log-probability per "
               "output token; null for one prompt"}),
    pa.field("prefill_s", pa.float64(), metadata={"doc": "time to first token"}),
    pa.field("decode_s", pa.float64()),
    pa.field("latency_s", pa.float64(), metadata={"doc": "wall clock of the request on rank 0"}),
    pa.field("gpu_time_s", pa.float64(), metadata={"doc": "CUDA-event time, max over ranks; null on CPU"}),
    pa.field("device_time_s", pa.float64(), metadata={
        "doc": "the row's share of the device busy time of every forward it took part in, summed over ranks and "
               "calls (CUDA events on GPU, the forwards' wall clock on CPU): its cost, whatever it shared steps with"}),
    pa.field("peak_memory_bytes", pa.int64(), metadata={"doc": "max over ranks, see memory_kind"}),
    pa.field("memory_kind", pa.string(), metadata={"doc": "cuda_max_allocated | cpu_peak_rss"}),
    pa.field("replica", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("dca_enabled", pa.bool_()),
    pa.field("dca_pretraining_length", pa.int64()),
    pa.field("dca_chunk_size", pa.int64()),
    pa.field("dca_local_window", pa.int64()),
    pa.field("dca_temperature_alpha", pa.float64()),
    pa.field("attention_backend", pa.string(), metadata={
        "doc": "attention kernels that ran for the row: triton | flash | torch with DCA (DCAConfig.backend as "
               "chosen and self-checked at start), the model's own (sdpa, eager, ...) without; its replica's "
               "(mixed: the replica's ranks disagree); rows no replica answered: the engine's when all replicas "
               "agree, else null"}),
    pa.field("attention_backend_fallback", pa.string(), metadata={
        "doc": "why attention_backend is not what was asked for (the start-up self-check's finding), else null"}),
    pa.field("content_hash", pa.string(),
             metadata={"doc": "sha256 of the document text (its UTF-8 bytes): all 64 hex digits"}),
    pa.field("config_hash", pa.string(), metadata={"doc": "fingerprint of model + prompt + generation settings"}),
    pa.field("job_id", pa.string(), nullable=False),
])
COLUMNS = tuple(OUTPUT_SCHEMA.names)
# The id types an output's id column can have: the input's (pipeline.data.input.InputPlan.id_type).
ID_TYPES = {"string": pa.string(), "int64": pa.int64(), "uint64": pa.uint64()}


def output_schema(id_type: pa.DataType | str = "string") -> pa.Schema:
    """OUTPUT_SCHEMA with the id column in the input's id type (one per job: every part of an
    output has the same schema), so results join to the input without a cast. id_type: a pyarrow
    type or its name in ID_TYPES."""
    if isinstance(id_type, str):
        if id_type not in ID_TYPES:
            raise ValueError(f"id type must be one of {sorted(ID_TYPES)}, got {id_type!r}")
        id_type = ID_TYPES[id_type]
    if id_type not in ID_TYPES.values():
        raise ValueError(f"id type must be one of {sorted(ID_TYPES)}, got {id_type}")
    index = OUTPUT_SCHEMA.get_field_index("id")
    return OUTPUT_SCHEMA.set(index, OUTPUT_SCHEMA.field(index).with_type(id_type))


def id_type_name(id_type: pa.DataType) -> str:
    """The name of an id type in ID_TYPES (what a manifest records)."""
    return next(name for name, t in ID_TYPES.items() if t == id_type)

# Columns only a job's output has: the processor keeps its input's own columns instead of the
# corpus key, and has no job, model or hashes to record.
JOB_ONLY_COLUMNS = ("id", "source_file", "source_row", "task", "attempts", "model", "content_hash", "config_hash",
                    "job_id")
# The columns the processor adds to its input's, in OUTPUT_SCHEMA's order, with their types (plain
# fields: no docs, all nullable).
PROCESSOR_FIELDS = [pa.field(f.name, f.type) for f in OUTPUT_SCHEMA if f.name not in JOB_ONLY_COLUMNS]
PROCESSOR_COLUMNS = tuple(f.name for f in PROCESSOR_FIELDS)
