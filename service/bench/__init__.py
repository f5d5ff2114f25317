"""`prefix-serve bench`: the same seeded closed-loop workload against PEFT's own method and this service."""
