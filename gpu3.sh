source .wheels/install.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH PDSERVE_EMBEDDED_GGUF=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf
ls /tmp/model; nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 200 python -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu_engine.py -k "teacher_forced and triton" > $OUT/tf-triton.log 2>&1
echo "rc=$?"; grep -E "teacher-forced|passed|failed|Error" $OUT/tf-triton.log | cut -c1-1500
date
timeout 250 python -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu_engine.py -k "teacher_forced and flashinfer-graphs" > $OUT/tf-fi.log 2>&1
echo "rc=$?"; grep -E "teacher-forced|passed|failed|Error" $OUT/tf-fi.log | cut -c1-1500
date
