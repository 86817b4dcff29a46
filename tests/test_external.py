"""Models from elsewhere through the commands: ``--model NAME --weights FILE`` or
``--model-factory``, with ``--eps`` and ``--dataset`` / ``--points`` required, and ``--points``
files checked with one clear error."""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from logitpair.cli import main
from logitpair.data.points import load_points
from logitpair.errors import ConfigError
from logitpair.evaluation import EvalOptions, evaluate_run
from logitpair.evaluation import test_points as points_of  # (not collected as a test)
from logitpair.evaluation.cache import points_digest
from logitpair.external import ExternalModel
from logitpair.models import create_model

FAST = ["--suite", "none", "--steps", "3", "--restarts", "1", "--quiet"]


def fails(capsys, argv, *expected):
    """Exit 2 with one line naming ``expected``."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("logitpair: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


# --------------------------------------------------------------------------- --points files
def _points(tmp_path, name="p.npz", **arrays):
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        save_file({k: torch.as_tensor(v) for k, v in arrays.items()}, str(path))
    return path


GOOD_X = np.random.default_rng(0).uniform(0, 1, (5, 1, 28, 28)).astype(np.float32)
GOOD_Y = np.array([0, 1, 2, 3, 9])


def test_points_files_in_both_formats(tmp_path):
    for name in ("p.npz", "p.safetensors"):
        x, y = load_points(_points(tmp_path, name, x=GOOD_X, y=GOOD_Y, extra=np.zeros(2)))
        assert x.dtype == torch.float32 and x.shape == (5, 1, 28, 28) and torch.equal(y, torch.tensor(GOOD_Y))
    x64, _ = load_points(_points(tmp_path, "f64.npz", x=GOOD_X.astype(np.float64), y=GOOD_Y.astype(np.uint8)))
    assert x64.dtype == torch.float32


BAD_POINTS = [
    ({"x": GOOD_X * 1.5, "y": GOOD_Y}, "x has values outside [0, 1] (min 0"),
    ({"x": GOOD_X - 0.5, "y": GOOD_Y}, "x has values outside [0, 1]"),
    ({"x": GOOD_X[:, 0], "y": GOOD_Y}, "x has shape (5, 28, 28); expected N x C x H x W"),
    ({"x": (GOOD_X * 255).astype(np.uint8), "y": GOOD_Y}, "x is torch.uint8; expected floating-point pixels"),
    ({"x": GOOD_X, "y": GOOD_Y[:4]}, "y has shape (4,); expected (5,)"),
    ({"x": GOOD_X, "y": GOOD_Y - 1}, "y has negative labels"),
    ({"x": GOOD_X, "y": GOOD_Y.astype(np.float32)}, "y is torch.float32; expected integer class labels"),
    ({"x": GOOD_X}, "has no y (it holds x)"),
    ({"x": np.where(GOOD_X > 0.5, np.nan, GOOD_X), "y": GOOD_Y}, "x holds NaN or infinite values"),
]


@pytest.mark.parametrize("arrays, message", BAD_POINTS)
def test_bad_points_are_one_clear_error(tmp_path, arrays, message):
    path = _points(tmp_path, **arrays)
    with pytest.raises(ConfigError) as err:
        load_points(path)
    assert err.value.option == "points" and message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_points_files(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=GOOD_Y)  # needs pickle to read back
    np.save(tmp_path / "single.npy", GOOD_X)
    shutil.move(tmp_path / "single.npy", tmp_path / "single.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    (tmp_path / "p.txt").write_text("1 2 3")
    for name, message in (("obj.npz", "not a readable .npz of arrays"), ("single.npz", "a single .npy array"),
                          ("junk.safetensors", "not a valid safetensors file"), ("p.txt", "expected .safetensors or .npz"),
                          ("absent.npz", "no such file")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_points(tmp_path / name)


# --------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory, lenet5_points):
    """The trained LeNet-5's weights in several files and its 12 held-out points."""
    model, x, y = lenet5_points
    root = tmp_path_factory.mktemp("external")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, root / "lenet.pth")
    save_file(model.state_dict(), str(root / "lenet.safetensors"))
    np.savez(root / "points.npz", x=x.numpy(), y=y.numpy())
    return root


