#!/usr/bin/env bash
# The prepared device-session script: what the open issues need a GPU for, in one call that
# fits a 15-minute device budget. Run it from the repository root on a GPU machine that has
# torch, timm and scikit-image, with the crack data copied into .gpu/data (it is read from
# there; the working tree travels without ../shared):
#
#   mkdir -p .gpu/data && cp -r ../shared/data/cfd ../shared/data/deepcrack .gpu/data/
#   echo /.gpu/ >> .git/info/exclude
#   # then, on the device: bash benchmarks/gpu_session.sh   (carry: .gpu)
#
# Every step writes into $OUT (or ./gpu_out): result files, benchmark logs and the timings the
# issues ask to state. CIFAR-10 (63 MB) does not fit the device's 64 MiB working-tree limit
# beside the repository, so the paper-sized Table 3 is not part of this script.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export ADCORE_GIT_COMMIT=${ADCORE_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export ADCORE_DATA=${ADCORE_DATA:-$PWD/.gpu/adcore-data} ADCORE_SHARED_DATA=$PWD/.gpu/data
export ADCORE_CRACKS=$PWD/.gpu/data ADCORE_PROGRESS=0 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
step() { echo "== $(date +%T) $1" | tee -a "$OUT/steps.log"; }

step "CUDA tests (CG and capacitance blends, fused flows, CUDA graphs, VQ-VAE fast path)"
timeout 240 python -m pytest tests/test_poisson_*.py tests/test_flows.py tests/test_train_vqvae.py \
  tests/test_vqvae.py tests/test_maps.py -q -p no:cacheprovider -k "cuda or gpu" \
  > "$OUT/cuda_tests.log" 2>&1; tail -3 "$OUT/cuda_tests.log"

step "Poisson blending, batch of 64 (issue: <= 10 ms per batch on an H100)"
timeout 120 python benchmarks/poisson.py > "$OUT/poisson.log" 2>&1; tail -5 "$OUT/poisson.log"

step "CFlow-AD training step against the FrEIA reference loop"
timeout 120 python benchmarks/cflow.py --device cuda > "$OUT/cflow.log" 2>&1; tail -5 "$OUT/cflow.log"

step "One crack run at the paper's 200 epochs (issue 15: state its time), current variant"
timeout 300 python -m adcore repro cflow --dataset cracks --loss boundary --device cuda \
  --seed 0 --out "$OUT/cflow_cracks_cfd_boundary_s0.json" > "$OUT/crack200.log" 2>&1
tail -3 "$OUT/crack200.log"
step "done"
