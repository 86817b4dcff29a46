"""Weight files from elsewhere (``logitpair.models.weights``): formats, torchvision's key layout,
the input normalisation the weights expect, and the refusal of pickled payloads.

torchvision is never imported: its state dicts are written from our own networks, which use its
module names; the names and shapes below are copied from torchvision's ``resnet.py`` and
``inception.py`` (``Inception3``, ``InceptionAux``, ``BasicConv2d``)."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from logitpair.checkpoint import normalization_of
from logitpair.errors import CheckpointError, ConfigError
from logitpair.external import ExternalModel
from logitpair.models import create_model
from logitpair.models.layers import NORMALIZATIONS, Normalize, normalization_stats, set_normalization
from logitpair.models.weights import (
    LAYOUTS,
    TORCHVISION_NAMES,
    head_keys,
    layout_of,
    load_into,
    num_classes_of,
    read_weights,
    strip_wrappers,
)

# (key, shape) of torchvision's resnet50 / resnet101 / inception_v3 (1000 classes, aux_logits=True)
TORCHVISION_SHAPES = {
    "resnet50": [("conv1.weight", (64, 3, 7, 7)), ("bn1.running_mean", (64,)), ("layer1.0.downsample.0.weight",
                 (256, 64, 1, 1)), ("layer2.0.conv2.weight", (128, 128, 3, 3)), ("layer2.0.downsample.0.weight",
                 (512, 256, 1, 1)), ("layer4.2.bn3.num_batches_tracked", ()), ("fc.weight", (1000, 2048)),
                 ("fc.bias", (1000,))],
    "resnet101": [("layer3.22.conv3.weight", (1024, 256, 1, 1)), ("layer3.22.bn3.running_var", (1024,)),
                  ("fc.weight", (1000, 2048))],
    "inceptionv3": [("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)), ("Conv2d_1a_3x3.bn.running_var", (32,)),
                    ("Conv2d_4a_3x3.conv.weight", (192, 80, 3, 3)), ("Mixed_5b.branch_pool.conv.weight",
                    (32, 192, 1, 1)), ("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 1, 7)),
                    ("Mixed_6e.branch7x7dbl_5.conv.weight", (192, 192, 1, 7)), ("AuxLogits.conv0.conv.weight",
                    (128, 768, 1, 1)), ("AuxLogits.conv1.conv.weight", (768, 128, 5, 5)), ("AuxLogits.fc.weight",
                    (1000, 768)), ("Mixed_7a.branch7x7x3_4.conv.weight", (192, 192, 3, 3)),
                    ("Mixed_7c.branch3x3dbl_3b.conv.weight", (384, 384, 3, 1)), ("fc.weight", (1000, 2048))],
}  # fmt: skip
STATE_SIZES = {"resnet50": 320, "resnet101": 626}  # len(torchvision.models.resnet50().state_dict()), resnet101


def _meta_state(name: str, **kwargs) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in create_model(name, num_classes=1000, **kwargs).state_dict().items()}


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "inceptionv3"])
def test_torchvision_names_and_shapes_are_ours(name):
    kwargs = {"aux_logits": True} if name == "inceptionv3" else {}
    ours = _meta_state(name, **kwargs)
    for key, shape in TORCHVISION_SHAPES[name]:
        assert tuple(ours[key]) == shape, key
    modules = {n for n, _ in _module_names(name, **kwargs)}
    for module in TORCHVISION_NAMES["resnet" if name.startswith("resnet") else name]:
        assert module in modules, module
    if name in STATE_SIZES:
        assert len(ours) == STATE_SIZES[name]
    assert not any("normalize" in k for k in ours), "the normalisation layer holds no state: it never meets a file"


def _module_names(name: str, **kwargs):
    with torch.device("meta"):
        return list(create_model(name, num_classes=1000, **kwargs).named_modules())


def test_layouts_state_the_normalisation_the_weights_expect():
    assert layout_of("resnet50") == layout_of("resnet101") == LAYOUTS["resnet50"]
    assert LAYOUTS["resnet50"].normalize == "imagenet" and LAYOUTS["inceptionv3"].normalize == "inception"
    assert layout_of("lenet5").name == "logitpair" and layout_of("lenet5").normalize is None
    assert NORMALIZATIONS["inception"] == ((0.5,) * 3, (0.5,) * 3), "2x - 1"
    assert head_keys("resnet50") == ("fc.weight", "fc.bias")
    assert set(head_keys("inceptionv3", aux_logits=True)) == {"fc.weight", "fc.bias", "AuxLogits.fc.weight",
                                                              "AuxLogits.fc.bias"}  # fmt: skip


# --------------------------------------------------------------------------- round trips
SIZES = {"resnet50": 32, "resnet101": 32, "inceptionv3": 75}


def _torchvision_file(tmp_path, source: nn.Module, suffix: str, prefix: str, *, legacy=False, wrapped=False):
    """``source``'s state dict as torchvision (and DataParallel) would save it."""
    state = {prefix + k: v.clone() for k, v in source.state_dict().items()}
    if legacy:  # pre-0.4.1 files (the first torchvision ResNets) have no num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 90} if wrapped else state, path,
                   _use_new_zipfile_serialization=not legacy)  # fmt: skip
    return path


