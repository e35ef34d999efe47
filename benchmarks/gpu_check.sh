#!/usr/bin/env bash
# The GPU checks of issue #19 in one run that stops by itself (docs/benchmarks.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--step NAME=SECONDS ...] [--only NAME[,NAME...]]
#                                [--python PATH] [--wheels DIR]
#
# Steps, in this order, each under its own time budget, cut to what is left of the overall one:
#   env          nvidia-smi, python, torch and CUDA versions, `soilnet doctor`, the imports of every step
#   train_step   benchmarks/train_step.py --device cuda: ViT-B/8 + climate Transformer in bf16, samples/s per GPU, MFU
#   loader       benchmarks/loader.py --device cuda: the loader's samples/s, and its headroom over train_step's
#   predict_map  benchmarks/predict_map.py --device cuda: predict-map cells/s (when that benchmark is there)
#   pytest       pytest -m gpu tests/gpu (junit xml and log)
# The benchmarks come before the tests so that a slow test run cannot cost the figures.
#
# Everything goes under --out (default: $OUT, else ./gpu_check_out): <step>.log for each step, <step>.json (the
# benchmark's last line, its JSON object), pytest.xml, and summary.json, rewritten after every step: each step's
# status ("passed", "failed: exit N", "timed out after S s", "skipped: <reason>"), its seconds and budget, and the
# figures copied from the benchmarks' own JSON (null, with the reason, where none was measured). No step's failure
# stops the others. Exit status: 0 when no step failed or timed out (skips do not count), 1 when one did, 2 for
# bad arguments, 124 when the overall limit or a SIGTERM cut the run.
#
# The GPU machine may carry another Python and torch and none of our dependencies, with no internet. The script
# uses --python (or $SOILNET_PYTHON), else the checkout's .venv, else python3 or python from PATH: the first that
# imports torch. The checkout goes on PYTHONPATH. With --wheels DIR (wheels carried with the tree) it installs
# what is missing, offline, into a virtual environment under $OUT that sees the system's packages (torch).
# Before each step it checks that step's imports and says which are missing instead of running it.
#
# Options:
#   --out DIR              where everything goes (default: $OUT, else ./gpu_check_out)
#   --budget SECONDS       overall limit, 1..3600 (default 450: within 8 minutes with the start-up and the summary)
#   --step NAME=SECONDS    one step's budget (defaults: env=75 train_step=90 loader=75 predict_map=60 pytest=240)
#   --only NAME[,NAME...]  run only these steps (env always runs: the others need what it finds)
#   --python PATH          the interpreter to use
#   --wheels DIR           install missing packages from these wheels (pip --no-index) into $OUT/venv
#   -h, --help             this text
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=(env train_step loader predict_map pytest)
declare -A BUDGET=([env]=75 [train_step]=90 [loader]=75 [predict_map]=60 [pytest]=240)
declare -A STATUS=() SECONDS_TAKEN=() GIVEN=()
OVERALL=450
MARGIN=8 # seconds kept for the summary after the last step
OUT_DIR=${OUT:-./gpu_check_out}
ONLY=""
PY=${SOILNET_PYTHON:-}
WHEELS=""

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() {
    echo "gpu_check.sh: $*" >&2
    exit 2
}
is_seconds() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 3600)); }
is_step() {
    local s
    for s in "${STEPS[@]}"; do [[ $s == "$1" ]] && return 0; done
    return 1
}

