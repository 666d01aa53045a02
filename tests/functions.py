"""Load the Lambda handler modules the way the Lambda runtime does."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_function(name: str) -> ModuleType:
    """Import ``functions/<name>/<name>.py`` afresh.

    Settings and clients are created at import, so each test imports the
    module again after setting its environment and starting moto.
    """
    path = ROOT / "functions" / name / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)

    return module
