"""Every setting of the pipeline, in one place, plain Python (no torch, no ray, no dca at import):

    job.py        JobConfig: a batch job's settings, its defaults, what identifies a job
    engine.py     EngineConfig: replicas, sharding, scheduling and limits of the engine
    model.py      ModelSpec: which model, dtype and DCA settings; the DCAConfig they resolve to
    task.py       the task settings the jobs and the processor share: tasks, truncation,
                  generation defaults, SamplingParams
    processor.py  DCAProcessorConfig: what the Ray Data processor runs
    resolve.py    each derived setting, resolved once: prefill block, KV dtype, planned device,
                  weight dtype and attention backend
    validate.py   the checks every config shares (one line naming field, rule and value)
    files.py      what every config does when read from a dict or file
"""
