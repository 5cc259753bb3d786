"""Nothing we load from disk runs code: YAML, HF weights, megatron checkpoints, exported folders.

Every "malicious" file here unpickles to ``open(MARKER, "w")``: if a loader ran it, the marker
file would appear. Each test asserts the refusal (with the file named) *and* that the marker is
absent; where the threat is real (torch's own reader of a checkpoint's ``.metadata``, megatron's
load of byte entries), a test shows that loading without our check does create the marker.
"""

from __future__ import annotations

import ast
import filecmp
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from harpe_megatron.checkpoint.safety import UnsafeCheckpointError, check_megatron_checkpoint
from harpe_megatron.config.loader import ConfigError, load_config
from harpe_megatron.hf.export_hf import convert_megatron_to_hf
from harpe_megatron.hf.import_hf import convert_hf_to_megatron
from harpe_megatron.hf.harpe_llama import SHIPPED_FILES
from harpe_megatron.hf.safetensors_io import HFCheckpointError, HFCheckpointReader
from tests.helpers import tiny_hf_llama, tiny_model_config


class Payload:
    """Unpickles to ``open(path, "w")``: creates ``path``, the sign that unpickling ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


# --- YAML ------------------------------------------------------------------------------------------
def test_yaml_with_python_tags_is_rejected_naming_the_file(tmp_path, marker):
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"run_dir: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ConfigError, match=rf"{bad}: invalid YAML: could not determine a constructor for the tag "
                                          r"'tag:yaml.org,2002:python/object/apply:builtins.open'"):
        load_config(bad)
    # an override is parsed as YAML too: the tag is not constructed, the text stays a plain string
    cfg = load_config(None, [f"run_dir=!!python/object/apply:builtins.open ['{marker}', 'w']", "training.train_iters=1",
                             "positional.bases={strategy: constant, base: 10000.0}"])
    assert isinstance(cfg.run_dir, str)
    assert not marker.exists()


# --- HF input --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_llama(tiny_model_config(num_query_groups=2))


def _hf_folder(path: Path, model, fmt: str) -> Path:
    if fmt == "safetensors":
        model.save_pretrained(path)
    else:  # transformers 5 writes safetensors only: the legacy pickled format by hand
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def test_pickled_hf_weights_are_refused(tmp_path, hf_model, marker):
    hf = _hf_folder(tmp_path / "hf", hf_model, "bin")
    assert (hf / "pytorch_model.bin").is_file()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match=r"pytorch_model\.bin: cannot load with torch\.load\(weights_only=True\)"):
        HFCheckpointReader(hf)
    assert not marker.exists()


def test_safetensors_are_preferred_over_a_pickled_bin(single_rank, tmp_path, hf_model, marker):
    hf = _hf_folder(tmp_path / "hf", hf_model, "safetensors")
    torch.save({"model.embed_tokens.weight": Payload(marker)}, hf / "pytorch_model.bin")
    reader = HFCheckpointReader(hf)
    assert reader.format == "safetensors"
    convert_hf_to_megatron(hf, tmp_path / "mg", progress=False)
    assert not marker.exists()


# --- megatron checkpoints --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def megatron_ckpt(tmp_path_factory, hf_model):
    """A clean megatron checkpoint (converted from a tiny HF model with per-head bases)."""
    from harpe_megatron.distributed.bringup import free_port, init_process_group

    init_process_group("cpu", rank=0, world_size=1, port=free_port())  # the session's single_rank, usable from a module fixture
    root = tmp_path_factory.mktemp("mg")
    hf = _hf_folder(root / "hf", hf_model, "safetensors")
    convert_hf_to_megatron(hf, root / "mg", progress=False,
                           overrides=["positional.bases={strategy: uniform, b_min: 100.0, b_max: 10000.0}"])
    return root / "mg"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _plant(file: Path, data: bytes) -> None:
    """Replace ``file`` and re-record the checkpoint's manifest, as someone who can write the files
    can: the manifest's checksums catch damage, not attacks; the pickle checks must hold alone."""
    from harpe_megatron.checkpoint.layout import checkpoint_files, file_crc32, write_manifest

    file.write_bytes(data)
    ckpt = file.parent
    write_manifest(ckpt, {n: file_crc32(ckpt / n) for n in checkpoint_files(ckpt)})


def test_clean_checkpoint_passes(megatron_ckpt):
    check_megatron_checkpoint(megatron_ckpt / "iter_0000000")  # byte entries (_extra_state) included


