"""Models: logits of the input's size for every depth and frame, the stride that suffices, reproducible
initialisation, local encoder weights, and clear errors for offline weights and unknown names."""

import warnings

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from holopipe.core.config import load_config
from holopipe.ml.models import ARCHITECTURES, PlainUNet, build_model, fold_batchnorm, model_stride

IN_CHANNELS = 2  # amplitude and phase


@pytest.fixture(autouse=True)
def _quiet_and_small():
    torch.set_num_threads(1)  # tiny models; the machine is shared
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smp's deprecation notices of third-party code
        yield


def logits_shape(model, rows, cols):
    with torch.no_grad():
        return tuple(model.eval()(torch.randn(2, IN_CHANNELS, rows, cols)).shape)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_plain_unet_returns_one_logit_per_pixel(depth):
    model = PlainUNet(IN_CHANNELS, width=4, depth=depth)
    stride = 2**depth
    assert logits_shape(model, 2 * stride, 3 * stride) == (2, 1, 2 * stride, 3 * stride)
    assert model.head.out_channels == 1
    assert [stage[0].out_channels for stage in model.encoders] == [4 * 2**level for level in range(depth)]


def test_plain_unet_rejects_frames_off_its_stride():
    with pytest.raises(ValueError, match="multiples of 8"):
        logits_shape(PlainUNet(IN_CHANNELS, width=4, depth=3), 16, 20)


def test_default_config_builds_plain_unet():
    config = load_config("config/config.yaml")
    model = build_model(config["model"], IN_CHANNELS)
    assert isinstance(model, PlainUNet)
    stride = model_stride(config["model"])
    assert stride == 2 ** config["model"]["depth"]
    assert logits_shape(model, stride, 2 * stride) == (2, 1, stride, 2 * stride)


@pytest.mark.parametrize("architecture, depth", [("unet", 3), ("linknet", 4), ("fpn", 3)])
def test_smp_architectures_run_on_tiles_and_larger_frames(architecture, depth):
    config = {"architecture": architecture, "encoder": "resnet18", "encoder_weights": None, "depth": depth}
    model = build_model(config, IN_CHANNELS)
    stride = model_stride(config)
    assert logits_shape(model, 64, 64) == (2, 1, 64, 64)  # a training tile
    # A non-square frame whose sides are multiples of the stride but not of the 64-pixel tile.
    rows, cols = 64 + stride, 64 + 3 * stride
    assert logits_shape(model, rows, cols) == (2, 1, rows, cols)


@pytest.mark.parametrize("architecture, depth, stride", [
    ("plain_unet", 4, 16), ("unet", 5, 32), ("pspnet", 4, 16), ("fpn", 4, 16), ("deeplabv3plus", 3, 8),
    ("deeplabv3plus", 5, 16), ("pan", 3, 64), ("pan", 4, 128),
])
def test_model_stride_suffices(architecture, depth, stride):
    config = {"architecture": architecture, "encoder": "resnet18", "depth": depth, "width": 4}
    assert model_stride(config) == stride
    # Sides of exactly one and two strides: the smallest frames the stride promises to handle.
    assert logits_shape(build_model(config, IN_CHANNELS), stride, 2 * stride) == (2, 1, stride, 2 * stride)


@pytest.mark.parametrize("architecture", ["plain_unet", "unet"])
def test_initialisation_is_reproducible_from_the_seed(architecture):
    config = {"architecture": architecture, "encoder": "resnet18", "depth": 3, "width": 4}

    def weights(seed):
        torch.manual_seed(seed)
        return build_model(config, IN_CHANNELS).state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first if first[key].is_floating_point())


def test_plain_unet_uses_kaiming_initialisation():
    torch.manual_seed(0)
    model = PlainUNet(IN_CHANNELS, width=16, depth=2)
    conv = model.bottom[3]  # 3x3, 64 -> 64 channels
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


def smp_config(weights=None, depth=3):
    return {"architecture": "unet", "encoder": "resnet18", "encoder_weights": weights, "depth": depth}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_encoder_weights_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    source = build_model(smp_config(), IN_CHANNELS)
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.encoder.state_dict(), str(path))
    else:
        torch.save(source.encoder.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_model(smp_config(str(path)), IN_CHANNELS)
    expected, actual = source.encoder.state_dict(), loaded.encoder.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_mismatched_encoder_weights_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "rgb_encoder.pth"
    torch.save(build_model(smp_config(), 3).encoder.state_dict(), path)  # 3 input channels, not 2
    with pytest.raises(ValueError, match=r"rgb_encoder\.pth.*conv1\.weight"):
        build_model(smp_config(str(path)), IN_CHANNELS)


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_model(smp_config(str(path)), IN_CHANNELS)


def test_named_weights_offline_give_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match=r"'imagenet'.*resnet18.*not available offline.*null"):
        build_model(smp_config("imagenet"), IN_CHANNELS)


