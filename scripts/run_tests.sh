#!/usr/bin/env bash
# Install and run the CPU test suite in one or more dependency "legs"; extra args go to pytest
# (locked leg only).
#
#   bash scripts/run_tests.sh                 # the locked leg: everything but tests marked slow
#   bash scripts/run_tests.sh -m slow         # only the slow ones (locked leg)
#   CI=true bash scripts/run_tests.sh         # what CI runs: all three legs below
#   LEGS=newest bash scripts/run_tests.sh     # one or more legs by name (comma list)
#
# Legs (README, "Dependencies and support matrix"):
#   locked  .venv         python3 (3.11 here), requirements/lock.txt: torch 2.13, megatron-core
#                         0.16.1, transformers 5.25 -- the whole suite, with tests/slurm: a real
#                         two-node Slurm cluster on this machine (as root they apt-get install
#                         slurmctld slurmd slurm-client munge if missing; elsewhere they are
#                         skipped with the reason; with CI=true they must run)
#   floor   .venv-floor   the same lock with the lowest supported transformers
#                         (requirements/transformers-floor.txt) -- the HF interop tests
#   newest  .venv-newest  Python 3.12 with the newest releases pyproject.toml allows (megatron-core
#                         0.19.x, newest torch: the CUDA build, a ~3 GB download that runs on CPU;
#                         transformers has no upper bound: its newest release, whatever it is
#                         when CI runs) -- model, converter (with generation), HF interop,
#                         training-equivalence, checkpoint and launcher tests
# Every leg runs even when an earlier one failed; the exit code is non-zero if any failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib/python.sh
source "$ROOT/scripts/lib/python.sh"

if [ -z "${LEGS:-}" ]; then
  if [ "${CI:-}" = "true" ]; then LEGS=locked,floor,newest; else LEGS=locked; fi
fi
PYTEST_ARGS=("$@")
if [ "${#PYTEST_ARGS[@]}" -eq 0 ]; then PYTEST_ARGS=(-m "not slow"); fi

# The HF interop tests (exported models on the installed transformers): run by every leg.
FLOOR_TESTS=(tests/unit/test_convert_roundtrip.py tests/unit/test_hf_parity.py tests/unit/test_harpe_llama_model.py
             tests/unit/test_safe_loading.py tests/unit/test_convert_errors.py tests/unit/test_eval_end_to_end.py
             tests/unit/test_self_extend.py tests/unit/test_export_frequencies.py)
NEWEST_TESTS=(tests/unit tests/distributed/test_parallel_equivalence.py tests/distributed/test_training.py
              tests/distributed/test_convert_tp.py tests/distributed/test_launcher.py
              tests/distributed/test_reliability.py)

failed=()
summary=()
run_leg() {  # name venv python deps override pytest-args...
  local name="$1" venv="$2" python="$3" deps="$4" override="$5"
  shift 5
  local start=$SECONDS
  echo
  echo "=== leg '$name' ($venv) ==="
  if ! VENV="$venv" PYTHON="$python" HARPE_DEPS="$deps" HARPE_CONSTRAINTS_OVERRIDE="$override" \
       bash "$ROOT/scripts/setup_venv.sh"; then
    failed+=("$name (setup)")
    summary+=("$name: setup failed after $((SECONDS - start))s")
    return
  fi
  "$venv/bin/python" -m pytest -q --timeout=900 -p no:cacheprovider "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then failed+=("$name (pytest exit $rc)"); fi
  summary+=("$name: pytest exit $rc in $((SECONDS - start))s (setup included)")
}

IFS=',' read -r -a legs <<< "$LEGS"
for leg in "${legs[@]}"; do
  case "$leg" in
    locked)
      run_leg locked "${VENV:-$ROOT/.venv}" "${PYTHON:-python3}" locked "" tests "${PYTEST_ARGS[@]}" ;;
    floor)
      run_leg floor "$ROOT/.venv-floor" "${PYTHON:-python3}" locked "$ROOT/requirements/transformers-floor.txt" \
        "${FLOOR_TESTS[@]}" -m "not slow" ;;
    newest)
      if ! py312="$(find_python 3.12)"; then
        failed+=("newest (no Python 3.12)")
        summary+=("newest: Python 3.12 not found (install it, e.g. 'pyenv install 3.12')")
        continue
      fi
      run_leg newest "$ROOT/.venv-newest" "$py312" newest "" "${NEWEST_TESTS[@]}" -m "not slow" ;;
    *)
      echo "run_tests.sh: unknown leg '$leg' (locked, floor, newest)" >&2; exit 2 ;;
  esac
done

echo
echo "=== legs ==="
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "FAILED legs: ${failed[*]}"
  exit 1
fi
