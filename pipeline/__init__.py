"""The distributed engine (Ray replicas, DeepSpeed tensor parallelism) and the Parquet data plane.

Driver-side modules import no torch/transformers/deepspeed at module level; those load inside the
processes that hold a model.
"""
