"""Segmentation networks that mark in-focus particles in a reconstructed plane.

Every model maps inputs ``(N, C, H, W)`` to particle LOGITS ``(N, 1, H, W)`` and is fully convolutional:
it runs on whole frames as well as on training tiles, provided both sides are multiples of
:func:`model_stride`.

``plain_unet`` is holopipe's own small U-Net (no extra dependency, trains on a CPU). The other architectures
come from segmentation-models-pytorch (smp), configured so that the output has the input's size at every
supported depth (smp's defaults assume depth 5).
"""

from __future__ import annotations

import copy
import difflib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("holopipe")

ARCHITECTURES = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "linknet": "Linknet",
    "fpn": "FPN",
    "manet": "MAnet",
    "pspnet": "PSPNet",
    "deeplabv3plus": "DeepLabV3Plus",
    "pan": "PAN",
    "upernet": "UPerNet",
    "segformer": "Segformer",
}
"""holopipe's names of the smp architectures -> smp class names."""

# Smallest encoder depth each smp decoder accepts (probed on smp 0.6; the largest is the encoder's, 5 for
# ResNets). plain_unet takes 1 to 6.
_MIN_DEPTH = {"unet": 1, "unetplusplus": 2, "manet": 1, "linknet": 1, "pspnet": 1,
              "fpn": 3, "deeplabv3plus": 3, "pan": 3, "upernet": 3, "segformer": 3}
_DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's U-Net default for depth 5; the last `depth` are used
_DEEPLAB_OUTPUT_STRIDE = 16  # smp's DeepLabV3+ default: deeper stages are dilated, not down-sampled
_PAN_OUTPUT_STRIDE = 16  # smp's PAN default
_PAN_PYRAMID = 8  # PAN's feature-pyramid attention halves its input three more times
_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
_DEFAULTS = {"architecture": "plain_unet", "encoder": "resnet18", "encoder_weights": None, "depth": 4,
             "width": 16}  # the schema's defaults, so partial dicts (tests, scripts) work too


