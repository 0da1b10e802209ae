"""The GGUF loader (cpp/src/gguf.cpp).

References: files written by the gguf package's GGUFWriter must read back with the values,
shapes and bytes that gguf's own GGUFReader sees; the format is ggml's docs/gguf.md. Corrupt
files, made with a small spec-level writer below (itself checked against GGUFReader), must raise
ValueError with a message that names the problem, never crash or hang.
"""

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from prosparse_rt._core import _testing as core  # noqa: E402

# ---------------------------------------------------------------------------------------------
# A spec-level GGUF writer for files GGUFWriter refuses to produce (corrupt ones).

_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I",
           V.INT32: "<i", V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q",
           V.FLOAT64: "<d"}


def _str(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype, val, sub=None) -> bytes:
    if vtype == V.STRING:
        return _str(val)
    if vtype == V.ARRAY:
        return struct.pack("<IQ", sub, len(val)) + b"".join(_value(sub, v) for v in val)
    return struct.pack(_SCALAR[vtype], val)


def _nbytes(shape, qtype) -> int:
    block, size = GGML_QUANT_SIZES[T(qtype)]
    return int(np.prod(shape)) // block * size


def build_gguf(kvs=(), tensors=(), *, magic=b"GGUF", version=3, alignment=32, n_kv=None,
               n_tensors=None) -> bytes:
    """kvs: (key, vtype, value[, array element type]); tensors: dicts with name, shape (ggml
    order), type, and optionally data and offset (relative to the data section)."""
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)
    for kv in kvs:
        key, vtype, val = kv[:3]
        out += _str(key) + struct.pack("<I", vtype) + _value(vtype, val, *kv[3:])
    blobs, next_off = [], 0
    for t in tensors:
        data = t.get("data")
        if data is None:
            data = bytes(_nbytes(t["shape"], t["type"]))
        off = t.get("offset", next_off)
        blobs.append((off, data))
        next_off = max(next_off, off + len(data) + (-len(data)) % alignment)
        out += _str(t["name"]) + struct.pack("<I", len(t["shape"]))
        out += struct.pack(f"<{len(t['shape'])}Q", *t["shape"]) + struct.pack("<IQ", t["type"], off)
    if tensors:  # the data section starts aligned; a file without tensors may end unpadded
        out += bytes((-len(out)) % alignment)
    data_start = len(out)
    for off, data in blobs:
        if not data:
            continue
        end = data_start + off + len(data)
        if len(out) < end:
            out += bytes(end - len(out))
        out[data_start + off : end] = data
    return bytes(out)


def _write(tmp_path, data: bytes, name="m.gguf") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _f32_tensor(name="w", shape=(32, 2)):
    return {"name": name, "shape": list(shape), "type": int(T.F32)}


def _load_error(tmp_path, data: bytes) -> str:
    with pytest.raises(ValueError) as e:
        core.gguf_summary(_write(tmp_path, data))
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# Reading what the gguf package writes

SCALARS = [  # (writer method, key, value, value as read back)
    ("add_uint8", "s.u8", 255, 255),
    ("add_int8", "s.i8", -128, -128),
    ("add_uint16", "s.u16", 65535, 65535),
    ("add_int16", "s.i16", -32768, -32768),
    ("add_uint32", "s.u32", 4294967295, 4294967295),
    ("add_int32", "s.i32", -2147483648, -2147483648),
    ("add_uint64", "s.u64", 2**64 - 1, 2**64 - 1),
    ("add_int64", "s.i64", -(2**63), -(2**63)),
    ("add_float32", "s.f32", 0.1, float(np.float32(0.1))),
    ("add_float64", "s.f64", 0.1, 0.1),
    ("add_bool", "s.bool_t", True, True),
    ("add_bool", "s.bool_f", False, False),
    ("add_string", "s.str", "ünïcödé ✓ 中文", "ünïcödé ✓ 中文"),
]
ARRAYS = [  # (key, element type, values)
    ("a.u8", V.UINT8, [0, 1, 255]),
    ("a.i8", V.INT8, [-128, 0, 127]),
    ("a.u16", V.UINT16, [0, 65535]),
    ("a.i16", V.INT16, [-32768, 32767]),
    ("a.u32", V.UINT32, [0, 4294967295]),
    ("a.i32", V.INT32, [-5, 6, 7]),
    ("a.u64", V.UINT64, [0, 2**64 - 1]),
    ("a.i64", V.INT64, [-(2**63), 2**63 - 1]),
    ("a.f32", V.FLOAT32, [0.5, -1.25, 3.0e38]),
    ("a.f64", V.FLOAT64, [0.1, -1e300]),
    ("a.bool", V.BOOL, [True, False, True]),
    ("a.str", V.STRING, ["a", "", "ß✓", "<0x0A>"]),
]


