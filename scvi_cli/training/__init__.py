"""Training: the one visible loop (loop.py), a run from files with resume (job.py), signals (preemption.py)."""
