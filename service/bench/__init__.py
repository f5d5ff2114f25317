"""`prefix-serve bench`: the same seeded closed-loop workload against PEFT's own method and this service."""

# The systems `prefix-serve bench` runs by default; ray-N (e.g. ray-2) on request. Here, not in `service.bench.cli`
# or `service.bench.command`, because both need it and the light parser must not import the heavy run.
SYSTEMS = ("peft", "static", "per-task", "mixed", "no-prefix")
