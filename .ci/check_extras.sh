#!/usr/bin/env bash
# Every extra works installed alone: for each one, a fresh virtualenv with `pip install
# '.[EXTRA]'` only (through uv, with one download cache for all of them), then an import of
# the modules that the extra is for, then its how-to page's sample (.ci/run_sample.py)
# against the sandbox. The sandbox is served by SANDBOX_PYTHON (the CI venv), so a venv
# without the sandbox extra can be checked against it too.
#
# Usage: .ci/check_extras.sh [EXTRA ...]   (default: all of them). Needs uv on PATH or in
# .venv/bin, and redis-server for the redis extra. Exits non-zero if any extra fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

UV=${UV:-$(command -v uv || echo "$root/.venv/bin/uv")}
SANDBOX_PYTHON=${SANDBOX_PYTHON:-$root/.venv/bin/python}
JOBS=${JOBS:-3}
work=$(mktemp -d /tmp/creditguard-extras.XXXXXX)
export UV_CACHE_DIR=${UV_CACHE_DIR:-$work/uv-cache}

# extra | modules to import | page | section (empty: the whole page) | Django settings
# (the Django page's sample runs inside a project: .ci/sample_django_settings.py)
CHECKS="
redis|creditguard.redis|docs/howto/workers.md||
fastapi|creditguard.fastapi creditguard.asgi|docs/howto/asgi-starlette-fastapi.md||
starlette|creditguard.asgi starlette.applications|docs/howto/asgi-starlette-fastapi.md|Any ASGI app|
flask|creditguard.flask creditguard.wsgi|docs/howto/flask.md||
django|creditguard.django|docs/howto/django.md||sample_django_settings
sandbox|creditguard.testing uvicorn|docs/howto/testing.md||
otel|creditguard.telemetry.otel opentelemetry.metrics|||
postgres|creditguard.ledger psycopg|||
report|creditguard.cli.report matplotlib|||
"

wanted=" ${*:-redis fastapi starlette flask django sandbox otel postgres report} "

redis_pids=()
cleanup() {
  for pid in "${redis_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  "$SANDBOX_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [[ $wanted == *" redis "* ]]; then
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
  redis_pids+=($!)
  export CREDITGUARD_REDIS_URL="redis://127.0.0.1:$port/0"
  # The page's Redis Cluster sample runs against three primaries joined in a cluster.
  nodes=()
  for n in 1 2 3; do
    # A node also listens on its port + 10000 (the cluster bus): both must be free.
    node=$("$SANDBOX_PYTHON" -c '
import random, socket
while True:
    port = random.randint(20000, 50000)
    try:
        for p in (port, port + 10000):
            socket.create_server(("127.0.0.1", p)).close()
    except OSError:
        continue
    print(port)
    break')
    mkdir -p "$work/cluster-$n"
    redis-server --port "$node" --bind 127.0.0.1 --save '' --appendonly no \
      --cluster-enabled yes --cluster-config-file nodes.conf --dir "$work/cluster-$n" \
      >"$work/cluster-$n.log" 2>&1 &
    redis_pids+=($!)
    nodes+=("127.0.0.1:$node")
  done
  for node in "${nodes[@]}"; do
    for _ in $(seq 100); do redis-cli -h 127.0.0.1 -p "${node#*:}" ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    >"$work/cluster.log" 2>&1; then
    cat "$work/cluster.log" >&2
    exit 1
  fi
  for _ in $(seq 100); do
    redis-cli -h 127.0.0.1 -p "${nodes[0]#*:}" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
    sleep 0.1
  done
  export CREDITGUARD_REDIS_CLUSTER_URL="redis://${nodes[0]}/0"
fi

# One build of the package, installed into every venv (its dependencies come through
# the shared cache).
"$UV" build -q --wheel --out-dir "$work/dist" "$root" >/dev/null
wheel=$(ls "$work"/dist/creditguard-*.whl)

check_one() {
  local extra=$1 modules=$2 page=$3 section=$4 settings=$5
  local venv=$work/venv-$extra
  # From outside the source tree: imports see what the install gave, nothing else.
  cd "$work" || return 1
  "$UV" venv -q --python python3 "$venv" || return 1
  "$UV" pip install -q --python "$venv/bin/python" "creditguard[$extra] @ file://$wheel" || return 1
  for module in $modules; do
    "$venv/bin/python" -I -c "import $module" || {
      echo "import $module failed with only creditguard[$extra] installed"
      return 1
    }
  done
  if [ -z "$page" ]; then  # no page of its own to run: a guard works with it installed
    "$venv/bin/python" -I -c "
import creditguard
from creditguard.testing import FakeLensmor
fake = FakeLensmor()
guard = creditguard.CreditGuard(fake.api_key, transport=fake.transport)
with guard.spend(1):
    pass
print('a guard spends with creditguard[$extra] installed alone')" || return 1
    return 0
  fi
  if [ -n "$settings" ]; then
    export DJANGO_SETTINGS_MODULE=$settings PYTHONPATH=$root/.ci
  fi
  "$venv/bin/python" "$root/.ci/run_sample.py" "$root/$page" \
    --sandbox-python "$SANDBOX_PYTHON" ${section:+--section "$section"} || return 1
}

names=()
pids=()
while IFS='|' read -r extra modules page section settings; do
  [ -n "$extra" ] || continue
  [[ $wanted == *" $extra "* ]] || continue
  # At most $JOBS checks at once (the Redis servers are jobs too: count the checks only).
  while :; do
    live=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && live+=("$pid"); done
    [ "${#live[@]}" -lt "$JOBS" ] && break
    wait -n "${live[@]}" || true
  done
  (
    if check_one "$extra" "$modules" "$page" "$section" "$settings" >"$work/$extra.log" 2>&1; then
      echo 0 >"$work/$extra.rc"
    else
      echo 1 >"$work/$extra.rc"
    fi
  ) &
  pids+=($!)
  names+=("$extra")
done <<<"$CHECKS"
for pid in "${pids[@]}"; do wait "$pid" || true; done  # the outcome is in each .rc file

failed=0
for extra in "${names[@]}"; do
  if [ "$(cat "$work/$extra.rc" 2>/dev/null)" = 0 ]; then
    echo "ok      creditguard[$extra]"
  else
    failed=1
    echo "FAILED  creditguard[$extra]:"
    tail -40 "$work/$extra.log" | sed 's/^/    /'
  fi
done
exit "$failed"
