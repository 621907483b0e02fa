import pytest
import torch

from fakeprint.core.errors import FakeprintError
from fakeprint.models import count_parameters, create_model, list_models

REPORT_COUNTS = {"threecnn": 691_781, "skipconcnn": 8_695_045}


@pytest.mark.parametrize("name,count", REPORT_COUNTS.items())
def test_parameter_counts_match_the_report(name, count):
    assert count_parameters(create_model(name)) == count


def test_ensemble_counts_match_the_report():
    m = create_model("ensemblecnn")
    assert count_parameters(m) == 9_387_553
    assert count_parameters(m, trainable_only=True) == 727


@pytest.mark.parametrize("name", list_models())
def test_every_model_maps_a_batch_to_five_logits(name):
    m = create_model(name).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 100, 100))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_dilated_threecnn_is_wider_and_dilated():
    m = create_model("threecnn_dilated")
    conv = m.features[4][0]
    assert conv.out_channels == 256 and conv.dilation == (2, 2) and conv.padding == (0, 0)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(FakeprintError, match="unknown model 'nope'"):
        create_model("nope")


def test_ensemble_outputs_log_probabilities_and_keeps_members_frozen():
    m = create_model("ensemblecnn")
    m.train()
    assert not m.members.training and all(not mod.training for mod in m.members.modules())
    out = m(torch.randn(3, 3, 100, 100))
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)
    out.sum().backward()
    assert all(p.grad is None for p in m.members.parameters())
    assert m.weights[0].weight.grad is not None and m.meta[0].weight.grad is not None


def test_ensemble_blend_follows_the_documented_rule():
    m = create_model("ensemblecnn").eval()
    x = torch.randn(4, 3, 100, 100)
    with torch.no_grad():
        probs = [mem(x).softmax(1) for mem in m.members]
        z = torch.cat(probs, 1)
        w = m.weights(z).softmax(1)
        p_w = w[:, :1] * probs[0] + w[:, 1:] * probs[1]
        p_m = m.meta(z).softmax(1)
        c_w, c_m = p_w.max(1, keepdim=True).values, p_m.max(1, keepdim=True).values
        expected = c_w / (c_w + c_m) * p_w + c_m / (c_w + c_m) * p_m
        assert torch.allclose(m(x).exp(), expected, atol=1e-5)


def _with_random_batchnorm_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorms as after training (non-trivial running statistics and affine parameters), so that folding
    them into the convolutions is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


@pytest.mark.parametrize("name", list_models())
def test_fusing_for_inference_keeps_every_models_outputs(name):
    from fakeprint.models.fuse import fuse_for_inference

    torch.manual_seed(0)
    model = _with_random_batchnorm_statistics(create_model(name)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    x = torch.randn(2, 3, 100, 100)
    with torch.no_grad():
        expected = model.eval()(x)
        got = fused(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the original is untouched; BatchNorms that follow a convolution are gone from the copy
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    bn_before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    bn_after = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    if name.startswith(("threecnn", "fpnet", "skipconcnn")):
        assert bn_before > 0 and bn_after == 0
    # every module of the copy in eval mode, the ones put in place too: inference.predict_logits switches a model
    # with modules in training mode to eval and back on every call (a cost, and a model that is not what it says)
    assert not [type(m).__name__ for m in fused.modules() if m.training]


def test_fusing_moves_the_relu_after_the_pool_in_threecnn():
    from fakeprint.models.fuse import MaxPool2ReLU, fuse_for_inference

    fused = fuse_for_inference(create_model("threecnn_dilated"))
    first, pool = fused.features[0], fused.features[1]
    assert isinstance(first[1], torch.nn.Identity) and isinstance(first[2], torch.nn.Identity)  # BN, ReLU gone
    assert isinstance(pool, MaxPool2ReLU)  # the pool and its ReLU, from strided views
    assert sum(isinstance(m, MaxPool2ReLU) for m in fused.modules()) == 3


@pytest.mark.parametrize("shape", [(2, 8, 100, 100), (3, 5, 25, 25), (1, 4, 23, 21), (2, 3, 3, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_strided_pool_equals_max_pool_and_relu(shape, channels_last):
    """``MaxPool2ReLU`` is ``relu(max_pool2d(x, 2))`` exactly: odd edges dropped, either layout, ties and NaNs
    as the pooling operator has them; under autograd it is the pooling operator itself (gradients flow)."""
    from fakeprint.models.fuse import MaxPool2ReLU

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2).round()  # rounded: many ties inside windows, zeros and negatives
    x.view(-1)[::97] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.relu(torch.nn.functional.max_pool2d(x, 2))
    with torch.no_grad():
        got = MaxPool2ReLU()(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    leaf = x.clone().requires_grad_()
    MaxPool2ReLU()(leaf).nan_to_num().sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == x.shape


@pytest.mark.parametrize("name", ["threecnn", "threecnn_dilated", "skipconcnn_narrow", "hybrid"])
def test_moving_relus_after_pools_keeps_training_outputs_gradients_and_keys(name):
    """``relu_after_pool`` (what the training path runs) is exact in training mode: the same loss, the same
    gradient for every parameter, the same state dict keys; and it did move something."""
    import copy

    from fakeprint.models.fuse import relu_after_pool

    torch.manual_seed(0)
    model = create_model(name).train()
    moved = relu_after_pool(copy.deepcopy(model))
    assert list(moved.state_dict()) == list(model.state_dict())
    assert sum(isinstance(m, torch.nn.ReLU) for m in moved.modules()) == sum(
        isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert any(isinstance(s, torch.nn.Sequential) and len(s) == 2 and isinstance(s[0], torch.nn.MaxPool2d)
               and isinstance(s[1], torch.nn.ReLU) for s in moved.modules())
    x, y = torch.rand(4, 3, 100, 100), torch.tensor([0, 1, 2, 3])
    losses = []
    for m in (model, moved):
        torch.manual_seed(1)  # the same dropout masks
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    for (k, a), b in zip(model.named_parameters(), moved.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=k)


def test_a_model_description_is_its_docstrings_whole_first_paragraph():
    """``fakeprint models`` shows the first paragraph of the model function's docstring on one line, not its first
    line (a wrapped first sentence was cut mid-sentence)."""
    from fakeprint.models.registry import describe, first_paragraph

    doc = """A first sentence long enough to be
        wrapped over two lines.

        Details that stay out of the list."""
    assert first_paragraph(doc) == "A first sentence long enough to be wrapped over two lines."
    assert first_paragraph(None) == ""
    assert describe("threecnn") == "The report's ThreeCNN (691,781 parameters)."
