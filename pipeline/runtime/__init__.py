"""What a job runs on: its Ray cluster and GPUs (`cluster`), its engine (`pool`: the ReplicaPool and
the memory plan printed at start), how it stops (`stops`: JobFailed, JobStopped, signals) and its
progress bar (`progress`)."""
