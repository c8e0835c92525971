"""KServe's own Python SDK (kserve, pinned in harness/kserve_sdk.lock) against a running server:
InferenceRESTClient (protocol v2) and InferenceGRPCClient on both models, with JSON and binary data,
requested outputs, classification, ids, versions, timeouts and errors, each answer compared with
/predict's for the same image.

It runs in the SDK's own venv (KServe needs protobuf<7, the project pins 7), from the repository root,
so that the images go through the project's one preprocessing:
    .venv/kserve-sdk/bin/python -m harness.kserve_sdk --http http://127.0.0.1:8000 --grpc 127.0.0.1:8001 \
        --images DIR
--images: a folder of image files (PNG, and JPEG for the JPEG check). The server: both models, no API key.
Prints one PASS/FAIL line per check; exits 1 on any FAIL. tests/service/test_server.py runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
import traceback
from pathlib import Path

import grpc
import httpx
import numpy as np

from model.preprocessing import decode_image, preprocess
from model.spec import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME

TENSOR, IMAGE = "alexnet_acmix", "alexnet_acmix_image"

results: list[tuple[str, bool, str]] = []
# InferenceGRPCClient logs every failed call with its traceback on this logger (then raises); quiet it.
logging.getLogger("kserve.trace").setLevel(logging.CRITICAL)


def record(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}", flush=True)


async def check(name: str, coro_fn):
    """Run coro_fn(); it returns (ok, detail) or raises (FAIL with the exception)."""
    try:
        ok, detail = await coro_fn()
    except Exception as exc:  # noqa: BLE001
        ok, detail = False, f"{type(exc).__name__}: {str(exc)[:300]}"
        if os.environ.get("KSERVE_CHECK_TRACE"):
            traceback.print_exc()
    record(name, ok, detail)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", required=True, help="the server's HTTP base URL")
    parser.add_argument("--grpc", required=True, help="the server's gRPC host:port")
    parser.add_argument("--images", type=Path, required=True, help="a folder of PNG (and JPEG) files")
    args = parser.parse_args()
    # kserve parses the command line when imported (kserve/model_server.py, abbreviations allowed:
    # --grpc is "ambiguous" there), so it is imported once ours is read, with the line emptied.
    del sys.argv[1:]
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
    from kserve.protocol.infer_type import RequestedOutput
    from kserve.protocol.rest import v2_datamodels as dm

    base, target = args.http.rstrip("/"), args.grpc

    paths = sorted(args.images.glob("*.png"))[:16]
    jpegs = sorted(args.images.glob("*.jpg"))[:2]
    if not paths or not jpegs:
        print(f"FAIL needs PNG and JPEG files in {args.images}")
        return 1
    files = [p.read_bytes() for p in paths]
    batch = np.stack([preprocess(decode_image(f)) for f in files])  # [N, 3, 128, 128] float32
    n = len(paths)
    # JSON tensors take ~20 bytes a value: 4 images (~4 MB) stay under the default 10 MB upload limit
    small = batch[:4]

    # What /predict (multipart, as curl -F) answers for each image: every SDK answer is compared with it.
    plain = httpx.AsyncClient(timeout=60)
    reference = []
    for p in paths + jpegs:
        r = await plain.post(f"{base}/predict", files={"file": (p.name, p.read_bytes())})
        r.raise_for_status()
        reference.append(r.json()["class_id"])
    ref = reference[:n]
    print(f"INFO /predict classes of the {len(reference)} images: {reference}")

    def classes_of(logits: np.ndarray) -> list[int]:
        return [int(i) for i in np.argmax(logits, axis=1)]

    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    grpc_client = InferenceGRPCClient(target, timeout=60)
    stub = GRPCInferenceServiceStub(grpc_client._channel)  # the SDK's own stubs for the RPCs it does not wrap

    # ---------------------------------------------------------------- REST: health and metadata
    async def rest_live():
        v = await rest.is_server_live(base)
        return v is True, f"{v!r}"

    async def rest_ready():
        v = await rest.is_server_ready(base)
        return v is True, f"{v!r}"

    async def rest_model_ready():
        a, b = await rest.is_model_ready(base, TENSOR), await rest.is_model_ready(base, IMAGE)
        return a is True and b is True, f"{a!r} {b!r}"

    async def rest_model_ready_unknown():
        v = await rest.is_model_ready(base, "nope")
        return v is False, f"{v!r}"

    async def rest_server_metadata():  # the SDK's REST client has no metadata call: its pydantic model
        r = await plain.get(f"{base}/v2")
        m = dm.ServerMetadataResponse.model_validate(r.json())
        return r.status_code == 200 and bool(m.name) and bool(m.version), f"{m.name} {m.version} {m.extensions}"

    async def rest_model_metadata():
        out = []
        for model in (TENSOR, IMAGE):
            r = await plain.get(f"{base}/v2/models/{model}")
            m = dm.ModelMetadataResponse.model_validate(r.json())
            out.append(f"{m.name}:{m.inputs[0].datatype}{m.inputs[0].shape}->{m.outputs[0].datatype}{m.outputs[0].shape}")
        return True, "; ".join(out)

    for name, fn in [("rest is_server_live", rest_live), ("rest is_server_ready", rest_ready),
                     ("rest is_model_ready (both models)", rest_model_ready),
                     ("rest is_model_ready unknown -> False", rest_model_ready_unknown),
                     ("rest server metadata (SDK pydantic model)", rest_server_metadata),
                     ("rest model metadata (SDK pydantic model)", rest_model_metadata)]:
        await check(name, fn)

    # ---------------------------------------------------------------- REST: inference
    def tensor_request(binary: bool, rid: str | None = None, outputs=None, parameters=None, data=batch):
        inp = InferInput(INPUT_NAME, list(data.shape), "FP32")
        inp.set_data_from_numpy(data, binary_data=binary)
        return InferRequest(TENSOR, [inp], request_id=rid, request_outputs=outputs, parameters=parameters)

    def image_request(model_files, binary: bool = True, rid=None, outputs=None, shape=None, b64=False):
        elements = [base64.b64encode(f) for f in model_files] if b64 else list(model_files)
        arr = np.array(elements, dtype=np.object_)
        if shape is not None:
            arr = arr.reshape(shape)
        inp = InferInput(INPUT_NAME, list(arr.shape), "BYTES")
        inp.set_data_from_numpy(arr, binary_data=binary)
        return InferRequest(IMAGE, [inp], request_id=rid, request_outputs=outputs)

    async def rest_tensor_json():
        res = await rest.infer(base, tensor_request(False, "rest-json-1", data=small), model_name=TENSOR)
        assert isinstance(res, InferResponse)
        logits = res.outputs[0].as_numpy()
        return (logits.shape == (len(small), NUM_CLASSES) and logits.dtype == np.float32 and classes_of(logits) == ref[:len(small)]
                and res.id == "rest-json-1"), f"shape {logits.shape}, classes {classes_of(logits)}, id {res.id!r}"

    async def rest_tensor_binary():
        res = await rest.infer(base, tensor_request(True), model_name=TENSOR)
        logits = res.outputs[0].as_numpy()
        return logits.shape == (n, NUM_CLASSES) and classes_of(logits) == ref, f"classes {classes_of(logits)}"

    async def rest_tensor_binary_output():
        out = [RequestedOutput(OUTPUT_NAME, {"binary_data": True})]
        res = await rest.infer(base, tensor_request(True, outputs=out), model_name=TENSOR)
        logits = res.outputs[0].as_numpy()
        return logits.shape == (n, NUM_CLASSES) and classes_of(logits) == ref, f"classes {classes_of(logits)}"

    async def rest_binary_data_output_param():
        hdrs: dict = {}
        res = await rest.infer(base, tensor_request(False, parameters={"binary_data_output": True}, data=small),
                               model_name=TENSOR, response_headers=hdrs)
        logits = res.outputs[0].as_numpy()
        binary = "inference-header-content-length" in {k.lower() for k in hdrs}
        return binary and classes_of(logits) == ref[:len(small)], f"binary response {binary}, classes {classes_of(logits)}"

    async def rest_json_vs_binary_equal():
        a = (await rest.infer(base, tensor_request(False, data=small), model_name=TENSOR)).outputs[0].as_numpy()
        b = (await rest.infer(base, tensor_request(True, data=small), model_name=TENSOR)).outputs[0].as_numpy()
        return np.allclose(a, b, atol=1e-4), f"max diff {np.abs(a - b).max():.2e}"

    async def rest_classification():
        out = [RequestedOutput(OUTPUT_NAME, {"classification": 3, "binary_data": False})]
        res = await rest.infer(base, tensor_request(True, outputs=out), model_name=TENSOR)
        arr = res.outputs[0].as_numpy()
        top = [int(str(row[0]).split(":")[1]) for row in arr]
        return (res.outputs[0].datatype == "BYTES" and arr.shape == (n, 3) and top == ref), \
            f"{res.outputs[0].datatype} {arr.shape} {arr[0].tolist()}"

    async def rest_classification_binary():
        out = [RequestedOutput(OUTPUT_NAME, {"classification": 2, "binary_data": True})]
        res = await rest.infer(base, tensor_request(True, outputs=out), model_name=TENSOR)
        arr = res.outputs[0].as_numpy()
        top = [int(str(row[0]).split(":")[1]) for row in arr]
        return arr.shape == (n, 2) and top == ref, f"{arr.shape} {arr[0].tolist()}"

    async def rest_image_binary_batch():
        res = await rest.infer(base, image_request(files, True, rid="img-1"), model_name=IMAGE)
        logits = res.get_output_by_name(OUTPUT_NAME).as_numpy()  # kserve's InferResponse has no as_numpy(name)
        return classes_of(logits) == ref and res.id == "img-1", f"classes {classes_of(logits)}, id {res.id!r}"

    async def rest_image_binary_n1():
        res = await rest.infer(base, image_request(files[:3], True, shape=(3, 1)), model_name=IMAGE)
        logits = res.outputs[0].as_numpy()
        return classes_of(logits) == ref[:3], f"classes {classes_of(logits)}"

    async def rest_image_json_base64():
        res = await rest.infer(base, image_request(files[:3], False, b64=True), model_name=IMAGE)
        logits = res.outputs[0].as_numpy()
        return classes_of(logits) == ref[:3], f"classes {classes_of(logits)}"

    async def rest_image_jpeg():
        jfiles = [p.read_bytes() for p in jpegs]
        res = await rest.infer(base, image_request(jfiles, True), model_name=IMAGE)
        got = classes_of(res.outputs[0].as_numpy())
        return got == reference[n:], f"classes {got} vs /predict {reference[n:]}"

    async def rest_tensor_vs_image():
        a = (await rest.infer(base, tensor_request(True), model_name=TENSOR)).outputs[0].as_numpy()
        b = (await rest.infer(base, image_request(files, True), model_name=IMAGE)).outputs[0].as_numpy()
        return np.allclose(a, b, atol=1e-2), f"max diff {np.abs(a - b).max():.2e}"

    async def rest_model_version():
        res = await rest.infer(base, tensor_request(True), model_name=TENSOR)
        return res.model_name == TENSOR, f"model_name {res.model_name!r}, model_version {res.model_version!r}"

    async def rest_response_datamodel():  # the JSON response against the SDK's pydantic InferenceResponse
        body, _ = tensor_request(False, "dm-1", data=small).to_rest()
        r = await plain.post(f"{base}/v2/models/{TENSOR}/infer", json=body)
        m = dm.InferenceResponse.model_validate(r.json())
        return m.id == "dm-1" and m.outputs[0].shape == [len(small), NUM_CLASSES], f"model_version {m.model_version!r}"

    async def rest_timeout_param():
        res = await rest.infer(base, tensor_request(True, parameters={"timeout": 30_000_000}), model_name=TENSOR)
        return classes_of(res.outputs[0].as_numpy()) == ref, "timeout parameter (us) taken"

    for name, fn in [("rest infer tensor JSON data (+ request id, as_numpy)", rest_tensor_json),
                     ("rest infer tensor binary_data=True", rest_tensor_binary),
                     ("rest infer requested output binary_data", rest_tensor_binary_output),
                     ("rest infer request binary_data_output", rest_binary_data_output_param),
                     ("rest JSON and binary logits equal", rest_json_vs_binary_equal),
                     ("rest classification output (JSON)", rest_classification),
                     ("rest classification output (binary)", rest_classification_binary),
                     ("rest infer image BYTES binary batch (+ id)", rest_image_binary_batch),
                     ("rest infer image BYTES shape [N,1]", rest_image_binary_n1),
                     ("rest infer image BYTES JSON base64", rest_image_json_base64),
                     ("rest infer image JPEG == /predict", rest_image_jpeg),
                     ("rest tensor model == image model", rest_tensor_vs_image),
                     ("rest response model_name", rest_model_version),
                     ("rest JSON response validates as the SDK's InferenceResponse", rest_response_datamodel),
                     ("rest timeout parameter", rest_timeout_param)]:
        await check(name, fn)

    # ---------------------------------------------------------------- REST: errors
    async def rest_error(model, request, want_status, want_text):
        try:
            await rest.infer(base, request, model_name=model)
        except httpx.HTTPStatusError as exc:
            msg = str(exc)
            ok = exc.response.status_code == want_status and want_text in msg
            return ok, f"HTTPStatusError {exc.response.status_code}: {msg[:160]}"
        return False, "no error raised"

    async def rest_unknown_model():
        return await rest_error("nope", tensor_request(True), 404, "unknown model")

    async def rest_wrong_shape():
        bad = np.zeros((1, 3, 64, 64), dtype=np.float32)
        return await rest_error(TENSOR, tensor_request(True, data=bad), 400, "shape")

    async def rest_wrong_shape_json():
        bad = np.zeros((1, 3, 64, 64), dtype=np.float32)
        return await rest_error(TENSOR, tensor_request(False, data=bad), 400, "shape")

    async def rest_bad_image():
        return await rest_error(IMAGE, image_request([b"not an image"], True), 400, "element 0")

    async def rest_unknown_output():
        return await rest_error(TENSOR, tensor_request(True, outputs=[RequestedOutput("probs")]), 400, "unknown output")

    for name, fn in [("rest error unknown model -> HTTPStatusError 404 with message", rest_unknown_model),
                     ("rest error wrong shape (binary) -> 400 with message", rest_wrong_shape),
                     ("rest error wrong shape (JSON) -> 400 with message", rest_wrong_shape_json),
                     ("rest error bad image -> 400 naming the element", rest_bad_image),
                     ("rest error unknown output -> 400", rest_unknown_output)]:
        await check(name, fn)

    # ---------------------------------------------------------------- gRPC: health and metadata
    async def g_live():
        v = await grpc_client.is_server_live()
        return v is True, f"{v!r}"

    async def g_ready():
        v = await grpc_client.is_server_ready()
        return v is True, f"{v!r}"

    async def g_model_ready():
        a, b = await grpc_client.is_model_ready(TENSOR), await grpc_client.is_model_ready(IMAGE)
        return a is True and b is True, f"{a!r} {b!r}"

    async def g_model_ready_unknown():
        try:
            v = await grpc_client.is_model_ready("nope")
        except grpc.RpcError as exc:
            return True, f"RpcError {exc.code().name}"
        return v is False, f"{v!r}"

    async def g_server_metadata():
        m = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        return bool(m.name) and bool(m.version), f"{m.name} {m.version} {list(m.extensions)}"

    async def g_model_metadata():
        out = []
        for model in (TENSOR, IMAGE):
            m = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
            out.append(f"{m.name}:{m.inputs[0].datatype}{list(m.inputs[0].shape)}->{m.outputs[0].datatype}"
                       f"{list(m.outputs[0].shape)}")
        return True, "; ".join(out)

    async def g_model_metadata_unknown():
        try:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND, f"{exc.code().name}: {exc.details()}"
        return False, "no error"

    for name, fn in [("grpc is_server_live", g_live), ("grpc is_server_ready", g_ready),
                     ("grpc is_model_ready (both models)", g_model_ready),
                     ("grpc is_model_ready unknown -> False", g_model_ready_unknown),
                     ("grpc ServerMetadata (SDK stub)", g_server_metadata),
                     ("grpc ModelMetadata (SDK stub)", g_model_metadata),
                     ("grpc ModelMetadata unknown -> NOT_FOUND", g_model_metadata_unknown)]:
        await check(name, fn)

    # ---------------------------------------------------------------- gRPC: inference
    async def g_tensor_raw():
        res = await grpc_client.infer(tensor_request(True, "grpc-raw-1"))
        logits = res.outputs[0].as_numpy()
        return (logits.shape == (n, NUM_CLASSES) and classes_of(logits) == ref and res.id == "grpc-raw-1"
                and res.model_name == TENSOR), \
            f"classes {classes_of(logits)}, id {res.id!r}, model {res.model_name!r} v{res.model_version!r}"

    async def g_tensor_contents():
        res = await grpc_client.infer(tensor_request(False, "grpc-contents-1"))
        logits = res.outputs[0].as_numpy()
        return classes_of(logits) == ref and res.id == "grpc-contents-1", f"classes {classes_of(logits)}"

    async def g_tensor_numpy_data():  # InferInput(data=ndarray): to_grpc sets it from numpy itself
        inp = InferInput(INPUT_NAME, list(batch.shape), "FP32", data=batch)
        res = await grpc_client.infer(InferRequest(TENSOR, [inp]))
        return classes_of(res.outputs[0].as_numpy()) == ref, "data=ndarray"

    async def g_classification():
        out = [RequestedOutput(OUTPUT_NAME, {"classification": 3})]
        res = await grpc_client.infer(tensor_request(True, outputs=out))
        arr = res.outputs[0].as_numpy()
        top = [int(row[0].decode().split(":")[1]) for row in arr]
        return arr.shape == (n, 3) and top == ref, f"{res.outputs[0].datatype} {arr.shape} {arr[0].tolist()}"

    async def g_requested_output_plain():
        res = await grpc_client.infer(tensor_request(True, outputs=[RequestedOutput(OUTPUT_NAME)],
                                                     parameters={"binary_data_output": True}))
        return classes_of(res.outputs[0].as_numpy()) == ref, "requested output without parameters"

    async def g_image_raw():
        res = await grpc_client.infer(image_request(files, True, rid="gimg-1"))
        logits = res.outputs[0].as_numpy()
        return classes_of(logits) == ref and res.id == "gimg-1", f"classes {classes_of(logits)}"

    async def g_image_bytes_contents():
        inp = InferInput(INPUT_NAME, [3], "BYTES", data=files[:3])
        res = await grpc_client.infer(InferRequest(IMAGE, [inp]))
        return classes_of(res.outputs[0].as_numpy()) == ref[:3], "bytes_contents"

    async def g_image_n1():
        res = await grpc_client.infer(image_request(files[:2], True, shape=(2, 1)))
        return classes_of(res.outputs[0].as_numpy()) == ref[:2], "shape [2,1]"

    async def g_vs_rest():
        a = (await grpc_client.infer(tensor_request(True))).outputs[0].as_numpy()
        b = (await rest.infer(base, tensor_request(True), model_name=TENSOR)).outputs[0].as_numpy()
        return np.allclose(a, b, atol=1e-4), f"max diff {np.abs(a - b).max():.2e}"

    async def g_timeout_param():
        res = await grpc_client.infer(tensor_request(True, parameters={"timeout": 30_000_000}))
        return classes_of(res.outputs[0].as_numpy()) == ref, "timeout parameter (int64_param us) taken"

    async def g_model_version():
        req = tensor_request(True)
        req.model_version = "1"
        res = await grpc_client.infer(req)
        bad = tensor_request(True)
        bad.model_version = "2"
        try:
            await grpc_client.infer(bad)
        except grpc.RpcError as exc:
            return classes_of(res.outputs[0].as_numpy()) == ref and exc.code() == grpc.StatusCode.NOT_FOUND, \
                f"version 1 ok, version 2 {exc.code().name}"
        return False, "version 2 answered"

    async def g_concurrent():
        got = await asyncio.gather(*(grpc_client.infer(image_request([f], True)) for f in files))
        got += await asyncio.gather(*(rest.infer(base, image_request([f], True), model_name=IMAGE) for f in files))
        classes = [classes_of(r.outputs[0].as_numpy())[0] for r in got]
        return classes == ref + ref, f"{len(got)} concurrent single-image requests (gRPC then REST)"

    for name, fn in [("grpc infer tensor raw_input_contents (+ id, model_name)", g_tensor_raw),
                     ("grpc model_version 1 / unknown 2", g_model_version),
                     ("grpc + rest concurrent requests", g_concurrent),
                     ("grpc infer tensor fp32_contents", g_tensor_contents),
                     ("grpc infer tensor InferInput(data=ndarray)", g_tensor_numpy_data),
                     ("grpc classification output", g_classification),
                     ("grpc requested output + binary_data_output param", g_requested_output_plain),
                     ("grpc infer image BYTES raw batch (+ id)", g_image_raw),
                     ("grpc infer image BYTES bytes_contents", g_image_bytes_contents),
                     ("grpc infer image BYTES shape [N,1]", g_image_n1),
                     ("grpc logits == rest logits", g_vs_rest),
                     ("grpc timeout parameter", g_timeout_param)]:
        await check(name, fn)

    # ---------------------------------------------------------------- gRPC: errors
    async def g_error(request, want, text):
        try:
            await grpc_client.infer(request)
        except grpc.RpcError as exc:
            return exc.code() == want and text in (exc.details() or ""), f"{exc.code().name}: {exc.details()}"
        return False, "no error raised"

    async def g_unknown_model():
        req = tensor_request(True)
        req.model_name = "nope"
        return await g_error(req, grpc.StatusCode.NOT_FOUND, "unknown model")

    async def g_wrong_shape():
        return await g_error(tensor_request(True, data=np.zeros((1, 3, 64, 64), np.float32)),
                             grpc.StatusCode.INVALID_ARGUMENT, "shape")

    async def g_bad_image():
        return await g_error(image_request([b"junk"], True), grpc.StatusCode.INVALID_ARGUMENT, "element 0")

    for name, fn in [("grpc error unknown model -> NOT_FOUND", g_unknown_model),
                     ("grpc error wrong shape -> INVALID_ARGUMENT", g_wrong_shape),
                     ("grpc error bad image -> INVALID_ARGUMENT", g_bad_image)]:
        await check(name, fn)

    await rest.close()
    await grpc_client.close()
    await plain.aclose()
    failed = [r for r in results if not r[1]]
    print(f"SUMMARY {len(results) - len(failed)} passed, {len(failed)} failed of {len(results)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
