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
"

wanted=" ${*:-redis fastapi starlette flask django sandbox} "

redis_pid=
cleanup() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

if [[ $wanted == *" redis "* ]]; then
  port=$("$SANDBOX_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
  redis_pid=$!
  export CREDITGUARD_REDIS_URL="redis://127.0.0.1:$port/0"
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
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
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
