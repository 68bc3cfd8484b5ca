#!/bin/bash
# T=seconds bash gpu/diag.sh : gpu/diag.py under MPS, every process stopped after T s (pool children included)
cd "$(dirname "$0")/.."
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog; mkdir -p /tmp/mps /tmp/mpslog
nvidia-cuda-mps-control -d 2>/dev/null
python gpu/diag.py 2>&1 | grep -v -i warn &
end=$((SECONDS+${T:-480})); while [ $SECONDS -lt $end ] && pgrep -f "gpu/diag.py" >/dev/null; do sleep 5; done
pkill -f "gpu/diag.py"; pkill -f spawn_main; sleep 2; nvidia-smi --query-gpu=name,memory.used --format=csv; ls -la $OUT
