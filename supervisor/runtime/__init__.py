"""The daemon runtime: supervised tasks, deadlines, retries, clocks and logging.

Nothing here knows about GPUs or Kubernetes; every role is built on these pieces.
"""
