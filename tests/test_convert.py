"""flashcli convert: rows copy the source, bundles decode to it, predictors meet their targets,
bad input is refused without leftovers."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest

from converters.convert import convert
from flashcli.engine import bundles, ggml
from flashcli.engine.bundles import bits_per_weight, bundle_name, down_type_for, layer_layouts
from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile
from flashcli.errors import BadModelFile, DiskFull, OutputExists, UnsupportedModel

from synthetic import TINY, write_llama_gguf

FLASHCLI = [sys.executable, "-m", "flashcli.cli"]
# Q8_0 rounds to half a step, a step being 1/127 of a 32-value block's largest value; its scale is
# itself an f16 (relative error 2^-11, and clipping at 127 when it rounds down): bound per column,
# relative to the column's largest value
Q8_BOUND = 0.5 / 127 + 2**-10


def check_records(source_path, flash_path, max_rel_err):
    """Every neuron's record: gate/up bytes equal the source rows (in the stored order); the
    down column within error; records not padded."""
    src, out = GGUFFile(source_path), GGUFFile(flash_path)
    cfg = ModelConfig.from_gguf(out)
    worst = 0.0
    for i, layout in enumerate(layer_layouts(out, cfg.d_model, cfg.n_layers)):
        records = out.tensor(bundle_name(i)).rows()
        assert records.shape == (cfg.n_ff, layout.stride)
        assert layout.stride == layout.gate_bytes + layout.up_bytes + layout.down_bytes
        gate, up, down = layout.split(records)
        src_gate = src.tensor(f"blk.{i}.ffn_gate.weight").rows()
        # neurons are stored hot first: find each record's source row
        where = {row.tobytes(): j for j, row in enumerate(src_gate)}
        order = np.array([where[row.tobytes()] for row in gate])
        assert sorted(order.tolist()) == list(range(cfg.n_ff))
        assert np.array_equal(up, src.tensor(f"blk.{i}.ffn_up.weight").rows()[order])
        t = src.tensor(f"blk.{i}.ffn_down.weight")
        want = ggml.dequantize_rows(t.rows(), t.ggml_type, t.row_len).T[order]  # [n_ff, d]
        got = layout.decode_down(records)
        err = np.abs(got - want).max(axis=1) / np.maximum(np.abs(want).max(axis=1), 1e-12)
        worst = max(worst, float(err.max()))
    assert worst <= max_rel_err, f"down column error {worst:.4f}"
    return worst


def test_rows_layout_copies_every_tensor_and_the_metadata(smollm2, smollm2_flash):
    reader = gguf.GGUFReader(smollm2_flash)  # gguf-py itself opens it
    assert {t.name for t in reader.tensors} == set(GGUFFile(smollm2).tensors)
    src, out = GGUFFile(smollm2), GGUFFile(smollm2_flash)
    for name, t in src.tensors.items():
        assert np.array_equal(out.tensor(name).raw, t.raw), name
        assert out.tensor(name).ggml_type == t.ggml_type
        assert out.tensor(name).offset % 4096 == 0
    for key in src.metadata:
        if key != "general.alignment":
            assert src.raw_metadata(key) == out.raw_metadata(key), key
    assert out.get("flashcli.format_version") == bundles.FORMAT_VERSION and out.get("flashcli.ffn_layout") == "rows"
    assert out.get("flashcli.ffn_activation") == "silu"
    assert out.get("flashcli.repacked") is None  # Q4_1 and Q8_0: no repacked kernels on x86


def test_rows_layout_stores_repacked_matrices_that_run_as_the_source(synthetic_dir, tmp_path):
    """A Q4_0 model: the matrices ggml repacks on this CPU are stored repacked (other bytes than
    the source's), the embeddings are not, and the converted file runs with the source's logits
    to the bit, streamed or resident. A file whose signature is not this CPU's is refused."""
    from flashcli.engine.model import Model
    from flashcli.engine.repack import repacks
    from flashcli.errors import UnsupportedModel
    from flashcli.flash.flash_model import FlashModel

    from synthetic import TINY, write_llama_gguf

    source = write_llama_gguf(synthetic_dir / "convert-q4_0.gguf", TINY, 2, seed=5)
    out = convert(source, tmp_path / "q4_0.flash.gguf").output
    src, conv = GGUFFile(source), GGUFFile(out)
    stored = set(conv.get("flashcli.repacked") or ())
    want = {
        n
        for n, t in src.tensors.items()
        if n != "token_embd.weight"
        and len(t.ne) == 2
        and ".weight" in n
        and "norm" not in n
        and repacks(t.ggml_type, t.ne)
    }
    assert stored == want and stored
    for name in stored:
        assert not np.array_equal(conv.tensor(name).raw, src.tensor(name).raw), name
    assert np.array_equal(conv.tensor("token_embd.weight").raw, src.tensor("token_embd.weight").raw)
    tokens = list(range(3, 40))
    dense = Model(source, n_ctx=64).eval(tokens, all_logits=True)
    roomy = FlashModel(out, n_ctx=64)
    np.testing.assert_array_equal(roomy.eval(tokens, all_logits=True), dense)
    tight = FlashModel(out, roomy.plan.minimum, n_ctx=64)
    assert tight.stream is not None and any(m.prepacked for m in tight.stream.matrices.values())
    np.testing.assert_array_equal(tight.eval(tokens, all_logits=True), dense)

    data = bytearray(open(out, "rb").read())
    at = data.find(conv.get("flashcli.repack_signature").encode())
    data[at : at + 4] = b"0000"
    moved = tmp_path / "other-cpu.flash.gguf"
    moved.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModel, match="another CPU"):
        FlashModel(moved, n_ctx=64)


