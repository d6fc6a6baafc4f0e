import os

import pytest


@pytest.fixture(autouse=True)
def _restore_torch_log_level(monkeypatch) -> None:
    """``gossipgrad train`` sets TORCH_CPP_LOG_LEVEL for the process it runs in; put it back."""
    value = os.environ.get("TORCH_CPP_LOG_LEVEL")
    if value is None:
        monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", value)
