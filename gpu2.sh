source .wheels/install.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH PDSERVE_EMBEDDED_GGUF=$PWD/.wheels/tok/smollm2-tokenizer.gguf
python -c "import msgspec, flashinfer; print('deps ok')"
date; touch /tmp/mark
timeout 450 python benchmarks/bench_gpu.py --no-b1 --steps 20 --profile-replays 0 --decode-batches 128,64 --pdl-ab > $OUT/bench.log 2>&1
echo "bench rc=$?"; grep -v " INFO " $OUT/bench.log | tail -30
date
timeout 120 python benchmarks/bench_decode_attention.py --fused-sweep --no-flashinfer --batches 128 --contexts 1064 --max-cache-gib 20 > $OUT/sweep.log 2>&1
echo "sweep rc=$?"; tail -30 $OUT/sweep.log
mkdir -p $OUT/results; find benchmarks/results -newer /tmp/mark -type f -exec cp {} $OUT/results/ \;
date