def test_conversion_is_deterministic(smollm2, smollm2_flash, tmp_path):
    """A fresh conversion gives the same bytes: what convert writes depends on the source only."""
    again = convert(smollm2, tmp_path / "again.flash.gguf").output

    def digest(p):
        return hashlib.sha256(open(p, "rb").read()).hexdigest()

    assert digest(again) == digest(smollm2_flash)


def test_bundles_layout_decodes_to_the_source(smollm2, smollm2_bundles):
    # Q4_1 source: the down column becomes Q8_0
    worst = check_records(smollm2, smollm2_bundles, max_rel_err=Q8_BOUND)
    assert worst > 0  # re-quantized, not copied
    out = GGUFFile(smollm2_bundles)
    cfg = ModelConfig.from_gguf(out)
    assert out.get("flashcli.ffn_layout") == "bundles"
    for i in range(cfg.n_layers):
        assert f"blk.{i}.ffn_gate.weight" not in out.tensors and out.tensor(bundle_name(i)).offset % 4096 == 0
        assert f"blk.{i}.ffn_pred_gate_a" in out.tensors
    assert len(out.get("flashcli.predictor.preserved")) == cfg.n_layers


def test_relu_predictor_meets_recall_and_size_targets(relu_model, relu_flash):
    out = GGUFFile(relu_flash)
    assert out.get("flashcli.ffn_activation") == "relu" and out.get("flashcli.ffn_layout") == "bundles"
    true = np.array(out.get("flashcli.predictor.true_fraction"))
    predicted = np.array(out.get("flashcli.predictor.predicted_fraction"))
    recall = np.array(out.get("flashcli.predictor.recall"))
    overall_recall = float((recall * true).sum() / true.sum())
    assert overall_recall >= 0.95, overall_recall
    assert predicted.sum() <= 3 * true.sum(), predicted.sum() / true.sum()
    check_records(relu_model, relu_flash, max_rel_err=Q8_BOUND)  # Q8_0 source: Q8_0 columns


@pytest.mark.parametrize("source,expected", [(0, 0), (1, 1), (30, 30), (8, 8), (2, 8), (3, 8), (12, 8), (14, 8)])
def test_down_columns_keep_floats_and_take_eight_bits_otherwise(source, expected):
    assert down_type_for(source, 640) == expected
    assert bits_per_weight(down_type_for(source, 640)) >= min(8.0, bits_per_weight(source))


@pytest.mark.parametrize("type_name,ggml_type", [("F16", 1), ("Q8_0", 8), ("Q4_0", 2), ("Q4_K", 12), ("Q6_K", 14)])
def test_synthetic_types_convert_to_bundles(type_name, ggml_type, synthetic_dir, tmp_path):
    src = write_llama_gguf(synthetic_dir / f"conv-{type_name}.gguf", TINY, ggml_type, seed=4)
    out = convert(src, tmp_path / "out.flash.gguf", layout="bundles", calibration_tokens=512).output
    # floats lose nothing; quantized columns become Q8_0 (from Q8_0 the second rounding can
    # reach a whole step where both round the same way)
    check_records(src, out, max_rel_err=0.0 if ggml_type == 1 else 2 * Q8_BOUND)