def _source(name: str, classes: int) -> nn.Module:
    """A network of ours with trained-looking BatchNorm statistics, in the layout's normalisation."""
    torch.manual_seed(1)
    kwargs = {"aux_logits": True} if name == "inceptionv3" else {}  # torchvision's inception_v3 has the aux head
    net = create_model(name, num_classes=classes, image_size=299 if kwargs else SIZES[name],
                       normalize=LAYOUTS[name].normalize, **kwargs)  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1000)
    return net.eval()


@pytest.mark.parametrize(
    "name, suffix, prefix, legacy, wrapped",
    [
        ("resnet50", ".safetensors", "", False, False),
        ("resnet50", ".pth", "module.", False, True),
        ("resnet50", ".pt", "", True, False),
        ("resnet101", ".pth", "module.", False, False),
        ("inceptionv3", ".safetensors", "module.", False, False),
        ("inceptionv3", ".pth", "", False, False),
    ],
)
def test_torchvision_layout_loads_with_the_same_logits(tmp_path, name, suffix, prefix, legacy, wrapped):
    source = _source(name, classes=7)
    path = _torchvision_file(tmp_path, source, suffix, prefix, legacy=legacy, wrapped=wrapped)
    x = torch.rand(3, 3, SIZES[name], SIZES[name], generator=torch.Generator().manual_seed(0))
    points = tmp_path / "points.safetensors"
    save_file({"x": x, "y": torch.tensor([0, 6, 3])}, str(points))
    model, info = ExternalModel(model=name, weights=str(path), eps=4 / 255, points=str(points)).load_run()
    with torch.no_grad():
        assert torch.equal(model(x), source(x)), "not the logits of the module the file was saved from"
    mean, std = NORMALIZATIONS[LAYOUTS[name].normalize]
    assert info.normalization == (pytest.approx(mean), pytest.approx(std))
    assert model.meta["model"]["kwargs"]["num_classes"] == 7 and model.meta["external"]["layout"] == "torchvision"
    dropped = model.meta["external"]["dropped"]
    assert (len(dropped) == 14) if name == "inceptionv3" else not dropped  # AuxLogits: conv0, conv1 (6 each), fc
    assert all(k.startswith("AuxLogits.") for k in dropped)


def test_inception_weights_get_2x_minus_1_where_ours_default_to_imagenet(tmp_path):
    ours = create_model("inceptionv3", num_classes=3, image_size=75)
    assert normalization_of(ours)[0] == pytest.approx(NORMALIZATIONS["imagenet"][0])
    path = tmp_path / "w.safetensors"
    save_file(ours.state_dict(), str(path))
    points = tmp_path / "p.safetensors"
    save_file({"x": torch.rand(2, 3, 75, 75), "y": torch.tensor([0, 1])}, str(points))
    loaded = ExternalModel(model="inceptionv3", weights=str(path), eps=0.0, points=str(points)).load()
    assert normalization_of(loaded) == ((0.5,) * 3, (0.5,) * 3)
    mine = ExternalModel(model="inceptionv3", weights=str(path), eps=0.0, points=str(points),
                         input_normalization="imagenet").load()  # fmt: skip
    x = torch.rand(2, 3, 75, 75)
    with torch.no_grad():
        assert torch.equal(mine(x), ours.eval()(x)), "--input-normalization imagenet gives back our own model"


def test_own_layout_of_other_architectures(tmp_path):
    torch.manual_seed(0)
    net = create_model("lenet5", num_classes=10).eval()
    path = tmp_path / "lenet.pth"
    torch.save({"_orig_mod." + k: v for k, v in net.state_dict().items()}, path)  # torch.compile's prefix
    fresh = create_model("lenet5", num_classes=10).eval()
    done = load_into(fresh, read_weights(path), path)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(fresh(x), net(x)) and len(done.loaded) == len(net.state_dict())
    assert num_classes_of("lenet5", read_weights(path), path, in_channels=1, image_size=28) == 10
    assert list(strip_wrappers({"module._orig_mod.a": torch.zeros(1)})) == ["a"]


