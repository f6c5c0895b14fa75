#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (an H200 with torch 2.11 + CUDA 13.0, triton 3.6, nvcc 13.0,
# pytest, pytest-benchmark, transformers, no network, 16 cores). It runs these steps, each with its own time
# limit and log, and goes on past a failed step:
#   1. build:   pip install --no-deps --no-build-isolation -e .  (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=16)
#      probe:   scripts/probe_warp_spec.py, each warp-specialised Triton config once (off for 2-3 if it fails)
#   2. tests:   pytest tests -q -rs --junitxml  -> junit.xml, tests.log, tests_summary.md (per file)
#      memory:  benchmarks/cross_entropy_inplace_memory.py at 8k x 4096 x 128k bf16 (cross_entropy's inplace_backward)
#      host:    benchmarks/host_overhead.py on triton and cuda: host time per call at tiny shapes
#   3. bench:   gptfast bench --full --device cuda --out $OUT/bench  (report.md, results.json, plots)
#   4. summary: summary.md with the commit, nvidia-smi, versions, test summary and the report's headline
# Everything lands in $OUT (default ./gpu-check-out) as gpu-check.tgz, with summary.md, tests_summary.md and
# report.md beside it. The whole run stays under 8 minutes (GPU_CHECK_TOTAL).
#
#   scripts/gpu_check.sh              on the GPU machine
#   scripts/gpu_check.sh --dry-run    the same steps on a CPU machine: no CUDA build (GPTFAST_SKIP_EXT=1 unless
#                                     DRY_RUN_BUILD=cpu), tests/test_bench.py only (GPU_CHECK_TESTS=tests for
#                                     all), and a --tiny CPU bench (BENCH_MODE=quick for the quick one)
#
# Environment: OUT, PYTHON (default: the active venv's python, else python3; ./.venv in a dry run),
# GPTFAST_COMMIT (the commit measured, when the tree has no .git), GPU_CHECK_TOTAL (seconds, default 470),
# BUILD_LIMIT, TESTS_LIMIT (seconds), GPU_CHECK_TESTS (pytest paths), GPU_CHECK_K (a pytest -k expression, e.g.
# "cuda or gpu" for only what the CPU suite cannot run), BENCH_MODE, BENCH_ARGS (extra bench args).
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [[ $DRY_RUN == 1 && -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"
  else PYTHON="$(command -v python3 || command -v python)"; fi
fi

START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL:-470}
STEPS_LOG="$OUT/steps.log"
: > "$STEPS_LOG"
declare -A STATUS

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$STEPS_LOG"; }
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
min() { (( $1 < $2 )) && echo "$1" || echo "$2"; }

# run_step NAME LIMIT LOGFILE CMD...: SIGINT at the limit (pytest and the bench then write what they have),
# SIGKILL 20 s later. Records "ok", "failed (rc N)" or "timed out after N s".
run_step() {
  local name=$1 limit=$2 logfile=$3; shift 3
  if (( limit < 10 )); then
    STATUS[$name]="skipped: no time left"; log "$name: skipped, no time left"; return
  fi
  log "$name: start (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -s INT -k 20 "$limit" "$@" > "$logfile" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then STATUS[$name]="timed out after ${dt}s (rc $rc)"
  elif (( rc == 0 )); then STATUS[$name]="ok (${dt}s)"
  else STATUS[$name]="failed (rc $rc, ${dt}s)"; fi
  log "$name: ${STATUS[$name]}; log: $logfile"
}

log "gpu_check: OUT=$OUT PYTHON=$PYTHON dry_run=$DRY_RUN total limit ${TOTAL}s"

# ------------------------------------------------------------------------------------------- 1. build
if [[ $DRY_RUN == 1 ]]; then
  if [[ "${DRY_RUN_BUILD:-skip}" == cpu ]]; then export GPTFAST_NO_CUDA=1; else export GPTFAST_SKIP_EXT=1; fi
else
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
fi
export MAX_JOBS="${MAX_JOBS:-16}" PIP_DISABLE_PIP_VERSION_CHECK=1
run_step build "$(min "${BUILD_LIMIT:-180}" "$(( $(left) - 260 ))")" "$OUT/build.log" \
  "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index --no-input -e .
"$PYTHON" - >> "$OUT/build.log" 2>&1 <<'EOF'
import gptfast, gptfast.backends as b
try:
    import gptfast._C
    print("gptfast._C loaded:", gptfast._C.__file__)
except ImportError as e:
    print("gptfast._C not importable:", e)
print("backends available:", {d: b.available(d) for d in (["cpu", "cuda"] if __import__("torch").cuda.is_available() else ["cpu"])})
EOF
tail -n 2 "$OUT/build.log" | tee -a "$STEPS_LOG"

# ------------------------------------------------------------------------------------------- probe
# Triton's warp-specialised attention configs (forward, dQ, dK/dV) come from its newest compiler pass: each
# runs once here, checked, under a 90 s limit. A failure, a hang or the limit turns them off for the tests and
# the bench (their GPU test then skips, saying so), rather than hanging both.
run_step probe "$(min 90 "$(( $(left) - 330 ))")" "$OUT/probe.log" "$PYTHON" scripts/probe_warp_spec.py
if [[ "${STATUS[probe]}" != ok* ]]; then
  export GPTFAST_TRITON_WARP_SPEC=0
  log "probe: the warp-specialised configs are off for the tests and the bench"
fi

# ------------------------------------------------------------------------------------------- 2. tests
if [[ $DRY_RUN == 1 ]]; then TESTS="${GPU_CHECK_TESTS:-tests/test_bench.py}"; else TESTS="${GPU_CHECK_TESTS:-tests}"; fi
rm -f "$OUT/junit.xml" "$OUT/tests_summary.md"
# shellcheck disable=SC2086  # TESTS may hold several paths
# 16 cores: spread the suite over pytest-xdist workers when it is there (the GPU image has it); Triton's
# compile cache on disk is shared between them. 200 s: the suite took 149 s at 2baac1f, and the tests of every
# autotune candidate since add some 30 Triton compiles; the memory step and the bench keep at least 150 s.
XDIST=()
if [[ $DRY_RUN == 0 ]] && "$PYTHON" -c "import xdist" 2>/dev/null; then XDIST=(-n "${GPU_CHECK_WORKERS:-8}"); fi
run_step tests "$(min "${TESTS_LIMIT:-200}" "$(( $(left) - 150 ))")" "$OUT/tests.log" \
  "$PYTHON" -m pytest $TESTS ${GPU_CHECK_K:+-k "$GPU_CHECK_K"} -q -rs -p no:cacheprovider "${XDIST[@]}" \
  --junitxml="$OUT/junit.xml"
"$PYTHON" - "$OUT" >> "$STEPS_LOG" 2>&1 <<'EOF'
"""junit.xml -> tests_summary.md: passed / failed / skipped per test file, then each failure's first line."""
import collections, pathlib, sys, xml.etree.ElementTree as ET

out = pathlib.Path(sys.argv[1])
lines = ["# Test summary", ""]
junit = out / "junit.xml"
if not junit.exists():
    tail = (out / "tests.log").read_text(errors="replace").splitlines()[-5:] if (out / "tests.log").exists() else []
    lines += ["No junit.xml was written (the test step did not finish). Last lines of tests.log:", "", "```",
              *tail, "```"]
else:
    counts = collections.defaultdict(collections.Counter)
    failures, interrupted = [], False
    for case in ET.parse(junit).getroot().iter("testcase"):
        if not case.get("classname"):
            interrupted = True  # pytest's entry for the test a SIGINT (the step's time limit) stopped
            continue
        parts = case.get("classname", "").split(".")
        mods = [i for i, p in enumerate(parts) if p.startswith("test_") or p.startswith("bench_")]
        path = "/".join(parts[: mods[-1] + 1]) + ".py" if mods else case.get("classname", "?")
        kind = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                kind = "failed" if child.tag == "failure" else "error"
                msg = (child.get("message") or child.text or "").strip().splitlines()
                failures.append(f"- `{path}::{case.get('name')}` ({kind}): {(msg[0] if msg else '')[:300]}")
            elif child.tag == "skipped":
                kind = "skipped"
        counts[path][kind] += 1
    total = sum(counts.values(), collections.Counter())
    lines += [f"**{total['passed']} passed, {total['failed']} failed, {total['error']} errors, "
              f"{total['skipped']} skipped** in {len(counts)} files", "",
              "| file | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
    for path in sorted(counts):
        c = counts[path]
        lines.append(f"| {path} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} |")
    if interrupted:
        lines += ["", "The step's time limit interrupted the run: the tests after the last one above did not run."]
    if failures:
        lines += ["", "## Failures", ""] + failures
    if not counts:
        tail = (out / "tests.log").read_text(errors="replace").splitlines()[-5:]
        lines += ["", "No test ran. Last lines of tests.log:", "", "```", *tail, "```"]
(out / "tests_summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:3]))
EOF

# ------------------------------------------------------------------------------------------- memory
# Peak memory of the LM head + loss with and without ops.cross_entropy's inplace_backward, at issue 3's LCE
# shape (8k tokens x 4096 x 128k, bf16; a few seconds), beside torch's.
if [[ $DRY_RUN == 1 ]]; then
  MEM=(--tokens 64 --hidden 16 --vocab 512 --dtype float32 --backend reference --device cpu)
else
  MEM=(--tokens 8192 --hidden 4096 --vocab 128256 --dtype bfloat16 --backend triton --device cuda)
fi
run_step memory "$(min 45 "$(( $(left) - 120 ))")" "$OUT/memory.log" \
  "$PYTHON" benchmarks/cross_entropy_inplace_memory.py "${MEM[@]}"

# ------------------------------------------------------------------------------------------- host
# Host time per call at tiny shapes (a few seconds): what bounds the mid-size rows of the bench (the 4096 x
# 32768 cross-entropy ran at 0.56x torch at 2baac1f) and the model step's eager peers.
if [[ $DRY_RUN == 1 ]]; then
  HOST=(--device cpu --backend cpu --rounds 2 --calls 20)
else
  HOST=(--device cuda --backend triton,cuda --rounds 5 --calls 200)
fi
run_step host "$(min 40 "$(( $(left) - 110 ))")" "$OUT/host.log" "$PYTHON" benchmarks/host_overhead.py "${HOST[@]}"

# ------------------------------------------------------------------------------------------- 3. bench
# `gptfast bench ARGS` is gptfast.bench.cli.main(ARGS); `python -m gptfast.bench` is the same call and needs
# neither the console script on PATH nor gptfast/cli.py.
if [[ $DRY_RUN == 1 ]]; then
  BENCH=(--"${BENCH_MODE:-tiny}" --device cpu)
else
  BENCH=(--"${BENCH_MODE:-full}" --device cuda)
fi
BENCH_LIMIT=$(( $(left) - 15 ))
# Triton prints each autotuner's pick (four lines per kernel and key), the cuda bindings theirs with every
# choice's time (one line each: attention forward tilings, softmax kernels); the summary lists them, so the
# next round of tuning starts from what won here.
export TRITON_PRINT_AUTOTUNING=1 GPTFAST_PRINT_AUTOTUNING=1
# The bench's own budget ends 30 s before the step's limit, so it writes its report instead of being killed.
# shellcheck disable=SC2086  # BENCH_ARGS may hold several arguments
run_step bench "$BENCH_LIMIT" "$OUT/bench.log" \
  "$PYTHON" -m gptfast.bench "${BENCH[@]}" --out "$OUT/bench" --time-budget "$(( BENCH_LIMIT - 30 ))" \
  --no-progress ${BENCH_ARGS:-}

# ------------------------------------------------------------------------------------------- 4. summary
# log_section TITLE LOG LINES: the log's last LINES lines (without profiler and torch warning noise) as a
# summary section, when the step wrote any.
log_section() {
  [[ -s "$2" ]] || return 0
  printf '## %s\n\n```\n' "$1"
  grep -v -e '^USDT' -e '^\[W' "$2" | tail -n "$3"
  printf '```\n\n'
}

COMMIT="${GPTFAST_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
if [[ "$COMMIT" != unknown && -z "${GPTFAST_COMMIT:-}" ]] && [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  COMMIT="$COMMIT (+ uncommitted changes)"
fi
SMI="$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo 'nvidia-smi: not available')"
NVCC="$(nvcc --version 2>/dev/null | tail -n 1 || true)"
{
  echo "# gpu_check summary"
  echo
  echo "- Commit: \`$COMMIT\`"
  echo "- Date: $(date -u +%Y-%m-%dT%H:%M:%SZ), dry run: $DRY_RUN, total $(( $(date +%s) - START )) s"
  echo "- nvidia-smi: $SMI"
  echo "- nvcc: ${NVCC:-not available}"
  "$PYTHON" - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({e})"
print(f"- Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
print(f"- CUDA available: {torch.cuda.is_available()}"
      + (f", device {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
EOF
  echo
  echo "## Steps"
  echo
  for step in build probe tests memory host bench; do echo "- $step: ${STATUS[$step]:-not run}"; done
  echo "- logs: build.log, probe.log, tests.log, memory.log, host.log, bench.log, steps.log;"
  echo "  junit.xml; bench/report.md, bench/results.json"
  echo
  if [[ -s "$OUT/probe.log" ]]; then
    echo "## Warp-specialised attention probe"
    echo
    echo '```'
    tail -n 40 "$OUT/probe.log"
    echo '```'
    echo
  fi
  sed -n '1,200p' "$OUT/tests_summary.md" 2>/dev/null | sed 's/^# Test summary/## Tests/'
  echo
  log_section "LM head + loss peak memory (benchmarks/cross_entropy_inplace_memory.py)" "$OUT/memory.log" 8
  log_section "Host time per call (benchmarks/host_overhead.py)" "$OUT/host.log" 30
  if grep -q '^Triton autotuning for function' "$OUT/bench.log" 2>/dev/null; then
    echo "## Autotune picks (bench)"
    echo
    awk '/^Triton autotuning for function/ { fn = $5; sub(/,$/, "", fn) }
         /^with key as / { key = substr($0, 13); sub(/,$/, "", key) }
         /^finished after / { secs = $3; sub(/s,$/, "", secs) }
         /^best config selected: / { cfg = substr($0, 23); sub(/;$/, "", cfg)
                                     printf "- `%s` %s: %s (%s s)\n", fn, key, cfg, secs }' \
      "$OUT/bench.log" | head -n 80
    echo
  fi
  if grep -q '^gptfast autotuning ' "$OUT/bench.log" 2>/dev/null; then
    echo "## CUDA kernel choices (bench)"
    echo
    grep '^gptfast autotuning ' "$OUT/bench.log" | sed 's/^gptfast autotuning /- /' | head -n 80
    echo
  fi
  if [[ -f "$OUT/bench/report.md" ]]; then
    awk '/^## Ceilings/{p=1} /^## /&&!/^## (Ceilings|Headline)/{p=0} p' "$OUT/bench/report.md"
  else
    echo "## Bench"; echo; echo "No report was written; last lines of bench.log:"; echo '```'
    tail -n 15 "$OUT/bench.log" 2>/dev/null; echo '```'
  fi
} > "$OUT/summary.md"
log "summary: $OUT/summary.md (total $(( $(date +%s) - START ))s)"

# The device tool returns only a few files per call: everything goes into one tarball, and the three files a
# reader wants first stay beside it.
[[ -f "$OUT/bench/report.md" ]] && cp "$OUT/bench/report.md" "$OUT/report.md"
TARBALL="$(mktemp)"
tar czf "$TARBALL" -C "$OUT" . && mv "$TARBALL" "$OUT/gpu-check.tgz"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name gpu-check.tgz ! -name summary.md ! -name tests_summary.md \
  ! -name report.md -exec rm -rf {} +
