"""Print pyproject.toml's dependencies pinned at their lower bounds (`name==version`, one a line), for the
lowest-versions CI step (`make test-lowest`). torch is left out (the step uses the venv's torch, or the one
named by LOWEST_TORCH); a dependency whose environment marker does not hold here is left out too."""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SKIP = {"torch"}


def pins(pyproject: Path) -> list[str]:
    from packaging.markers import Marker

    out = []
    for spec in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement, _, marker = spec.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,\s]*)\s*", requirement)
        if m is None:
            sys.exit(f"{pyproject}: {spec!r} has no plain lower bound (name>=version)")
        if m[1].lower() not in SKIP:
            out.append(f"{m[1]}=={m[2]}")
    return out


if __name__ == "__main__":
    print("\n".join(pins(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
