#!/usr/bin/env bash
# Mutation testing of the five scripts' math: does a one-line bug in a lesson fail test_models.py?
#
#   bash benchmarks/mutmut.sh [SCRATCH]   (in the project's virtual environment; SCRATCH: /tmp/mutmut-latent)
#
# mutmut makes one small change at a time in the functions listed below (- for +, 2 for 1, an argument
# dropped, > for >=), runs the tests that reach that function, and calls the change killed if one fails,
# survived if none does. It works in a scratch copy (it writes a mutants/ folder) and is not part of CI.
# It installs mutmut 3.8.1 into the active environment. About 20 minutes on two cores; a second run only
# retests what changed. Score and survivors: see the README's test section.
#
# What survives changes nothing a test on a CPU can see, or nothing a lesson rests on: device= or dtype=
# dropped (the same on a CPU), the progress line of a terminal, the order of evaluation batches, .sum(+1)
# for .sum(-1) on a 2-D tensor, x[1] for x[0] where all images have one size, chunk and batch sizes, > for
# >= at a threshold no value sits on, the range of the discrete scale's grid (the best lies inside either
# way), the sign of a residual branch or a dropped ReLU (a network learns around them), the noise of a
# restart (+ or -, std with or without Bessel's correction), a per-row constant in the nearest-code
# distance (same argmin), softmax's dim left to its 2-D default, a bin's mass read in the other tail where
# both are accurate. Read each with `mutmut show NAME` in the scratch folder.
set -euo pipefail
scratch=$(realpath -m "${1:-/tmp/mutmut-latent}")
cd "$(dirname "$0")/.."  # the repository root, wherever this is run from
case "$PWD/" in "$scratch"/*) echo "error: $scratch holds this repository; give another folder" >&2; exit 1;; esac
if [ -e "$scratch" ] && [ -n "$(ls -A "$scratch")" ] && [ ! -f "$scratch/mutmut.log" ]; then
  echo "error: $scratch holds files of its own; give an empty or new folder" >&2; exit 1
fi
python -m pip install --quiet mutmut==3.8.1
rm -rf "$scratch" && mkdir -p "$scratch" && cp ./*.py "$scratch"/ && cd "$scratch"
cat > setup.cfg <<'CFG'
[mutmut]
source_paths=
  vae_2d.py
  vae_image.py
  vlae.py
  vqvae.py
  pixelcnn_prior.py
also_copy=
  common.py
CFG
math=(  # the math functions: losses, estimators, codebook updates, masks, samplers, evaluations
  'vae_2d.*'{gaussian_log_prob,reparameterise,kl_standard_normal,loss_terms,iw_nll,latent_usage,evaluate}'__*'
  'vae_image.*'{reconstruction,bits_per_dim,discrete_log_prob,fit_discrete_scale,loss_terms}'__*'
  'vae_image.*'{with_course_metrics,iw_nll,active_units,kl_per_dim,evaluate,final_metrics}'__*'
  'vae_image.*StandardNormal*'{log_prob,sample}'__*'
  'vlae.*MaskedLinear*forward__*' 'vlae.*MADE*__init____*' 'vlae.*MADE*forward__*' 'vlae.*FlowPrior*log_prob__*'
  'vlae.*FlowPrior*sample__*' 'vlae.*'{conditionals,loss_terms,kl_per_dim}'__*'
  'vqvae.*'{flatten_grid,nearest_code,lookup,loss_terms,usage_stats,ema_update,fresh_use,set_use}'__*'
  'vqvae.*'{kmeans_pp_init,restart_dead_codes,evaluate}'__*' 'vqvae.*VQVAE*forward__*'
  'pixelcnn_prior.*MaskedConv2d*forward__*' 'pixelcnn_prior.*'{_mask,gate,from_embedding,nll_per_grid}'__*'
  'pixelcnn_prior.*GatedLayer*forward__*' 'pixelcnn_prior.*'{loss_terms,encode,evaluate,sample}'__*'
)
# One thread per mutant: the children are forked from a process that has loaded torch.
OMP_NUM_THREADS=1 mutmut run --max-children 2 "${math[@]}" > mutmut.log 2>&1 || { tail -5 mutmut.log; exit 1; }
mutmut results --all true > results.txt  # one line a mutant: killed, survived, or not checked (not math)
grep ': survived$' results.txt > survivors.txt || true
killed=$(grep -c ': killed$' results.txt || true)
survived=$(wc -l < survivors.txt)
permille=$((1000 * killed / (killed + survived)))
echo "killed $killed of $((killed + survived)) mutants ($((permille / 10)).$((permille % 10))%); survivors in $scratch/survivors.txt"
