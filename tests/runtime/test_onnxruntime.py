"""The one ONNX Runtime session factory: the options every session (service, verification, benchmarks) gets."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runtime.backend import BackendError
from runtime.onnxruntime import SESSION_CONFIG, OnnxRuntimeBackend, create_session

ROOT = Path(__file__).resolve().parents[2]


def test_sessions_set_denormals_as_zero_and_no_spinning(tiny_onnx):
    options = create_session(tiny_onnx, threads=1).get_session_options()
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert SESSION_CONFIG == {"session.set_denormal_as_zero": "1", "session.intra_op.allow_spinning": "0"}


def test_the_service_backend_uses_the_factory(tiny_onnx):
    with OnnxRuntimeBackend(tiny_onnx, max_batch=4, threads=1) as backend:
        assert backend.session.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_no_other_code_makes_its_own_session():
    """Every InferenceSession of the project comes from create_session (artifacts.py only reads
    metadata, without running the graph); the tests' oracle is an independent plain session."""
    makers = []
    for folder in ("runtime", "export", "service", "benchmarks", "harness", "model"):
        for source in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "InferenceSession":
                    makers.append(source.relative_to(ROOT).as_posix())
    assert sorted(set(makers)) == ["runtime/artifacts.py", "runtime/onnxruntime.py"]


def test_a_missing_or_corrupt_file_is_named(tmp_path):
    with pytest.raises(BackendError, match="no such ONNX file"):
        create_session(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\0garbage")
    with pytest.raises(BackendError, match="bad.onnx: ONNX Runtime cannot load it"):
        create_session(tmp_path / "bad.onnx")
