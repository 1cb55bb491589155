"""The engine stays a library: no web framework, queue or database in it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_engine_imports_no_fastapi_celery_or_sqlalchemy():
    loaded = _modules_after("import engine.jobs, engine.bench, engine.methods, engine.unlearning")
    assert "torch" in loaded  # the check would be meaningless if nothing was imported
    assert not loaded & {"fastapi", "starlette", "celery", "kombu", "sqlalchemy", "alembic", "app",
                         "worker"}


def test_torch_free_engine_modules_stay_torch_free():
    loaded = _modules_after("import engine, engine.datasets, engine.errors, engine.arch_shapes, "
                            "engine.model_desc, engine.manifest")
    assert "numpy" in loaded
    assert "torch" not in loaded and "torchvision" not in loaded


def test_the_verdict_helper_needs_neither_torch_nor_scipy():
    loaded = _modules_after("import engine.evidence")
    assert "numpy" in loaded
    assert not loaded & {"torch", "scipy", "sklearn"}