def test_evaluate_a_weights_file_on_points(tmp_path, lenet_files, lenet5_points, capsys):
    model, x, y = lenet5_points
    out = tmp_path / "results"
    argv = ["evaluate", str(out), "--model", "lenet5", "--weights", str(lenet_files / "lenet.pth"), "--eps", "0.1",
            "--points", str(lenet_files / "points.npz"), "--json", *FAST]  # fmt: skip
    assert main(argv) == 0
    ev = json.loads(capsys.readouterr().out)
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert ev["n"] == 12 and ev["clean"]["value"] == pytest.approx(clean) and ev["eps"] == pytest.approx(0.1)
    assert ev["dataset"] == "points:points.npz" and ev["method"] is None
    assert ev["external"]["model"] == "lenet5" and ev["external"]["layout"] == "logitpair"
    assert len(ev["external"]["sha256"]) == 64 and ev["external"]["normalization"] is None
    assert "Model from elsewhere: `lenet5`, weights" in (out / "evaluation.md").read_text()
    api = evaluate_run(tmp_path / "api", EvalOptions(n=12, steps=3, restarts=1, suite=None), write=False,
                       external=ExternalModel(model="lenet5", weights=str(lenet_files / "lenet.safetensors"),
                                              eps=0.1, points=str(lenet_files / "points.npz")))  # fmt: skip
    assert api["per_example"] == ev["per_example"], "the same model, however its weights were saved"
    assert not (tmp_path / "api").exists(), "write=False writes nothing"


def test_evaluate_a_torchvision_layout_file(tmp_path, capsys):
    """A ResNet-50 state dict as torchvision's DataParallel saves it, on the user's points."""
    torch.manual_seed(0)
    net = create_model("resnet50", num_classes=5, image_size=32).eval()
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "resnet50-dp.pth")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    y[0] = (y[0] + 1) % 5  # one point the model gets wrong
    save_file({"x": x, "y": y}, str(tmp_path / "points.safetensors"))
    argv = ["evaluate", str(tmp_path / "out"), "--model", "resnet50", "--weights", str(tmp_path / "resnet50-dp.pth"),
            "--eps", "1/255", "--points", str(tmp_path / "points.safetensors"), "--json", *FAST]  # fmt: skip
    assert main(argv) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["per_example"]["clean"] == "0111" and ev["external"]["layout"] == "torchvision"
    assert ev["external"]["normalization"][0] == pytest.approx([0.485, 0.456, 0.406])


def test_a_models_weights_evaluate_as_its_run_does(tmp_path, tiny_run, data_dir, capsys):
    """The weights of one of our runs, given as a model from elsewhere with the run's dataset and
    eps, give the run's own evaluation."""
    common = ["--n", "40", "--json", *FAST]
    assert main(["evaluate", str(tiny_run), "--no-resume", *common]) == 0
    ours = json.loads(capsys.readouterr().out)
    argv = ["evaluate", str(tmp_path / "ext"), "--model", "lenet5", "--weights", str(tiny_run / "model.safetensors"),
            "--eps", "0.1", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), *common]  # fmt: skip
    assert main(argv) == 0
    ext = json.loads(capsys.readouterr().out)
    assert ext["per_example"] == ours["per_example"] and ext["dataset"] == "fashion-mnist"
    fails(capsys, ["evaluate", str(tiny_run), *argv[2:]], "holds a run; the results of a model from elsewhere")


