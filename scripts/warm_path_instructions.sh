#!/usr/bin/env bash
# Instructions per warm request, counted by callgrind: for each service, the
# slope between 1,600 and 4,800 requests (32 callers, 2 KiB JSON bodies,
# hyper-util's client and a hyper server on 127.0.0.1, one current-thread
# runtime), so that set-up cancels out. Two patterns: a task spawned per
# request (`spawn`), and 32 tasks each looping over its requests (`loop`).
# Prints the tables BENCHMARKS.md quotes.
# Needs valgrind (apt-get install -y valgrind). Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install -y valgrind" >&2; exit 1; }
exe=$(cargo bench --bench warm_path --features reqwest --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep warm_path | tail -1)
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$exe" --count "$1" "$2" "$3" 2>&1 |
        sed -n 's/.*refs: *\([0-9,]*\).*/\1/p' | tr -d ,
}
for pattern in spawn loop; do
    echo
    echo "Pattern: $pattern"
    echo
    echo "| service | instructions per request | added over bare |"
    echo "|---|---|---|"
    bare=""
    for service in bare identity tower_retry follow_redirect layered reqwest_bare reqwest_layered; do
        low=$(count "$service" 1600 "$pattern")
        high=$(count "$service" 4800 "$pattern")
        per=$(((high - low) / 3200))
        # The reqwest rows are measured against the bare reqwest client.
        case "$service" in bare | reqwest_bare) bare=$per ;; esac
        printf '| %s | %s | %+d |\n' "$service" "$per" $((per - bare))
    done
done
