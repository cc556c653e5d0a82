"""Init container `config`: write the server config with cache.url taken from $PRUNEFUSION_REDIS_URL.

The server does not expand environment variables in cache.url (only in model paths and cache.data_dir), and the
URL may hold a password, so it comes from a Secret as an environment variable and is written here into an
in-memory volume, never into the ConfigMap. Usage: python render-config.py TEMPLATE.yaml OUT.yaml
"""

import os
import sys
from pathlib import Path

import yaml


def main(template: str, out: str) -> int:
    url = os.environ.get("PRUNEFUSION_REDIS_URL", "").strip()
    if not url:
        print("PRUNEFUSION_REDIS_URL is empty: check the Secret named by redis.existingSecret / redis.url",
              file=sys.stderr)
        return 1
    config = yaml.safe_load(Path(template).read_text())
    config.setdefault("cache", {})["url"] = url
    target = Path(out)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    target.chmod(0o600)
    print(f"{target}: cache.url from $PRUNEFUSION_REDIS_URL")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
