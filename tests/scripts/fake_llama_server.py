"""A stand-in for llama.cpp's llama-server in tests (CI has no llama.cpp build): the command line the bench starts it
with, GET /health and POST /completion on token ids, answering the fields the bench reads.

It writes one JSON line per request it got (and a first line with its own argv and pid) to `<model>.requests.jsonl`.
Each answer generates exactly `n_predict` tokens (ids derived from the prompt), as llama-server does with
`ignore_eos`. Standard library only."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("-c", type=int, default=4096)
    parser.add_argument("-t", type=int, default=1)
    parser.add_argument("-tb", type=int, default=1)
    parser.add_argument("--cont-batching", action="store_true")
    args, extra = parser.parse_known_args()
    if not args.model.is_file():
        print(f"error: failed to load model {args.model}", file=sys.stderr)
        sys.exit(1)
    log_path = Path(str(args.model) + ".requests.jsonl")
    lock = threading.Lock()
    with lock, open(log_path, "a") as log:
        log.write(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "extra": extra}) + "\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as llama-server's

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"status": "ok"})
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path != "/completion" or not isinstance(request.get("prompt"), list):
                self._answer(400, {"error": "expected /completion with token ids"})
                return
            with lock, open(log_path, "a") as log:
                log.write(json.dumps(request) + "\n")
            prompt, count = request["prompt"], int(request["n_predict"])
            tokens = [3 + (sum(prompt) + i) % 97 for i in range(count)]
            self._answer(200, {
                "tokens": tokens, "tokens_predicted": count, "tokens_cached": 0,
                "timings": {"prompt_n": len(prompt), "prompt_ms": 1.0, "predicted_n": count, "predicted_ms": 2.0},
            })  # fmt: skip

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
