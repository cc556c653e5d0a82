"""Init container `wait-for-models`: wait until every model directory of the server config holds a checkpoint.

The compression Job builds the models into the volume beside the release; the server runs with --no-build and
would fail at once on a missing directory. Paths are resolved by the server's own config loader (${PRUNEFUSION_HOME}
expanded). Usage: python wait-for-models.py CONFIG.yaml [--every SECONDS] [--timeout SECONDS]
"""

import argparse
import sys
import time

from prunefusion.server.config import load_config


def missing_models(config_path: str) -> list[str]:
    config = load_config(config_path)
    return [f"{m.name} ({m.resolved_path})" for m in config.models if not (m.resolved_path / "config.json").is_file()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between checks")
    parser.add_argument("--timeout", type=float, default=None, help="give up (exit 1) after this long; default: never")
    args = parser.parse_args(argv)
    start, last_report = time.monotonic(), None
    while missing := missing_models(args.config):
        waited = time.monotonic() - start
        if args.timeout is not None and waited >= args.timeout:
            print(f"still missing after {waited:.0f} s: {', '.join(missing)}", file=sys.stderr)
            return 1
        if last_report is None or waited - last_report >= 60:
            print(f"waiting for the compression Job: {', '.join(missing)}", flush=True)
            last_report = waited
        time.sleep(args.every)
    print("every model directory holds a checkpoint", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
