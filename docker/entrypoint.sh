#!/usr/bin/env bash
# Container entrypoint. The service reads one prefix store (PREFIX_SERVE_PREFIX_DIR), normally a volume; a fresh, empty
# volume would hide the example prefixes baked into the image. So on the first start with an empty store, copy the
# examples in; then exec the command, so the server is PID 1 and gets Docker's SIGTERM directly.
# The marker makes seeding happen once: deleting every task later does not bring the examples back.
# (The registry ignores names that start with ".".)
set -euo pipefail

store=${PREFIX_SERVE_PREFIX_DIR:-/data/prefixes}
examples=${PREFIX_SERVE_EXAMPLES_DIR:-/opt/prefix-serve/examples}
marker=$store/.examples-seeded

mkdir -p "$store" 2>/dev/null || true
if [ -w "$store" ] && [ ! -e "$marker" ]; then
    if [ -d "$examples" ] && [ -z "$(ls -A "$store")" ]; then
        cp -R "$examples"/. "$store"/
        echo "entrypoint: empty prefix store $store seeded with the example prefixes from $examples" >&2
    fi
    touch "$marker"
fi

exec "$@"
