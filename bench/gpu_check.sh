#!/usr/bin/env bash
# The built-in trainer on one GPU, beside nanochat's own base_train: under 8 minutes on an H100/H200.
#
#   bench/gpu_check.sh              on the GPU machine (no package registry needed)
#   bench/gpu_check.sh --dry-run    the same pipeline on CPU with tiny models (checks the script itself)
#   bench/gpu_check.sh --prepare    on a machine WITH a registry, before going to the GPU machine
#
# For depth 12 and 20 (bf16, torch.compile, seq 2048, device batch 32, or 16 if 32 runs out of
# memory, 20 timed steps after 5 warm-up steps) it prints armlab's tok/s, MFU (nanochat's FLOPs
# convention: sliding windows counted per layer, nanochat's bf16 peak table), peak memory and the
# loader's tok/s per rank beside the model's; then, while the time budget lasts, nanochat
# 92d63d4's base_train at the same depth, batch, sequence and steps, and the ratio armlab/nanochat.
#
# What travels with the tree (bench/.carry/, git-ignored; `--prepare` fills it):
#   bench/.carry/nanochat/   a copy of ../shared/nanochat/92d63d4 (the reference trainer)
#   bench/.carry/wheels/     wheels of armlab's and nanochat's pure dependencies, for the GPU
#                            machine's Python (PYVER=3.12 bench/gpu_check.sh --prepare for another
#                            version than this one); torch is the GPU machine's own
# On the GPU machine, modules its Python lacks are installed from bench/.carry/wheels into
# bench/.carry/venv (a --system-site-packages venv, so its torch is used); nothing is fetched.
# FlashAttention 3 comes from the Hugging Face kernel hub (`kernels` package) as in nanochat; with
# no network and no cached kernel both trainers fall back to SDPA with a window mask (printed).
# WINDOW_PATTERN=L measures full attention instead; GPU_CHECK_BUDGET_S (default 450) caps the run.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
CARRY="${ARMLAB_CARRY:-$HERE/.carry}"
PY="${PYTHON:-python3}"
MODE="${1:-run}"
PATTERN="${WINDOW_PATTERN:-SSSL}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$(date +%s)
NEEDED_MODULES="numpy pyarrow pydantic rich xxhash tiktoken rustbpe psutil filelock yaml requests jinja2"
# ~80 MB for one Python version, pyarrow and numpy the bulk of it; GPU_CHECK_WHEELS="..." to carry fewer
# (a torch image usually has numpy, filelock, jinja2 and requests already)
WHEEL_PACKAGES="${GPU_CHECK_WHEELS:-numpy pyarrow pydantic rich xxhash tiktoken rustbpe psutil filelock pyyaml requests jinja2}"

