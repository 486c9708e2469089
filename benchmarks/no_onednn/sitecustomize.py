"""Every Python process started with this folder on PYTHONPATH runs as a CPU without native bf16 (AVX2-only) does:
oneDNN switched off as torch is imported, before any other code uses it.

    PYTHONPATH=benchmarks/no_onednn .venv/bin/llava-lora quickstart --out qs-avx2 --overwrite
    PYTHONPATH=benchmarks/no_onednn make test-fast

torch sends a bf16 matmul to oneDNN only on AVX-512 CPUs; elsewhere it takes ATen's reference kernel. With oneDNN
off, a bf16 matmul takes that same kernel on any CPU (measured on an AVX512-BF16 EPYC: 1.2 GFLOP/s against fp32's
170 at 1024^3), while fp32 (MKL) is unchanged. Python imports ``sitecustomize`` at start-up, so subprocesses (torchrun
workers, the CLI run by a test) take the switch too; DataLoader workers are forked and inherit it.
"""

import importlib.abc
import importlib.machinery
import sys
import warnings


def _switch_off(torch) -> None:
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    torch.backends.mkldnn.enabled = False


class _OnceTorchIsImported(importlib.abc.MetaPathFinder):
    """Switches oneDNN off as ``import torch`` finishes, so that a Python that never imports torch does not pay
    for it: inductor's ISA probes are six such children, and importing torch in each made torch.compile's first
    call 12 s slower."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _switch_off(module)

            spec.loader.exec_module = exec_module
        return spec


if "torch" in sys.modules:
    _switch_off(sys.modules["torch"])
else:
    sys.meta_path.insert(0, _OnceTorchIsImported())
