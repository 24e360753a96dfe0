#!/usr/bin/env bash
# Training speed of each image script on this machine's CPU in each precision, one epoch each: what
# --precision auto picks here against fp32 (and bf16), side by side, as one markdown table.
#
#   bash benchmarks/speed.sh [DATA_DIR]     # DATA_DIR holds cifar10.pkl (default data; else torchvision's)
#
# PRECISIONS="auto fp32" (the default: "auto fp32 bf16") and SCALE=0.1 (fewer images) shorten it. bf16
# runs on a tenth of the images: on a CPU without AMX it is 10-30x slower. To see a laptop's AVX2 CPU on a
# Xeon with AMX: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 bash benchmarks/speed.sh DATA_DIR
# Writes into results/speed/; prints the CPU, its bf16/AMX flags and the table (also results/speed/table.md).
set -u
cd "$(dirname "$0")/.."
DATA=${1:-data}
OUT=${OUT:-results/speed}
PRECISIONS=${PRECISIONS:-auto fp32 bf16}
SCALE=${SCALE:-1}
mkdir -p "$OUT"
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
flags=$(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')
echo "CPU: ${cpu:-unknown}; flags: ${flags:-none of avx2, avx512f, avx512_bf16, amx}; ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-} ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-}"

n() { python -c "print(max(10, int($1 * $SCALE)))"; }  # images for a run, scaled
run() {  # run NAME PRECISION IMAGES ARGS...: one epoch, its log beside its results
  local name=$1 precision=$2 images=$3; shift 3
  python "$@" --dataset cifar10 --data-dir "$DATA" --epochs 1 --subset "$images" --precision "$precision" \
    --device cpu --overwrite --out "$OUT/$name-$precision" > "$OUT/$name-$precision.log" 2>&1 || tail -n 1 "$OUT/$name-$precision.log"
}
for p in $PRECISIONS; do
  share=$([ "$p" = bf16 ] && echo 0.1 || echo 1)
  run vae_image "$p" "$(n "10000 * $share")" vae_image.py --iw-samples 2 --iw-examples 10
  run vlae "$p" "$(n "10000 * $share")" vlae.py --iw-samples 2 --iw-examples 10
  run vqvae "$p" "$(n "2000 * $share")" vqvae.py
  run pixelcnn_prior "$p" "$(n "10000 * $share")" pixelcnn_prior.py --vqvae "$OUT/vqvae-$p/model.pt"
done

python - "$OUT" "$PRECISIONS" <<'EOF' | tee "$OUT/table.md"
import json, os, sys
out, precisions = sys.argv[1], sys.argv[2].split()
print('| script | ' + ' | '.join(f'`{p}`' for p in precisions) + ' |')
print('|---|' + '---|' * len(precisions))
for name in ('vae_image', 'vlae', 'vqvae', 'pixelcnn_prior'):
    cells = []
    for p in precisions:
        try:
            m = json.load(open(os.path.join(out, f'{name}-{p}', 'metrics.json')))
            cells.append(f"{m['train_examples_per_s']:,.0f}" + (f" ({m['ran_on']['precision']})" if p == 'auto' else ''))
        except (OSError, ValueError, KeyError):
            cells.append('-')
    print(f'| `{name}` | ' + ' | '.join(cells) + ' |')
EOF
