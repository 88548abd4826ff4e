"""The data plane: what goes into the engine and what comes out, on the driver side (pyarrow and
the tokenizer; no torch):

    input.py    the corpus: files, schema checks, documents row by row, work units
    prompts.py  prompt templates, rendering to token ids, truncation
    rows.py     the row builder: documents -> requests -> output rows (ok and error)
    schema.py   the output schema (the jobs' parts, the processor's columns)
    writer.py   the exactly-once writer: parts, manifest, lock, unit commits
"""
