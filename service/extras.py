"""The optional dependency sets (pyproject.toml's extras) that some commands need and serving never imports.

`prefix-serve train` / `eval` / `examples` need `train`, `prefix-serve bench` needs `bench`; a server installs neither
(the Docker image holds locks/serve-cpu.txt only). Without the extra those commands end with one line naming it."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

# The top-level modules each extra adds (keep in step with pyproject.toml's [project.optional-dependencies]).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("peft", "tqdm"),
    "bench": ("peft", "matplotlib"),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here (none when the extra is installed)."""
    missing = []
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a finder that refuses the name (as the tests' blocker does)
            found = False
        if not found:
            missing.append(module)
    return missing


def extra_of_missing_module(module_name: str | None, extra: str) -> bool:
    """Whether a ModuleNotFoundError's `name` is one of `extra`'s modules (or a submodule of one)."""
    return (module_name or "").split(".")[0] in EXTRA_MODULES[extra]


def needs_extra_message(command: str, extra: str, missing: Sequence[str]) -> str:
    return (
        f"`prefix-serve {command}` needs the '{extra}' extra, which is not installed here (missing: "
        f"{', '.join(missing)}): pip install 'prefix-serve[{extra}]'"
    )
