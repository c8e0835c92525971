"""The exported ONNX graph: clean, static but for the batch, TensorRT-parsable, equal to Paddle."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.__main__ import main
from export.errors import ExportError
from export.onnx_export import graph_report
from export.verify import compare, onnx_session, run_onnx, verification_set, verify_onnx
from harness.hidden_cpu_features import unavailable
from runtime.cpu import cpu_info


@pytest.fixture(scope="module")
def exported(onnx_model):
    return onnx_model


def test_io_names_types_and_dynamic_batch(exported):
    report = graph_report(onnx.load(str(exported)))
    assert report["inputs"] == {"image": ("FLOAT", ["batch", 3, 128, 128])}
    assert report["outputs"] == {"logits": ("FLOAT", ["batch", 10])}


def test_graph_is_clean(exported):
    report = graph_report(onnx.load(str(exported)))
    assert "Identity" not in report["ops"]
    assert report["dead_nodes"] == [] and report["unused_initializers"] == []
    assert report["shape_computation"] == []  # no Shape/ConstantOfShape/Range: shapes are static
    assert report["constant_computation"] == []  # weight products (fc into dep_conv, rate2) folded
    assert report["dynamic_shape_operands"] == []  # Pad/Slice/Squeeze/Reshape operands are initializers


def test_graph_report_finds_unclean_graphs():
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    nodes = [helper.make_node("Mul", ["w", "w"], ["w2"], name="product"),  # weights only: per call
             helper.make_node("MatMul", ["x", "w2"], ["y"], name="matmul"),
             helper.make_node("Relu", ["x"], ["unused"], name="dead")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [weight])
    report = graph_report(helper.make_model(graph))
    assert report["constant_computation"] == ["Mul:product"]
    assert report["dead_nodes"] == ["dead"]


def test_attention_is_matmuls_not_unfold(exported):
    ops = graph_report(onnx.load(str(exported)))["ops"]
    assert ops["Softmax"] == 3 and ops["MatMul"] == 3 * 2 + 3  # per ACmix: 2 attention; 3 classifier
    assert not {"Im2Col", "Col2Im", "Gather", "GatherND", "ScatterND", "Split", "Loop", "If"} & set(ops)
    # Per ACmix and per q, k, v: a 1x1 projection and a grouped convolution (fc folded into dep_conv).
    assert ops["Conv"] == 2 + 3 * 3 * 2  # the stem, then the ACmix layers; conv_p folded away


def test_convolution_path_groups_fit_onnx_runtime_blocks(exported):
    model = onnx.load(str(exported))
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    grouped = [(node, shapes[node.input[1]]) for node in model.graph.node if node.op_type == "Conv"
               and any(a.name == "group" and a.i > 1 for a in node.attribute)]
    # [out, in per group, 3, 3]: 4 head dimensions of 4 heads per group, 16 channels in and out.
    assert [weight for _, weight in grouped] == [[192, 16, 3, 3]] * 6 + [[128, 16, 3, 3]] * 3
    assert [a.i for node, _ in grouped for a in node.attribute if a.name == "group"] == [12] * 6 + [8] * 3


def test_intermediate_shapes_are_static_but_batch(exported):
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(exported)), strict_mode=True)
    for value in inferred.graph.value_info:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert all(isinstance(d, int) and d > 0 for d in dims[1:]), (value.name, dims)


def test_onnx_runtime_equals_paddle_on_generated_images(exported, weights):
    batch = verification_set(None, 16, None)[0]
    result = verify_onnx(exported, weights, batch)
    assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4


def test_onnx_runtime_equals_paddle_on_real_images(exported, weights, shared_data):
    batch = verification_set(shared_data, 16, "model/weights/val_split.json")[0]
    assert batch.shape == (16, 3, 128, 128)
    assert verify_onnx(exported, weights, batch)["top1_agreement"] == 1.0


def test_any_batch_size_runs(exported):
    session = onnx_session(exported)
    for n in (1, 3, 70):
        assert run_onnx(session, np.zeros((n, 3, 128, 128), np.float32)).shape == (n, 10)


def test_compare_reports_disagreement():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = np.array([[1.0, 0.5], [2.0, 1.0]], np.float32)
    assert compare(a, b) == {"n": 2, "max_abs_diff": 2.0, "top1_agreement": 0.5}


def test_cli_onnx_writes_and_verifies(weights, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    code = main(["onnx", "--weights", str(weights), "--out", str(out), "--data", "",
                 "--count", "8"])
    assert code == 0 and out.is_file()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["verify"]["n"] == 8 and result["verify"]["max_abs_diff"] <= 1e-4


def test_cli_onnx_that_fails_its_check_against_paddle_is_never_put_in_place(weights, tmp_path, capsys, monkeypatch):
    """As derived files and engines: the check runs on the written file before it replaces --out (a
    bound no export can meet stands in for an export that disagrees with Paddle)."""
    import export.verify
    from runtime.reference import reference_path

    out = tmp_path / "cli.onnx"
    out.write_bytes(b"the ONNX of before")
    reference_path(out).write_bytes(b"its reference logits")  # the service checks every start against them
    monkeypatch.setattr(export.verify, "MAX_LOGIT_DIFF", -1.0)
    assert main(["onnx", "--weights", str(weights), "--out", str(out), "--data", "", "--count", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out} disagrees with Paddle") and f"not put in place: {out} is as it was" in err
    assert out.read_bytes() == b"the ONNX of before"
    assert reference_path(out).read_bytes() == b"its reference logits"  # not the new weights' beside the old ONNX
    assert not list(tmp_path.glob(".cli.onnx*"))  # no temporary file left


def test_cli_onnx_if_stale_keeps_a_current_file_and_exports_one_of_other_weights(paddle, onnx_model, weights,
                                                                                  tmp_path, capsys):
    import shutil

    from runtime.artifacts import WEIGHTS_DIGEST, onnx_metadata, sha256_file
    from runtime.reference import reference_path

    out = shutil.copyfile(onnx_model, tmp_path / "model.onnx")
    shutil.copyfile(reference_path(onnx_model), reference_path(out))  # current: with its reference logits
    assert main(["onnx", "--weights", str(weights), "--out", str(out), "--if-stale"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"onnx": str(out), "kept": True}
    assert out.read_bytes() == onnx_model.read_bytes()

    state = paddle.load(str(weights))
    state["classifier.6.bias"] = state["classifier.6.bias"] + 1.0  # newer weights
    newer = tmp_path / "newer.pdparams"
    paddle.save(state, str(newer))
    assert main(["onnx", "--weights", str(newer), "--out", str(out), "--if-stale", "--no-verify"]) == 0
    assert f"{out} was made from another weights file than {newer}: exporting it" in capsys.readouterr().err
    assert onnx_metadata(out)[WEIGHTS_DIGEST] == sha256_file(newer)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["onnx", "--weights", "{tmp}/missing.pdparams"], "missing.pdparams: no such weights file"),
        (["onnx", "--weights", "{tmp}"], "a folder, not a weights file"),
        (["onnx", "--weights", "{tmp}/corrupt.pdparams"], "corrupt.pdparams: not a Paddle .pdparams file"),
        (["verify", "--onnx", "{tmp}/missing.onnx", "--weights", "{weights}", "--data", ""],
         "missing.onnx: no such ONNX file"),
        (["verify", "--onnx", "{tmp}/corrupt.onnx", "--weights", "{weights}", "--data", ""],
         "corrupt.onnx: onnx.checker failed"),
        (["engine", "--onnx", "{tmp}/missing.onnx"], "cannot build a TensorRT engine here"),
        # a --data that is not there is a typo, not a request for generated images ('' is)
        (["verify", "--onnx", "{tmp}/missing.onnx", "--weights", "{weights}", "--data", "{tmp}/typo.tar.gz"],
         "typo.tar.gz: no such data set (--data '' verifies on generated images)"),
        (["onnx", "--precision", "int8", "--from-onnx", "{tmp}/x.onnx", "--data", "{tmp}/typo.tar.gz"],
         "typo.tar.gz: no such data set"),
        (["onnx", "--precision", "fp16", "--from-onnx", "{tmp}/corrupt.onnx", "--out", "{tmp}/x.onnx"],
         "corrupt.onnx: not an ONNX file (DecodeError)"),
        (["onnx", "--precision", "int8", "--from-onnx", "{tmp}/corrupt.onnx", "--out", "{tmp}/x.onnx"],
         "corrupt.onnx: not an ONNX file (DecodeError)"),
        (["onnx", "--weights", "{weights}", "--out", "{tmp}/a_file/x.onnx", "--no-verify"],
         "a_file/x.onnx: cannot write here"),
        (["onnx", "--weights", "{weights}", "--out", "{tmp}", "--no-verify"], ": a folder, not a file"),
        (["verify", "--weights", "{weights}", "--split-file", "{tmp}/missing.json"], "missing.json: no such split file"),
        (["verify", "--count", "0"], "argument --count: 0 is not a positive integer"),
    ],
)
def test_cli_errors_are_one_line(argv, message, weights, tmp_path, capsys):
    (tmp_path / "corrupt.pdparams").write_bytes(b"\x00garbage")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x00garbage")
    (tmp_path / "a_file").write_text("x")
    argv = [a.format(tmp=tmp_path, weights=weights) for a in argv]
    with pytest.raises(SystemExit) if "--count" in argv else contextlib.nullcontext() as exited:
        assert main(argv) == 2
    if exited:  # argparse's own one line
        assert exited.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(err) == 1 and message in err[0]


def test_an_fp16_or_int8_file_is_not_taken_as_the_fp32_source(onnx_model, tmp_path, capsys):
    fp16 = tmp_path / "m.fp16.onnx"
    assert main(["onnx", "--precision", "fp16", "--from-onnx", str(onnx_model), "--out", str(fp16), "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["onnx", "--precision", "int8", "--from-onnx", str(fp16), "--out", str(tmp_path / "m.int8.onnx")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {fp16}: an fp16 or int8 ONNX, made from another; give the "
                                               "fp32 ONNX (--from-onnx)")


def test_all_stops_after_onnx_without_tensorrt(weights, tmp_path, capsys):
    out = tmp_path / "all.onnx"
    assert main(["all", "--weights", str(weights), "--out", str(out), "--data", "",
                 "--count", "4"]) == 0
    captured = capsys.readouterr()
    assert "stopping before the engine:" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["engine"] is None


def test_fp16_model_runs_in_onnx_runtime_and_agrees(exported, tmp_path):
    from export.fp16 import convert_fp16

    half = convert_fp16(exported, tmp_path / "model.fp16.onnx")
    report = graph_report(onnx.load(str(half)))
    assert report["inputs"] == {"image": ("FLOAT", ["batch", 3, 128, 128])}  # I/O stay float32
    assert report["outputs"] == {"logits": ("FLOAT", ["batch", 10])}
    batch = verification_set(None, 32, None)[0]
    full, reduced = run_onnx(onnx_session(exported), batch), run_onnx(onnx_session(half), batch)
    result = compare(full, reduced)
    assert result["max_abs_diff"] < 0.1 and result["top1_agreement"] >= 0.95


def test_cli_onnx_fp16_derives_records_its_source_and_verifies(onnx_model, tmp_path, capsys):
    import shutil

    from runtime.artifacts import SOURCE_DIGEST, onnx_metadata, onnx_staleness, sha256_file
    from runtime.reference import reference_path

    source = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    shutil.copyfile(reference_path(onnx_model), reference_path(source))
    assert main(["onnx", "--precision", "fp16", "--from-onnx", str(source), "--data", "",
                 "--count", "16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    half = tmp_path / "m.fp16.onnx"
    # Without a data set, the check is the service's reference check (generated images make no
    # top-1 agreement check: their two best logits are often close).
    assert result["onnx"] == str(half) and "verify" not in result
    assert result["reference_check"]["n"] == 16 and result["reference_check"]["source"] == "generated noise images"
    assert onnx_metadata(half)[SOURCE_DIGEST] == sha256_file(source)
    assert onnx_staleness(half, source, SOURCE_DIGEST) is None


def test_a_derived_file_that_fails_its_check_is_not_left_and_the_one_before_stays(onnx_model, tmp_path, capsys,
                                                                                  monkeypatch):
    """A fake reference check that fails (the unit's logic: where the file goes, not why it failed)."""
    import shutil

    import export.verify

    def fails(derived, onnx_path, precision):
        assert Path(derived).is_file() and Path(derived) != tmp_path / "m.fp16.onnx"
        raise ExportError(f"{derived}: reference check failed: |logit diff| 3 on reference image 2")

    monkeypatch.setattr(export.verify, "verify_reference", fails)
    source = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    before = tmp_path / "m.fp16.onnx"
    before.write_bytes(b"the file of before")
    assert main(["onnx", "--precision", "fp16", "--from-onnx", str(source), "--data", ""]) == 2
    assert "reference check failed" in capsys.readouterr().err
    assert before.read_bytes() == b"the file of before"
    # nothing unverified left (the lock file the export wrote under stays, as provisioning's does)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".provision.lock", "m.fp16.onnx", "m.onnx"]


def test_a_derived_file_without_data_nor_reference_says_it_is_not_verified(onnx_model, tmp_path, capsys):
    import shutil

    source = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    assert main(["onnx", "--precision", "fp16", "--from-onnx", str(source), "--data", ""]) == 0
    assert (f"{tmp_path / 'm.fp16.onnx'}: no reference check (no reference file beside {source}); NOT VERIFIED: "
            "no data set either") in capsys.readouterr().err


@pytest.mark.parametrize("passes", [True, False])
def test_a_calibration_made_on_the_way_is_kept_only_with_a_file_that_passed(onnx_model, tmp_path, monkeypatch,
                                                                           passes):
    """Fakes of the quantizer (it calibrates: a new table) and of the check (the unit's logic: which
    files go where). A table whose file failed would be reused by the next export without data."""
    import shutil

    import export.int8
    import export.verify

    table = tmp_path / "int8_calibration.json"
    table.write_text("the table of before")
    monkeypatch.setattr(export.int8, "CALIBRATION_TABLE", table)

    def quantize(source, out, data, split_file, count, table_out):
        shutil.copyfile(source, out)
        Path(table_out).write_text("a new calibration")

    def check(derived, onnx_path, precision):
        if not passes:
            raise ExportError(f"{derived}: reference check failed")
        return {"n": 16, "max_abs_diff": 0.5, "source": "generated noise images"}

    monkeypatch.setattr(export.int8, "quantize_int8", quantize)
    monkeypatch.setattr(export.verify, "verify_reference", check)
    source = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    assert main(["onnx", "--precision", "int8", "--from-onnx", str(source), "--data", ""]) == (0 if passes else 2)
    assert table.read_text() == ("a new calibration" if passes else "the table of before")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".provision.lock", "m.onnx", table.name,
                                                                 *(["m.int8.onnx"] * passes)])


