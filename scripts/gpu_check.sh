#!/bin/bash
# The GPU checks of issue 20 in one run (docs/benchmarks.md, section 8): the device tests, the
# commands with --device cuda beside --device cpu, and bench_gpu. Run from the repository root
# on a machine with a CUDA build of torch:
#
#     bash scripts/gpu_check.sh                 # log and bench JSON in ./runs/gpu_check
#     OUT=/tmp/g DEV=cpu bash scripts/gpu_check.sh   # a dry run of the same steps on the CPU
#
# SITE: an extra folder put first on PYTHONPATH (dependencies installed with pip --target).
# Each step has its own time limit; a step that fails does not stop the later ones. About 10
# minutes on an H200 with 16 cores.
set -u
DEV=${DEV:-cuda}
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"
LOG=$OUT/check.log
T=$(mktemp -d "${TMPDIR:-/tmp}/edufl-gpu.XXXX")
export PYTHONUNBUFFERED=1 PYTHONPATH=${SITE:-}${SITE:+:}$PWD
# edufl's CLI from this checkout, installed or not
mkdir -p "$T/bin" && printf '#!/bin/sh\nexec python3 -m simulations.cli "$@"\n' > "$T/bin/edufl"
chmod +x "$T/bin/edufl" && export PATH=$T/bin:$PATH
stage() { echo; echo "=== $1 [$(date +%T)]"; }
timed() { local s=$(date +%s.%N); "$@"; local rc=$?; echo "--- rc=$rc wall=$(python3 -c "print(round($(date +%s.%N)-$s,2))") s: $*"; return $rc; }
{
stage env
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
echo "cpus $(nproc)"
python3 -c "
import sys,torch,opacus,flwr,numpy,pandas,sklearn,pydantic,google.protobuf as pb,grpc,ray
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'opacus', opacus.__version__, 'flwr', flwr.__version__, 'numpy', numpy.__version__, 'pandas', pandas.__version__, 'sklearn', sklearn.__version__, 'pydantic', pydantic.__version__, 'protobuf', pb.__version__, 'grpc', grpc.__version__, 'ray', ray.__version__)
import simulations.cli, client.app, server.app
" || { echo "ENV BROKEN"; exit 3; }
stage "device tests"
timed timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/privacy/test_dp_device.py tests/client/test_app_device.py tests/shared_models/test_devices.py tests/test_device_cli.py tests/simulations/test_runner_device.py
stage "simulate run (inline engine, DP) on $DEV, then cpu"
for d in $DEV $([ "$DEV" = cpu ] || echo cpu); do
  timed timeout 60 edufl simulate run --synthetic 3 --students 1200 --rounds 3 --engine inline --dp-epsilon 8 --seed 0 --device $d --out $T/sim-$d 2>&1 | tail -5
done
stage "train on $DEV, then cpu"
for d in $DEV $([ "$DEV" = cpu ] || echo cpu); do
  timed timeout 60 edufl train $T/sim-cpu/consortium/institution_0* --model lstm --epochs 8 --seed 0 --device $d --out $T/train-$d 2>&1 | tail -4
done
python3 -c "
import json
for d in ('$DEV','cpu'):
    try: m=json.load(open('$T/train-'+d+'/metrics.json')); print(d, json.dumps(m)[:600])
    except Exception as e: print(d, 'no metrics', e)
"
stage "client score on $DEV, then cpu"
inst=$(ls -d $T/sim-cpu/consortium/institution_0* | head -1)
timed timeout 45 edufl client score --data $inst --model $T/train-$DEV --device $DEV --db $T/score.sqlite --home $T/home --show 3 2>&1 | tail -8
timed timeout 45 edufl client score --data $inst --model $T/train-$DEV --device cpu --db $T/score-cpu.sqlite --home $T/home-cpu --show 3 2>&1 | tail -5
stage "simulate run (Ray engine, DP, GPU shares) on $DEV"
timed timeout 100 edufl simulate run --synthetic 4 --students 1200 --rounds 2 --engine ray --dp-epsilon 8 --seed 0 --device $DEV --out $T/ray-$DEV 2>&1 | tail -6
timed timeout 80 edufl simulate run --synthetic 4 --students 1200 --rounds 2 --engine ray --dp-epsilon 8 --seed 0 --device $DEV --gpus-per-node 0.25 --out $T/ray25-$DEV 2>&1 | tail -4
stage "bench_gpu (lstm, batch 64, 1k/10k/100k)"
timed timeout ${BENCH1:-240} python3 -m bench.bench_gpu --json $OUT/bench_gpu.json ${BENCH_ARGS:-}
stage "bench_gpu (lstm, gru, multitask, cnn-lstm; batch 1024; 10k/100k)"
timed timeout ${BENCH2:-300} python3 -m bench.bench_gpu --models lstm,gru,multitask,cnn-lstm --batch 1024 --sizes 10000,100000 --reps 2 --cpu-reps-above 10000 --json $OUT/bench_gpu_b1024.json ${BENCH_ARGS:-}
stage "bench_gpu (lstm; batch 256, the DP default; 100k)"
timed timeout ${BENCH3:-60} python3 -m bench.bench_gpu --models lstm --batch 256 --sizes 100000 --reps 2 --cpu-reps-above 10000 --json $OUT/bench_gpu_b256.json ${BENCH_ARGS:-}
stage done
} 2>&1 | tee $LOG