def test_pickled_metadata_is_refused_and_would_have_run(megatron_ckpt, tmp_path, marker):
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = _copy(megatron_ckpt, tmp_path / "mg") / "iter_0000000"
    _plant(ckpt / ".metadata", pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to unpickle: it references "
                                                    r"(_io|io|builtins)\.open, which is not torch\.distributed\.checkpoint metadata"):
        check_megatron_checkpoint(ckpt)
    with pytest.raises(UnsafeCheckpointError, match="references (_io|io|builtins).open"):
        convert_megatron_to_hf(ckpt, tmp_path / "hf", progress=False)
    assert not marker.exists() and not (tmp_path / "hf").exists()
    # what megatron's loader (torch's FileSystemReader, plain pickle.load) would have done:
    try:
        FileSystemReader(str(ckpt)).read_metadata()
    except Exception:
        pass
    assert marker.exists()


def test_pickled_common_state_is_refused(megatron_ckpt, tmp_path, marker):
    ckpt = _copy(megatron_ckpt, tmp_path / "mg") / "iter_0000000"
    torch.save({"iteration": 0, "config_yaml": Payload(marker)}, ckpt / "common.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"common\.pt: refusing to load: not loadable with "
                                                    r"torch\.load\(weights_only=True\)"):
        check_megatron_checkpoint(ckpt)
    assert not marker.exists()


def test_pickled_byte_entry_is_refused_and_would_have_run(single_rank, tmp_path, marker):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from harpe_megatron.distributed.bringup import megatron_parallel

    ckpt = tmp_path / "obj"
    ckpt.mkdir()
    with megatron_parallel():
        dist_checkpointing.save({"obj": ShardedObject("obj", Payload(marker), (1,), (0,), replica_id=0)}, str(ckpt))
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0\.distcp \(entry 'obj/shard_0_1'\): refusing to load: "
                                                    r"not loadable with torch\.load\(weights_only=True\)"):
        check_megatron_checkpoint(ckpt)
    assert not marker.exists()
    # megatron's own load of that entry (torch.load(weights_only=False) in torch's planner) runs it
    with megatron_parallel():
        dist_checkpointing.load({"obj": ShardedObject("obj", None, (1,), (0,), replica_id=0)}, str(ckpt))
    assert marker.exists()


def test_training_refuses_an_unsafe_pretrained_checkpoint(megatron_ckpt, tmp_path, marker):
    from harpe_megatron.config.loader import config_from_dict
    from harpe_megatron.training.input_checks import check_pretrained

    mg = _copy(megatron_ckpt, tmp_path / "mg")
    _plant(mg / "iter_0000000" / ".metadata", pickle.dumps(Payload(marker)))
    base = {"training": {"train_iters": 1}, "positional": {"bases": {"strategy": "constant", "base": 10000.0}}}
    cfg = config_from_dict({"checkpoint": {"pretrained": str(mg)}, **base})
    with pytest.raises(ValueError, match=r"checkpoint\.pretrained: unsafe checkpoint: .*\.metadata: refusing"):
        check_pretrained(cfg)
    cfg = config_from_dict({"checkpoint": {"pretrained": str(tmp_path / "nowhere")}, **base})
    with pytest.raises(ValueError, match=r"checkpoint\.pretrained: unusable checkpoint: checkpoint directory "
                                                  r".*nowhere does not exist"):
        check_pretrained(cfg)
    assert not marker.exists()


def test_run_config_yaml_of_an_export_is_read_safely(megatron_ckpt, tmp_path, marker):
    bad = tmp_path / "run.yaml"
    bad.write_text(f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ValueError, match=rf"{bad}: invalid YAML \(read with yaml\.safe_load only\)"):
        convert_megatron_to_hf(megatron_ckpt, tmp_path / "hf", config_path=bad, progress=False)
    assert not marker.exists() and not (tmp_path / "hf").exists()


# --- exported HF folders ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> str:
    from harpe_megatron.data.tokenizer import train_sentencepiece
    from tests.unit.test_data_tokenizer import corpus_texts

    return train_sentencepiece(corpus_texts(), tmp_path_factory.mktemp("tok") / "tok", vocab_size=400).model_path


