#!/usr/bin/env bash
# Docker HEALTHCHECK: healthy when GET /health answers 200 (it does once the model is loaded). Plain bash /dev/tcp,
# so the image needs no curl and a probe costs milliseconds, not a Python start-up.
set -euo pipefail

exec 3<>"/dev/tcp/127.0.0.1/${PREFIX_SERVE_PORT:-8000}"
printf 'GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 5 _ status _ <&3
[ "$status" = 200 ]
