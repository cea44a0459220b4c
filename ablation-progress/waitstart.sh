#!/bin/bash
W=/work/runs/s13/fresh/build
until [ -f $W/corpus.txt ] && [ -f $W/clip/encoder.json ] && [ -f $W/lm.done ] && [ -f $W/datastore/datastore.json ] && [ -f $W/gap_stats.safetensors ]; do sleep 30; done
echo "$(date +%T) stages ready" >> /work/runs/s13/abl.log
/work/runs/s13/abl.sh & sleep 5; /work/runs/s13/abl.sh & wait
