"""API keys: the key store (hashes only, read from a file or an environment variable), constant-time matching, and
the token bucket behind per-key request rates. Pure: no gRPC here (the interceptor uses these).

A keys file holds one key a line, `NAME sha256:HEX [rps=R] [burst=B] [concurrent=N] [models=a,b]`; `#` starts a
comment. The plaintext key is shown once, when it is made (`prunefusion keys create`), and stored nowhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from prunefusion.home import expand_path
from prunefusion.server.config import KeyLimits

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a Prometheus label value: no quoting needed
HASH_PATTERN = re.compile(r"sha256:([0-9a-f]{64})")
MAX_KEY_CHARS = 256  # longer presented keys are refused before hashing
KEY_PREFIX = "pf-"


class KeyFileError(ValueError):
    """A keys file line is malformed; the message names the source and the line."""


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


UNLIMITED = KeyLimits()


def bucket_size(limits: KeyLimits) -> int | None:
    """The token bucket's size: `burst`, else one second's worth of requests; None without a rate."""
    if limits.requests_per_second is None:
        return None
    return limits.burst or max(1, int(limits.requests_per_second))


def file_signature(path: Path) -> tuple:
    """Changes when the file is rewritten or replaced: (inode, mtime, size), or ("missing",)."""
    try:
        st = path.stat()
    except OSError:
        return ("missing",)
    return st.st_ino, st.st_mtime_ns, st.st_size


# keys-file option (and `prunefusion keys create` flag) -> KeyLimits field, whose pydantic checks judge the value;
# "models" is the allow-list
LIMIT_OPTIONS = {"rps": "requests_per_second", "burst": "burst", "concurrent": "max_concurrent"}
_OPTION_OF_FIELD = {field: option for option, field in LIMIT_OPTIONS.items()}


def limit_problems(error: ValidationError, prefix: str = "") -> str:
    """KeyLimits' validation error, named by option (`prefix` "--" names the flags); never the values."""
    return "; ".join(f"{prefix}{_OPTION_OF_FIELD[e['loc'][0]]}: {e['msg']}" for e in error.errors())


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)
    limits: KeyLimits = UNLIMITED
    models: frozenset[str] | None = None  # None: every model

    def line(self) -> str:
        """The key's keys-file line (what `prunefusion keys create` appends)."""
        options = {option: getattr(self.limits, attr) for option, attr in LIMIT_OPTIONS.items()}
        options["models"] = ",".join(sorted(self.models)) if self.models else None
        extra = "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in options.items()
                        if v is not None)
        return f"{self.name} sha256:{self.digest.hex()}{extra}"


def _parse_line(line: str, where: str, defaults: KeyLimits) -> ApiKey:
    parts = line.split()
    if len(parts) < 2:
        raise KeyFileError(f"{where}: expected 'NAME sha256:HEX [options]', got {len(parts)} field(s)")
    name, hashed, *options = parts
    if not NAME_PATTERN.fullmatch(name):
        raise KeyFileError(f"{where}: key name must match {NAME_PATTERN.pattern}")
    match = HASH_PATTERN.fullmatch(hashed)
    if match is None:
        raise KeyFileError(f"{where}: the second field must be sha256: and 64 lower-case hex digits (the hash of "
                           "the key, never the key itself)")
    limits, models = defaults.model_dump(), None
    for option in options:
        key, sep, value = option.partition("=")
        if key == "models" and sep:
            models = frozenset(m for m in value.split(",") if m)
        elif key in LIMIT_OPTIONS and sep:
            limits[LIMIT_OPTIONS[key]] = value
        else:
            shown = repr(key) if sep and key.isidentifier() else "(not key=value)"  # never echo what may be a key
            raise KeyFileError(f"{where}: unknown option {shown}; known: {[*LIMIT_OPTIONS, 'models']} (key=value)")
    try:
        parsed = KeyLimits(**limits)
    except ValidationError as err:  # the defaults were checked with the config: the problem is an option here
        raise KeyFileError(f"{where}: {limit_problems(err)}") from None
    return ApiKey(name, bytes.fromhex(match.group(1)), parsed, models)


def parse_keys(text: str, source: str, defaults: KeyLimits = UNLIMITED) -> list[ApiKey]:
    keys = [_parse_line(line, f"{source}:{number}", defaults)
            for number, raw in enumerate(text.splitlines(), 1) if (line := raw.split("#", 1)[0].strip())]
    return check_unique(keys, source)


def check_unique(keys: list[ApiKey], source: str) -> list[ApiKey]:
    for attr, what in (("name", "name"), ("digest", "hash")):
        values = [getattr(k, attr) for k in keys]
        repeated = {v for v in values if values.count(v) > 1}
        if repeated:
            shown = sorted(repeated) if attr == "name" else ["(a hash)"]
            raise KeyFileError(f"{source}: each key {what} may appear once; repeated: {shown}")
    return keys


class KeyStore:
    """The keys in force. `match` compares the presented key's hash with every stored hash in constant time and
    without an early exit, so the time taken says nothing about which key (if any) was close."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = tuple(keys)
        self.by_name = {k.name: k for k in keys}

    def match(self, presented: str) -> ApiKey | None:
        if not presented or len(presented) > MAX_KEY_CHARS:
            return None
        digest, found = hash_key(presented), None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


@dataclass(frozen=True)
class KeySource:
    """Where the keys come from (a file, an environment variable, or both) and the defaults for their limits."""

    file: Path | None
    env: str | None
    defaults: KeyLimits

    @classmethod
    def of(cls, file: str | None, env: str | None, defaults: KeyLimits) -> KeySource:
        return cls(expand_path(file) if file else None, env, defaults)

    def signature(self) -> tuple:
        """Changes when the keys may have changed (the file rewritten or replaced, the variable set anew)."""
        return (file_signature(self.file) if self.file is not None else None,
                os.environ.get(self.env) if self.env else None)

    def load(self) -> KeyStore:
        keys: list[ApiKey] = []
        if self.file is not None:
            try:
                text = self.file.read_text()
            except OSError as err:
                raise KeyFileError(f"server.auth.api_keys_file: cannot read {self.file}: {err.strerror}") from None
            keys += parse_keys(text, str(self.file), self.defaults)
        if self.env is not None:
            if self.env not in os.environ:
                raise KeyFileError(f"server.auth.api_keys_env: the environment variable {self.env} is not set")
            keys += parse_keys(os.environ[self.env], f"${self.env}", self.defaults)
        return KeyStore(check_unique(keys, "server.auth (the file and the variable together)"))


class TokenBucket:
    """`rate` tokens a second up to `size`; `take(now)` spends one and returns 0, or returns the seconds until one
    is due (spending nothing)."""

    def __init__(self, rate: float, size: int, now: float):
        self.rate, self.size = rate, size
        self.tokens, self.updated = float(size), now

    def take(self, now: float) -> float:
        self.tokens = min(self.size, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def append_key(name: str, file: Path | None, limits: KeyLimits = UNLIMITED,
               models: frozenset[str] | None = None) -> tuple[str, str]:
    """Make a key; append its line to `file` (created private) unless None. Returns (key, line)."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"key name must match {NAME_PATTERN.pattern}")
    key = new_key()
    line = ApiKey(name, hash_key(key), limits, models).line()
    parse_keys(line, "the new key's line")  # the server must be able to read what is written (e.g. models=a b)
    if file is not None:
        existing = file.read_text() if file.exists() else ""
        if name in {k.name for k in parse_keys(existing, str(file))}:
            raise ValueError(f"{file} already has a key named {name!r}")
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(("" if not existing or existing.endswith("\n") else "\n") + line + "\n")
    return key, line
