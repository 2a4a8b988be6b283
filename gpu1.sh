source .wheels/install.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH PDSERVE_EMBEDDED_GGUF=$PWD/.wheels/tok/smollm2-tokenizer.gguf
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
date
timeout 300 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kernels.py -k "pdl or rms_norm or silu_and_mul or rope_and_store or triton_paged_attention" > $OUT/tests.log 2>&1
echo "tests rc=$?"; tail -5 $OUT/tests.log
date
timeout 240 python benchmarks/bench_decode_attention.py --fused-sweep --no-flashinfer --batches 128 --contexts 1064 --max-cache-gib 20 > $OUT/sweep.log 2>&1
echo "sweep rc=$?"; tail -40 $OUT/sweep.log
mkdir -p $OUT/results; cp benchmarks/results/*decode-attention* $OUT/results/ 2>/dev/null
date
