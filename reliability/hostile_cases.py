"""R1's hostile requests as data: hypothesis strategies over every RPC's fields, raw and malformed protobuf bytes,
gzip-compressed requests and a compressed bomb. A case is small and hashable (huge values are recipes, `Big`, built
only when the case is sent), so 10,000 of them cost little memory and each one can be written down as JSON.

    cases = draw_cases(600)          # deterministic (hypothesis derandomized), one Case per example
    bodies(cases[0])                 # [bytes]: the request messages exactly as sent
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

from prunefusion_client.v1 import multimodal_pb2 as mm
from prunefusion_client.v1 import quality_filter_pb2 as qf
from prunefusion_client.v1 import text_generation_pb2 as tg

TEXT_MODEL, IMAGE_MODEL = "pico", "pico-tf"
TG, MM, QF = "/prunefusion.v1.TextGeneration/", "/prunefusion.v1.Multimodal/", "/prunefusion.v1.QualityFilter/"
HEALTH = "/grpc.health.v1.Health/Check"
UNKNOWN_METHOD = TG + "NoSuchMethod"


# full method -> (request message class, call shape); the shape picks the generic channel call in r1_hostile
METHODS: dict[str, tuple[Any, str]] = {
    TG + "Generate": (tg.GenerateRequest, "unary"),
    TG + "GenerateStream": (tg.GenerateRequest, "server_stream"),
    TG + "ListModels": (tg.ListModelsRequest, "unary"),
    MM + "GenerateImage": (mm.GenerateImageRequest, "unary"),
    MM + "Caption": (mm.CaptionRequest, "unary"),
    MM + "GenerateInterleaved": (mm.GenerateInterleavedRequest, "server_stream"),
    MM + "ListImageModels": (mm.ListImageModelsRequest, "unary"),
    QF + "Score": (qf.ScoreRequest, "unary"),
    QF + "ScoreStream": (qf.ScoreRequest, "bidi"),
    QF + "Info": (qf.QualityInfoRequest, "unary"),
    HEALTH: (health_pb2.HealthCheckRequest, "unary"),
    UNKNOWN_METHOD: (tg.ListModelsRequest, "unary"),  # UNIMPLEMENTED is the right answer
}


@dataclass(frozen=True)
class Big:
    """A huge value as a recipe: `unit * times` (str or bytes), built when sent."""

    unit: str | bytes
    times: int


@dataclass(frozen=True)
class Case:
    method: str  # full gRPC method path
    kind: str  # "field" (one hostile field) | "fields" (all drawn) | "raw" | "malformed" | "gzip" | "bomb"
    recipe: Any  # field(s): ((field, value), ...); raw: bytes; malformed: (name, args); gzip: (kind, recipe)
    compress: bool = False  # sent with grpc.Compression.Gzip


def _freeze(value: Any) -> Any:
    """Dicts and lists drawn by hypothesis -> tuples, so a Case is hashable and deduplicated."""
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# ---- field values -----------------------------------------------------------------------------------------------
HOSTILE_TEXT = ["", " ", "\x00", "\x00" * 64, "\r\n", "a\r\nb\r\n", "\r" * 32, "\t\v\f\b\x1b[2J", "\u202ereversed",
                "\ufeffbom", "\u0301" * 64, "🙂" * 16, "\U0010ffff", "￿", "<|endoftext|>", "%s%n%x", "../../etc/passwd",
                "' OR 1=1 --", "\\x00\\n", "pico\x00", "pico ", "PICO", "a" * 255, "a" * 256, "a" * 257]
BIG_UNITS = ["a", "\x00", "🙂", "\r\n", "ab c ", "\u0301", "<|endoftext|>"]
BIG_BYTES = [1000, 4096, 65_536, 1 << 20]  # UTF-8 size of a huge string (a 4 MiB prompt would only slow the run)
SMALL_STRING = st.text(max_size=48) | st.sampled_from(HOSTILE_TEXT)
BIG_STRING = st.builds(lambda unit, size: Big(unit, max(1, size // len(unit.encode()))), st.sampled_from(BIG_UNITS),
                       st.sampled_from(BIG_BYTES))
STRING = st.sampled_from([0] * 9 + [1]).flatmap(lambda big: BIG_STRING if big else SMALL_STRING)  # 1 in 10 huge
INT32_EDGES = [0, 1, -1, 2, 8, 16, 24, 32, 64, 65, 255, 256, 512, 4096, 2**31 - 1, -(2**31), 2**30]
INT32 = st.sampled_from(INT32_EDGES) | st.integers(-(2**31), 2**31 - 1)
UINT64 = st.sampled_from([0, 1, 2**31, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)
FLOAT_EDGES = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, -1.0, 0.5, 1.0, 2.0, 3.4e38, -3.4e38]
FLOAT32 = st.sampled_from(FLOAT_EDGES) | st.floats(width=32)
DOUBLE = st.sampled_from([*FLOAT_EDGES, 1e308, -1e308, 5e-324, 101.0, 100.0]) | st.floats()
ENUM = st.sampled_from([0, 1, 2, 3, 99, -1, 2**31 - 1, -(2**31)]) | st.integers(-(2**31), 2**31 - 1)


def optional(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | values


def model_name(valid: str) -> st.SearchStrategy:
    return st.just(valid) | st.just(valid) | STRING  # two in three reach the model


def repeated(values: st.SearchStrategy, item: Any) -> st.SearchStrategy:
    """A short list of drawn values, or a huge one of one value (`("many", item, n)`)."""
    many = st.sampled_from([1025, 10_000, 100_000]).map(lambda n: ("many", item, n))
    return st.sampled_from([0] * 7 + [1]).flatmap(lambda huge: many if huge else st.lists(values, max_size=6))


DOCUMENT = st.fixed_dictionaries({"id": STRING, "text": STRING})
SMALL_DOCUMENT = (("id", "d"), ("text", "A short document about the os module and its functions."))
METHOD_NAMES = ["sharma", "gopher_repetition", "gopher_quality", "c4", "fineweb", "long_file", "", "SHARMA",
                "nope", "sharma\x00"]
EMBEDDING_METHODS = ["semdedup", "outlier"]
THRESHOLD_KEYS = ["sharma.min", "gopher_quality.min_doc_words", "long_file.drop_top_percent", "c4.max_line_words",
                  "nodot", ".x", "x.", "gopher_repetition.top_2_gram"]
IMAGES = ["png_1x1", "png_32", "png_huge_header", "png_truncated", "png_bad_crc", "gif", "jpeg", "bmp", "empty",
          "png_4096_zeros", "png_zero_size"]
IMAGE_BYTES = (st.binary(max_size=512) | st.sampled_from(IMAGES).map(lambda name: ("image", name))
               | st.builds(Big, st.sampled_from([b"\x00", b"\x89PNG"]), st.sampled_from([4096, 1 << 20])))


def fields(embeddings: bool) -> dict[str, dict[str, st.SearchStrategy]]:
    """Every request message's fields -> its hostile values (None: the optional field left unset)."""
    methods = st.sampled_from(METHOD_NAMES + (EMBEDDING_METHODS if embeddings else []))
    return {
        "GenerateRequest": {
            "model": model_name(TEXT_MODEL), "prompt": STRING, "max_new_tokens": optional(INT32),
            "temperature": optional(FLOAT32), "top_p": optional(FLOAT32), "top_k": optional(INT32),
            "seed": optional(UINT64), "stop": repeated(SMALL_STRING, "\n"), "request_id": STRING,
            "cache_policy": ENUM},
        "GenerateImageRequest": {
            "model": model_name(IMAGE_MODEL), "prompt": STRING, "steps": optional(INT32),
            "guidance_scale": optional(FLOAT32), "seed": optional(UINT64), "size": optional(INT32),
            "request_id": STRING},
        "CaptionRequest": {"model": model_name(IMAGE_MODEL), "image": IMAGE_BYTES, "max_tokens": optional(INT32),
                           "request_id": STRING},
        "GenerateInterleavedRequest": {
            "model": model_name(IMAGE_MODEL), "prompt": STRING, "max_tokens": optional(INT32),
            "max_images": optional(INT32), "steps": optional(INT32), "guidance_scale": optional(FLOAT32),
            "seed": optional(UINT64), "request_id": STRING},
        "ScoreRequest": {
            "documents": repeated(DOCUMENT, SMALL_DOCUMENT), "methods": repeated(methods, "sharma"),
            "thresholds": st.dictionaries(st.sampled_from(THRESHOLD_KEYS) | SMALL_STRING, DOUBLE, max_size=4),
            "mode": ENUM, "min_score": optional(DOUBLE), "drop_bottom_percent": optional(DOUBLE),
            "line_spans": st.booleans(), "request_id": STRING,
            "rule_profile": st.sampled_from(["", "datatrove", "gopher-paper"]) | SMALL_STRING},
        "HealthCheckRequest": {"service": st.sampled_from(["", "prunefusion.v1.TextGeneration"]) | STRING},
        "ListModelsRequest": {}, "ListImageModelsRequest": {}, "QualityInfoRequest": {},
    }


