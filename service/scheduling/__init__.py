"""Schedulers: which rows run in the next forward and how admission, retirement and memory are decided, one module per
batch layout behind the `Scheduler` interface of `base` (the engine's loop knows no layout)."""