def test_export_contains_exactly_our_files(megatron_ckpt, tokenizer_model, tmp_path):
    """The per-head export ships exactly harpe_llama's .py files (SHIPPED_FILES), byte-identical."""
    out = tmp_path / "hf"
    convert_megatron_to_hf(megatron_ckpt, out, tokenizer_model=tokenizer_model, progress=False)
    files = sorted(p.name for p in out.iterdir())
    weights = [f for f in files if f.endswith(".safetensors")]
    assert weights and all(f.startswith("model-") for f in weights)
    expected = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json", "configuration_harpe_llama.py",
                "modeling_harpe_llama.py", "layers_harpe_llama.py", "compat_harpe_llama.py",
                "self_extend_harpe_llama.py"}
    rest = set(files) - set(weights)
    assert rest - {"tokenizer.json"} == expected, rest  # tokenizer.json: when a fast tokenizer reproduces sp
    assert all((out / f).is_file() for f in files)  # no folders, no links
    py = sorted(f for f in files if f.endswith(".py"))
    assert py == sorted(f.name for f in SHIPPED_FILES)
    for f in SHIPPED_FILES:
        assert filecmp.cmp(f, out / f.name, shallow=False), f.name
    config = json.loads((out / "config.json").read_text())
    # auto_map names classes of the configuration and modeling files only
    assert {v.split(".")[0] for v in config["auto_map"].values()} == {"configuration_harpe_llama", "modeling_harpe_llama"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_remote_code_imports_only_torch_and_transformers():
    """What trust_remote_code runs (docs/conversion.md): these imports and nothing else. transformers
    only through its public modules (the model classes are ours; no transformers.models.llama)."""
    by_file = {f.name: _imports(f) for f in SHIPPED_FILES}
    assert by_file["configuration_harpe_llama.py"] == {"transformers"}
    assert by_file["compat_harpe_llama.py"] == {
        "__future__", "dataclasses", "functools", "inspect", "transformers.cache_utils", "transformers.masking_utils",
        "transformers.modeling_outputs", "transformers.modeling_utils"}
    assert by_file["layers_harpe_llama.py"] == {"__future__", "typing", "torch", "torch.nn.functional",
                                                ".compat_harpe_llama"}
    assert by_file["self_extend_harpe_llama.py"] == {
        "__future__", "typing", "torch", ".compat_harpe_llama", ".layers_harpe_llama"}
    assert by_file["modeling_harpe_llama.py"] == {
        "__future__", "math", "typing", "torch", "torch.nn.functional", "torch.utils.checkpoint", "transformers",
        "transformers.cache_utils", ".configuration_harpe_llama", ".layers_harpe_llama", ".compat_harpe_llama",
        ".self_extend_harpe_llama"}
    # transformers copies a local folder's modeling file with its DIRECT relative imports only:
    # modeling_harpe_llama.py must name every other shipped file itself.
    assert {"." + f.stem for f in SHIPPED_FILES} - {".modeling_harpe_llama"} <= by_file["modeling_harpe_llama.py"]


def test_evaluation_runs_no_code_from_the_folder(megatron_ckpt, tokenizer_model, tmp_path, marker):
    """The eval harness loads harpe_llama with the package's own classes, never the folder's .py files."""
    from harpe_megatron.eval.runner import load_hf

    out = tmp_path / "hf"
    convert_megatron_to_hf(megatron_ckpt, out, tokenizer_model=tokenizer_model, progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "harpe_llama"
    tampered = out / "modeling_harpe_llama.py"
    code = tampered.read_text().replace("from __future__ import annotations\n",
                                        f"from __future__ import annotations\nopen({str(marker)!r}, 'w')\n", 1)
    tampered.write_text(code)  # valid Python: trust_remote_code=True would create the marker
    model, tokenizer, _ = load_hf(str(out))
    assert type(model).__module__ == "harpe_megatron.hf.harpe_llama.modeling_harpe_llama"
    assert tokenizer("hello")["input_ids"]
    assert not marker.exists()


def test_resume_and_initial_weights_refuse_pickled_code(megatron_ckpt, tmp_path, marker):
    """The trainer's own loads (resume: load_checkpoint; checkpoint.pretrained: load_model_weights)
    run the same check before megatron unpickles anything, data checks on or off."""
    from harpe_megatron.checkpoint.save_load import load_checkpoint, load_model_weights
    from harpe_megatron.config.model import ParallelConfig, PositionalConfig
    from harpe_megatron.distributed.bringup import megatron_parallel
    from harpe_megatron.model.builder import build_model, transformer_config
    from harpe_megatron.positional.bases import UniformBases
    from tests.helpers import tiny_model_config

    ckpt = _copy(megatron_ckpt, tmp_path / "mg") / "iter_0000000"
    _plant(ckpt / ".metadata", pickle.dumps(Payload(marker)))
    m = tiny_model_config()
    with megatron_parallel():
        cfg = transformer_config(m, ParallelConfig(), use_cpu_initialization=True)
        model = build_model(m, PositionalConfig(bases=UniformBases()), cfg, max_sequence_length=32)
        with pytest.raises(RuntimeError, match=r"loading checkpoint .*iter_0000000 failed \(UnsafeCheckpointError: "
                                               r".*\.metadata: refusing to unpickle"):
            load_checkpoint(ckpt, [model], None, None)
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to unpickle"):
            load_model_weights(ckpt, [model])
    assert not marker.exists()
