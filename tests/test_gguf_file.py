"""server.models.gguf_file against gguf.GGUFReader (the reference parser): every metadata field
and every tensor (type, shape, bytes in GGUFReader's layout) of the embedded model and of a
file written here with every value type, plain and quantized tensors and a custom alignment;
malformed files get GGUFFormatError. server.models.gguf_dequant against gguf.quants: the same
float32 bits for every tensor of both files."""

from __future__ import annotations

import numpy as np
import pytest

from server.models.gguf_file import GGUFFile, GGUFFormatError

_READER_ONLY = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def assert_same_as_gguf_reader(path) -> GGUFFile:
    from gguf import GGUFReader

    ours, ref = GGUFFile(path), GGUFReader(str(path))
    ref_keys = [k for k in ref.fields if k not in _READER_ONLY]
    assert list(ours.fields) == ref_keys
    for key in ref_keys:
        assert ours.fields[key] == ref.fields[key].contents(), key
    assert len(ours.tensors) == len(ref.tensors)
    for mine, theirs in zip(ours.tensors, ref.tensors, strict=True):
        assert mine.name == theirs.name and mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        assert np.array_equal(mine.data, theirs.data, equal_nan=True), mine.name
    assert ours.data_offset == ref.data_offset
    return ours


def test_embedded_model_matches_gguf_reader(gguf_path):
    gf = assert_same_as_gguf_reader(gguf_path)
    assert len(gf.fields["tokenizer.ggml.tokens"]) == 49152
    assert gf.fields["general.architecture"] == "llama"


@pytest.fixture
def written(tmp_path):
    """A GGUF with every scalar type, string and numeric arrays, F32 / F16 / Q8_0 / Q4_0
    tensors and 64-byte alignment, written by gguf's own writer."""
    import gguf
    from gguf.quants import quantize

    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo\nwörld")
    w.add_array("t.strs", ["a", "", "ü" * 300])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((7,)).astype(np.float16))
    w.add_tensor("f32_3d", rng.standard_normal((2, 3, 4)).astype(np.float32))
    for qt in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0,
               gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_0):
        x = rng.standard_normal((4, 64)).astype(np.float32)
        w.add_tensor(qt.name.lower(), quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_written_file_matches_gguf_reader(written):
    gf = assert_same_as_gguf_reader(written)
    assert gf.fields["t.u64"] == 2**63 + 5 and gf.fields["t.str"] == "héllo\nwörld"
    assert gf.fields["t.strs"] == ["a", "", "ü" * 300] and gf.fields["t.bool"] is True
    assert gf.data_offset % 64 == 0


def test_malformed_files(written, tmp_path):
    data = written.read_bytes()
    cases = {
        "magic": b"GGUX" + data[4:],
        "version": data[:4] + (7).to_bytes(4, "little") + data[8:],
        "big_endian": data[:4] + (3).to_bytes(4, "big") + data[8:],
        "truncated_header": data[:100],
        "truncated_data": data[:-100],  # (the end may be up to 63 bytes of padding)
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        with pytest.raises(GGUFFormatError):
            GGUFFile(p)


def assert_dequantized_like_gguf(gf: GGUFFile) -> None:
    import torch
    from gguf.quants import dequantize as gguf_dequantize

    from server.models.gguf_dequant import dequantize

    for t in gf.tensors:
        ref = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32))
        out = dequantize(t.data, t.tensor_type)
        assert out.dtype == torch.float32 and out.shape == ref.shape, t.name
        assert torch.equal(out, ref), t.name  # bit for bit


def test_dequantize_embedded_model_like_gguf(gguf_path):
    assert_dequantized_like_gguf(GGUFFile(gguf_path))


def test_dequantize_every_written_type_like_gguf(written):
    gf = GGUFFile(written)
    assert {t.tensor_type.name for t in gf.tensors} == {"F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"}
    assert_dequantized_like_gguf(gf)
