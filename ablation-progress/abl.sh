#!/bin/bash
# one ablation worker: pops "STEPS SEED ROW" lines from tasks.txt under a lock until none are left
W=/work/runs/s13/fresh/build
cd /work/wt-abl2
while true; do
  task=$(flock /work/runs/s13/lock bash -c 'head -1 /work/runs/s13/tasks.txt; sed -i 1d /work/runs/s13/tasks.txt')
  [ -z "$task" ] && break
  set -- $task
  echo "$(date +%T) start $task" >> /work/runs/s13/abl.log
  OMP_NUM_THREADS=1 nice -n 19 env PYTHONPATH=/work/wt-abl2 .venv/bin/python -m training shapes-ablate \
    --work-dir $W --weights /work/wt-abl2/weights/shapes --steps $1 --n 500 --train-seeds $2 --only $3 --json \
    > /work/runs/s13/out/out-$1-$2-$3.json 2> /work/runs/s13/out/err-$1-$2-$3.log
  echo "$(date +%T) done $task rc=$?" >> /work/runs/s13/abl.log
done
