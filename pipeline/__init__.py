"""The distributed engine (Ray replicas, DeepSpeed tensor parallelism) and the Parquet data plane.

    job.py      run_job, run_nightly: a batch job, orchestrated
    config/     every setting, its checks and the settings derived from it
    data/       input, prompts, the row builder, the output schema, the exactly-once writer
    dataflows/  driver, ray-data units, the Ray Data processor (and the failure budget)
    engine/     replicas of one model: pool, replicas, rank workers, batching, the memory planner
    runtime/    Ray and GPU start-up, the job's engine, stops and signals, progress
    metrics/    per-job metrics beside the output, live metrics for the dashboard

docs/architecture.md has one line per module and how a document flows through them.
Driver-side modules import no torch/transformers/deepspeed at module level; those load inside the
processes that hold a model.
"""
