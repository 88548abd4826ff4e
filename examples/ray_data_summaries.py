"""Summaries of the example corpus with the Ray Data processor (docs/ray-data.md).

    .venv/bin/python examples/ray_data_summaries.py [OUTPUT_DIR]

Reads examples/corpus with ray.data, runs the embedded SmolLM2 with DCA through one engine replica
and writes Parquet (one file per block) to OUTPUT_DIR (default /tmp/dca-ray-data).
"""

import sys

import pyarrow.parquet as pq
import ray

from pipeline.config.processor import DCAProcessorConfig
from pipeline.dataflows.processor import build_processor
from pipeline.runtime.ray_data_output import ray_data_console

output = sys.argv[1] if len(sys.argv) > 1 else "/tmp/dca-ray-data"
ray.init(address="local", include_dashboard=False)  # or ray.init() inside `ray job submit`
config = DCAProcessorConfig(model="smollm2", task="summarize", concurrency=1, batch_size=2,
                            max_input_tokens=2048, max_new_tokens=48)
processor = build_processor(
    config,
    preprocess=lambda row: {"id": row["id"], "text": row["text"]},  # keep only what is needed
    postprocess=lambda row: {k: row[k] for k in ("id", "status", "output", "prompt_tokens", "gpu_time_s",
                                                 "prefill_s", "decode_s", "dca_chunk_size")},
)
summaries = processor(ray.data.read_parquet("examples/corpus"))
with ray_data_console():  # Ray Data's warnings only (its INFO reports go to its log file); a terminal shows its bar
    summaries.write_parquet(output)
for row in pq.read_table(output).to_pylist():  # read back without a second Ray Data execution
    print(f"{row['id']} [{row['status']}] {row['prompt_tokens']} tok: {(row['output'] or '')[:100]!r}")