# --------------------------------------------------------------------------- clear errors
def test_missing_unexpected_and_mismatched_keys_are_one_error(tmp_path):
    net = create_model("resnet50", num_classes=5, image_size=32)
    state = net.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["classifier.weight"] = torch.zeros(5, 2048)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_into(create_model("resnet50", num_classes=5, image_size=32), read_weights(path), path, what="resnet50",
                  layout=LAYOUTS["resnet50"])  # fmt: skip
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "torchvision layout" in text
    assert "1 missing (layer1.0.conv1.weight)" in text and "1 unexpected (classifier.weight)" in text
    with pytest.raises(CheckpointError, match=r"shape mismatch with the model: fc.weight \(file \(5, 2048\), model"):
        load_into(create_model("resnet50", num_classes=9, image_size=32), net.state_dict(), path)
    many = {f"x{i}": torch.zeros(1) for i in range(9)}
    with pytest.raises(CheckpointError, match=r"9 unexpected \(x0, x1, x2, x3, x4 and 4 more\)"):
        load_into(create_model("lenet5"), {**create_model("lenet5").state_dict(), **many}, path)


def test_weight_formats_and_contents_are_checked(tmp_path):
    cases = {
        "w.bin": (b"anything", "expected a weights file .safetensors, .pt, .pth"),
        "w.safetensors": (b"\x00" * 16, "not a valid safetensors file"),
        "w.pth": (b"not a torch file", "refusing to load it: not a weights-only torch.save file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            read_weights(tmp_path / name)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_weights(tmp_path / "list.pt")
    torch.save({"epoch": 3, "weights": {"a": torch.zeros(1)}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="entries that are not tensors .*epoch, weights.*one of state_dict"):
        read_weights(tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="no such weights file"):
        read_weights(tmp_path / "absent.pth")


class Payload:
    """Unpickling this creates ``marker``: the side effect a malicious .pth would have."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle", "nested"])
def test_a_pth_with_a_pickled_payload_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "payload-ran"
    Payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    if kind == "raw-pickle":
        path.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    elif kind == "nested":
        torch.save({"state_dict": {"fc.weight": torch.zeros(2)}, "hook": [Payload()]}, path)
    else:
        torch.save({"fc.weight": torch.zeros(2), "x": Payload()}, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    text = str(err.value)
    assert "refusing to load it" in text and "weights_only=True" in text and "\n" not in text
    if kind != "raw-pickle":
        assert re.search(r"pickles (io|builtins)\.open, which is not a tensor", text), "the refused global is named"
    assert not marker.exists(), "the pickled payload ran"


# --------------------------------------------------------------------------- --input-normalization
def test_input_normalization_replaces_and_never_stacks():
    torch.manual_seed(0)
    net = create_model("resnet50", num_classes=4, image_size=32).eval()
    bare = create_model("resnet50", num_classes=4, image_size=32, normalize=None).eval()
    bare.load_state_dict(net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    stats = normalization_stats("0.5,0.25", 3)
    assert stats == ((0.5,) * 3, (0.25,) * 3)
    replaced = set_normalization(net, stats)
    assert sum(isinstance(m, Normalize) for m in replaced.modules()) == 1
    with torch.no_grad():
        assert torch.allclose(replaced(x), bare((x - 0.5) / 0.25), atol=1e-5)
        assert torch.equal(set_normalization(replaced, None)(x), bare(x)), "none removes it"
    lenet = create_model("lenet5").eval()  # no normalisation layer: it goes in front
    wrapped = set_normalization(lenet, normalization_stats("0.1307,0.3081", 1))
    y = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(wrapped(y), lenet((y - 0.1307) / 0.3081))
    assert normalization_of(wrapped) == (pytest.approx((0.1307,)), pytest.approx((0.3081,)))
    per_channel = normalization_stats("0.4,0.5,0.6,0.2,0.3,0.4", 3)
    assert per_channel == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    assert normalization_stats("imagenet", 1)[0] == pytest.approx((sum(NORMALIZATIONS["imagenet"][0]) / 3,))


@pytest.mark.parametrize("spec", ["0.5", "0.1,0.2,0.3", "a,b", "0.5,0", "0.5,-1", "nan,1"])
def test_bad_input_normalization(spec):
    with pytest.raises(ConfigError, match="input_normalization: ") as err:
        normalization_stats(spec, 3)
    assert "\n" not in str(err.value)
