import pytest
import torch

from fakeprint.errors import FakeprintError
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