@pytest.fixture(scope="module")
def writer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "writer.gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    for method, key, value, _ in SCALARS:
        getattr(w, method)(key, value)
    for key, sub, values in ARRAYS:
        w.add_key_value(key, values, V.ARRAY, sub_type=sub)
    tensors = {}
    for qtype, shape in [(T.F32, (3, 64)), (T.F16, (2, 2, 32)), (T.BF16, (5, 96)),
                         (T.Q8_0, (4, 64)), (T.Q4_0, (2, 3, 4, 32)), (T.Q4_1, (7, 32)),
                         (T.F32, (40,))]:
        x = rng.standard_normal(shape).astype(np.float32)
        name = f"t.{qtype.name.lower()}.{len(shape)}d"
        if qtype == T.F32:
            w.add_tensor(name, x)
            raw = x.tobytes()
        else:
            q = quantize(x, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            raw = q.tobytes()
        tensors[name] = (qtype, shape, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


def test_metadata_of_every_scalar_type_reads_back(writer_file):
    path, _ = writer_file
    md = core.gguf_summary(path)["metadata"]
    assert md["general.architecture"] == "llama"
    for _, key, _, expected in SCALARS:
        assert md[key] == expected, key
        assert type(md[key]) is type(expected), key


def test_metadata_arrays_of_every_element_type_read_back(writer_file):
    path, _ = writer_file
    md = core.gguf_summary(path)["metadata"]
    for key, sub, values in ARRAYS:
        expected = [float(np.float32(v)) for v in values] if sub == V.FLOAT32 else values
        assert md[key] == expected, key


def test_metadata_agrees_with_gguf_reader(writer_file):
    path, _ = writer_file
    ours = core.gguf_summary(path)["metadata"]
    reader = gguf.GGUFReader(path)
    keys = [f.name for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    assert list(ours) == keys  # same keys, in file order
    for f in reader.fields.values():
        if f.name.startswith("GGUF."):
            continue
        ref = f.contents()
        if isinstance(ref, float) or (isinstance(ref, list) and ref and isinstance(ref[0], float)):
            np.testing.assert_array_equal(ours[f.name], ref)
        else:
            assert ours[f.name] == ref, f.name


def test_tensors_read_back_with_type_shape_and_bytes(writer_file):
    path, tensors = writer_file
    summary = core.gguf_summary(path)
    assert [t[0] for t in summary["tensors"]] == list(tensors)  # file order
    for name, type_name, shape, nbytes in summary["tensors"]:
        qtype, np_shape, raw = tensors[name]
        assert type_name == qtype.name.lower()
        assert shape == list(reversed(np_shape))  # ggml order: fastest dimension first
        assert nbytes == len(raw)
        assert core.gguf_tensor_bytes(path, name) == raw, name


def test_tensor_offsets_agree_with_gguf_reader(writer_file):
    path, _ = writer_file
    for t in gguf.GGUFReader(path).tensors:
        assert core.gguf_tensor_bytes(path, t.name) == t.data.tobytes(), t.name


def test_version_and_powerinfer_flag(writer_file):
    path, _ = writer_file
    s = core.gguf_summary(path)
    assert (s["version"], s["powerinfer"]) == (3, False)


def test_powerinfer_magic_reads_like_gguf(tmp_path, writer_file):
    # PowerInfer writes the same layout under the magic "PWRI".
    path, tensors = writer_file
    data = bytearray(open(path, "rb").read())
    data[:4] = b"PWRI"
    p = _write(tmp_path, bytes(data))
    s = core.gguf_summary(p)
    assert s["powerinfer"] is True
    assert s["tensors"] == core.gguf_summary(path)["tensors"]


def test_version_2_reads_like_version_3(tmp_path):
    # v2 and v3 differ only in v3 allowing big-endian files.
    kvs = [("k", V.UINT32, 7)]
    s = core.gguf_summary(_write(tmp_path, build_gguf(kvs, [_f32_tensor()], version=2)))
    assert s["version"] == 2 and s["metadata"] == {"k": 7}


def test_custom_alignment_is_honoured(tmp_path):
    path = str(tmp_path / "a64.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    a = np.arange(3 * 32, dtype=np.float32).reshape(3, 32)
    b = np.arange(5, dtype=np.float32)  # 20 bytes: the next tensor needs 44 bytes of padding
    c = np.full((1, 32), 7, np.float32)
    for name, x in [("a", a), ("b", b), ("c", c)]:
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name, x in [("a", a), ("b", b), ("c", c)]:
        assert core.gguf_tensor_bytes(path, name) == x.tobytes()


def test_spec_writer_used_below_produces_files_gguf_reader_accepts(tmp_path):
    kvs = [("x.u32", V.UINT32, 5), ("x.arr", V.ARRAY, ["a", "bc"], V.STRING)]
    data = bytes(range(256)) * 1
    tensors = [{"name": "w", "shape": [64, 2], "type": int(T.F16), "data": data}]
    p = _write(tmp_path, build_gguf(kvs, tensors))
    r = gguf.GGUFReader(p)
    assert r.fields["x.u32"].contents() == 5 and r.fields["x.arr"].contents() == ["a", "bc"]
    assert r.tensors[0].data.tobytes() == data
    assert core.gguf_tensor_bytes(p, "w") == data


def test_file_without_tensors_loads(tmp_path):
    # (GGUFWriter silently drops empty strings, so the empty string is written here.)
    s = core.gguf_summary(_write(tmp_path, build_gguf([("k", V.STRING, "v"), ("e", V.STRING, "")])))
    assert s["tensors"] == [] and s["metadata"] == {"k": "v", "e": ""}


def test_empty_array_reads_back(tmp_path):
    p = _write(tmp_path, build_gguf([("e", V.ARRAY, [], V.INT32)]))
    assert core.gguf_summary(p)["metadata"]["e"] == []
    assert core.gguf_get(p, "e", "int_array") == []


# ---------------------------------------------------------------------------------------------
# Typed getters (GGUFFile::get_*)

def test_get_int_accepts_every_integer_type(writer_file):
    path, _ = writer_file
    for key in ["s.u8", "s.i8", "s.u16", "s.i16", "s.u32", "s.i32", "s.i64"]:
        expected = next(v for _, k, v, _ in SCALARS if k == key)
        assert core.gguf_get(path, key, "int") == expected


def test_get_int_refuses_uint64_beyond_int64(writer_file):
    path, _ = writer_file
    with pytest.raises(ValueError, match=r"'s\.u64'.*out of range"):
        core.gguf_get(path, "s.u64", "int")


def test_get_float_accepts_floats_and_integers(writer_file):
    path, _ = writer_file
    assert core.gguf_get(path, "s.f32", "float") == float(np.float32(0.1))
    assert core.gguf_get(path, "s.f64", "float") == 0.1
    assert core.gguf_get(path, "s.i16", "float") == -32768.0


def test_wrong_type_names_the_key_and_both_types(writer_file):
    path, _ = writer_file
    with pytest.raises(ValueError, match=r"'s\.str' has type string, expected an integer"):
        core.gguf_get(path, "s.str", "int")
    with pytest.raises(ValueError, match=r"'s\.u32' has type uint32, expected string"):
        core.gguf_get(path, "s.u32", "str")
    with pytest.raises(ValueError, match=r"'s\.u8' has type uint8, expected bool"):
        core.gguf_get(path, "s.u8", "bool")
    with pytest.raises(ValueError, match=r"'a\.i32' has type array of int32, expected array of string"):
        core.gguf_get(path, "a.i32", "str_array")
    with pytest.raises(ValueError, match=r"'a\.str' has type array of string, expected array of numbers"):
        core.gguf_get(path, "a.str", "float_array")


def test_get_str_refuses_a_string_that_is_not_utf8_naming_file_and_key(tmp_path):
    p = _write(tmp_path, build_gguf([("k.bad", V.STRING, b"ab\xff"), ("k.ok", V.STRING, "fine")]))
    with pytest.raises(ValueError, match=r"'k\.bad' holds a string that is not valid UTF-8") as e:
        core.gguf_get(p, "k.bad", "str")
    assert p in str(e.value)
    assert core.gguf_get(p, "k.ok", "str") == "fine"
    # Strings are checked where they are read as text: the file itself loads.
    assert core.gguf_summary(p)["metadata"]["k.bad"] == "ab\ufffd"


def test_missing_key(writer_file):
    path, _ = writer_file
    with pytest.raises(ValueError, match=r"'no\.such\.key' is missing"):
        core.gguf_get(path, "no.such.key", "str")
    assert core.gguf_get(path, "no.such.key", "str_array") == []  # arrays: absent means empty
    assert core.gguf_get(path, "no.such.key", "bool") is False  # the default


def test_array_getters(writer_file):
    path, _ = writer_file
    assert core.gguf_get(path, "a.str", "str_array") == ["a", "", "ß✓", "<0x0A>"]
    assert core.gguf_get(path, "a.i32", "int_array") == [-5, 6, 7]
    assert core.gguf_get(path, "a.u16", "int_array") == [0, 65535]
    np.testing.assert_array_equal(core.gguf_get(path, "a.f32", "float_array"),
                                  np.array([0.5, -1.25, 3.0e38], np.float32))
    assert core.gguf_get(path, "a.i8", "float_array") == [-128.0, 0.0, 127.0]
    with pytest.raises(ValueError, match=r"'a\.u64'.*out of range"):
        core.gguf_get(path, "a.u64", "int_array")


# ---------------------------------------------------------------------------------------------
# Bad input: each case raises ValueError (FileNotFoundError allowed for a missing file) naming
# the problem.

def test_missing_file(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="does not exist"):
        core.gguf_summary(str(tmp_path / "nope.gguf"))


def test_directory(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        core.gguf_summary(str(tmp_path))


def test_empty_file(tmp_path):
    assert "empty" in _load_error(tmp_path, b"")


@pytest.mark.parametrize("head", [b"GGML" + bytes(20), b"\x89PNG\r\n\x1a\n" + bytes(16),
                                  b"{\"a\": 1}" + bytes(16)])
def test_wrong_magic(tmp_path, head):
    assert "not a GGUF file" in _load_error(tmp_path, head)


@pytest.mark.parametrize("version,message", [(1, "version 1 is not supported"),
                                             (4, "unsupported GGUF version 4"),
                                             (0, "unsupported GGUF version 0"),
                                             (0x03000000, "big-endian")])
def test_unsupported_version(tmp_path, version, message):
    assert message in _load_error(tmp_path, build_gguf(version=version))


def test_every_truncation_of_a_valid_file_is_refused(tmp_path):
    kvs = [("general.name", V.STRING, "tiny"), ("n", V.UINT32, 3),
           ("v", V.ARRAY, ["x", "yy", "zzz"], V.STRING), ("f", V.ARRAY, [1.0, 2.0], V.FLOAT32)]
    tensors = [_f32_tensor("a", (32, 1)), {"name": "b", "shape": [32, 2], "type": int(T.Q8_0)}]
    full = build_gguf(kvs, tensors)  # the last tensor ends exactly at the end of the file
    core.gguf_summary(_write(tmp_path, full))
    p = str(tmp_path / "cut.gguf")
    for n in range(len(full)):
        with open(p, "wb") as f:
            f.write(full[:n])
        with pytest.raises(ValueError, match="truncated|empty|too small") as e:
            core.gguf_summary(p)
        assert p in str(e.value)  # the message names the file


def test_unsupported_tensor_type_is_named(tmp_path):
    path = str(tmp_path / "k.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((2, 136), np.uint8), raw_dtype=T.IQ4_XS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="tensor 'blk.0.ffn_down.weight' has type iq4_xs, which "
                                         "prosparse-rt does not support"):
        core.gguf_summary(path)


def test_unknown_tensor_type_id(tmp_path):
    t = {"name": "w", "shape": [32], "type": 77, "data": bytes(32)}
    assert "tensor 'w' has unknown type id 77" in _load_error(tmp_path, build_gguf([], [t]))


def test_misaligned_tensor_offset(tmp_path):
    t = dict(_f32_tensor(), offset=4)
    assert "not a multiple of the alignment 32" in _load_error(tmp_path, build_gguf([], [t]))


@pytest.mark.parametrize("offset", [1 << 20, 2**64 - 32])  # past the end; wraps around if added
def test_tensor_data_past_end_of_file(tmp_path, offset):
    t = {"name": "w", "shape": [32, 2], "type": int(T.F32), "offset": offset, "data": b""}
    assert "extends past the end of the file" in _load_error(tmp_path, build_gguf([], [t]))


def test_tensor_data_partly_past_end_of_file(tmp_path):
    data = build_gguf([], [_f32_tensor("w", (32, 4))])
    assert "extends past the end" in _load_error(tmp_path, data[:-4])


@pytest.mark.parametrize("field", ["n_kv", "n_tensors"])
@pytest.mark.parametrize("count", [2**63, 2**64 - 1, 10**9])
def test_absurd_counts(tmp_path, field, count):
    msg = _load_error(tmp_path, build_gguf([("k", V.UINT8, 1)], [_f32_tensor()], **{field: count}))
    assert "more than the file can hold" in msg


def test_absurd_string_length(tmp_path):
    data = bytearray(build_gguf([("key", V.STRING, "value")]))
    i = data.index(b"value") - 8
    data[i : i + 8] = struct.pack("<Q", 2**64 - 1)
    assert "truncated" in _load_error(tmp_path, bytes(data))


@pytest.mark.parametrize("sub", [V.UINT8, V.UINT64, V.STRING])
def test_absurd_array_length(tmp_path, sub):
    data = bytearray(build_gguf([("arr", V.ARRAY, [], sub)]))
    data[-8:] = struct.pack("<Q", 2**62)  # the count is the file's last field
    assert "more than the file can hold" in _load_error(tmp_path, bytes(data))


def test_duplicate_metadata_key(tmp_path):
    kvs = [("k", V.UINT32, 1), ("k", V.UINT32, 2)]
    assert "duplicate metadata key 'k'" in _load_error(tmp_path, build_gguf(kvs))


def test_duplicate_tensor_name(tmp_path):
    assert "duplicate tensor name 'w'" in _load_error(
        tmp_path, build_gguf([], [_f32_tensor("w"), _f32_tensor("w")]))


def test_unknown_value_type(tmp_path):
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("k") + struct.pack("<I", 13) + bytes(8)
    assert "key 'k' has unknown value type 13" in _load_error(tmp_path, head)


def test_nested_array_is_refused(tmp_path):
    head = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("k") +
            struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1) + struct.pack("<IQ", V.UINT8, 1) + b"\x00")
    assert "array of arrays" in _load_error(tmp_path, head)


def test_unknown_array_element_type(tmp_path):
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _str("k") + struct.pack("<IIQ", V.ARRAY, 99, 0)
    assert "unknown value type 99" in _load_error(tmp_path, head)


@pytest.mark.parametrize("shape", [[], [32, 1, 1, 1, 1]])
def test_dimension_count_outside_1_to_4(tmp_path, shape):
    t = {"name": "w", "shape": shape, "type": int(T.F32), "data": bytes(128)}
    assert "dimensions (must be 1 to 4)" in _load_error(tmp_path, build_gguf([], [t]))


@pytest.mark.parametrize("shape", [[32, 0], [0], [2**63, 1]])
def test_invalid_dimension(tmp_path, shape):
    t = {"name": "w", "shape": shape, "type": int(T.F32), "data": b""}
    assert "invalid dimension" in _load_error(tmp_path, build_gguf([], [t]))


def test_element_count_overflow(tmp_path):
    t = {"name": "w", "shape": [2**32, 2**32], "type": int(T.F32), "data": b""}
    assert "overflow" in _load_error(tmp_path, build_gguf([], [t]))


def test_byte_size_overflow(tmp_path):
    t = {"name": "w", "shape": [2**31, 2**31], "type": int(T.F32), "data": b""}  # 2^62 * 4 bytes
    assert "too large" in _load_error(tmp_path, build_gguf([], [t]))


def test_row_not_a_whole_number_of_blocks(tmp_path):
    t = {"name": "w", "shape": [48, 2], "type": int(T.Q8_0), "data": bytes(128)}
    assert "not a multiple of the block size 32" in _load_error(tmp_path, build_gguf([], [t]))


@pytest.mark.parametrize("vtype,value,message", [
    (V.UINT32, 48, "not a positive power of two"),
    (V.UINT32, 0, "not a positive power of two"),
    (V.INT32, -32, "not a positive power of two"),
    (V.STRING, "32", "expected an integer"),
])
def test_bad_alignment(tmp_path, vtype, value, message):
    data = build_gguf([("general.alignment", vtype, value)], [_f32_tensor()], alignment=64)
    assert message in _load_error(tmp_path, data)


# ---------------------------------------------------------------------------------------------
# Fuzzing: mutated copies of a valid file either load or raise ValueError. It runs in a child
# process so that a crash fails this test instead of killing the test run.

FUZZ_SCRIPT = textwrap.dedent(r"""
    import os, struct, sys
    import numpy as np
    from prosparse_rt._core import _testing as core

    seed_path, work, n_cases, header_end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    seed = open(seed_path, "rb").read()
    rng = np.random.default_rng(20240601)
    extremes = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 32, 64, 13]
    loaded = refused = 0
    path = os.path.join(work, "fuzz.gguf")
    for case in range(n_cases):
        data = bytearray(seed)
        op = case % 4
        if op == 0:  # truncate, mostly inside the header
            data = data[: int(rng.integers(0, header_end + 64))]
        elif op == 1:  # flip random bits in the header
            for _ in range(int(rng.integers(1, 5))):
                i = int(rng.integers(0, header_end))
                data[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:  # an extreme 64-bit value (counts, lengths, dims, offsets are u64)
            i = int(rng.integers(0, header_end - 8))
            data[i : i + 8] = struct.pack("<Q", extremes[int(rng.integers(0, len(extremes)))])
        else:  # a small 32-bit value (types, n_dims) or random bytes anywhere
            i = int(rng.integers(0, len(data) - 4))
            if rng.random() < 0.5:
                data[i : i + 4] = struct.pack("<I", int(rng.integers(0, 48)))
            else:
                data[i : i + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        with open(path, "wb") as f:
            f.write(data)
        try:
            s = core.gguf_summary(path)
        except ValueError:
            refused += 1
            continue
        for name, _, _, nbytes in s["tensors"]:  # touch every byte the loader handed out
            assert len(core.gguf_tensor_bytes(path, name)) == nbytes
        loaded += 1
    print(f"loaded={loaded} refused={refused}")
""")


def test_fuzzed_files_load_or_raise_value_error(tmp_path, writer_file):
    seed_path, _ = writer_file
    n_cases = 3000
    header_end = min(t.data_offset for t in gguf.GGUFReader(seed_path).tensors)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run([sys.executable, "-c", FUZZ_SCRIPT, seed_path, str(tmp_path),
                           str(n_cases), str(header_end)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"fuzz child died (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    loaded, refused = (int(x.split("=")[1]) for x in proc.stdout.split())
    assert loaded + refused == n_cases
    assert refused > n_cases // 4 and loaded > 0  # the mutations reach both outcomes
