"""The report's failed models and the studies' narrow stand-ins: registry, shapes, documented structure."""

import pytest
import torch

from fakeprint.models import count_parameters, create_model, list_models
from fakeprint.models.failed import MBConv, SqueezeExcite

NEW = ["effnet_se", "twoconv", "fiveconv", "skipconcnn_narrow", "skipconcnn_narrow_noskip", "threecnn_narrow"]
SMALL_ARGS = {"effnet_se": {"width": 4}, "twoconv": {"out1": 4, "out2": 8, "kernel": 3}, "fiveconv": {"width": 4},
              "skipconcnn_narrow": {"width": 4}, "skipconcnn_narrow_noskip": {"width": 4},
              "threecnn_narrow": {"width": 4}}


def test_new_models_are_registered():
    assert set(NEW) <= set(list_models())


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("num_classes", [5, 2])
def test_shapes_and_finite_output(name, num_classes):
    m = create_model(name, num_classes, **SMALL_ARGS[name]).eval()
    with torch.no_grad():
        out = m(torch.randn(3, 3, 100, 100))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_twoconv_parameter_count_follows_out1_out2_kernel():
    def expected(o1, o2, k):
        conv1 = 3 * o1 * k * k + o1 + 2 * o1          # conv weights + bias + BN affine
        conv2 = o1 * o2 * k * k + o2 + 2 * o2
        head = o2 * 16 * 128 + 128 + 128 * 5 + 5
        return conv1 + conv2 + head

    for o1, o2, k in [(64, 128, 5), (32, 64, 3), (8, 16, 5)]:
        m = create_model("twoconv", out1=o1, out2=o2, kernel=k)
        assert count_parameters(m) == expected(o1, o2, k)
    assert count_parameters(create_model("twoconv")) == expected(64, 128, 5)  # the report's best is the default


def test_fiveconv_has_five_convolutions_down_to_3x3():
    m = create_model("fiveconv", width=4)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 5
    assert m.features(torch.zeros(1, 3, 100, 100)).shape == (1, 32, 3, 3)


def test_effnet_se_is_built_from_mbconv_blocks_with_squeeze_excitation():
    m = create_model("effnet_se", width=4)
    blocks = [x for x in m.modules() if isinstance(x, MBConv)]
    assert len(blocks) == 5 and all(any(isinstance(y, SqueezeExcite) for y in b.modules()) for b in blocks)
    assert len(m.stages) == 3  # three scales feed the attention


def test_effnet_se_attention_weights_the_scales():
    m = create_model("effnet_se", width=4).eval()
    seen = {}
    m.score.register_forward_hook(lambda mod, inp, out: seen.update(scores=out))
    with torch.no_grad():
        m(torch.randn(2, 3, 100, 100))
    assert seen["scores"].shape == (2, 3, 1)  # one score per scale, softmaxed over the scales


def test_mbconv_residual_only_when_shape_is_kept():
    assert MBConv(8, 8).residual and not MBConv(8, 16).residual and not MBConv(8, 8, stride=2).residual
    assert MBConv(8, 16, stride=2)(torch.randn(1, 8, 10, 10)).shape == (1, 16, 5, 5)


def test_narrow_stand_ins_are_the_report_networks_at_full_width():
    assert count_parameters(create_model("skipconcnn_narrow", width=128)) == count_parameters(create_model("skipconcnn"))
    assert count_parameters(create_model("threecnn_narrow", width=64)) == count_parameters(create_model("threecnn"))
    # one family each: the narrow variants are width arguments of the report's classes, with the same weights layout
    from fakeprint.models.skipconcnn import SkipConCNN
    from fakeprint.models.threecnn import ThreeCNN

    for narrow, full, cls in (("threecnn_narrow", "threecnn", ThreeCNN), ("skipconcnn_narrow", "skipconcnn", SkipConCNN)):
        assert type(create_model(narrow)) is cls
        wide = create_model(narrow, width=64 if cls is ThreeCNN else 128).state_dict()
        ref = create_model(full).state_dict()
        assert {k: v.shape for k, v in wide.items()} == {k: v.shape for k, v in ref.items()}


def test_narrow_noskip_drops_only_the_shortcut():
    skip, noskip = create_model("skipconcnn_narrow", width=4), create_model("skipconcnn_narrow_noskip", width=4)
    # the shortcut of the 8 -> 16 residual block is Conv1x1(8->16) + BN(16)
    assert count_parameters(skip) - count_parameters(noskip) == 8 * 16 + 16 + 2 * 16
    torch.manual_seed(0)
    x = torch.randn(2, 3, 100, 100)
    noskip.load_state_dict({k: v for k, v in skip.state_dict().items() if "shortcut" not in k})
    with torch.no_grad():
        assert not torch.allclose(skip.eval()(x), noskip.eval()(x))
