"""The installed package must carry every subpackage and its data (CI installs it non-editable)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vqexport").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert {"vqexport._targets", "vqexport.data.demo"} <= listed


def test_bundled_targets_and_demo_files_exist():
    assert (ROOT / "targets" / "ort.toml").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vq_head.json",
                 "vq_head.safetensors", "MODEL_CARD.md"):
        assert (ROOT / "vqexport" / "data" / "demo" / name).is_file()


def test_trt_op_list_and_gpu_kernel_are_package_data():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["vqexport._ops_gpu"] == "ops/vqlogits/gpu"
    assert (ROOT / "ops" / "vqlogits" / "gpu" / "vqlogits_triton.py").is_file()
    assert "*.toml" in cfg["package-data"]["vqexport.backends.trt"]
    assert (ROOT / "vqexport" / "backends" / "trt" / "onnx_ops.toml").is_file()
