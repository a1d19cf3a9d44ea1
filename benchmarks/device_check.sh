#!/usr/bin/env bash
# GPU checks for regjax, in one run of at most ~8 minutes, writing everything to one file.
#
#   bash benchmarks/device_check.sh [OUT_DIR]      # default: runs/device_check
#
# On a machine whose JAX sees an accelerator (it uses the python3 there, with regjax
# from this checkout on PYTHONPATH; jax, flax, optax, chex, pytest and hypothesis must
# be installed):
#   1. the environment: jax, jaxlib, devices, nvidia-smi;
#   2. the noise-op, generator and BatchNorm tests on the accelerator;
#   3. regjax.random.bits on the accelerator against the CPU backend and the pinned
#      words, for a few keys and shapes (one of more than 2**32 elements' worth of
#      counter: the high word);
#   4. the benchmark table: noise ops (dropout vs flax with threefry, rbg and unsafe_rbg
#      keys, vs the copy floor) and BatchNorm vs flax, float32 and bfloat16, at the two
#      CPU sizes and at (8192, 16384), large enough to measure an accelerator's bandwidth.
# On this 2-core CPU (as a dry run) it took 7 minutes.
# Every step has its own time limit, so one that hangs cannot take the others with it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/device_check}
mkdir -p "$out"
log="$out/device_check.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
{
  step "environment"
  $py -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__); print(jax.devices())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

  step "tests on the accelerator (generator, noise-op moments and hash checks, BatchNorm)"
  timeout 240 $py -m pytest -q -p no:cacheprovider tests/test_random.py tests/test_normalization.py \
    "tests/test_stochastic.py::MomentsTest" 2>&1 | tail -15

  step "regjax.random.bits: accelerator vs CPU, and the pinned words"
  timeout 90 $py - <<'EOF'
import jax, numpy as np
from regjax import random as rrandom
import tests.test_random as t
accel = jax.devices()[0]
cpu = jax.devices("cpu")[0]
print("accelerator:", accel, "| reference:", cpu)
ok = True
for seed in (0, 1, 1234):
  for shape in ((8,), (33, 65), (4, 1024, 1024)):
    words = {}
    for dev in (accel, cpu):
      with jax.default_device(dev):
        words[dev.platform] = np.asarray(rrandom.bits(jax.random.key(seed), shape))
    same = np.array_equal(words[accel.platform], words[cpu.platform])
    ok &= same
    print(f"key({seed}) {shape}: {'identical' if same else 'DIFFERENT'}")
for name, key in t._keys().items():
  with jax.default_device(accel):
    got = list(map(int, rrandom.bits(key, (8,))))
  same = got == t.PINNED[name]
  ok &= same
  print(f"pinned words {name}: {'identical' if same else 'DIFFERENT'}")
seed_words = rrandom.seed_words(jax.random.key(5))
lo = jax.numpy.arange(1 << 20, dtype=jax.numpy.uint32)
hi = jax.numpy.full_like(lo, 3)
wide = {}
for dev in (accel, cpu):
  with jax.default_device(dev):
    wide[dev.platform] = np.asarray(rrandom.hash_counter(jax.device_put(seed_words, dev),
                                                         jax.device_put(lo, dev),
                                                         jax.device_put(hi, dev)))
same = np.array_equal(wide[accel.platform], wide[cpu.platform])
ok &= same
print(f"high counter word 3: {'identical' if same else 'DIFFERENT'}")
print("ALL IDENTICAL" if ok else "MISMATCH")
EOF

  step "benchmarks: noise ops and BatchNorm"
  timeout 300 $py -m benchmarks.run --sizes small,large,8192x16384 --dtypes float32,bfloat16 \
    --sections noise,batchnorm,memory --rounds 7 --calls 5 --no-steady-malloc \
    --out "$out/benchmarks.json" 2>&1 | grep -v "^ *$"
  step "done"
} 2>&1 | tee "$log"
