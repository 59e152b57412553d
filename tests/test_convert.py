"""flashcli convert: bundles decode to the source, predictors meet their targets, bad input is
refused without leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest

from flashcli import ggml
from flashcli.bundles import BundleLayout, bundle_name
from flashcli.config import ModelConfig
from flashcli.convert import convert
from flashcli.errors import BadModelFile, DiskFull, OutputExists, UnsupportedModel
from flashcli.gguf_file import GGUFFile
from flashcli.synthetic import TINY, write_llama_gguf

FLASHCLI = [sys.executable, "-m", "flashcli.cli"]
# Q8_0 rounds to half a step, a step being 1/127 of a 32-value block's largest value; its scale is
# itself an f16 (relative error 2^-11, and clipping at 127 when it rounds down): bound per column,
# relative to the column's largest value
Q8_BOUND = 0.5 / 127 + 2**-10


def check_records(source_path, flash_path, max_rel_err):
    """Every neuron's record: gate/up bytes equal the source rows; down column within error."""
    src, out = GGUFFile(source_path), GGUFFile(flash_path)
    cfg = ModelConfig.from_gguf(out)
    layout = BundleLayout.from_metadata(out, cfg.d_model)
    worst = 0.0
    for i in range(cfg.n_layers):
        records = out.tensor(bundle_name(i)).rows()
        assert records.shape == (cfg.n_ff, layout.stride)
        gate, up, down = layout.split(records)
        assert np.array_equal(gate, src.tensor(f"blk.{i}.ffn_gate.weight").rows())
        assert np.array_equal(up, src.tensor(f"blk.{i}.ffn_up.weight").rows())
        t = src.tensor(f"blk.{i}.ffn_down.weight")
        want = ggml.dequantize_rows(t.rows(), t.ggml_type, t.row_len).T  # [n_ff, d]
        got = layout.decode_down(records)
        err = np.abs(got - want).max(axis=1) / np.maximum(np.abs(want).max(axis=1), 1e-12)
        worst = max(worst, float(err.max()))
        assert not records[:, layout.payload_bytes :].any(), "padding must be zero"
    assert worst <= max_rel_err, f"down column error {worst:.4f}"
    return worst


def test_smollm2_converts_with_exact_gate_up_and_close_down(smollm2, smollm2_flash):
    # Q4_1 source: down columns become Q8_0
    worst = check_records(smollm2, smollm2_flash, max_rel_err=Q8_BOUND)
    assert worst > 0  # re-quantized, not copied


def test_output_is_a_standard_gguf_with_everything_else_unchanged(smollm2, smollm2_flash):
    reader = gguf.GGUFReader(smollm2_flash)  # gguf-py itself opens it
    names = {t.name for t in reader.tensors}
    src = GGUFFile(smollm2)
    out = GGUFFile(smollm2_flash)
    cfg = ModelConfig.from_gguf(src)
    for i in range(cfg.n_layers):
        assert bundle_name(i) in names and f"blk.{i}.ffn_pred_gate_a" in names
        assert f"blk.{i}.ffn_gate.weight" not in names
    for name, t in src.tensors.items():
        if ".ffn_gate." in name or ".ffn_up." in name or ".ffn_down." in name:
            continue
        assert np.array_equal(out.tensor(name).raw, t.raw), name
        assert out.tensor(name).ggml_type == t.ggml_type
    for key, value in src.metadata.items():
        if key != "general.alignment":
            assert src.raw_metadata(key) == out.raw_metadata(key), key
    assert out.get("flashcli.format_version") == 1
    assert out.get("flashcli.ffn_activation") == "silu"
    assert out.alignment == 4096
    for i in range(cfg.n_layers):
        assert out.tensor(bundle_name(i)).offset % 4096 == 0
    assert len(out.get("flashcli.predictor.preserved")) == cfg.n_layers


