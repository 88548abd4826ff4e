"""The three ways documents flow to the engine and back, all building their rows with
pipeline.data.rows:

    driver.py     the jobs' default dataflow: this process reads, prompts, schedules and commits
    units.py      the jobs' Ray Data dataflow (--dataflow ray-data): work units through Ray tasks
                  and actors, one committed part per unit; the driver only plans and adds up
    processor.py  the Ray Data processor for users' own pipelines (read_parquet -> processor ->
                  write): rows in, rows out, no commits, no resume
    context.py    JobRun: what a job's dataflow works with (both job dataflows)
    budget.py     the failure budget both job dataflows judge
"""