parse_args() {
    while (($#)); do
        case $1 in
        -h | --help) usage && exit 0 ;;
        --out) (($# >= 2)) || die "--out needs a folder"; OUT_DIR=$2; shift ;;
        --budget)
            (($# >= 2)) && is_seconds "$2" || die "--budget needs whole seconds, 1..3600"
            OVERALL=$((10#$2)); shift ;;
        --step)
            (($# >= 2)) && [[ $2 == *=* ]] || die "--step needs NAME=SECONDS"
            is_step "${2%%=*}" || die "--step: no step '${2%%=*}' (steps: ${STEPS[*]})"
            is_seconds "${2#*=}" || die "--step ${2%%=*}: whole seconds, 1..3600"
            BUDGET[${2%%=*}]=$((10#${2#*=})); shift ;;
        --only)
            (($# >= 2)) || die "--only needs step names"
            local s
            for s in ${2//,/ }; do is_step "$s" || die "--only: no step '$s' (steps: ${STEPS[*]})"; done
            ONLY=",$2,"; shift ;;
        --python) (($# >= 2)) || die "--python needs a path"; PY=$2; shift ;;
        --wheels) (($# >= 2)) && [[ -d $2 ]] || die "--wheels needs a folder of wheels"; WHEELS=$(cd "$2" && pwd); shift ;;
        *) die "unknown argument '$1' (--help lists the options)" ;;
        esac
        shift
    done
}

# ------------------------------------------------------------------------------------------------- JSON by hand
json_str() {
    local s
    s=$(printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037')
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}
json_or_null() { # a file holding one JSON value, else null
    if [[ -s $1 ]]; then cat "$1"; else printf 'null'; fi
}
str_or_null() { # $1 as a JSON string, or null when empty
    if [[ -n $1 ]]; then json_str "$1"; else printf 'null'; fi
}

write_summary() {
    local s first=1 tmp="$OUT_DIR/summary.json.tmp"
    {
        printf '{\n  "script": "benchmarks/gpu_check.sh",\n  "started_utc": %s,\n' "$(json_str "$STARTED")"
        printf '  "updated_utc": %s,\n' "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
        printf '  "elapsed_s": %d,\n  "budget_s": %d,\n' "$(($(date +%s) - T0))" "$OVERALL"
        printf '  "host": %s,\n  "python": %s,\n' "$(json_str "$(hostname 2>/dev/null)")" "$(str_or_null "$PY")"
        printf '  "python_choice": %s,\n  "cuda": %s,\n' "$(json_str "$PY_WHY")" "$(json_str "$CUDA_WHY")"
        printf '  "gpus": %d,\n  "steps": {\n' "$NGPU"
        for s in "${STEPS[@]}"; do
            ((first)) || printf ',\n'
            first=0
            printf '    "%s": {"status": %s, "seconds": %s, "budget_s": %s, "log": %s, "result": %s}' "$s" \
                "$(json_str "${STATUS[$s]}")" "${SECONDS_TAKEN[$s]:-null}" "${GIVEN[$s]:-null}" \
                "$(str_or_null "$([[ -f $OUT_DIR/$s.log ]] && echo "$s.log")")" "$(json_or_null "$OUT_DIR/$s.json")"
        done
        printf '\n  },\n  "figures": %s,\n' "$(json_or_null "$OUT_DIR/figures.json")"
        printf '  "note": %s\n}\n' "$(json_str "Figures are copied from each benchmark's own JSON line on this \
machine; null where no step measured one. Nothing here is estimated.")"
    } >"$tmp" && mv "$tmp" "$OUT_DIR/summary.json"
}

# ------------------------------------------------------------------------------------------------- time keeping
remaining() { echo $((DEADLINE - $(date +%s))); }

# run_step NAME CMD...: CMD under the step's budget (cut to what is left), in the background so that a TERM on
# this script ends it at once; its output in NAME.log. Returns CMD's status (124: timed out).
CHILD=""
run_step() {
    local name=$1 left budget start rc
    shift
    left=$(($(remaining) - MARGIN))
    budget=${BUDGET[$name]}
    ((left < budget)) && budget=$left
    if ((budget < 1)); then
        STATUS[$name]="skipped: overall budget spent (--budget $OVERALL)"
        return 125
    fi
    GIVEN[$name]=$budget
    STATUS[$name]="running (cut by the overall time limit if it stays so)"
    write_summary
    start=$(date +%s)
    timeout --kill-after=5 "$budget" "$@" >>"$OUT_DIR/$name.log" 2>&1 &
    CHILD=$!
    wait "$CHILD"
    rc=$?
    CHILD=""
    SECONDS_TAKEN[$name]=$(($(date +%s) - start))
    if ((rc == 124 || rc == 137)); then
        STATUS[$name]="timed out after $budget s"
    elif ((rc == 0)); then
        STATUS[$name]="passed"
    else
        STATUS[$name]="failed: exit $rc"
    fi
    return $rc
}

on_term() {
    [[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null
    local s
    for s in "${STEPS[@]}"; do
        [[ ${STATUS[$s]} == running* || ${STATUS[$s]} == "not reached" ]] && STATUS[$s]="cut by the overall time limit"
    done
    write_summary
    rm -rf "$WORK"
    exit 124
}

wanted() { [[ -z $ONLY || $1 == env || $ONLY == *",$1,"* ]]; }

# ------------------------------------------------------------------------------------------------- python
# missing_modules NAME...: the modules among NAME that do not import with $PY, one line "name: error" each (what
# the modules themselves print, e.g. warnings, is left out; a python that dies or hangs is one line too)
missing_modules() {
    local out rc
    out=$(timeout 120 "$PY" - "$@" <<'PY' 2>/dev/null
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as err:  # noqa: BLE001  (any failure to import is what this reports)
        print(f"MISSING {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
print("CHECKED", flush=True)
PY
    )
    rc=$?
    grep '^MISSING ' <<<"$out" | sed 's/^MISSING //'
    grep -q '^CHECKED$' <<<"$out" || echo "python: the import check did not finish (exit $rc)"
}

# script_imports FILE: the modules FILE imports at its top level (the ones it needs before doing anything)
script_imports() {
    timeout 60 "$PY" - "$1" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
names = []
for node in tree.body:
    if isinstance(node, ast.Import):
        names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
        names.append(node.module)
print(" ".join(dict.fromkeys(names)))
PY
}

choose_python() {
    local c tried=()
    local candidates=("$REPO/.venv/bin/python" python3 python)
    [[ -n $PY ]] && candidates=("$PY")
    PY=""
    for c in "${candidates[@]}"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            tried+=("$c: not found")
        elif timeout 120 "$c" -c 'import torch' >/dev/null 2>&1; then
            PY=$(command -v "$c")
            PY_WHY="$c imports torch${tried:+ (not: ${tried[*]})}"
            return 0
        else
            tried+=("$c: does not import torch")
        fi
    done
    PY_WHY="no python that imports torch: ${tried[*]}"
    return 1
}

# prepare_wheels: a venv under $OUT that sees the system's packages (torch) and the wheels of --wheels, installed
# offline; the checkout itself stays on PYTHONPATH (no build of the package needed). All at once, else one by one,
# so that one wheel for another Python does not keep out the others.
prepare_wheels() {
    local venv="$OUT_DIR/venv" w rc=0
    {
        echo "== offline install of $WHEELS/*.whl into $venv"
        "$PY" -m venv --system-site-packages "$venv" || rc=$?
        if ((rc == 0)) && ! "$venv/bin/python" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl; then
            for w in "$WHEELS"/*.whl; do
                "$venv/bin/python" -m pip install -q --no-index --no-deps "$w" || echo "(not installed: ${w##*/})"
            done
        fi
    } >>"$OUT_DIR/env.log" 2>&1
    if ((rc == 0)) && timeout 120 "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
        PY="$venv/bin/python"
        PY_WHY="$PY_WHY; then $venv with the wheels of $WHEELS (env.log lists any not installed)"
    else
        PY_WHY="$PY_WHY; the venv with the wheels of $WHEELS failed (env.log), so without it"
    fi
}

probe_cuda() {
    local line
    line=$(timeout 120 "$PY" -c 'import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
print(n, f"torch {torch.__version__}, CUDA build {torch.version.cuda}: {n} GPU(s) {names}".rstrip())' 2>&1 | tail -1)
    if [[ $line =~ ^([0-9]+)\ (.*)$ ]]; then
        NGPU=${BASH_REMATCH[1]}
        CUDA_WHY=${BASH_REMATCH[2]}
    else
        NGPU=0
        CUDA_WHY="torch could not be asked: $line"
    fi
}

# ------------------------------------------------------------------------------------------------- the steps
env_report() {
    echo "== $(date -u) on $(hostname 2>/dev/null); checkout $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null))"
    echo "== nvidia-smi"
    timeout 30 nvidia-smi 2>&1 || echo "(nvidia-smi: not available or failed)"
    echo "== python: $PY_WHY"
    [[ -n $PY ]] || return 0
    "$PY" -VV
    echo "== cuda: $CUDA_WHY"
    timeout 60 "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())'
    echo "== imports each step needs (empty: all import)"
    local s
    if ((NGPU == 0)); then
        echo "(not checked: without CUDA no step runs)"
    else
        for s in train_step loader predict_map pytest; do
            echo "-- $s"
            needs "$s" | tee "$WORK/needs_$s"
        done
    fi
    echo "== soilnet doctor"
    timeout 45 "$PY" -m soilnet.cli doctor 2>&1 || echo "(soilnet doctor: exit $?)"
}

# needs STEP: its missing imports, one per line (none: empty)
needs() {
    case $1 in
    train_step) missing_modules deepspeed $(script_imports "$REPO/benchmarks/train_step.py") ;;
    loader) missing_modules $(script_imports "$REPO/benchmarks/loader.py") ;;
    predict_map) [[ -f $REPO/benchmarks/predict_map.py ]] && missing_modules $(script_imports "$REPO/benchmarks/predict_map.py") ;;
    pytest) missing_modules pytest deepspeed webdataset safetensors rasterio soilnet.cli shards.pack ;;
    esac
}

# cached_needs STEP: what the env step found missing for STEP, else asks again
cached_needs() {
    if [[ -f $WORK/needs_$1 ]]; then cat "$WORK/needs_$1"; else needs "$1"; fi
}

# can_run STEP: 0 when STEP can run here, else its status set to why not
can_run() {
    local name=$1 missing
    if ! wanted "$name"; then
        STATUS[$name]="skipped: not in --only"
    elif [[ -z $PY ]]; then
        STATUS[$name]="skipped: no python that imports torch"
    elif ((NGPU == 0)); then
        STATUS[$name]="skipped: no CUDA ($CUDA_WHY)"
    elif [[ $name == predict_map && ! -f $REPO/benchmarks/predict_map.py ]]; then
        STATUS[$name]="skipped: benchmarks/predict_map.py is absent (the maps benchmark has not landed)"
    elif ! missing=$(cached_needs "$name") || [[ -n $missing ]]; then
        if [[ $missing == *"the import check did not finish"* ]]; then
            STATUS[$name]="skipped: the check of its imports did not finish ($name.log)"
        else
            STATUS[$name]="skipped: missing python modules: $(echo "$missing" | cut -d: -f1 | paste -sd, - | sed 's/,/, /g')"
        fi
        echo "$missing" >>"$OUT_DIR/$name.log"
    else
        return 0
    fi
    return 1
}

# help_of SCRIPT: SCRIPT's --help, asked once; has_option SCRIPT OPTION: whether it lists OPTION
declare -A HELP=()
help_of() {
    [[ -n ${HELP[$1]+set} ]] || HELP[$1]=$(timeout 120 "$PY" "$1" --help 2>/dev/null)
}
has_option() {
    help_of "$1"
    grep -q -- "$2" <<<"${HELP[$1]}"
}

# last_json STEP: the step log's last line that is a JSON object, into STEP.json (nothing when there is none)
last_json() {
    local line
    line=$(grep '^{' "$OUT_DIR/$1.log" | tail -1)
    [[ -n $line ]] && printf '%s' "$line" | timeout 60 "$PY" -c 'import json, sys; json.loads(sys.stdin.read())' \
        2>/dev/null && printf '%s\n' "$line" >"$OUT_DIR/$1.json"
    return 0
}

step_train_step() {
    can_run train_step || return 0
    run_step train_step "$PY" "$REPO/benchmarks/train_step.py" --device cuda --steps 20 --warmup 3
    last_json train_step
}

step_loader() {
    can_run loader || return 0
    local script="$REPO/benchmarks/loader.py" opt args=(--device cuda)
    if ! has_option "$script" --device; then
        STATUS[loader]="skipped: benchmarks/loader.py has no --device option (issue #19 items 1-2 not landed)"
        return 0
    fi
    # smaller than its defaults, to fit the budget; each option only where this version of the script has it
    for opt in "--samples 512" "--reads 2048" "--repeats 1" "--workers 0 1" "--threads 2"; do
        has_option "$script" "${opt%% *}" && args+=($opt)
    done
    run_step loader "$PY" "$script" "${args[@]}"
    last_json loader
}

step_predict_map() {
    can_run predict_map || return 0
    if ! has_option "$REPO/benchmarks/predict_map.py" --device; then
        STATUS[predict_map]="skipped: benchmarks/predict_map.py has no --device option, so its cells/s would not be the GPU's"
        return 0
    fi
    run_step predict_map "$PY" "$REPO/benchmarks/predict_map.py" --device cuda
    last_json predict_map
}

step_pytest() {
    can_run pytest || return 0
    run_step pytest "$PY" -m pytest -m gpu -v -rs -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml" "$REPO/tests/gpu"
    [[ -f $OUT_DIR/pytest.xml ]] && timeout 60 "$PY" - "$OUT_DIR/pytest.xml" >"$OUT_DIR/pytest.json" 2>/dev/null <<'PY'
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
counts["not_passed"] = {
    f"{c.get('classname')}::{c.get('name')}": (child.tag + ": " + (child.get("message") or "")[:300])
    for c in suite.iter("testcase") for child in c if child.tag in ("failure", "error", "skipped")
}
print(json.dumps(counts))
PY
    local counts
    counts=$(timeout 60 "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))
print(", ".join(f"{c[k]} {k}" for k in ("passed", "failures", "errors", "skipped")))' "$OUT_DIR/pytest.json" 2>/dev/null)
    [[ -n $counts ]] && STATUS[pytest]="${STATUS[pytest]} ($counts)"
    return 0
}

# figures.json: the headline figures, copied from the benchmarks' JSON, and the loader's headroom over the model
write_figures() {
    [[ -n $PY ]] || return 0
    timeout 60 "$PY" - "$OUT_DIR" >"$OUT_DIR/figures.json" 2>>"$OUT_DIR/env.log" <<'PY' || rm -f "$OUT_DIR/figures.json"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    f = out / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None
step, loader, pmap = load("train_step"), load("loader"), load("predict_map")
fig = {"device": None, "samples_per_s_per_gpu": None, "mfu": None, "mfu_reason": "train_step measured nothing",
       "loader_samples_per_s": None, "loader_key": None, "headroom": None, "predict_map_cells_per_s": None}
if step:
    fig.update(device=step.get("device_name"), samples_per_s_per_gpu=step.get("samples_per_s_per_device"),
               mfu=step.get("mfu"), mfu_reason=step.get("mfu_reason"), flops_per_sample=step.get("flops_per_sample"))
if loader:  # the best augmented configuration, as loader.py names it in "best"
    key = loader.get("best")
    if isinstance(loader.get(key), (int, float)):
        fig.update(loader_samples_per_s=loader[key], loader_key=key)
if fig["loader_samples_per_s"] and fig["samples_per_s_per_gpu"]:
    fig["headroom"] = fig["loader_samples_per_s"] / fig["samples_per_s_per_gpu"]
else:
    fig["headroom_reason"] = "needs both the loader's and the model's samples/s from this run"
if pmap:
    fig["predict_map_cells_per_s"] = next((v for k, v in pmap.items() if "cells_per_s" in k), None)
print(json.dumps(fig))
PY
}

main() {
    parse_args "$@"
    mkdir -p "$OUT_DIR" || die "cannot make $OUT_DIR"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    local s
    for s in "${STEPS[@]}"; do rm -f "$OUT_DIR/$s.log" "$OUT_DIR/$s.json"; done
    rm -f "$OUT_DIR/summary.json" "$OUT_DIR/figures.json" "$OUT_DIR/pytest.xml"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || die "cannot make a temporary folder"
    T0=$(date +%s)
    DEADLINE=$((T0 + OVERALL))
    STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    PY_WHY="not chosen yet" CUDA_WHY="not probed yet" NGPU=0
    for s in "${STEPS[@]}"; do STATUS[$s]="not reached"; done
    trap on_term TERM INT
    write_summary
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/soilnet-gpu-check-extensions}
    cd "$REPO" || die "cannot enter $REPO"
    if choose_python && [[ -n $WHEELS ]]; then prepare_wheels; fi
    [[ -n $PY ]] && probe_cuda
    export DS_ACCELERATOR=$([[ $NGPU -gt 0 ]] && echo cuda || echo cpu)
    export REPO OUT_DIR WORK PY PY_WHY CUDA_WHY NGPU
    export -f env_report needs missing_modules script_imports
    run_step env bash -c env_report
    step_train_step
    step_loader
    step_predict_map
    step_pytest
    write_figures
    write_summary
    rm -rf "$WORK"
    echo "gpu_check.sh: $OUT_DIR/summary.json"
    local bad=0
    for s in "${STEPS[@]}"; do
        printf '  %-12s %s\n' "$s" "${STATUS[$s]}"
        [[ ${STATUS[$s]} == failed* || ${STATUS[$s]} == timed\ out* ]] && bad=1
    done
    return $bad
}

# the whole run under one limit, whatever hangs: this script again, under timeout
if [[ -z ${GPU_CHECK_LIMITED:-} ]]; then
    parse_args "$@"
    GPU_CHECK_LIMITED=1 exec timeout --kill-after=10 $((OVERALL + 15)) bash "${BASH_SOURCE[0]}" "$@"
fi
main "$@"
