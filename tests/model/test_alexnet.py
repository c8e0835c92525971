"""The fast ACmix and networks against a straight transcription of the reference (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from model import reference_acmix as oracle


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_state(layer, seed: int) -> dict:
    import paddle

    rng = np.random.default_rng(seed)
    return {
        key: paddle.to_tensor((rng.standard_normal(list(value.shape)) * 0.2).astype("float32"))
        for key, value in layer.state_dict().items()
    }


def count_parameters(model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.parameters())


def test_parameter_counts_match_the_reference(paddle):
    from model.alexnet import AlexNet, AlexNet_ACmix

    assert count_parameters(AlexNet_ACmix()) == 7_051_159
    assert count_parameters(AlexNet()) == 7_524_042


def test_state_dict_keys_and_shapes_equal_the_oracle(paddle):
    from model.alexnet import AlexNet_ACmix

    ours = {k: list(v.shape) for k, v in AlexNet_ACmix().state_dict().items()}
    reference = {k: list(v.shape) for k, v in oracle.AlexNet_ACmix().state_dict().items()}
    assert ours == reference
    assert ours["features.6.dep_conv.weight"] == [192, 9, 3, 3]
    assert ours["features.6.dep_conv.bias"] == [1]


@pytest.mark.parametrize("in_planes,out_planes", [(128, 192), (192, 192), (192, 128)])
def test_acmix_layer_equals_the_oracle(paddle, in_planes, out_planes):
    from model.alexnet import ACmix

    reference, fast = oracle.ACmix(in_planes, out_planes), ACmix(in_planes, out_planes)
    state = random_state(reference, seed=in_planes + out_planes)
    reference.set_state_dict(state)
    fast.set_state_dict(state)
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((3, in_planes, 7, 7)).astype("float32"))
    assert relative_error(fast(x).numpy(), reference(x).numpy()) <= 1e-5


@pytest.mark.parametrize("in_planes,out_planes", [(128, 192), (16, 24)])  # 4 and 1 head dims per group
def test_acmix_as_traced_for_export_equals_the_oracle(paddle, in_planes, out_planes):
    from model.alexnet import ACmix

    reference, fast = oracle.ACmix(in_planes, out_planes), ACmix(in_planes, out_planes)
    state = random_state(reference, seed=in_planes)
    reference.set_state_dict(state)
    fast.set_state_dict(state)
    traced = paddle.jit.to_static(fast, full_graph=True)
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((2, in_planes, 7, 7)).astype("float32"))
    assert relative_error(traced(x).numpy(), reference(x).numpy()) <= 1e-5


def test_acmix_gradients_equal_the_oracle(paddle):
    from model.alexnet import ACmix

    reference, fast = oracle.ACmix(128, 192), ACmix(128, 192)
    state = random_state(reference, seed=5)
    reference.set_state_dict(state)
    fast.set_state_dict(state)
    x = np.random.default_rng(2).standard_normal((2, 128, 7, 7)).astype("float32")
    grads = []
    for layer in (reference, fast):
        inp = paddle.to_tensor(x, stop_gradient=False)
        (layer(inp) ** 2).sum().backward()
        grads.append({"input": inp.grad.numpy(), **{n: p.grad.numpy() for n, p in layer.named_parameters()}})
    # conv_p's bias cancels out of the attention logits: its true gradient is 0 and both sides
    # hold only round-off, so errors are measured against the largest gradient of the layer.
    scale = max(float(np.abs(g).max()) for g in grads[0].values())
    for name in grads[0]:
        assert float(np.abs(grads[1][name] - grads[0][name]).max()) <= 1e-5 * scale, name


def test_whole_network_equals_the_oracle_and_loads_its_checkpoint(paddle, tmp_path):
    from model.alexnet import AlexNet_ACmix
    from model.predict import load_weights

    reference = oracle.AlexNet_ACmix()
    reference.set_state_dict(random_state(reference, seed=3))
    reference.eval()
    checkpoint = tmp_path / "reference.pdparams"
    paddle.save(reference.state_dict(), str(checkpoint))

    fast = AlexNet_ACmix()
    fast.set_state_dict(paddle.load(str(checkpoint)))  # no renaming
    fast.eval()
    x = paddle.to_tensor(np.random.default_rng(4).standard_normal((2, 3, 128, 128)).astype("float32"))
    expected = reference(x).numpy()
    assert relative_error(fast(x).numpy(), expected) <= 1e-5
    assert relative_error(load_weights("alexnet_acmix", str(checkpoint))(x).numpy(), expected) <= 1e-5


def test_window_counts_cover_every_offset_once():
    from model.alexnet import MASKED_LOGIT, window_log_counts

    logs = window_log_counts(7, 7, 7)
    counts = np.where(logs == MASKED_LOGIT, 0, np.round(np.exp(logs)))
    assert counts.shape == (49, 49)
    assert (counts.sum(axis=1) == 49).all()
    # The corner's window reflects onto a 4x4 block; positions 1-3 rows/cols away count twice.
    assert counts[0].reshape(7, 7)[:4, :4].tolist() == [[1, 2, 2, 2], [2, 4, 4, 4], [2, 4, 4, 4], [2, 4, 4, 4]]


def test_unsupported_configurations_are_refused(paddle):
    from model.alexnet import ACmix, build_model

    with pytest.raises(NotImplementedError):
        ACmix(16, 32, stride=2)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet")