def message_name(method: str) -> str:
    return METHODS[method][0].DESCRIPTOR.name


# ---- raw and malformed protobuf ---------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def length_delimited(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


# name -> (arguments' strategy, builder(arguments) -> body bytes)
MALFORMED: dict[str, tuple[st.SearchStrategy, Any]] = {
    "bad_utf8": (st.tuples(st.integers(1, 10), st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\xfe"])),
                 lambda a: length_delimited(a[0], a[1])),
    "nested_bad_utf8": (st.integers(1, 2), lambda a: length_delimited(1, length_delimited(a, b"\xff\xfe"))),
    "wrong_wire_type": (st.tuples(st.integers(1, 10), st.sampled_from([0, 1, 2, 5])),
                        lambda a: tag(a[0], a[1]) + {0: varint(7), 1: bytes(8), 2: b"\x01x", 5: bytes(4)}[a[1]]),
    "invalid_wire_type": (st.tuples(st.integers(1, 10), st.sampled_from([6, 7])), lambda a: tag(*a) + b"\x00"),
    "field_zero": (st.sampled_from([0, 2]), lambda w: tag(0, w) + b"\x00"),
    "field_max": (st.sampled_from([2**29 - 1, 19_000, 19_999]), lambda f: tag(f, 0) + b"\x01"),
    "overlong_varint": (st.integers(10, 64), lambda n: tag(3, 0) + b"\xff" * n + b"\x01"),
    "length_past_end": (st.sampled_from([1, 2**31 - 1, 2**32, 2**64 - 1]), lambda n: tag(2, 2) + varint(n) + b"ab"),
    "deep_groups": (st.sampled_from([10, 99, 100, 101, 1000, 20_000]),
                    lambda n: tag(99, 3) * n + tag(99, 4) * n),
    "unclosed_groups": (st.sampled_from([1, 100, 5000]), lambda n: tag(99, 3) * n),
    "unmatched_end_group": (st.integers(1, 99), lambda f: tag(f, 4)),
    "deep_messages": (st.sampled_from([10, 100, 101, 1000]), lambda n: _nested(1, n)),
    "truncated_varint": (st.integers(1, 10), lambda f: tag(f, 0) + b"\x80"),
    "repeated_field": (st.sampled_from([1000, 100_000]), lambda n: length_delimited(2, b"x") * n),
}


def _nested(field: int, depth: int) -> bytes:
    """`field` holding a message holding `field`..., `depth` deep (recursion limits of nested messages)."""
    body = b""
    for _ in range(depth):
        body = length_delimited(field, body)
    return body


# the mix of a run, in percent: each kind is drawn on its own (hypothesis' own mix of one_of branches drifts far from
# uniform); "fields" last takes up what the small spaces cannot give (there are only 60 distinct bombs)
CASE_WEIGHTS = {"field": 40, "malformed": 20, "gzip": 8, "raw": 5, "bomb": 2, "fields": 25}
VALID = {  # a request each method answers OK (the warm-up sends these): the base of a one-hostile-field case
    "GenerateRequest": {"model": TEXT_MODEL, "prompt": "The os module", "max_new_tokens": 8, "cache_policy": 1},
    "GenerateImageRequest": {"model": IMAGE_MODEL, "prompt": "a red circle on the left", "steps": 2, "size": 32},
    "CaptionRequest": {"model": IMAGE_MODEL, "image": ("image", "png_32"), "max_tokens": 8},
    "GenerateInterleavedRequest": {"model": IMAGE_MODEL, "prompt": "a red circle on the left", "max_tokens": 8,
                                   "max_images": 1, "steps": 2},
    "ScoreRequest": {"documents": (SMALL_DOCUMENT,)},
}


# ---- whole cases ------------------------------------------------------------------------------------------------
def fields_case(field_table: dict, method: str) -> st.SearchStrategy:
    values = st.fixed_dictionaries(field_table[message_name(method)])
    return values.map(lambda v: Case(method, "fields", _freeze({k: x for k, x in v.items() if x is not None})))


def one_field_case(field_table: dict, method: str) -> st.SearchStrategy:
    """A valid request (VALID) with one field drawn hostile: reaches the checks behind the first bad field."""
    table, base = field_table[message_name(method)], VALID.get(message_name(method), {})
    if not table:  # an empty message: nothing to make hostile here (raw and malformed cases add unknown fields)
        return st.just(valid_case(method))
    return st.sampled_from(sorted(table)).flatmap(lambda name: table[name].map(
        lambda v: Case(method, "field", _freeze({k: x for k, x in {**base, name: v}.items() if x is not None}))))


def valid_case(method: str) -> Case:
    return Case(method, "field", _freeze(VALID.get(message_name(method), {})))


def kind_strategies(embeddings: bool = False) -> dict[str, st.SearchStrategy]:
    table = fields(embeddings)
    methods = st.sampled_from(list(METHODS))
    by_fields = methods.flatmap(lambda m: fields_case(table, m))
    by_field = methods.flatmap(lambda m: one_field_case(table, m))
    raw = st.builds(lambda m, b: Case(m, "raw", b), methods, st.binary(max_size=512))
    malformed = methods.flatmap(lambda m: st.sampled_from(list(MALFORMED)).flatmap(
        lambda name: MALFORMED[name][0].map(lambda args: Case(m, "malformed", (name, args)))))
    zipped = st.one_of(by_field, by_fields, raw).map(lambda c: Case(c.method, "gzip", (c.kind, c.recipe), True))
    bomb = st.builds(lambda m, what: Case(m, "bomb", what, compress=True), methods, st.sampled_from(list(BOMBS)))
    return {"field": by_field, "fields": by_fields, "malformed": malformed, "raw": raw, "gzip": zipped, "bomb": bomb}


class _Enough(Exception):
    """Raised from inside the hypothesis test once enough distinct cases are drawn: the only way to stop @given."""


def distinct(strategy: st.SearchStrategy, n: int) -> list[Case]:
    """Up to `n` distinct values of `strategy`, drawn by hypothesis derandomized (the same list every run; it
    repeats values, so up to 3n examples are drawn)."""
    cases: dict[Case, None] = {}
    if n <= 0:
        return []

    @settings(max_examples=3 * n, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(strategy)
    def collect(case: Case) -> None:
        cases.setdefault(case)
        if len(cases) >= n:
            raise _Enough

    with contextlib.suppress(_Enough):
        collect()
    return list(cases)


def draw_cases(n: int, embeddings: bool = False) -> list[Case]:
    """`n` distinct cases in CASE_WEIGHTS' mix, shuffled with a fixed seed (every batch gets every kind)."""
    strategies, cases = kind_strategies(embeddings), []
    for kind, percent in CASE_WEIGHTS.items():
        cases += distinct(strategies[kind], n - len(cases) if kind == "fields" else round(n * percent / 100))
    random.Random(17).shuffle(cases)
    return cases[:n]


# ---- building a case's bytes ------------------------------------------------------------------------------------
def value_of(value: Any) -> Any:
    if isinstance(value, Big):
        return value.unit * value.times
    if isinstance(value, tuple) and value[:1] == ("image",):
        return _image(value[1])
    return value


def build_message(method: str, recipe: tuple) -> Any:
    cls = METHODS[method][0]
    message = cls()
    for name, value in recipe:
        if isinstance(value, tuple) and value[:1] == ("many",):
            _, item, n = value
            value = [item] * n
        field = getattr(message, name) if cls.DESCRIPTOR.fields_by_name[name].is_repeated else None
        if name == "thresholds":
            field.update({k: value_of(v) for k, v in value})
        elif name == "documents":
            field.extend(qf.Document(**{k: value_of(v) for k, v in doc}) for doc in value)
        elif field is not None:
            field.extend(value_of(v) for v in value)
        else:
            setattr(message, name, value_of(value))
    return message


BOMB_BYTES = 8 << 20  # decompressed size: well under the server's receive limit, ~8 KiB on the wire
BOMBS = {
    "zeros": lambda: bytes(BOMB_BYTES),  # field number 0: not protobuf at all
    "prompt": lambda: tg.GenerateRequest(model=TEXT_MODEL, prompt="\x00" * BOMB_BYTES).SerializeToString(),
    "stop": lambda: tg.GenerateRequest(model=TEXT_MODEL, stop=["\n"] * (BOMB_BYTES // 3)).SerializeToString(),
    "documents": lambda: qf.ScoreRequest(documents=[qf.Document(id="d", text="a " * (BOMB_BYTES // 2))]
                                         ).SerializeToString(),
    "unknown_field": lambda: length_delimited(77, bytes(BOMB_BYTES - 8)),
}


@functools.cache
def _bomb(name: str) -> bytes:
    return BOMBS[name]()


@functools.cache
def _image(name: str) -> bytes:
    return IMAGE_BUILDERS[name]()


def bodies(case: Case) -> list[bytes]:
    """The request messages of a case, serialized; a client-streaming method gets a few (and an empty stream)."""
    kind, recipe = (recipe_kind := case.kind), case.recipe
    if kind == "gzip":
        kind, recipe = recipe
    if kind == "bomb":
        body = _bomb(recipe)
    elif kind == "raw":
        body = recipe
    elif kind == "malformed":
        name, args = recipe
        body = MALFORMED[name][1](args)
    else:
        body = build_message(case.method, recipe).SerializeToString()
    if METHODS[case.method][1] == "bidi" and recipe_kind in ("field", "fields"):
        return [body] * (len(body) % 4)  # 0 to 3 messages: the empty stream too
    return [body]


# ---- images for Caption -----------------------------------------------------------------------------------------
def _encoded(fmt: str, side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 0, 0)).save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _png_of(side: int, idat: bytes | None = None, crc: int | None = None) -> bytes:
    """A PNG's signature and header for side x side RGB (its CRC forced when given), an IDAT if given, IEND."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0), crc)
    return b"\x89PNG\r\n\x1a\n" + ihdr + (_chunk(b"IDAT", idat) if idat else b"") + _chunk(b"IEND", b"")


IMAGE_BUILDERS = {
    "png_1x1": lambda: _encoded("PNG", 1), "png_32": lambda: _encoded("PNG", 32),
    "png_huge_header": lambda: _png_of(20_000), "png_truncated": lambda: _encoded("PNG", 32)[:40],
    "png_bad_crc": lambda: _png_of(32, crc=0), "png_zero_size": lambda: _png_of(0), "empty": lambda: b"",
    "gif": lambda: _encoded("GIF", 16), "jpeg": lambda: _encoded("JPEG", 16), "bmp": lambda: _encoded("BMP", 16),
    # 48 MiB of pixels inflated from ~50 KiB: a decompression bomb behind a plausible header
    "png_4096_zeros": lambda: _png_of(4096, zlib.compress(bytes((4096 * 3 + 1) * 4096), 9)),
}


def describe(case: Case) -> dict[str, Any]:
    """A case as JSON-able data (Big values as {"repeat": unit, "times": n}; bytes as latin-1 text)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Big):
            unit = value.unit.decode("latin-1") if isinstance(value.unit, bytes) else value.unit
            return {"repeat": unit, "times": value.times}
        if isinstance(value, bytes):
            return {"bytes_latin1": value[:4096].decode("latin-1"), "length": len(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return repr(value)
        return value

    return {"method": case.method, "kind": case.kind, "compress": case.compress, "recipe": plain(case.recipe)}


__all__ = ["BOMBS", "Big", "Case", "METHODS", "bodies", "describe", "draw_cases", "message_name"]
