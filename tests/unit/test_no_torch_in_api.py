"""The API, the service and the engine import without torch or diffusers, so their tests run in
milliseconds with a fake model. Checked in a fresh interpreter, since this one may have them."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import diffuser_api.api.app
import diffuser_api.service.images
import diffuser_api.engine
print(sorted(name for name in ("torch", "diffusers") if name in sys.modules))
"""


def test_api_service_and_engine_import_without_torch_or_diffusers() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