def test_relu_predictor_meets_recall_and_size_targets(relu_model, relu_flash):
    out = GGUFFile(relu_flash)
    assert out.get("flashcli.ffn_activation") == "relu"
    true = np.array(out.get("flashcli.predictor.true_fraction"))
    predicted = np.array(out.get("flashcli.predictor.predicted_fraction"))
    recall = np.array(out.get("flashcli.predictor.recall"))
    overall_recall = float((recall * true).sum() / true.sum())
    assert overall_recall >= 0.95, overall_recall
    assert predicted.sum() <= 2.5 * true.sum(), predicted.sum() / true.sum()
    check_records(relu_model, relu_flash, max_rel_err=Q8_BOUND)


@pytest.mark.parametrize("type_name,ggml_type", [("F16", 1), ("Q8_0", 8), ("Q4_0", 2), ("Q4_K", 12), ("Q6_K", 14)])
def test_synthetic_types_convert(type_name, ggml_type, synthetic_dir, tmp_path):
    src = write_llama_gguf(synthetic_dir / f"conv-{type_name}.gguf", TINY, ggml_type, seed=4)
    out = convert(src, tmp_path / "out.flash.gguf", calibration_tokens=512).output
    # float sources keep their type (transposing is lossless); quantized ones become Q8_0
    check_records(src, out, max_rel_err=0.0 if ggml_type == 1 else Q8_BOUND)


def test_existing_output_refused_and_force_overwrites(synthetic_dir, tmp_path):
    src = write_llama_gguf(synthetic_dir / "conv-force.gguf", TINY, 8, seed=5)
    out = tmp_path / "x.flash.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExists):
        convert(src, out, calibration_tokens=512)
    assert out.read_bytes() == b"precious"
    convert(src, out, force=True, calibration_tokens=512)
    assert GGUFFile(out).get("flashcli.format_version") == 1


def test_bad_inputs_rejected_without_leftovers(smollm2, synthetic_dir, tmp_path):
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(open(smollm2, "rb").read(5_000_000))
    not_gguf = tmp_path / "n.gguf"
    not_gguf.write_text("nope")
    iq4 = write_llama_gguf(synthetic_dir / "conv-iq4.gguf", TINY, 20, seed=6)
    flash = write_llama_gguf(synthetic_dir / "conv-ok.gguf", TINY, 8, seed=6)
    flash = convert(flash, tmp_path / "ok.flash.gguf", calibration_tokens=512).output
    cases = [(tmp_path / "missing.gguf", BadModelFile), (truncated, BadModelFile), (not_gguf, BadModelFile),
             (iq4, UnsupportedModel), (flash, BadModelFile)]
    for path, error in cases:
        before = set(os.listdir(tmp_path))
        with pytest.raises(error):
            convert(path, tmp_path / "out.flash.gguf", calibration_tokens=512)
        assert set(os.listdir(tmp_path)) == before, path
    r = subprocess.run(FLASHCLI + ["convert", str(truncated), "-o", str(tmp_path / "o.gguf")], capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "truncated" in r.stderr


def test_full_disk_leaves_nothing(synthetic_dir, tmp_path, monkeypatch):
    import errno

    import flashcli.convert as conv

    src = write_llama_gguf(synthetic_dir / "conv-disk.gguf", TINY, 8, seed=7)
    real = conv.write_gguf

    def fails_midway(f, *args, **kw):
        f.write(b"x" * 100_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(conv, "write_gguf", fails_midway)
    with pytest.raises(OSError):
        convert(src, tmp_path / "o.flash.gguf", calibration_tokens=512)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(conv, "write_gguf", real)
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DiskFull):
        convert(src, tmp_path / "o.flash.gguf", calibration_tokens=512)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_convert_leaves_no_output(smollm2, tmp_path):
    out = tmp_path / "i.flash.gguf"
    proc = subprocess.Popen(FLASHCLI + ["convert", str(smollm2), "-o", str(out), "--calibration-tokens", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".i.flash") for p in tmp_path.iterdir()):
        time.sleep(0.05)  # wait until it is writing the output
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "flashcli: interrupted"
    assert list(tmp_path.iterdir()) == []
