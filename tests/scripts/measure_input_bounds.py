"""/health latency while huge prompts are refused (real `prefix-serve serve`, embedded SmolLM2, loopback only).

Usage: .venv/bin/python tests/scripts/measure_input_bounds.py [PORT]   (~1 min; prints one JSON line per case)"""
import json, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path
import httpx

root = Path(__file__).resolve().parents[2]
work = Path(tempfile.mkdtemp(prefix="measure-inputs-"))
port = int(sys.argv[1]) if len(sys.argv) > 1 else 18711
store = work / "store"
log = open(work / "server.log", "wb")
proc = subprocess.Popen([str(root / ".venv/bin/prefix-serve"), "serve", "--port", str(port), "--prefix-dir", str(store),
                         "--device", "cpu", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=work)
url = f"http://127.0.0.1:{port}"
def rss():
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
try:
    t0 = time.time()
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200: break
        except httpx.TransportError: pass
        assert proc.poll() is None and time.time() - t0 < 180
        time.sleep(0.3)
    model = httpx.get(url + "/health").json()["model"]
    results = {}
    cases = {
        "generate_20MB": ("/generate", {"task_id": "none", "inputs": "hello " * (20 * 1024 * 1024 // 6)}),
        "completions_20MB": ("/v1/completions", {"model": model, "prompt": "hello " * (20 * 1024 * 1024 // 6)}),
        "chat_20MB": ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hello " * (20 * 1024 * 1024 // 6)}]}),
        "completions_3.9MB_over_char_bound": ("/v1/completions", {"model": model, "prompt": "hello " * (3_900_000 // 6)}),
        "completions_at_char_bound_331k_chars": ("/v1/completions", {"model": model, "prompt": "hello " * (331_776 // 6)}),
    }
    for name, (path, body) in cases.items():
        raw = json.dumps(body).encode()
        lat = []; stop = threading.Event()
        def probe():
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    s = time.perf_counter(); c.get("/health"); lat.append(time.perf_counter() - s); time.sleep(0.01)
        th = threading.Thread(target=probe); th.start(); time.sleep(0.2)
        rss0 = rss()
        s = time.perf_counter()
        r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=120)
        took = time.perf_counter() - s
        time.sleep(0.2); stop.set(); th.join()
        msg = r.json().get("error"); msg = msg["message"] if isinstance(msg, dict) else msg
        results[name] = {"body_MB": round(len(raw) / 1e6, 1), "status": r.status_code, "answered_s": round(took, 3),
                         "health_ms_p50": round(1000 * statistics.median(lat), 1), "health_ms_max": round(1000 * max(lat), 1),
                         "probes": len(lat), "rss_mib_before": rss0, "rss_mib_after": rss(), "message": msg[:140]}
        print(name, json.dumps(results[name]), flush=True)
finally:
    proc.terminate(); proc.wait(30)
