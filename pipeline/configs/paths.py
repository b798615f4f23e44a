"""Where a preset's artifacts go unless it says otherwise: cache/NAME and runs/NAME/{heads,model,eval}."""

from __future__ import annotations

DEFAULT_PRESET = "demo"


def run_paths(preset: str) -> dict[str, str]:
    """Where a preset's artifacts go unless it says otherwise: cache/NAME and runs/NAME/{heads,model,eval}."""
    return {"cache_dir": f"cache/{preset}", "heads_dir": f"runs/{preset}/heads", "out_dir": f"runs/{preset}/model",
            "report_dir": f"runs/{preset}/eval"}


DEFAULT_PATHS = run_paths(DEFAULT_PRESET)
