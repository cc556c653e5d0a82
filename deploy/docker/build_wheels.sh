#!/usr/bin/env bash
# Build every wheel the CPU image installs into deploy/docker/wheels/ (the Dockerfile installs with --no-index):
#   deps/   CPU torch (TORCH_SPEC) and every third-party dependency of the server and client
#   local/  this checkout's prunefusion and prunefusion-client
# The sources are copied first (git's tracked and untracked-but-not-ignored files), so a stale build/ or egg-info
# in the checkout never leaks into the wheel. pip's cache makes a rerun quick.
#   PIP           pip that resolves the set (default .venv/bin/python -m pip)
#   MORE_PYTHONS  more interpreters whose environment markers the set must also satisfy (default /usr/bin/python3
#                 when it has pip: Debian bookworm's 3.11.2, the local base's python, which needs async-timeout
#                 for redis where 3.11.3+ does not); each one only adds what it lacks
#   TORCH_SPEC    default torch==2.13.0 (the CPU build on these machines)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
read -r -a PIP <<<"${PIP:-.venv/bin/python -m pip}"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
MORE_PYTHONS=${MORE_PYTHONS-/usr/bin/python3}
out=deploy/docker/wheels
src=$(mktemp -d "${TMPDIR:-/tmp}/prunefusion-src.XXXXXX")
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | grep -zv '^deploy/docker/wheels/' \
    | tar -cf - --null --no-recursion --ignore-failed-read -T - 2>/dev/null | tar -xf - -C "$src"
rm -rf "$out.part" && mkdir -p "$out.part/deps" "$out.part/local"
# the logs (setuptools' warnings included) are shown only when pip fails
"${PIP[@]}" wheel --wheel-dir "$out.part/deps" "$TORCH_SPEC" "$src/clients/python" "$src" >"$src/pip.log" 2>&1 \
    || { tail -40 "$src/pip.log"; exit 1; }
mv "$out.part"/deps/prunefusion-[0-9]*.whl "$out.part"/deps/prunefusion_client-[0-9]*.whl "$out.part/local/"
for python in $MORE_PYTHONS; do
    if ! "$python" -m pip --version >/dev/null 2>&1; then
        echo "wheels: $python has no pip; the set covers only $("${PIP[@]}" --version | sed 's/.*(python /python /; s/)//')"
        continue
    fi
    before=$(ls "$out.part/deps" | wc -l)
    "$python" -m pip wheel --wheel-dir "$out.part/deps" --find-links "$out.part/deps" "$TORCH_SPEC" \
        "$out.part"/local/*.whl >"$src/pip-more.log" 2>&1 || { tail -40 "$src/pip-more.log"; exit 1; }
    rm -f "$out.part"/deps/prunefusion-[0-9]*.whl "$out.part"/deps/prunefusion_client-[0-9]*.whl
    echo "wheels: $("$python" --version) added $(( $(ls "$out.part/deps" | wc -l) - before ))"
done
rm -rf "$out" && mv "$out.part" "$out"
echo "wheels: $(find "$out/deps" -name '*.whl' | wc -l) dependencies ($(du -sh "$out/deps" | cut -f1)), local: $(cd "$out/local" && echo *.whl)"
