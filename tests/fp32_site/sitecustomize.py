"""Under UNMEMORIZE_TEST_FP32=1, tests/conftest.py puts this folder on PYTHONPATH, so every Python the tests
start (the CLI, torchrun ranks, the examples) imports it: `make_runtime()` then answers as on a CPU without
fast bfloat16 (AVX2 only, e.g. AMD EPYC): no autocast, float32 everywhere. Nothing in src/ is changed; the
patch is applied when `unmemorize.io.models` is first imported.
"""

import os
import sys

if os.environ.get("UNMEMORIZE_TEST_FP32") == "1":
    from importlib.machinery import PathFinder

    def no_cpu_bf16(models) -> None:
        """`models._bf16_is_fast` answers False on CPU (CUDA unchanged)."""
        fast = models._bf16_is_fast
        models._bf16_is_fast = lambda device: device.type != "cpu" and fast(device)

    class _PatchOnImport:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "unmemorize.io.models":
                return None
            spec = PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                no_cpu_bf16(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport)