say() { printf '%s\n' "$*"; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

prepare() {
    local src="$ROOT/../shared/nanochat/92d63d4"
    [ -d "$src/nanochat" ] || { say "gpu_check: $src not found (the team's shared nanochat snapshot)"; exit 2; }
    mkdir -p "$CARRY/wheels"
    rm -rf "$CARRY/nanochat" && cp -r "$src" "$CARRY/nanochat"
    local plat=()
    if [ -n "${PYVER:-}" ]; then
        plat=(--python-version "$PYVER" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --implementation cp)
    fi
    # shellcheck disable=SC2086
    "$PY" -m pip download -q -d "$CARRY/wheels" --only-binary=:all: "${plat[@]}" $WHEEL_PACKAGES || exit 2
    say "gpu_check: carried nanochat -> $CARRY/nanochat and $(ls "$CARRY/wheels" | wc -l) wheels -> $CARRY/wheels ($(du -sh "$CARRY" | cut -f1))"
}

missing_modules() {
    "$1" - <<EOF
import importlib.util
print(" ".join(m for m in "$NEEDED_MODULES".split() if importlib.util.find_spec(m) is None))
EOF
}

setup_python() {
    "$PY" -c "import torch" 2>/dev/null || { say "gpu_check: $PY has no torch; set PYTHON=/path/to/python with torch"; exit 2; }
    local missing
    missing="$(missing_modules "$PY")"
    if [ -n "$missing" ]; then
        if [ ! -d "$CARRY/wheels" ]; then
            say "gpu_check: $PY lacks: $missing; carry wheels (bench/gpu_check.sh --prepare where PyPI is reachable)"
            exit 2
        fi
        [ -x "$CARRY/venv/bin/python" ] || "$PY" -m venv --system-site-packages "$CARRY/venv" || exit 2
        PY="$CARRY/venv/bin/python"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --find-links "$CARRY/wheels" $(echo "$missing" | sed 's/\byaml\b/pyyaml/') || exit 2
        missing="$(missing_modules "$PY")"
        [ -z "$missing" ] || { say "gpu_check: still missing after the carried wheels: $missing"; exit 2; }
    fi
    export PYTHONPATH="$ROOT/src:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
}

# armlab at one depth: batch 32, then 16 on out-of-memory (exit 3 from bench/train.py)
armlab_at() {
    local depth=$1 out="$WORK/armlab-d$1.json" rc batch
    for batch in $BATCHES; do
        timeout "$(left)" "$PY" "$HERE/train.py" --device "$DEVICE" --depth "$depth" --batch-size "$batch" \
            --seq-len "$SEQ" --steps "$STEPS" --warmup "$WARMUP" --window-pattern "$PATTERN" $COMPILE \
            --json "$out" $LOADER
        rc=$?
        if [ $rc -eq 0 ]; then echo "$batch" > "$WORK/batch-d$depth"; return 0; fi
        [ $rc -eq 3 ] || { say "gpu_check: armlab d$depth failed (exit $rc)"; return 1; }
        say "gpu_check: d$depth batch $batch ran out of memory; retrying smaller"
    done
    return 1
}

nanochat_at() {
    local depth=$1 batch
    batch="$(cat "$WORK/batch-d$depth" 2>/dev/null)" || return 1
    local nc="$CARRY/nanochat"
    [ -d "$nc/nanochat" ] || nc="$ROOT/../shared/nanochat/92d63d4"
    [ -d "$nc/nanochat" ] || { say "gpu_check: no nanochat snapshot (bench/.carry/nanochat); skipping nanochat"; return 1; }
    timeout "$(left)" "$PY" "$HERE/nanochat_ref.py" --nanochat "$nc" --python "$PY" --device "$DEVICE" \
        --depth "$depth" --batch-size "$batch" --seq-len "$SEQ" --steps $((STEPS + WARMUP)) --warmup "$WARMUP" \
        --window-pattern "$PATTERN" --json "$WORK/nanochat-d$depth.json"
}

summary() {
    "$PY" - "$WORK" "$DEPTHS" <<'EOF'
import json, sys
from pathlib import Path
work, depths = Path(sys.argv[1]), sys.argv[2].split()
print(f"\n{'depth':>5} {'batch':>5} {'armlab tok/s':>13} {'MFU':>6} {'peak GiB':>8} {'loader tok/s':>13} "
      f"{'nanochat tok/s':>15} {'ratio':>6}  attention")
for d in depths:
    a = work / f"armlab-d{d}.json"
    if not a.exists():
        print(f"{d:>5}  (armlab did not finish)")
        continue
    r = json.loads(a.read_text())
    n = work / f"nanochat-d{d}.json"
    nt = json.loads(n.read_text())["tok_per_s"] if n.exists() else None
    fmt = lambda v, f: "-" if v is None else format(v, f)
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1f}%"
    print(f"{d:>5} {r['batch_size']:>5} {r['tok_per_s']:>13,.0f} {mfu:>6} "
          f"{fmt(r['peak_memory_gib'], '8.1f'):>8} {fmt(r.get('loader_tok_per_s'), ',.0f'):>13} "
          f"{fmt(nt, ',.0f'):>15} {fmt(nt and r['tok_per_s'] / nt, '.2f'):>6}  {r['attention']} ({r['window_pattern']})")
EOF
}

case "$MODE" in
    --prepare) prepare; exit 0 ;;
    --dry-run)  # CPU, tiny: every step of the real run, in about a minute
        DEVICE=cpu DEPTHS="2 3" SEQ=256 STEPS=2 WARMUP=1 BATCHES="2 1" COMPILE="--no-compile"
        export TORCHDYNAMO_DISABLE=1 ;;
    run)
        DEVICE=cuda DEPTHS="12 20" SEQ=2048 STEPS=20 WARMUP=5 BATCHES="32 16" COMPILE="--compile" ;;
    *) say "usage: bench/gpu_check.sh [--dry-run | --prepare]"; exit 2 ;;
esac

setup_python
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { say "gpu_check: no CUDA device visible to $PY (use --dry-run to check the script on CPU)"; exit 2; }
    "$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# armlab first at both depths (the loader is measured with the first depth: same batch and sequence)
LOADER=""
for d in $DEPTHS; do
    say "== armlab d$d ($(elapsed)s elapsed of ${BUDGET}s)"
    armlab_at "$d"
    LOADER="--no-loader"
done
# nanochat while the budget lasts: a cold compile plus the steps take about 2 minutes a depth on an H100
for d in $DEPTHS; do
    if [ "$(left)" -lt "${NANOCHAT_MIN_S:-120}" ] && [ "$DEVICE" = cuda ]; then
        say "== nanochat d$d: skipped, $(left)s left of the budget"
        continue
    fi
    say "== nanochat 92d63d4 base_train d$d ($(elapsed)s elapsed)"
    nanochat_at "$d" || say "gpu_check: nanochat d$d did not finish"
done
summary
say "gpu_check: done in $(elapsed)s"