FACTORY = """
import torch
from torch import nn


def small_cnn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def not_a_model():
    return 3


def broken():
    raise RuntimeError("no GPU here")


def conv_only():
    return nn.Conv2d(1, 2, 3)
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    name = f"userfactory_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_evaluate_a_factory_model_with_its_own_normalisation(tmp_path, factory_module, lenet_files, capsys):
    import importlib

    net = importlib.import_module(factory_module).small_cnn()
    torch.manual_seed(5)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "mine.pth")
    x, y = load_points(lenet_files / "points.npz")
    argv = ["evaluate", str(tmp_path / "out"), "--model-factory", f"{factory_module}:small_cnn", "--weights",
            str(tmp_path / "mine.pth"), "--input-normalization", "0.5,0.25", "--eps", "0.05", "--points",
            str(lenet_files / "points.npz"), "--json", *FAST]  # fmt: skip
    assert main(argv) == 0
    ev = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        expected = (net.eval()((x - 0.5) / 0.25).argmax(1) == y).tolist()
    assert ev["per_example"]["clean"] == "".join("1" if c else "0" for c in expected)
    assert ev["external"]["normalization"] == [[0.5], [0.25]] and ev["external"]["factory"].endswith(":small_cnn")
    for target, message in ((f"{factory_module}:not_a_model", "returned a int, not a torch.nn.Module"),
                            (f"{factory_module}:broken", "broken() raised RuntimeError: no GPU here"),
                            (f"{factory_module}:absent", "has no 'absent'"),
                            ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                            ("not a spec", "expected package.module:function"),
                            (f"{factory_module}:conv_only", "returns (1, 2, 26, 26) for one image, not logits")):  # fmt: skip
        fails(capsys, ["evaluate", str(tmp_path / "o2"), "--model-factory", target, "--eps", "0.1", "--points",
                       str(lenet_files / "points.npz"), *FAST], "--model-factory: ", message)  # fmt: skip
    rgb = _points(tmp_path, "rgb.npz", x=np.zeros((2, 3, 28, 28), np.float32), y=np.zeros(2, int))
    fails(capsys, ["evaluate", str(tmp_path / "o3"), "--model-factory", f"{factory_module}:small_cnn", "--eps", "0.1",
                   "--points", str(rgb), *FAST], "--points: ", "images of shape (3, 28, 28) do not fit",
          "RuntimeError")  # fmt: skip


def test_what_a_model_from_elsewhere_needs_is_required(tmp_path, lenet_files, capsys):
    w, pts = str(lenet_files / "lenet.pth"), str(lenet_files / "points.npz")
    out = str(tmp_path / "out")
    cases = [
        (["--model", "lenet5", "--weights", w, "--points", pts], "--eps: a model from elsewhere has no recorded eps"),
        (["--model", "lenet5", "--weights", w, "--eps", "0.1"], "--dataset: a model from elsewhere has no recorded dataset"),
        (["--weights", w, "--eps", "0.1", "--points", pts], "--weights: only with --model or --model-factory"),
        (["--points", pts], "--points: only with --model or --model-factory"),
        (["--model", "lenet5", "--eps", "0.1", "--points", pts], "--weights: a registered architecture (lenet5) needs"),
        (["--model", "lenet5", "--model-factory", "a:b", "--weights", w, "--eps", "0.1", "--points", pts], "got both"),
        (["--model", "lenet9", "--weights", w, "--eps", "0.1", "--points", pts], "--model: unknown model 'lenet9'"),
        (["--model", "lenet5", "--weights", w, "--eps", "0.1", "--dataset", "mnist9"], "--dataset: unknown dataset"),
        (["--model", "lenet5", "--weights", w, "--eps", "2", "--points", pts], "--eps: expected an L-inf radius"),
        (["--model", "lenet5", "--weights", str(tmp_path / "no.pth"), "--eps", "0.1", "--points", pts],
         "--weights: ", "no.pth: no such file"),
        (["--model", "resnet50", "--weights", w, "--eps", "0.1", "--points", pts], "no classifier head of resnet50"),
        (["--model", "lenet5", "--weights", w, "--eps", "0.1", "--points", pts, "--input-normalization", "1,2,3"],
         "--input-normalization: expected none"),
    ]  # fmt: skip
    for extra, *messages in cases:
        fails(capsys, ["evaluate", out, *extra, *FAST], *messages)
    assert not (tmp_path / "out").exists(), "nothing is written before the model loads"


class Payload:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_payload_pth_given_to_evaluate_never_runs(tmp_path, lenet_files, capsys):
    Payload.marker = str(tmp_path / "payload-ran")
    torch.save({"features.0.weight": torch.zeros(16, 1, 5, 5), "x": Payload()}, tmp_path / "evil.pth")
    argv = ["evaluate", str(tmp_path / "out"), "--model", "lenet5", "--weights", str(tmp_path / "evil.pth"), "--eps",
            "0.1", "--points", str(lenet_files / "points.npz"), *FAST]  # fmt: skip
    fails(capsys, argv, "evil.pth: refusing to load it: it pickles", "torch.load(weights_only=True)")
    assert not (tmp_path / "payload-ran").exists() and not (tmp_path / "out").exists()


def test_points_that_do_not_fit_the_model(tmp_path, lenet_files, capsys):
    w = str(lenet_files / "lenet.pth")
    cases = [
        (_points(tmp_path, "big.npz", x=GOOD_X * 2, y=GOOD_Y), "--points: ", "x has values outside [0, 1]"),
        (_points(tmp_path, "rgb.npz", x=np.zeros((2, 3, 28, 28), np.float32), y=np.zeros(2, int)),
         "lenet.pth: shape mismatch with lenet5 for images (3, 28, 28): features.0.weight (file (16, 1, 5, 5)"),
        (_points(tmp_path, "labels.npz", x=GOOD_X, y=GOOD_Y + 3), "--points: ", "y has label 12, but the model has 10"),
        (_points(tmp_path, "flat.npz", x=GOOD_X.reshape(5, -1), y=GOOD_Y), "x has shape (5, 784)"),
    ]  # fmt: skip
    for path, *messages in cases:
        fails(capsys, ["evaluate", str(tmp_path / "o"), "--model", "lenet5", "--weights", w, "--eps", "0.1",
                       "--points", str(path), *FAST], *messages)  # fmt: skip


def test_transfer_and_certify_take_a_model_from_elsewhere(tmp_path, tiny_run, data_dir, capsys):
    ext = ["--model", "lenet5", "--weights", str(tiny_run / "model.safetensors"), "--eps", "0.1", "--dataset",
           "fashion-mnist", "--data-dir", str(data_dir)]  # fmt: skip
    out = tmp_path / "transfer"
    assert main(["transfer", str(tiny_run), *ext, "--n", "20", "--attack", "pgd:steps=3", "--out", str(out),
                 "--json", "--quiet"]) == 0  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert doc["targets"] == ["run", "model"] and doc["external"]["model"]["layout"] == "logitpair"
    robust = doc["robust"]
    assert robust["run"]["model"]["value"] == robust["run"]["run"]["value"], "the same weights: white-box twice"
    cert = tmp_path / "cert"
    argv = ["certify", str(cert), *ext, "--n", "10", "--method", "ibp", "--eps-curve", "0.1", "--quiet"]
    assert main(argv) == 0
    doc = json.loads((cert / "certify.json").read_text())
    assert doc["model"] == "lenet5" and doc["certify"]["n"] == 10 and doc["settings"]["eps"] == pytest.approx(0.1)
    x, y, _ = points_of(ExternalModel(eps=0.1, model="lenet5", weights=str(tiny_run / "model.safetensors"),
                                        dataset="fashion-mnist", data_dir=str(data_dir)).load_run()[1], 10)  # fmt: skip
    assert doc["points"]["digest"] == points_digest(x, y)


def test_audit_takes_a_model_from_elsewhere(tmp_path, lenet_files, capsys):
    out = tmp_path / "audit"
    argv = ["audit", str(out), "--model", "lenet5", "--weights", str(lenet_files / "lenet.safetensors"), "--eps",
            "0.1", "--points", str(lenet_files / "points.npz"), "--quick", "--n", "8", "--steps", "3", "--restarts",
            "1", "--suite", "quick", "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n"] == 8 and doc["dataset"] == "points:points.npz" and (out / "audit.md").is_file()
