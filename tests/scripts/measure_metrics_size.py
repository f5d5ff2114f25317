"""/metrics size after 1,000 task ids are created, used and deleted (in-process app, tiny model; ~40 s).

Usage: .venv/bin/python tests/scripts/measure_metrics_size.py"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fastapi.testclient import TestClient
from service.api.app import create_app
from service.model_loader import wrap_model
from service.settings import Settings
from tests.helpers import TINY_MAX_POSITIONS, make_peft_prefix_adapter, read_adapter, tiny_llama, tiny_tokenizer

tmp = Path(tempfile.mkdtemp())
loaded = wrap_model(tiny_llama(seed=0, initializer_range=0.5, max_position_embeddings=TINY_MAX_POSITIONS), tiny_tokenizer(128), "tiny-llama")
config, weights = read_adapter(make_peft_prefix_adapter(loaded.model, tmp / "a", 3, 1))
files = {"adapter_config": ("c.json", config), "adapter_model": ("m.safetensors", weights)}
out = {}
with TestClient(create_app(Settings(prefix_dir=tmp / "store", max_prefixes=2000), loaded)) as client:
    base = client.get("/metrics").text
    out["fresh"] = {"bytes": len(base), "lines": base.count("\n")}
    started = time.time()
    for i in range(1000):
        tid = f"task{i:04d}"
        assert client.post("/prefixes", data={"task_id": tid}, files=files).status_code == 201
        assert client.post("/generate", json={"task_id": tid, "inputs": "t5 t6", "parameters": {"max_new_tokens": 1}}).status_code == 200
        if i == 999:
            live = client.get("/metrics").text
            out["1000_live_tasks"] = {"bytes": len(live), "lines": live.count("\n"),
                                      "distinct_task_labels": len({l.split('task="')[1].split('"')[0] for l in live.splitlines() if 'task="task' in l})}
    for i in range(1000):
        assert client.delete(f"/prefixes/task{i:04d}").status_code == 204
    text = client.get("/metrics").text
    out["after_1000_created_used_deleted"] = {"bytes": len(text), "lines": text.count("\n"),
                                              "lines_naming_a_deleted_task": sum('task="task' in l for l in text.splitlines())}
    out["seconds"] = round(time.time() - started, 1)
print(json.dumps(out))