class _DoubleConv(nn.Sequential):
    """Two 3x3 convolutions with batch norm and ReLU: one U-Net stage, same H and W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class PlainUNet(nn.Module):
    """A small plain U-Net: ``depth`` max-pool stages, stage ``l`` with ``width * 2**l`` channels.

    Up-sampling by 2x2 transposed convolutions, skip connections by concatenation, a 1x1 convolution to one
    logit channel. Sides of the input must be multiples of ``2**depth``. Weights get Kaiming-normal
    initialisation, so a model is reproducible from ``torch.manual_seed``.
    """

    def __init__(self, in_channels: int, width: int = 16, depth: int = 4):
        super().__init__()
        if in_channels < 1 or width < 1 or depth < 1:
            raise ValueError(f"PlainUNet needs in_channels, width and depth >= 1, got {in_channels}, {width}, "
                             f"{depth}")
        self.depth = depth
        channels = [width * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _DoubleConv(in_channels if level == 0 else channels[level - 1], channels[level])
            for level in range(depth)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottom = _DoubleConv(channels[depth - 1], channels[depth])
        # Listed from the deepest level up, in the order forward() uses them.
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2)
            for level in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(
            _DoubleConv(2 * channels[level], channels[level]) for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(channels[0], 1, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions (ReLU gain), zero biases, identity batch norms."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> logits (N, 1, H, W)."""
        stride = 2**self.depth
        if x.shape[-2] % stride or x.shape[-1] % stride:
            raise ValueError(f"PlainUNet of depth {self.depth} needs sides that are multiples of {stride}, "
                             f"got {tuple(x.shape[-2:])}")
        skips = []
        for encode in self.encoders:
            x = encode(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for upsample, decode, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decode(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


def _settings(model_config: dict) -> dict:
    """The model section with the schema's defaults filled in and the architecture checked."""
    settings = {**_DEFAULTS, **model_config}
    architecture = settings["architecture"]
    if architecture != "plain_unet" and architecture not in ARCHITECTURES:
        valid = ", ".join(["plain_unet", *ARCHITECTURES])
        raise ValueError(f"model.architecture: unknown architecture {architecture!r}; valid ones: {valid}")
    depth = settings["depth"]
    if architecture != "plain_unet" and not _MIN_DEPTH[architecture] <= depth <= 5:
        raise ValueError(f"model.depth: {architecture} takes depth {_MIN_DEPTH[architecture]} to 5, got {depth}")
    return settings


def model_stride(model_config: dict) -> int:
    """Factor that frame (and tile) sides must be multiples of, for the model section ``model_config``.

    ``2**depth`` for plain_unet and for smp's encoder-decoders (unet, unetplusplus, linknet, fpn, manet,
    pspnet, upernet, segformer). DeepLabV3+ dilates instead of down-sampling beyond stride 16, so
    ``min(2**depth, 16)``. PAN's pyramid attention halves its deepest features three more times, so
    ``8 * min(2**depth, 16)`` (64 at depth 3, 128 deeper).
    """
    settings = _settings(model_config)
    architecture, depth = settings["architecture"], settings["depth"]
    if architecture == "deeplabv3plus":
        return min(2**depth, _DEEPLAB_OUTPUT_STRIDE)
    if architecture == "pan":
        return _PAN_PYRAMID * min(2**depth, _PAN_OUTPUT_STRIDE)
    return 2**depth


def _smp_kwargs(architecture: str, depth: int) -> dict:
    """Decoder arguments that make smp's output the input's size at this depth (smp assumes depth 5)."""
    if architecture in ("unet", "unetplusplus", "manet"):
        return {"decoder_channels": _DECODER_CHANNELS[-depth:]}
    if architecture == "fpn":
        return {"upsampling": 2 ** (depth - 3)}  # FPN's decoder output is at stride 2**(depth - 3)
    if architecture == "pspnet":
        return {"upsampling": 2**depth}  # PSPNet's decoder output is at the encoder's stride
    return {}


def _is_weights_file(weights: str) -> bool:
    """A local state-dict file rather than an smp weights name such as "imagenet"."""
    return weights.endswith(_WEIGHT_SUFFIXES) or "/" in weights or Path(weights).exists()


def _check_encoder(encoder: str) -> None:
    import segmentation_models_pytorch as smp

    if encoder.startswith("tu-"):  # timm universal encoders: timm checks the name itself
        return
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        close = difflib.get_close_matches(encoder, names, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"model.encoder: unknown encoder {encoder!r}{hint} (all names: "
                         f"segmentation_models_pytorch.encoders.get_encoder_names(), or tu-<timm name>)")


def _read_state_dict(path: Path) -> dict:
    """A state dict from a .safetensors file or a torch .pth/.pt file (tensors only)."""
    if not path.is_file():
        raise FileNotFoundError(f"model.encoder_weights: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read encoder weights ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor) of the encoder")
    return state


def _load_encoder_weights(encoder: nn.Module, path: Path, description: str) -> None:
    """Load a state dict file into ``encoder`` strictly, naming every key or shape that does not fit."""
    state = _read_state_dict(path)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
              for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches (file vs model)", shapes)) if keys]
    if problems:
        raise ValueError(f"{path}: encoder weights do not fit {description}; " + "; ".join(problems))
    encoder.load_state_dict(state, strict=True)


def build_model(model_config: dict, in_channels: int) -> nn.Module:
    """The network of the ``model`` config section for ``in_channels`` input channels; outputs logits.

    ``encoder_weights`` (smp architectures): null builds a randomly initialised encoder without touching the
    network; a path to a local ``.pth``/``.pt``/``.safetensors`` state dict of the encoder (as saved from
    ``model.encoder.state_dict()``, so with ``in_channels`` input channels) is loaded strictly; any other
    string is an smp weights name (e.g. "imagenet"), which smp fetches from its cache or the Hugging Face
    hub: a failure there raises a RuntimeError saying the weights are not available offline.
    plain_unet has no encoder: ``encoder`` and ``encoder_weights`` are ignored (with a warning for weights).
    """
    settings = _settings(model_config)
    architecture, depth = settings["architecture"], settings["depth"]
    weights = settings["encoder_weights"]
    if architecture == "plain_unet":
        if weights is not None:
            warnings.warn(f"model.encoder_weights {weights!r} ignored: plain_unet has no pretrained encoder",
                          stacklevel=2)
        return PlainUNet(in_channels, settings["width"], depth)

    import segmentation_models_pytorch as smp

    encoder = settings["encoder"]
    _check_encoder(encoder)
    weights_file = Path(weights) if weights is not None and _is_weights_file(weights) else None
    description = f"encoder {encoder} of {architecture} (depth {depth}, {in_channels} input channels)"

    def create(encoder_weights):
        return smp.create_model(ARCHITECTURES[architecture], encoder_name=encoder, encoder_depth=depth,
                                encoder_weights=encoder_weights, in_channels=in_channels, classes=1,
                                **_smp_kwargs(architecture, depth))

    if weights is None or weights_file is not None:
        try:
            model = create(None)
        except (KeyError, ValueError) as error:
            raise ValueError(f"model: cannot build {description}: {error}") from error
        if weights_file is not None:
            _load_encoder_weights(model.encoder, weights_file, description)
        return model
    try:
        return create(weights)
    except KeyError as error:  # smp: no such weights name for this encoder
        raise ValueError(f"model.encoder_weights: {error.args[0]}") from error
    except ValueError as error:
        raise ValueError(f"model: cannot build {description}: {error}") from error
    except OSError as error:  # Hugging Face hub: connection, offline mode, missing cache entry (all OSError)
        raise RuntimeError(
            f"model.encoder_weights: pretrained weights {weights!r} for encoder {encoder} are not available "
            f"offline ({type(error).__name__}: {error}). Set model.encoder_weights to a local .pth/.pt/"
            f".safetensors file of the encoder's state dict, or to null to train from scratch."
        ) from error


_FOLDABLE_CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)
_FOLD_TOLERANCE = 1e-4
"""Largest difference of the folded model's logits from the original's on the probe, relative to their largest
magnitude (float32 folding differs by rounding only, ~1e-6)."""


def _conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, batch norm) names where the batch norm's input IS the convolution's output, unmodified.

    Observed on one forward pass of ``example`` rather than guessed from module names: a convolution's output
    tensor is remembered with its version counter, and a batch norm called on that very tensor, not changed in
    place since (an in-place ReLU in between bumps the version), follows it directly. Modules called more than
    once are left alone (one folding could not serve several uses).
    """
    produced: dict[int, tuple[str, torch.Tensor, int]] = {}
    calls: dict[str, int] = {}
    followers: dict[str, str] = {}
    handles = []

    def after_conv(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            produced[id(output)] = (name, output, output._version)  # the tensor is kept: its id stays unique
        return hook

    def before_norm(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            entry = produced.get(id(args[0]))
            if entry is not None and entry[1] is args[0] and args[0]._version == entry[2]:
                followers[name] = entry[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, _FOLDABLE_CONVOLUTIONS):
            handles.append(module.register_forward_hook(after_conv(name)))
        elif isinstance(module, nn.BatchNorm2d) and module.track_running_stats:
            handles.append(module.register_forward_pre_hook(before_norm(name)))
    try:
        with torch.no_grad():  # not inference_mode: its tensors keep no version counter
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, norm) for norm, conv in followers.items() if calls[norm] == 1 and calls[conv] == 1]


def _fold_into(conv: nn.Module, norm: nn.BatchNorm2d) -> None:
    """conv <- norm(conv(.)) in eval mode: each output channel's weights scaled, the shift into the bias
    (computed in float64)."""
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    shift = -norm.running_mean.double() * scale
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    weight = conv.weight.double()
    if isinstance(conv, nn.ConvTranspose2d):  # weight (in, out / groups, kh, kw)
        groups = conv.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        weight = (grouped * scale.reshape(groups, 1, -1, 1, 1)).reshape(weight.shape)
    else:  # weight (out, in / groups, kh, kw)
        weight = weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight.data = weight.to(conv.weight.dtype)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm2d that directly follows a convolution (Conv2d or
    ConvTranspose2d) folded into it and replaced by ``nn.Identity``: one kernel less per stage at inference.

    ``example`` (N, C, H, W; sides multiples of the model's stride) is one probe input: the pairs are found on
    its forward pass (:func:`_conv_batchnorm_pairs`, any architecture: plain_unet, smp encoders and
    decoders), and the folded model's logits are checked against the original's on it. Should they differ
    (a convolution's output also used elsewhere, which the probe cannot see), the model is returned unfolded
    with a warning: slower, never wrong.
    """
    original = model.eval()
    folded = copy.deepcopy(original)
    example = example.to(next(original.parameters()).device)
    pairs = _conv_batchnorm_pairs(folded, example)
    for conv_name, norm_name in pairs:
        _fold_into(folded.get_submodule(conv_name), folded.get_submodule(norm_name))
        parent_name, _, child = norm_name.rpartition(".")
        setattr(folded.get_submodule(parent_name), child, nn.Identity())
    with torch.no_grad():
        expected, actual = original(example), folded(example)
    difference = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if difference > _FOLD_TOLERANCE:
        warnings.warn(f"fold_batchnorm: {type(model).__name__} with its batch norms folded differs from the "
                      f"original by {difference:.2g} (relative) on the probe; keeping the batch norms",
                      stacklevel=2)
        return copy.deepcopy(original)
    log.debug("fold_batchnorm: %d batch norms folded into their convolutions", len(pairs))
    return folded


MODEL_FORMAT = "holopipe-model/1"
"""The ``format`` of a saved model file: a dict of ``state_dict`` and the info :func:`load_model` returns."""


def load_model(path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model saved by :func:`holopipe.ml.train.train_model` (best weights, eval mode, on ``device``) and its info
    dict (model config, in_channels, channel_names, tile_size, stride, stats, train config, version, best metric)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickle, zip and unpickling errors all mean the same here
        raise ValueError(f"{path}: not a holopipe model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a holopipe model file (expected format {MODEL_FORMAT!r}, as written "
                         "by holopipe train)")
    info = {key: value for key, value in payload.items() if key not in ("format", "state_dict")}
    model = build_model(info["model"], info["in_channels"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), info
