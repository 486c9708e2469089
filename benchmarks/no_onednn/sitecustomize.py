"""Every Python process started with this folder on PYTHONPATH runs as a CPU without native bf16 (AVX2-only) does:
oneDNN switched off before any other code runs.

    PYTHONPATH=benchmarks/no_onednn .venv/bin/llava-lora quickstart --out qs-avx2 --overwrite
    PYTHONPATH=benchmarks/no_onednn make test-fast

torch sends a bf16 matmul to oneDNN only on AVX-512 CPUs; elsewhere it takes ATen's reference kernel. With oneDNN
off, a bf16 matmul takes that same kernel on any CPU (measured on an AVX512-BF16 EPYC: 1.2 GFLOP/s against fp32's
170 at 1024^3), while fp32 (MKL) is unchanged. Python imports ``sitecustomize`` at start-up, so subprocesses (torchrun
workers, the CLI run by a test) take the switch too; DataLoader workers are forked and inherit it.
"""

import warnings

import torch

warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
torch.backends.mkldnn.enabled = False
