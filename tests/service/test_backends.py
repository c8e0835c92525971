"""service.backends.ensure_onnx: the ONNX file the service loads is exported from the configured weights."""

from __future__ import annotations

import logging
import shutil

import onnx
import pytest

from export.engine import sha256_file
from export.onnx_export import WEIGHTS_DIGEST
from service.backends import ensure_onnx
from tests.service.conftest import service_settings


@pytest.fixture
def exports(monkeypatch):
    """A fake export_onnx (the real one is tested in tests/export): records its calls."""
    import export.onnx_export

    calls = []
    monkeypatch.setattr(export.onnx_export, "export_onnx", lambda weights, out: calls.append((str(weights), str(out))))
    return calls


def test_an_onnx_file_of_the_configured_weights_is_used(onnx_model, weights, exports, tmp_path):
    onnx_path = shutil.copyfile(onnx_model, tmp_path / "model.onnx")
    ensure_onnx(service_settings(onnx_path, weights_path=str(weights)))
    assert exports == []


def test_an_onnx_file_of_other_weights_is_exported_again(onnx_model, weights, exports, tmp_path, caplog):
    onnx_path = shutil.copyfile(onnx_model, tmp_path / "model.onnx")
    newer = tmp_path / "newer.pdparams"
    newer.write_bytes(weights.read_bytes() + b"\0")  # other bytes: another sha256
    with caplog.at_level(logging.WARNING, logger="service"):
        ensure_onnx(service_settings(onnx_path, weights_path=str(newer)))
    assert exports == [(str(newer), str(onnx_path))]
    assert f"{onnx_path} was exported from other weights than {newer}: exporting it from {newer}" in caplog.text


def test_a_missing_onnx_file_is_exported(weights, exports, tmp_path):
    ensure_onnx(service_settings(tmp_path / "none.onnx", weights_path=str(weights)))
    assert exports == [(str(weights), str(tmp_path / "none.onnx"))]


def test_an_onnx_file_that_does_not_name_its_weights_is_used_as_it_is(onnx_model, weights, exports, tmp_path):
    model = onnx.load(str(onnx_model))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "own.onnx"))
    ensure_onnx(service_settings(tmp_path / "own.onnx", weights_path=str(weights)))
    assert exports == []


def test_the_exported_onnx_names_the_sha256_of_its_weights(onnx_model, weights):
    props = {prop.key: prop.value for prop in onnx.load(str(onnx_model)).metadata_props}
    assert props[WEIGHTS_DIGEST] == sha256_file(weights)
