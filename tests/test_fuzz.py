"""Property-based fuzzing of the two parsers that read outside input: ``read_idx`` and the
config reader/builder. Each input ends in a valid result or the project's own error, never
another exception, a hang or an allocation out of proportion to the file. 300 examples per
test by default; set LP_FUZZ_EXAMPLES (e.g. 4000) to search longer."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import struct
import time
import tracemalloc
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from logitpair.config import DataConfig, OptimConfig, RunConfig, build, make_config, to_dict
from logitpair.data.idx import _TYPES, read_idx
from logitpair.errors import ConfigError, DataError, LogitpairError
from logitpair.methods import METHODS

FUZZ = settings(
    max_examples=int(os.environ.get("LP_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- read_idx
def header(code: int, dims: list[int]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def check_idx(path: Path, payload: bytes, announced: tuple[int, int, list[int]] | None = None) -> None:
    """read_idx gives an array or DataError, quickly and without a large allocation; an array
    matches the header that produced it."""
    path.write_bytes(payload)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        arr = read_idx(path)
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        arr = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    event("array" if arr is not None else "DataError")
    # reading may hold the file, its decompressed body and the native-endian copy, no more
    raw = len(gzip.decompress(payload)) if payload[:2] == b"\x1f\x8b" and arr is not None else len(payload)
    assert peak < 4 * raw + (4 << 20), f"peak allocation {peak} for a {len(payload)}-byte file"
    if arr is not None:
        assert isinstance(arr, np.ndarray) and arr.dtype.isnative and arr.ndim >= 1
        if announced is not None:
            code, _, dims = announced
            assert arr.dtype == _TYPES[code].newbyteorder("=") and list(arr.shape) == dims
            assert arr.size == math.prod(dims)


@FUZZ
@given(data=st.binary(max_size=300), gz=st.booleans())
@example(data=b"", gz=False)
@example(data=b"\x1f\x8b", gz=False)
@example(data=header(0x08, [4, 1 << 30]), gz=False)  # 4 GiB announced in 12 bytes
@example(data=header(0x08, [4, 1 << 30]), gz=True)
def test_read_idx_arbitrary_bytes(scratch, data, gz):
    check_idx(scratch / "a.idx", gzip.compress(data) if gz else data)


@FUZZ
@given(data=st.binary(min_size=2, max_size=300))
def test_read_idx_corrupt_gzip_stream(scratch, data):
    """Bytes that start with the gzip magic but are not (or not only) a valid gzip stream."""
    check_idx(scratch / "b.idx.gz", b"\x1f\x8b" + data)


small_dim = st.integers(0, 6)
any_dim = st.one_of(small_dim, st.integers(0, 2**32 - 1), st.sampled_from([2**31, 2**32 - 1, 1 << 16]))


@FUZZ
@given(
    code=st.one_of(st.sampled_from(sorted(_TYPES)), st.sampled_from(sorted(_TYPES)), st.integers(0, 255)),
    dims=st.one_of(st.lists(small_dim, min_size=1, max_size=4), st.lists(any_dim, max_size=5)),
    body=st.one_of(st.none(), st.none(), st.binary(max_size=400)),
    delta=st.sampled_from([0, 0, 0, 0, 0, -1, 1, -7]),
    gz=st.booleans(),
    tail=st.binary(max_size=3),
)
def test_read_idx_valid_headers(scratch, code, dims, body, delta, gz, tail):
    """Well-formed headers with random type codes and sizes; the body is either exactly what
    the header needs (+ delta bytes), when that is small, or random bytes."""
    raw = header(code, dims)
    need = math.prod(dims) * (_TYPES[code].itemsize if code in _TYPES else 1)
    if body is None and need <= 4096:
        body = bytes(max(need + delta, 0)) if delta >= 0 else bytes(range(256)) * 16
        body = body[: max(need + delta, 0)]
    raw += body or b""
    raw += tail if delta else b""
    announced = (code, len(dims), dims) if code in _TYPES else None
    check_idx(scratch / ("c.idx.gz" if gz else "c.idx"), gzip.compress(raw) if gz else raw, announced)


@pytest.mark.parametrize("gz", [False, True])
def test_huge_header_in_tiny_file_fails_fast(tmp_path, gz):
    """4 GiB (and 2**96 bytes) announced in a ~30-byte file: DataError at once, no allocation."""
    for dims in ([1 << 16, 1 << 16], [2**32 - 1] * 3, [1 << 12, 1 << 10, 1 << 10]):
        raw = header(0x08, dims) + bytes(30 - 4 - 4 * len(dims))
        path = tmp_path / ("h.idx.gz" if gz else "h.idx")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(DataError, match="needs|impossible"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert time.perf_counter() - t0 < 1.0 and peak < 4 << 20


# --------------------------------------------------------------------------- config
SECTIONS = {"": RunConfig, "data": DataConfig, "optim": OptimConfig, "loss": METHODS.settings("alp")}  # default method
LOSS_CLASSES = [METHODS.settings(m) for m in METHODS.names()]
KEYS = sorted({f.name for cls in [*SECTIONS.values(), *LOSS_CLASSES] for f in dataclasses.fields(cls)})
NAMES = ["lenet5", "lenet", "alp", "clp", "lsq", "mpgd", "regular", "adam", "sgd", "rmsprop", "cosine",
         "step", "constant", "last", "best-robust", "skip", "stop", "l2sq", "l1", "mean", "sum"]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**30, 2**64 - 1, 2**31]),
    st.floats(),  # includes nan, inf, -0.0, subnormals
    st.text(max_size=8),
    st.sampled_from(
        [
            "8/255",
            "1/0",
            "1e400",
            "-1e400",
            "nan",
            "inf",
            "0x10",
            "1_000",
            " 3 ",
            "2.0",
            "true",
            "yes",
            "0",
            "-1",
            "1" * 5000,
            "9" * 400 + "/1",
        ]
        + NAMES
    ),
)
keys = st.one_of(st.sampled_from(KEYS + list(SECTIONS)[1:]), st.text(max_size=6), st.integers(-2, 2), st.none())
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(keys, kids, max_size=4)),
                      max_leaves=12)  # fmt: skip


def field_value(hint: typing.Any, default: typing.Any) -> st.SearchStrategy:
    """Mostly plausible values for one config field (its default among them), hostile ones mixed in."""
    if dataclasses.is_dataclass(hint):
        return section(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = {int: st.integers(-2, 40), float: st.one_of(st.floats(-2, 2), st.sampled_from([".5", "8/255", "-1/3"])),
            bool: st.booleans(), str: st.sampled_from(NAMES)}[args[0]]  # fmt: skip
    return st.one_of(st.just(default), st.just(default), base, base, scalars, values)


def section(cls: type) -> st.SearchStrategy:
    hints, proto = typing.get_type_hints(cls), build(cls, {})
    fields = {f.name: field_value(hints[f.name], getattr(proto, f.name)) for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def one_change(draw: st.DrawFn) -> dict:
    """The defaults with one or two fields set to a hostile or plausible value."""
    out: dict = {}
    for _ in range(draw(st.integers(1, 2))):
        sec = draw(st.sampled_from(list(SECTIONS)))
        cls, hints = SECTIONS[sec], typing.get_type_hints(SECTIONS[sec])
        name = draw(st.sampled_from([k for k, h in hints.items() if not dataclasses.is_dataclass(h)]))
        value = draw(st.one_of(field_value(hints[name], getattr(build(cls, {}), name)), scalars))
        (out.setdefault(sec, {}) if sec else out)[name] = value
    return out


mappings = st.one_of(section(RunConfig), one_change(), st.dictionaries(keys, values, max_size=5))


def check_config(cfg: RunConfig) -> None:
    """What every accepted config must satisfy: finite floats, int64-sized ints, a faithful
    JSON round trip (it is written to config.json and compared on --resume)."""
    d = to_dict(cfg)
    text = json.dumps(d, allow_nan=False)
    assert build(RunConfig, json.loads(text)) == cfg

    def walk(v: typing.Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, float):
            assert math.isfinite(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            assert -(2**63) <= v < 2**63

    walk(d)
    assert 0 <= cfg.loss.eps <= 1 and cfg.optim.batch_size >= 1 and getattr(cfg.loss, "attack_steps", 1) >= 1
    torch.Generator().manual_seed(cfg.seed * 100_003 + 10_000)  # the seeds train() derives


@FUZZ
@given(mapping=mappings)
@example(mapping={"loss": {"eps": float("nan")}})
@example(mapping={"optim": {"lr": float("inf")}})
@example(mapping={"seed": 10**30})
@example(mapping={"optim": {"epochs": True}})
@example(mapping={"loss": {"eps": "1e400"}})
@example(mapping={1: 2, "a": 3})
@example(mapping={"data": [1, 2]})
def test_build_random_mappings(mapping):
    try:
        cfg = build(RunConfig, mapping)
    except LogitpairError as exc:
        assert "\n" not in str(exc)
        event("ConfigError")
        return
    event("RunConfig")
    check_config(cfg)


def dump(mapping: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(mapping, default=str)
    if fmt == "yaml":
        return yaml.safe_dump(mapping, default_flow_style=bool(len(mapping) % 2))
    lines, tables = [], []  # a small TOML writer; unsupported values become strings

    def tv(v: typing.Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
        if isinstance(v, list):
            return "[" + ", ".join(tv(x) for x in v) + "]"
        return json.dumps(str(v))

    for k, v in mapping.items():
        if isinstance(v, dict):
            tables.append(
                f"[{json.dumps(str(k))}]\n"
                + "".join(f"{json.dumps(str(a))} = {tv(b)}\n" for a, b in v.items() if not isinstance(b, dict))
            )
        else:
            lines.append(f"{json.dumps(str(k))} = {tv(v)}\n")
    return "".join(lines) + "".join(tables)


YAML_TOKENS = st.sampled_from([".nan", ".inf", "-.inf", "1.0e+400", "8/255", "~", "yes", "no", "0x1F", "0o17",
                               "2001-01-01", "[1, 2]", "{a: 1}", "&a [*a]", "!!python/object:os.system", "'1'",
                               "99999999999999999999999", "-1", "0", "3", "0.5", "lenet5", "alp", "\"\"", "|\n  x"])  # fmt: skip


@st.composite
def yaml_lines(draw: st.DrawFn) -> str:
    """Line-level YAML built from real keys and YAML's odd scalars (NaN, inf, dates, tags...)."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        sec = draw(st.sampled_from(["", "data", "optim", "loss"]))
        key = draw(st.sampled_from(KEYS))
        val = draw(YAML_TOKENS)
        out.append(f"{sec}:\n  {key}: {val}\n" if sec else f"{key}: {val}\n")
    return "".join(out)


text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)


@FUZZ
@given(fmt=st.sampled_from(["yaml", "toml", "json"]),
       body=st.one_of(text, mappings.map(lambda m: ("dump", m)), yaml_lines()))  # fmt: skip
@example(fmt="yaml", body="loss:\n  eps: .nan\n")
@example(fmt="yaml", body="optim: 3\n")
@example(fmt="yaml", body="- 1\n- 2\n")
@example(fmt="json", body='{"loss": {"eps": Infinity}}')
@example(fmt="toml", body="seed = 99999999999999999999\n")
@example(fmt="yaml", body="a: &x [*x]\n")
def test_read_config_file_arbitrary_text(scratch, fmt, body):
    if isinstance(body, tuple):
        body = dump(body[1], fmt)
    path = scratch / f"c.{fmt}"
    path.write_text(body, encoding="utf-8")
    try:
        cfg = make_config(path)
    except LogitpairError as exc:
        assert isinstance(exc, ConfigError) and "\n" not in str(exc)
        event("ConfigError")
        return
    event("RunConfig")
    check_config(cfg)