def test_existing_output_refused_and_force_overwrites(synthetic_dir, tmp_path):
    src = write_llama_gguf(synthetic_dir / "conv-force.gguf", TINY, 8, seed=5)
    out = tmp_path / "x.flash.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExists):
        convert(src, out)
    assert out.read_bytes() == b"precious"
    convert(src, out, force=True)
    assert GGUFFile(out).get("flashcli.format_version") == bundles.FORMAT_VERSION


def test_bad_inputs_rejected_without_leftovers(smollm2, synthetic_dir, tmp_path):
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(open(smollm2, "rb").read(5_000_000))
    not_gguf = tmp_path / "n.gguf"
    not_gguf.write_text("nope")
    iq2 = write_llama_gguf(synthetic_dir / "conv-tq.gguf", TINY, 8, seed=6)
    _retype(iq2, "blk.0.ffn_up.weight", 16)  # IQ2_XXS: no kernel of ours
    flash = write_llama_gguf(synthetic_dir / "conv-ok.gguf", TINY, 8, seed=6)
    flash = convert(flash, tmp_path / "ok.flash.gguf").output
    cases = [
        (tmp_path / "missing.gguf", BadModelFile),
        (truncated, BadModelFile),
        (not_gguf, BadModelFile),
        (iq2, UnsupportedModel),
        (flash, BadModelFile),
    ]
    for path, error in cases:
        before = set(os.listdir(tmp_path))
        with pytest.raises(error):
            convert(path, tmp_path / "out.flash.gguf")
        assert set(os.listdir(tmp_path)) == before, path
    r = subprocess.run(
        FLASHCLI + ["convert", str(truncated), "-o", str(tmp_path / "o.gguf")], capture_output=True, text=True
    )
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "truncated" in r.stderr


def _retype(path, name, ggml_type):
    """Rewrites one tensor's type field in place (its data then no longer matches: for refusal tests)."""
    import struct

    gf = GGUFFile(path)
    data = bytearray(open(path, "rb").read())
    needle = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(needle) + len(needle)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    type_pos = pos + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_pos)[0] == gf.tensor(name).ggml_type
    struct.pack_into("<I", data, type_pos, ggml_type)
    open(path, "wb").write(bytes(data))


def test_full_disk_leaves_nothing(synthetic_dir, tmp_path, monkeypatch):
    import errno

    import converters.convert as conv
    import converters.gguf_writer as writer

    src = write_llama_gguf(synthetic_dir / "conv-disk.gguf", TINY, 8, seed=7)
    real = writer.write_gguf

    def fails_midway(f, *args, **kw):
        f.write(b"x" * 100_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_gguf", fails_midway)
    with pytest.raises(OSError):
        convert(src, tmp_path / "o.flash.gguf")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(writer, "write_gguf", real)
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DiskFull):
        convert(src, tmp_path / "o.flash.gguf")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "sig, code, last_line",
    [(signal.SIGINT, 130, "flashcli: interrupted"), (signal.SIGTERM, 143, "flashcli: terminated")],
    ids=["ctrl-c", "kill"],
)
def test_a_signal_during_convert_leaves_no_output(smollm2, tmp_path, sig, code, last_line):
    """Ctrl-C, or a plain `kill` (SIGTERM), while the output is being written: one line, the
    signal's exit status, and neither the output nor its unfinished file left."""
    out = tmp_path / "i.flash.gguf"
    proc = subprocess.Popen(
        FLASHCLI + ["convert", str(smollm2), "-o", str(out), "--layout", "bundles", "--calibration-tokens", "512"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as at a terminal: a background job (CI started with `&`) inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".i.flash") for p in tmp_path.iterdir()):
        time.sleep(0.05)  # wait until it is writing the output
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == last_line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", [2, 5])
def test_a_converted_file_of_a_format_this_flashcli_does_not_read_is_refused(version, tmp_path):
    """Versions 3 (before experts as records) and 4 are read; others say to convert again."""
    from flashcli.engine.bundles import layout_of
    from flashcli.errors import UnsupportedModel

    from synthetic import write_llama_gguf

    extra = {"flashcli.format_version": version, "flashcli.ffn_layout": "rows"}
    path = write_llama_gguf(tmp_path / "old.gguf", extra=extra)
    with pytest.raises(UnsupportedModel, match="convert the source again"):
        layout_of(GGUFFile(path))
    extra["flashcli.format_version"] = 3
    assert layout_of(GGUFFile(write_llama_gguf(tmp_path / "v3.gguf", extra=extra))) == "rows"
