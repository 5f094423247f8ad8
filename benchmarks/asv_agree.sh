#!/usr/bin/env bash
# asv_agree.sh: do the asv suite and `python -m normffn bench` agree on the same cases?
#
# Usage:   benchmarks/asv_agree.sh [REPO]        (REPO: a normffn checkout, default: the git
#                                               top level of the current directory)
# Needs:   the extensions built in place in REPO (python setup.py build_ext --inplace -j 2),
#          asv (>= 0.6) and torch installed, ~/.asv-machine.json (`asv machine --yes` once).
#          No .pth file and no pip install: the script points both tools at REPO/src itself,
#          bench through PYTHONPATH and asv through ASV_PYTHONPATH (asv drops PYTHONPATH from
#          its benchmark processes but puts ASV_PYTHONPATH on their sys.path).
# Time:    about 3-5 minutes on the 2-core development VM (an estimate from per-process costs,
#          not timed end to end): asv ~1.5-2 min (12 benchmarks x 3 processes, 1-3 s each with
#          the torch import); bench ~1.5-2 min (four invocations; bench times every direction
#          of each op and shape, e.g. FFN forward+backward too). The script prints both times.
#          Run it on an idle machine: both tools use all cores.
# Output:  one table, asv median vs bench median per case and provider, and asv/bench.
#          asv's results are saved under .asv/results/<machine>/ for REPO's HEAD (overwriting
#          an earlier `--python=same` run of that commit); bench's JSON under $OUT.
#
# Cases (bench's headline calls; asv's time_* of the per-provider classes):
#   LayerNorm forward 8192x768 and 2048x4096 float32 (out=), backward 8192x768 float32 (out=),
#   LayerNorm forward 1000x769 float64 (issue #17's case where the two tools disagreed),
#   RMSNorm forward 8192x768 float32 (out=), FFN forward 2048x768x3072 float32 (out=).
set -euo pipefail

REPO=$(cd "${1:-$(git rev-parse --show-toplevel)}" && pwd)
OUT=${OUT:-$(mktemp -d /tmp/asv_agree.XXXXXX)}
mkdir -p "$OUT"
cd "$REPO"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export ASV_PYTHONPATH="$REPO/src"
python -c "import normffn._kernels.layer_norm" 2>/dev/null || {
    echo "asv_agree: normffn's extensions are not built in $REPO/src" >&2; exit 1; }
[ -f ~/.asv-machine.json ] || { echo "asv_agree: run 'asv machine --yes' first" >&2; exit 1; }
HASH=$(git rev-parse HEAD)
echo "repo $REPO at ${HASH:0:8}; load average: $(cut -d' ' -f1-3 /proc/loadavg); output in $OUT"

t0=$SECONDS
P="(normffn|torch)"
asv run --python=same --set-commit-hash "$HASH" -a rounds=3 --show-stderr \
    -b "^bench_layer_norm\.LayerNorm_$P\.time_(forward|backward)\(\(8192, 768\), 'float32'\)" \
    -b "^bench_layer_norm\.LayerNorm_$P\.time_forward\(\(2048, 4096\), 'float32'\)" \
    -b "^bench_layer_norm\.LayerNorm_$P\.time_forward\(\(1000, 769\), 'float64'\)" \
    -b "^bench_rms_norm\.RMSNorm_$P\.time_forward\(\(8192, 768\), 'float32'\)" \
    -b "^bench_ffn\.FFN_$P\.time_forward\(\(2048, 768, 3072\), 'float32'\)" \
    > "$OUT/asv.log" 2>&1 || { tail -40 "$OUT/asv.log" >&2; exit 1; }
t_asv=$((SECONDS - t0))

t0=$SECONDS
python -m normffn bench --op layer_norm --shape 8192x768 --shape 2048x4096 \
    --json "$OUT/bench_ln.json" > "$OUT/bench_ln.txt" 2> "$OUT/bench.err"
python -m normffn bench --op layer_norm --shape 1000x769 --dtype float64 \
    --json "$OUT/bench_ln64.json" > "$OUT/bench_ln64.txt" 2>> "$OUT/bench.err"
python -m normffn bench --op rms_norm --shape 8192x768 \
    --json "$OUT/bench_rms.json" > "$OUT/bench_rms.txt" 2>> "$OUT/bench.err"
python -m normffn bench --op ffn --shape 2048x768x3072 \
    --json "$OUT/bench_ffn.json" > "$OUT/bench_ffn.txt" 2>> "$OUT/bench.err"
t_bench=$((SECONDS - t0))

python - "$REPO" "$HASH" "$OUT" <<'EOF'
import glob, itertools, json, os, sys

repo, commit, out = sys.argv[1:]
# asv: the newest --python=same result file of this commit
files = sorted(glob.glob(os.path.join(repo, ".asv", "results", "*", f"{commit[:8]}-existing-*.json")),
               key=os.path.getmtime)
res = json.load(open(files[-1]))
cols = res["result_columns"]
asv = {}
for name, row in res["results"].items():
    r = dict(zip(cols, row))
    for params, value in zip(itertools.product(*r["params"]), r["result"]):
        if value is not None and value == value:        # NaN: not run (not selected)
            asv[(name, params)] = value * 1e3

bench = {}
for path in glob.glob(os.path.join(out, "bench_*.json")):
    for c in json.load(open(path))["cases"]:
        for label, p in c["providers"].items():
            bench[(c["op"], c["direction"], c["shape"], c["dtype"], label)] = p["median_ms"]

def fmt(v, digits):
    return f"{v:9.{digits}f}" if v else f"{'-':>9}"


cases = [  # asv module.class prefix, method, shape, dtype, bench op, direction
    ("bench_layer_norm.LayerNorm", "forward", (8192, 768), "float32", "layer_norm", "forward"),
    ("bench_layer_norm.LayerNorm", "forward", (2048, 4096), "float32", "layer_norm", "forward"),
    ("bench_layer_norm.LayerNorm", "backward", (8192, 768), "float32", "layer_norm", "backward"),
    ("bench_layer_norm.LayerNorm", "forward", (1000, 769), "float64", "layer_norm", "forward"),
    ("bench_rms_norm.RMSNorm", "forward", (8192, 768), "float32", "rms_norm", "forward"),
    ("bench_ffn.FFN", "forward", (2048, 768, 3072), "float32", "ffn", "forward"),
]
print(f"\n{'case':<38} {'provider':<13} {'asv ms':>9} {'bench ms':>9} {'asv/bench':>9}")
print("-" * 82)
worst = 1.0
for prefix, m, shape, dtype, op, direction in cases:
    for provider, label in (("normffn", "normffn out="), ("torch", "torch")):
        key = (f"{prefix}_{provider}.time_{m}", (repr(shape), repr(dtype)))
        a = asv.get(key)
        b = bench.get((op, direction, "x".join(map(str, shape)), dtype, label))
        ratio = a / b if a and b else None
        if ratio:
            worst = max(worst, ratio, 1 / ratio)
        case = f"{op} {direction} {'x'.join(map(str, shape))} {dtype}"
        print(f"{case:<38} {label:<13} {fmt(a, 3)} {fmt(b, 3)} {fmt(ratio, 2)}")
print(f"\nlargest disagreement: {100 * (worst - 1):.0f}% (target: within 20%)")
EOF
echo "asv took ${t_asv} s, bench ${t_bench} s; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