def test_what_a_killed_export_left_is_removed_by_the_next_provisioning(tmp_path):
    """Provisioning kills its child export (SIGKILL) on SIGTERM: no cleanup of its own runs. What is
    left is found by name beside the artifact (model/files.py), under provisioning's lock."""
    from model.files import remove_leftovers, staged

    artifact = tmp_path / "m.int8.onnx"
    artifact.write_bytes(b"the current file")
    left = [staged(artifact), tmp_path / f".{staged(artifact).name}.abc123.tmp", tmp_path / ".m.int8.onnx.x1.tmp",
            tmp_path / ".m.int8.onnx.unverified"]  # the fixed name an export of before session 25 staged at
    for path in left:
        path.write_bytes(b"half")
    assert remove_leftovers(artifact) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx"]


def test_a_manual_export_waits_for_the_lock_a_provisioning_holds_unless_it_is_that_provisionings_child(
        onnx_model, tmp_path):
    """A manual `python -m export onnx --precision ...` took no lock: a provisioning making the same
    file at once could remove its staged file (as a killed export's leftover) or replace it."""
    import os
    import shutil
    import subprocess
    import sys

    from export.provision import LOCK_HELD, LOCK_NAME
    from harness.server import ROOT
    from model.files import exclusive
    from runtime.reference import reference_path

    source = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    shutil.copyfile(reference_path(onnx_model), reference_path(source))
    command = [sys.executable, "-m", "export", "onnx", "--precision", "fp16", "--from-onnx", str(source),
               "--data", ""]
    with exclusive(tmp_path / LOCK_NAME):  # as a provisioning holds it
        manual = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with pytest.raises(subprocess.TimeoutExpired):  # it takes ~1.2 s unlocked: 8 s leave a loaded machine room
            manual.wait(timeout=8)
        assert manual.poll() is None
        assert not (tmp_path / "m.fp16.onnx").exists() and not list(tmp_path.glob(".m.fp16.onnx*"))
        # the provisioning's own child does not wait for the lock its parent holds
        env = {**os.environ, LOCK_HELD: str((tmp_path / LOCK_NAME).resolve())}
        child = subprocess.run([*command, "--out", str(tmp_path / "child.fp16.onnx")], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr
    assert manual.wait(timeout=120) == 0, manual.stderr.read()
    assert (tmp_path / "m.fp16.onnx").is_file()


def test_two_writers_of_one_artifact_stage_it_under_names_of_their_own(tmp_path):
    """A manual export takes no lock: were its staged file the same as a provisioning's making the
    same artifact, each would write into the other's and one could put in place a half-written file."""
    from model.files import remove_leftovers, staged

    artifact = tmp_path / "m.int8.onnx"
    first, second = staged(artifact), staged(artifact)
    assert first != second and first.parent == second.parent == tmp_path
    first.write_bytes(b"one writer")
    second.write_bytes(b"another")
    assert first.read_bytes() == b"one writer"
    other = tmp_path / ".m.onnx.0123456789ab.unverified"  # another artifact's, not this one's
    other.write_bytes(b"the fp32 file being made")
    assert remove_leftovers(artifact) == sorted([first, second])
    assert other.exists()


def test_subnormal_weights_are_flushed_and_the_logits_stay(paddle, weights, tmp_path):
    from export.onnx_export import export_onnx
    from model.subnormals import count_subnormals
    from tests.conftest import subnormal_float32

    state = paddle.load(str(weights))
    fc = state["classifier.0.weight"].numpy().copy()
    fc[:, :64] = subnormal_float32()  # ~1e-39: dead units' weights, shrunk by weight decay (../shared/notes/subnormals.md)
    state["classifier.0.weight"] = paddle.to_tensor(fc)
    dirty = tmp_path / "dirty.pdparams"
    paddle.save(state, str(dirty))
    assert count_subnormals(fc) == fc.shape[0] * 64
    out = export_onnx(dirty, tmp_path / "clean.onnx")
    model = onnx.load(str(out))
    assert sum(count_subnormals(onnx.numpy_helper.to_array(init)) for init in model.graph.initializer) == 0
    batch = verification_set(None, 8, None)[0]
    assert verify_onnx(out, dirty, batch)["max_abs_diff"] <= 1e-4  # Paddle (with them) and ONNX (without) agree


def test_the_export_records_reference_images_that_reproduce(onnx_model, weights):
    from runtime.onnxruntime import OnnxRuntimeBackend
    from runtime.reference import check, read_reference, reference_path

    reference = read_reference(reference_path(onnx_model))
    assert len(reference.images) == 16 and reference.source == "generated noise images"
    with OnnxRuntimeBackend(onnx_model, max_batch=8) as backend:
        result = check(backend, reference, "fp32")
    assert result["n"] == 16 and result["max_abs_diff"] <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_of_the_model_agrees_with_onnx_runtime_on_real_images(onnx_model, shared_data, tmp_path, precision,
                                                                    capsys):
    import shutil

    from runtime.cuda import tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {reason}")
    onnx_copy = tmp_path / "model.onnx"
    shutil.copy(onnx_model, onnx_copy)
    assert main(["engine", "--onnx", str(onnx_copy), "--precision", precision, "--max-batch", "64",
                 "--data", str(shared_data), "--count", "1000", "--timing-cache", str(tmp_path / "cache")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["verify"]["passed"] and result["verify"]["n"] == 1000


@pytest.mark.skipif(unavailable() is not None, reason=f"cannot hide CPU features here: {unavailable()}")
@pytest.mark.skipif("avx512f" not in cpu_info()["extensions"], reason="this CPU has no AVX-512 to hide")
def test_the_one_layout_gives_the_same_logits_on_avx2_and_avx512_kernels(onnx_model, tmp_path):
    """One exported layout serves every x86 CPU (README, "ONNX Runtime layout"): ONNX Runtime's AVX2
    kernels (NCHWc blocks of 8; AVX-512 hidden from a child, harness/hidden_cpu_features.py) and
    this CPU's AVX-512 ones (blocks of 16) compute the same logits."""
    import subprocess
    import sys

    from harness.hidden_cpu_features import environment
    from runtime.onnxruntime import create_session

    x = np.random.default_rng(5).normal(size=(8, 3, 128, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    child = ("import sys, numpy as np; from runtime.onnxruntime import create_session; "
             "x = np.load(sys.argv[2] + '/x.npy'); "
             "np.save(sys.argv[2] + '/avx2.npy', create_session(sys.argv[1], 1).run(['logits'], {'image': x})[0])")
    done = subprocess.run([sys.executable, "-c", child, str(onnx_model), str(tmp_path)], env=environment("avx2"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    avx512 = create_session(onnx_model, 1).run(["logits"], {"image": x})[0]
    avx2 = np.load(tmp_path / "avx2.npy")
    assert 0 < np.abs(avx2 - avx512).max() <= 1e-4  # not bit-identical: other kernels ran
