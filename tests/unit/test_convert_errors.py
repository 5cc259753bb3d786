"""Conversion refuses bad inputs with errors naming the problem, and never leaves half an output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harpe_megatron.config.loader import ConfigError
from harpe_megatron.hf.export_hf import convert_megatron_to_hf
from harpe_megatron.hf.import_hf import convert_hf_to_megatron
from harpe_megatron.hf.output_dir import atomic_output_dir
from harpe_megatron.hf.safetensors_io import HFCheckpointError, HFCheckpointReader, parse_size
from harpe_megatron.hf.safetensors_write import SafetensorsShardWriter
from harpe_megatron.hf.session import megatron_cpu_session
from tests.helpers import tiny_hf_llama, tiny_model_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A sharded safetensors HF folder (GQA) to copy and damage."""
    root = tmp_path_factory.mktemp("hf_src")
    model = tiny_hf_llama(tiny_model_config(num_query_groups=2))
    model.save_pretrained(root / "hf", max_shard_size="200KB")
    assert (root / "hf" / "model.safetensors.index.json").is_file()
    return root / "hf"


def copy_of(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in source.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_missing_shard_file_named_in_index(source, tmp_path):
    hf = copy_of(source, tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (hf / victim).unlink()
    with pytest.raises(HFCheckpointError, match=f"shard file '{victim}' does not exist"):
        convert_hf_to_megatron(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_index_entry_missing_from_its_file(source, tmp_path):
    hf = copy_of(source, tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = next(f for f in index["weight_map"].values()
                                                    if f != index["weight_map"]["model.norm.weight"])
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match="'model.norm.weight' is listed in shard"):
        HFCheckpointReader(hf)


def test_truncated_and_malformed_safetensors_are_one_line_errors(source, tmp_path, capsys):
    """The safetensors headers are parsed here (tensors are read with pread, not mapped): a
    truncated shard or a file that is not safetensors is refused before anything is written."""
    from tools.convert_from_hf import main as convert_from_hf_main

    hf = copy_of(source, tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert convert_from_hf_main([str(hf), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {shard}: tensor ") and "within the file" in err
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(HFCheckpointError, match=rf"{shard}: unreadable safetensors header"):
        HFCheckpointReader(hf)
    shard.write_bytes(b"PK")
    with pytest.raises(HFCheckpointError, match=rf"{shard}: not a safetensors file"):
        HFCheckpointReader(hf)
    assert not (tmp_path / "out").exists()


def _rewrite_tensor(hf: Path, name: str, value, next_to: str | None = None) -> str:
    """Replace (``value``), delete (None) or add (``next_to``: into that tensor's file) one tensor."""
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    file = index["weight_map"][next_to or name]
    tensors = load_file(hf / file)
    if value is None:
        del tensors[name]
        del index["weight_map"][name]
    else:
        tensors[name] = value
        index["weight_map"][name] = file
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, hf / file, metadata={"format": "pt"})
    return file


def test_wrong_tensor_shape_names_tensor_and_file(source, tmp_path):
    hf = copy_of(source, tmp_path / "hf")
    file = _rewrite_tensor(hf, "model.layers.1.self_attn.k_proj.weight", torch.zeros(16, 64))
    with pytest.raises(HFCheckpointError, match=rf"'model.layers.1.self_attn.k_proj.weight' in .*{file}.* "
                                                r"shape \[16, 64\], expected \[32, 64\]"):
        convert_hf_to_megatron(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_and_unexpected_tensors(source, tmp_path):
    hf = copy_of(source, tmp_path / "hf")
    _rewrite_tensor(hf, "model.layers.0.mlp.up_proj.weight", None)
    with pytest.raises(HFCheckpointError, match="missing 1 tensor.*model.layers.0.mlp.up_proj.weight"):
        convert_hf_to_megatron(hf, tmp_path / "out", progress=False)
    hf2 = copy_of(source, tmp_path / "hf2")
    _rewrite_tensor(hf2, "model.layers.0.self_attn.q_proj.bias", torch.zeros(64),
                    next_to="model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(HFCheckpointError, match="does not have.*q_proj.bias"):
        convert_hf_to_megatron(hf2, tmp_path / "out", progress=False)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'.* not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     r"rope_parameters.low_freq_factor is missing \(llama3 RoPE scaling needs it\)"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope'.* not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32 differs"),
])
def test_unsupported_configs(source, tmp_path, changes, message):
    hf = copy_of(source, tmp_path / "hf")
    edit_config(hf, **changes)
    with pytest.raises(ValueError, match=message):
        convert_hf_to_megatron(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_layout_and_override_validation(source, tmp_path):
    with pytest.raises(ConfigError, match=r"--tp 8.*num_attention_heads \(4\).*divisible"):
        convert_hf_to_megatron(source, tmp_path / "out", tp=8, progress=False)
    with pytest.raises(ConfigError, match=r"num_layers \(2\).*pipeline_model_parallel_size \(3\)"):
        convert_hf_to_megatron(source, tmp_path / "out", pp=3, progress=False)
    with pytest.raises(ConfigError, match="only positional"):
        convert_hf_to_megatron(source, tmp_path / "out", overrides=["model.num_layers=4"], progress=False)
    with pytest.raises(ConfigError, match="paper"):  # the 32-head table does not fit 2 KV groups
        convert_hf_to_megatron(source, tmp_path / "out", overrides=["positional.bases.strategy=paper"], progress=False)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_refused_and_untouched(single_rank, source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        convert_hf_to_megatron(source, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    convert_hf_to_megatron(source, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "iter_0000000", "latest"]
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(single_rank, source, tmp_path, monkeypatch):
    """A read failing on the read-ahead thread after some tensors were written."""
    from harpe_megatron.checkpoint import prefetch

    real_read = prefetch.read_exactly
    calls = {"n": 0}

    def flaky_read(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk went away")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(prefetch, "read_exactly", flaky_read)
    with pytest.raises(OSError, match="disk went away"):
        convert_hf_to_megatron(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # With --overwrite, a failed conversion keeps the previous output as it was.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    calls["n"] = 0
    with pytest.raises(OSError):
        convert_hf_to_megatron(source, tmp_path / "out", overwrite=True, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"] and leftovers(tmp_path) == []


def test_export_failure_midway_and_bad_checkpoint_dirs(single_rank, source, tmp_path, monkeypatch):
    convert_hf_to_megatron(source, tmp_path / "mg", progress=False)
    real_write = SafetensorsShardWriter.write

    def failing_write(self, name, tensor):
        if name.startswith("model.layers.1."):
            raise RuntimeError("killed")
        return real_write(self, name, tensor)

    monkeypatch.setattr(SafetensorsShardWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="killed"):
        convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", max_shard_size="50KB", progress=False)
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()

    with pytest.raises(ValueError, match="would contain"):  # --overwrite must not delete its own input
        convert_megatron_to_hf(tmp_path / "mg", tmp_path, overwrite=True, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a training save directory"):
        convert_megatron_to_hf(tmp_path / "empty", tmp_path / "hf", progress=False)
    (tmp_path / "mg" / "latest").unlink()
    with pytest.raises(ValueError, match="no 'latest' marker.*iter_0000000"):
        convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        convert_megatron_to_hf(tmp_path / "mg" / "iter_0000000", tmp_path / "hf", tokenizer_model=tmp_path / "nope",
                               progress=False)
    assert not (tmp_path / "hf").exists()


def test_shard_writer_and_reader(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "d": torch.randn(4, 4).to(torch.float16),
        "e": torch.zeros(0, 3),
    }
    writer = SafetensorsShardWriter(tmp_path, [(n, t.shape, t.dtype) for n, t in tensors.items()], max_shard_bytes=64)
    assert writer.num_shards > 1
    with pytest.raises(ValueError, match="expected tensor 'a' next"):
        writer.write("b", tensors["b"])
    for name, t in tensors.items():
        writer.write(name, t.t().contiguous().t() if t.dim() == 2 else t)  # non-contiguous input is fine
    index = writer.close()
    assert set(index["weight_map"]) == set(tensors)
    with HFCheckpointReader(tmp_path) as reader:
        for name, t in tensors.items():
            assert torch.equal(reader.get(name), t) and reader.info(name).dtype == t.dtype
    for shard in set(index["weight_map"].values()):  # the safetensors library reads our files
        for name, t in load_file(tmp_path / shard).items():
            assert torch.equal(t, tensors[name])
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123


def test_atomic_output_dir_protects_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="would contain"):
        with atomic_output_dir(tmp_path, overwrite=True, protect=[tmp_path / "in"]):
            pass
    with atomic_output_dir(tmp_path / "new") as tmp:
        (tmp / "x").write_text("1")
        assert not (tmp_path / "new").exists()
    assert (tmp_path / "new" / "x").read_text() == "1" and leftovers(tmp_path) == []


def test_conversion_refuses_inside_megatron_parallel_state(single_rank, source, tmp_path):
    from harpe_megatron.distributed.bringup import megatron_parallel

    with megatron_parallel(), pytest.raises(RuntimeError, match="outside an initialised megatron"):
        with megatron_cpu_session():
            pass


def _flip_bits(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def test_export_refuses_damaged_incomplete_and_nonfinite_checkpoints(single_rank, source, tmp_path, capsys):
    """Export: a bit flipped without a size change is named by its checksum (the CLI exits 2,
    nothing written); a 'latest' naming an incomplete checkpoint is not replaced by an older one;
    a missing shard (with or without a manifest) and NaN/inf weights are one-line errors."""
    import shutil

    from tools.convert_to_hf import main as convert_to_hf_main

    convert_hf_to_megatron(source, tmp_path / "mg", progress=False)
    good = tmp_path / "mg" / "iter_0000000"
    manifest = json.loads((good / "harpe_manifest.json").read_text())
    shard = sorted(n for n in manifest["crc32"] if n.endswith(".distcp"))[0]

    damaged = tmp_path / "damaged"
    shutil.copytree(good, damaged)
    _flip_bits(damaged / shard, (damaged / shard).stat().st_size // 2, 0x7F)
    assert convert_to_hf_main([str(damaged), str(tmp_path / "hf"), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()  # (library import warnings come first)
    assert err[-1].startswith(f"error: {damaged / shard}: damaged: its CRC-32 is ")
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []

    incomplete = tmp_path / "mg" / "iter_0000005"
    shutil.copytree(good, incomplete)
    (incomplete / shard).unlink()
    (tmp_path / "mg" / "latest").write_text("iter_0000005\n")
    with pytest.raises(ValueError, match=rf"latest names 'iter_0000005', which is missing {shard} \(listed in "
                                         r"harpe_manifest.json\): refusing to export another iteration in its place; "
                                         r"pass \S+iter_0000000 to export that older checkpoint"):
        convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    with pytest.raises(ValueError, match=rf"checkpoint \S+iter_0000005 is missing {shard}"):
        convert_megatron_to_hf(incomplete, tmp_path / "hf", progress=False)
    (incomplete / "harpe_manifest.json").unlink()  # no manifest (older saves): the reads name the file
    with pytest.raises(FileNotFoundError, match=rf"iter_0000005/{shard}: missing \(the checkpoint's .metadata lists"):
        convert_megatron_to_hf(incomplete, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()

    nan_hf = tmp_path / "nan_hf"
    model = tiny_hf_llama(tiny_model_config(num_query_groups=2))
    with torch.no_grad():
        model.model.embed_tokens.weight[3, :5] = float("inf")
    model.save_pretrained(nan_hf)
    convert_hf_to_megatron(nan_hf, tmp_path / "nan_mg", progress=False)
    with pytest.raises(ValueError, match=r"non-finite weights in embedding.word_embeddings.weight \(5 of \d+\); "
                                         "refusing to export them"):
        convert_megatron_to_hf(tmp_path / "nan_mg", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def _fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", "__0_0.distcp"):
        (folder / name).write_text("x")
    return folder


@pytest.mark.parametrize("layout,converted_ok,reason", [
    ({"run/.harpe.lock": ""}, True, "is a training run directory (it has .harpe.lock)"),
    ({"run/metrics.jsonl": "{}"}, True, "is a training run directory (it has metrics.jsonl)"),
    ({"run/checkpoints/iter_0000012/x": ""}, True, "iter_0000012 is a training checkpoint"),
    ({"run/checkpoints/iter_0000012.tmp/x": ""}, True, "iter_0000012.tmp is a training checkpoint"),
    ({"run/iter_0000000/x": "", "run/latest": "iter_0000000"}, False, "iter_0000000 is a megatron checkpoint"),
    ("checkpoint", True, "is a megatron checkpoint"),
], ids=["lock", "metrics", "save_dir", "partial_save", "converted", "iter_dir"])
def test_overwrite_never_replaces_a_checkpoint_or_a_run(tmp_path, layout, converted_ok, reason):
    out = tmp_path / "run"
    if layout == "checkpoint":
        _fake_checkpoint(out)
    else:
        for rel, text in layout.items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(text)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    pattern = re.escape(f"output directory {out}: --overwrite never replaces a directory holding a checkpoint or a "
                        "run (") + ".*" + re.escape(reason)
    with pytest.raises(FileExistsError, match=pattern):
        with atomic_output_dir(out, overwrite=True, converted_ok=converted_ok):
            pass
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_earlier_outputs_and_output_errors_name_the_argument(tmp_path):
    """An earlier export (and, for the import, an earlier import) may be replaced; an output inside
    the input is refused; an output that cannot be created is named as given, not by the
    temporary folder, and the folders made for it are removed again."""
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    with atomic_output_dir(export, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{\"new\": 1}")
    converted = tmp_path / "mg"
    (converted / "iter_0000000").mkdir(parents=True)
    (converted / "latest").write_text("iter_0000000\n")
    with atomic_output_dir(converted, overwrite=True, converted_ok=True) as tmp:
        (tmp / "latest").write_text("iter_0000000\n")
    assert sorted(p.name for p in converted.iterdir()) == ["latest"]
    with pytest.raises(ValueError, match=f"output directory {export / 'sub'} is inside the input {export}"):
        with atomic_output_dir(export / "sub", protect=[export]):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"output directory {tmp_path / 'file' / 'out'} cannot be created: "):
        with atomic_output_dir(tmp_path / "file" / "out"):
            pass
    with pytest.raises(RuntimeError, match="body failed"):
        with atomic_output_dir(tmp_path / "new" / "a" / "out"):
            raise RuntimeError("body failed")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_converter_clis_refuse_meaningless_arguments(single_rank, source, tmp_path, capsys):
    """The issue's case: exporting one checkpoint of a save directory over another with --overwrite
    is refused (exit 2, one line) and the other is untouched; an output inside the input, zero
    sizes and layouts are refused before any work."""
    from harpe_megatron.cli import convert_from_hf, convert_to_hf

    save = tmp_path / "save"
    convert_hf_to_megatron(source, save, progress=False)
    other = _fake_checkpoint(save / "iter_0000005")
    before = sorted(p.name for p in other.iterdir())
    capsys.readouterr()
    cases = [
        (convert_to_hf, [str(save / "iter_0000000"), str(other), "--overwrite"],
         f"error: output directory {other}: --overwrite never replaces a directory holding a checkpoint or a run"),
        (convert_to_hf, [str(save), str(save / "hf")], f"error: output directory {save / 'hf'} is inside the input"),
        (convert_from_hf, [str(source), str(source / "sub")], f"error: output directory {source / 'sub'} is inside"),
        (convert_to_hf, [str(save), str(tmp_path / "x"), "--max-position-embeddings", "0"],
         "tools/convert_to_hf.py: error: argument --max-position-embeddings: expected an integer >= 1, got '0'"),
        (convert_to_hf, [str(save), str(tmp_path / "x"), "--max-shard-size", "0"],
         "tools/convert_to_hf.py: error: argument --max-shard-size: a size must be at least 1 byte, got '0'"),
        (convert_from_hf, [str(source), str(tmp_path / "x"), "--tp", "0"],
         "tools/convert_from_hf.py: error: argument --tp: expected an integer >= 1, got '0'"),
    ]
    for tool, argv, message in cases:
        try:
            code = tool.main(argv)
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in other.iterdir()) == before
    assert not (tmp_path / "x").exists() and not (source / "sub").exists() and not (save / "hf").exists()
