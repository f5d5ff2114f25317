"""/metrics size after 1,000 task ids are created, used and deleted (in-process app, tiny model; ~40 s).

Usage: .venv/bin/python tests/scripts/measure_metrics_size.py   (prints one JSON line; docs/reliability.md's table)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastapi.testclient import TestClient  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.model_loader import wrap_model  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.helpers import (  # noqa: E402
    TINY_MAX_POSITIONS,
    make_peft_prefix_adapter,
    read_adapter,
    tiny_llama,
    tiny_tokenizer,
)

TASKS = 1000


def size(text: str) -> dict[str, int]:
    return {"bytes": len(text), "lines": text.count("\n")}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="measure-metrics-"))
    model = tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=TINY_MAX_POSITIONS)
    loaded = wrap_model(model, tiny_tokenizer(128), "tiny-llama")
    config, weights = read_adapter(make_peft_prefix_adapter(loaded.model, tmp / "adapter", 3, 1))
    files = {"adapter_config": ("c.json", config), "adapter_model": ("m.safetensors", weights)}
    out: dict[str, object] = {}
    started = time.time()
    with TestClient(create_app(Settings(prefix_dir=tmp / "store", max_prefixes=2 * TASKS), loaded)) as client:
        out["fresh"] = size(client.get("/metrics").text)
        for i in range(TASKS):
            task = f"task{i:04d}"
            assert client.post("/prefixes", data={"task_id": task}, files=files).status_code == 201
            body = {"task_id": task, "inputs": "t5 t6", "parameters": {"max_new_tokens": 1}}
            assert client.post("/generate", json=body).status_code == 200
        live = client.get("/metrics").text
        labels = {line.split('task="')[1].split('"')[0] for line in live.splitlines() if 'task="task' in line}
        out["all_live"] = {**size(live), "distinct_task_labels": len(labels)}
        for i in range(TASKS):
            assert client.delete(f"/prefixes/task{i:04d}").status_code == 204
        after = client.get("/metrics").text
        naming = sum('task="task' in line for line in after.splitlines())
        out["after_created_used_deleted"] = {**size(after), "lines_naming_a_deleted_task": naming}
    out["tasks"], out["seconds"] = TASKS, round(time.time() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
