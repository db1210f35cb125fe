#!/usr/bin/env bash
# One prepared GPU run (issue 29): the CUDA tests, the DeepHEMNMA paper's Table I (both
# columns: trained on the truth; on the simulated stream for the same wall time) and Table II
# (HEMNMA, 10 % outlier removal, the network trained on its amplitudes), HEMNMA images/s and
# reconstruction particles/s, all written to ONE figures file. The time limits sum to under
# 9 minutes (one 600 s device command); each part has its own limit, and a part that fails or
# runs out of time is written as such ("FAILED (exit N)" / "TIMED OUT after N s", with the end
# of its output: Table I's finished rows) while the next parts still run.
#
#   bash bench/gpu_check.sh [FILE]          # FILE default: $OUT/gpu_check.txt, else bench/results/gpu_check.txt
#   bash bench/gpu_check.sh --tiny [FILE]   # CPU, 32 px, a few particles, 1 epoch (the test's size)
#
# Geometry of the tables: the paper's (256 px at 1 Å/px, shifts within ±5 px, SNR 0.1 over the
# box, CTF 0.5 µm; the network sees a 128 Å window cropped to 64 px), with fewer images and
# epochs than the paper's 6000/2000 x 20, meant to fit all eight Table I rows in their limit
# (a guess: never run on a GPU yet);
# GPU_CHECK_TABLE1 / GPU_CHECK_TABLE2 replace the sizing options (see bench/paper_tables.py);
# GPU_CHECK_SKIP=name,name skips parts (cuda_tests, table1, table2, hemnma_speed,
# reconstruction_speed), e.g. to rerun only those that ran out of time; GPU_CHECK_LIMITS=
# name=seconds,... replaces parts' time limits.
#
# Python: $PYTHON, else the repo's .venv/bin/python, else python3. The device machine has no
# network: where the repo's .venv is not there, carry the packages its python3 lacks as wheels
# in .whl/ (see the README's "One prepared GPU run"); they are installed to /tmp/site first.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

tiny=${GPU_CHECK_TINY:-0}
if [ "${1:-}" = "--tiny" ]; then tiny=1; shift; fi
if [ -n "${1:-}" ]; then file=$1
elif [ -n "${OUT:-}" ]; then file=$OUT/gpu_check.txt
else file=$here/bench/results/gpu_check.txt; fi
mkdir -p "$(dirname "$file")"
file=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi

if [ "$tiny" = 1 ]; then
    device=cpu
    # 12 training images: 10 % outlier removal keeps 11, none of whose batches is one image
    # (batch normalisation refuses those).
    geometry="--box 32 --working-size 32 --rotations 1 --batch-size 4 --test 2 --epochs 1"
    table1=${GPU_CHECK_TABLE1:-"$geometry --cases 7 --train 8"}
    table2=${GPU_CHECK_TABLE2:-"$geometry --train 12 --finetune-epochs 1"}
    align="--n 4 --size 32 --pixel-size 4 --working-size 32 --search-size 16 --angular-step 30 --candidates 2 --final 1 --refine-iters 2"
    recon="--skip-accuracy --speed-n 16 --speed-box 32"
    tests_limit=120; t1_limit=120; t2_limit=120; align_limit=60; recon_limit=60
else
    device=${GPU_CHECK_DEVICE:-cuda}
    # Limits sum to 515 s, so the whole run fits one 600 s device command with its start-up.
    table1=${GPU_CHECK_TABLE1:-"--box 256 --train 800 --test 200 --epochs 5"}
    table2=${GPU_CHECK_TABLE2:-"--box 256 --train 500 --test 200 --epochs 8 --finetune-epochs 3"}
    align="--n 64 --size 128 --snr 0.1 --defocus-um 0.5"
    recon="--skip-accuracy --speed-n 2048 --speed-box 128"
    tests_limit=45; t1_limit=270; t2_limit=135; align_limit=40; recon_limit=25
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) (tiny=$tiny, device $device)"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$py" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
        '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1
    "$py" -c "import importlib.util as u; m = [n for n in ('numpy', 'scipy', 'torch', 'torchvision', 'prody',
        'mrcfile', 'torch_fourier_slice', 'einops', 'pytest') if u.find_spec(n) is None];
print('missing packages (carry them as wheels in .whl/):', ' '.join(m) if m else 'none')" 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} >"$file"

# part NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, appends its output and its fate.
part() {
    local name=$1 limit=$2 t0 rc
    shift 2
    local override
    override=$(tr ',' '\n' <<<"${GPU_CHECK_LIMITS:-}" | sed -n "s/^$name=//p")
    limit=${override:-$limit}
    t0=$(date +%s)
    echo "== $name: $*" >&2
    echo "" >>"$file"
    echo "## $name" >>"$file"
    if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
        echo "$name: skipped (GPU_CHECK_SKIP)" >>"$file"
        return 0
    fi
    timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" >"$work/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        tail -n 40 "$work/$name.log" >>"$file"
        echo "$name: TIMED OUT after $limit s (the lines above are what it wrote)" >>"$file"
    elif [ $rc -ne 0 ]; then
        tail -n 40 "$work/$name.log" >>"$file"
        echo "$name: FAILED (exit $rc; the lines above are the end of its output)" >>"$file"
    else
        echo "$name: ok" >>"$file"
    fi
    echo "$name: $(( $(date +%s) - t0 )) s" >>"$file"
    return 0
}

# What each part writes to the figures file (its own files or its summary lines).
cuda_tests() {
    "$py" -m pytest -q -p no:cacheprovider -k "cuda or device" \
        continuousflex_dl/tests/test_device.py continuousflex_dl/tests/test_ctf.py \
        continuousflex_dl/tests/test_reconstruction.py continuousflex_dl/tests/test_synthesis.py \
        >"$work/tests.out" 2>&1
    local rc=$?
    grep -E "passed|failed|skipped|error|SKIPPED|FAILED" "$work/tests.out" | tail -n 20 >>"$file"
    return $rc
}
table() {  # table N OPTIONS...: paper_tables.py, its Markdown table into the file
    local n=$1 rc
    shift
    "$py" bench/paper_tables.py --table "$n" --device "$device" --out "$work/table$n.md" "$@"
    rc=$?
    [ -f "$work/table$n.md" ] && cat "$work/table$n.md" >>"$file"
    return $rc
}
json_bench() {  # json_bench SCRIPT OPTIONS...: a bench that writes its figures as JSON
    local script=$1 rc
    shift
    "$py" "bench/$script" --device "$device" --out "$work/$script.json" "$@"
    rc=$?
    [ -f "$work/$script.json" ] && cat "$work/$script.json" >>"$file" && echo >>"$file"
    return $rc
}

export py device work file
export -f cuda_tests table json_bench
# shellcheck disable=SC2086  # the sizing options split into words on purpose
{
    part cuda_tests "$tests_limit" cuda_tests
    part table1 "$t1_limit" table 1 $table1
    part table2 "$t2_limit" table 2 $table2
    part hemnma_speed "$align_limit" json_bench bench_alignment.py $align
    part reconstruction_speed "$recon_limit" json_bench bench_reconstruction.py $recon
}
echo "" >>"$file"
echo "total: $(( $(date +%s) - start )) s" >>"$file"
echo "figures written to $file" >&2
