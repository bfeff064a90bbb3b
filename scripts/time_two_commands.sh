#!/usr/bin/env bash
# Time README's two commands as a new user runs them: each on its own fresh clone of HEAD, with no
# venv, no pip cache and no compiler cache (inductor's), on this machine. Writes
# docs/perf/two_commands.json (wall seconds, exit codes, machine, load) and keeps the logs in the
# clones' parent folder. Usage: bash scripts/time_two_commands.sh [OUT_JSON]
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${1:-docs/perf/two_commands.json}
WORK=$(mktemp -d /tmp/two_commands.XXXX)
export PIP_NO_CACHE_DIR=1 CI=true
run() {  # name, command: a fresh clone, a fresh inductor cache, the command timed
  local name=$1 cmd=$2 dir="$WORK/$1"
  git clone -q "$REPO" "$dir"
  local load0 t0 t1 rc
  load0=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  (cd "$dir" && TORCHINDUCTOR_CACHE_DIR="$WORK/$name.inductor" bash -c "$cmd") >"$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  printf '"%s": {"command": "%s", "rc": %d, "wall_s": %.0f, "load_before": %s, "load_after": %s, "last_line": "%s"}' \
    "$name" "$cmd" "$rc" "$(echo "$t1 - $t0" | bc)" "$load0" "$(cut -d' ' -f1 /proc/loadavg)" \
    "$(grep -v '^\s*$' "$WORK/$name.log" | tail -1 | tr -d '"\\' | cut -c1-160)"
}
MAIN='bash scripts/setup.sh && .venv/bin/python examples/tiny_vit.py fit --config examples/configs/tiny_vit.yaml'
first=$(run main_job "$MAIN")
second=$(run ci "bash .ci/run")
{
  echo "{"
  echo "  \"commit\": \"$(git rev-parse --short HEAD)\", \"date\": \"$(date -u +%F)\","
  echo "  \"machine\": \"$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(($(grep MemTotal /proc/meminfo | awk '{print $2}') / 1048576)) GiB\","
  echo "  $first,"
  echo "  $second"
  echo "}"
} >"$OUT"
cat "$OUT"
echo "logs: $WORK"
