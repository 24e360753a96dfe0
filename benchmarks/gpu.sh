#!/usr/bin/env bash
# Every script at its default budget on CUDA, with --precision auto (what a user gets: bf16 from compute
# capability 8.0, fp16 with a GradScaler before) and then fp32: train examples/s, wall time and the final
# numbers, as one markdown table. Meant for a short lease of a GPU machine (about 15 minutes in all,
# start-up included), so the auto pass comes first and each run has a time limit.
#
#   bash benchmarks/gpu.sh [DATA_DIR]    # DATA_DIR holds cifar10.pkl (default data); else torchvision
#                                        # downloads CIFAR-10 there, which needs network access
#
# Writes into results/gpu/<mode>/<script>/ and prints the table at the end (also results/gpu/table.md).
set -u
cd "$(dirname "$0")/.."
DATA=${1:-data}
[ -f "$DATA/cifar10.pkl" ] || echo "no $DATA/cifar10.pkl: torchvision will download CIFAR-10 into $DATA" >&2
OUT=results/gpu
LIMIT=${LIMIT:-240}  # seconds per run at most: a run cut short still leaves its last checkpoint
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu EXTRA="--epochs 1 --subset 200" tries the script itself on a CPU
EXTRA=${EXTRA:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

run() {  # run MODE NAME ARGS...: one script, timed, its output kept beside its results
  mode=$1 name=$2; shift 2
  out=$OUT/$mode/$name
  mkdir -p "$out"
  start=$(date +%s)
  timeout "$LIMIT" python "$@" --device "$DEVICE" $EXTRA --overwrite --out "$out" > "$out.log" 2>&1
  echo "$? $(( $(date +%s) - start ))" > "$out.wall"
  tail -n 2 "$out.log"
}

for mode in auto fp32; do
  flag="--precision $mode"
  run "$mode" vae_2d vae_2d.py
  run "$mode" vae_image vae_image.py --dataset cifar10 --data-dir "$DATA" $flag
  run "$mode" vlae vlae.py --dataset cifar10 --data-dir "$DATA" $flag
  run "$mode" vqvae vqvae.py --dataset cifar10 --data-dir "$DATA" $flag
  run "$mode" pixelcnn_prior pixelcnn_prior.py --dataset cifar10 --data-dir "$DATA" \
      --vqvae "$OUT/$mode/vqvae/model.pt" $flag
done

python - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, os, sys
out = sys.argv[1]
keys = {'vae_2d': ['neg_elbo', 'nll_iw'], 'vae_image': ['neg_elbo', 'sse_plus_kl', 'bits_per_dim'],
        'vlae': ['neg_elbo', 'sse_plus_kl', 'bits_per_dim'], 'vqvae': ['recon_mse', 'codes_used', 'perplexity'],
        'pixelcnn_prior': ['nll', 'bits_per_dim', 'sample_seconds_100']}
print('| script | --precision (ran in) | exit | wall s | epochs | train examples/s | final numbers |')
print('|---|---|---|---|---|---|---|')
for mode in ('auto', 'fp32'):
    for name, shown in keys.items():
        path = os.path.join(out, mode, name)
        rc, wall = open(path + '.wall').read().split() if os.path.exists(path + '.wall') else ('-', '0')
        try:
            m = json.load(open(os.path.join(path, 'metrics.json')))
        except OSError:
            print(f'| {name} | {mode} | {rc} | {float(wall):.0f} | (no metrics.json) | | |')
            continue
        f = {**m['final_test'], **{k: m[k] for k in m if k.startswith('sample_')}}
        numbers = ', '.join(f'{k} {f[k]:.4g}' for k in shown if k in f)
        print(f"| {name} | {mode} ({m['ran_on']['precision']}) | {rc} | {float(wall):.0f} | {m['epochs_trained']} | "
              f"{m['train_examples_per_s']:,.0f} | {numbers} |")
EOF