def test_unknown_weights_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="imagenet"):
        build_model(smp_config("instagram"), IN_CHANNELS)


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(ValueError, match="transformer") as error:
        build_model({"architecture": "transformer"}, IN_CHANNELS)
    assert all(name in str(error.value) for name in ["plain_unet", *ARCHITECTURES])
    with pytest.raises(ValueError, match="transformer"):
        model_stride({"architecture": "transformer"})


def test_unknown_encoder_suggests_close_names():
    with pytest.raises(ValueError, match="resnet81.*resnet18"):
        build_model({"architecture": "unet", "encoder": "resnet81", "depth": 3}, IN_CHANNELS)


def test_depth_outside_the_decoder_range_is_rejected():
    with pytest.raises(ValueError, match="fpn takes depth 3 to 5"):
        build_model({"architecture": "fpn", "depth": 2}, IN_CHANNELS)


# ---- BatchNorm folded for inference ----

def trained_looking(model: nn.Module) -> nn.Module:
    """``model`` with batch-norm statistics and affine parameters far from the identity they start at, so a
    wrong fold shows."""
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(size, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(size, generator=generator))
            module.bias.data.copy_(0.4 * torch.rand(size, generator=generator) - 0.2)
    return model.eval()


def batch_norms_run(model: nn.Module, inputs: torch.Tensor) -> list[str]:
    """Names of the BatchNorm2d modules called in ``model``'s forward pass on ``inputs``."""
    called, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(lambda module, args, name=name: called.append(name)))
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return called


@pytest.mark.parametrize("config", [
    {"architecture": "plain_unet", "width": 4, "depth": 3},
    {"architecture": "linknet", "encoder": "resnet18", "encoder_weights": None, "depth": 5},
    {"architecture": "unet", "encoder": "resnet18", "encoder_weights": None, "depth": 3},
], ids=["plain_unet", "linknet", "unet"])
def test_folded_batch_norms_leave_the_logits_and_no_batch_norm_runs(config):
    torch.manual_seed(0)
    model = trained_looking(build_model(config, IN_CHANNELS))
    stride = model_stride(config)
    frame = torch.randn(2, IN_CHANNELS, 2 * stride, 3 * stride)  # non-square, larger than the probe
    norms = len(batch_norms_run(model, frame))
    assert norms >= 10
    folded = fold_batchnorm(model, torch.randn(1, IN_CHANNELS, stride, stride))
    assert not folded.training and batch_norms_run(folded, frame) == []
    with torch.no_grad():
        expected, actual = model(frame), folded(frame)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert len(batch_norms_run(model, frame)) == norms  # the original is left as it was
    if config["depth"] == 5:  # every encoder stage runs: not one BatchNorm2d is left in the model
        assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())


def test_transposed_and_grouped_convolutions_fold_and_a_modified_output_does_not():
    torch.manual_seed(0)
    model = trained_looking(nn.Sequential(
        nn.Conv2d(IN_CHANNELS, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 6, 1, bias=False),
        nn.ReLU(inplace=True),  # changes the convolution's output in place: this batch norm must stay
        nn.BatchNorm2d(6),
    ))
    frame = torch.randn(2, IN_CHANNELS, 6, 10)
    folded = fold_batchnorm(model, torch.randn(1, IN_CHANNELS, 4, 4))
    assert [type(module).__name__ for module in folded] == ["Conv2d", "Identity", "ConvTranspose2d", "Identity",
                                                             "Conv2d", "ReLU", "BatchNorm2d"]
    with torch.no_grad():
        torch.testing.assert_close(folded(frame), model(frame), rtol=1e-5, atol=1e-5)


class SharedOutput(nn.Module):
    """A convolution whose output feeds its batch norm AND a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(IN_CHANNELS, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


def test_a_fold_that_would_change_the_output_is_refused_with_a_warning():
    model = trained_looking(SharedOutput())
    with pytest.warns(UserWarning, match="SharedOutput.*keeping the batch norms"):
        folded = fold_batchnorm(model, torch.randn(1, IN_CHANNELS, 8, 8))
    assert isinstance(folded.norm, nn.BatchNorm2d) and folded is not model
    frame = torch.randn(2, IN_CHANNELS, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(folded(frame), model(frame))
