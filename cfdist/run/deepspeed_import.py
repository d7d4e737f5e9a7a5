"""Importing DeepSpeed without the MLflow import its autotuner makes.

``import deepspeed`` imports ``deepspeed.autotuning.autotuner``, which imports MLflow whenever it
is installed (to log autotuning experiments): 1.3 s of imports (pandas, FastAPI, MLflow's GenAI
modules, ...) in every process that imports DeepSpeed, i.e. each Ray Train worker, each torchrun
rank and each CLI process that trains or exports. cfdist never runs DeepSpeed's autotuner, so
:func:`import_deepspeed` hides MLflow for that one import (the autotuner then records
``has_mlflow = False``). MLflow itself stays importable afterwards, and in a process that has
already imported it (cfdist's MLflow tracking) nothing is hidden.

    deepspeed = import_deepspeed()
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

_LOCK = threading.Lock()


def import_deepspeed() -> ModuleType:
    """The ``deepspeed`` module, imported (once) with MLflow hidden from its autotuner."""
    module = sys.modules.get("deepspeed")
    if module is not None:
        return module
    with _LOCK:
        hide = "mlflow" not in sys.modules
        if hide:
            sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this is set
        try:
            import deepspeed
        finally:
            if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
                del sys.modules["mlflow"]
    return deepspeed
