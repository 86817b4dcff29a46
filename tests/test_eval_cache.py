"""The evaluation cache (both users: the protocol and the transfer matrix), the one black-box
evaluation, and the parts of ``reproduce`` (scales, protocols with declared metrics, presets
checked against them)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import train_small_cnn
from safetensors.torch import save_file

from logitpair.attacks import ATTACKS, predict
from logitpair.errors import ConfigError
from logitpair.evaluation import pgd_spec, run_protocol, transfer_matrix
from logitpair.evaluation.blackbox import black_box, craft
from logitpair.evaluation.cache import EvalCache, Fingerprint, run_batches
from logitpair.evaluation.transfer import craft_fingerprint
from logitpair.experiments.presets import PRESETS, Column, Comparison, Preset
from logitpair.experiments.protocols import PROTOCOLS
from logitpair.experiments.reproduce import ReproduceOptions, make_plan, row_config
from logitpair.experiments.scales import SMALL_LAMBDA, SmallScale
from logitpair.metrics import topk_correct
from logitpair.threat import Linf

THREAT = Linf(0.1)


@pytest.fixture(scope="module")
def source(tiny_data):
    return train_small_cnn(*tiny_data, seed=1)


def _points(tiny_data, n=40):
    return tiny_data[0][:n], tiny_data[1][:n]


class _Interrupt(Exception):
    pass


def _dying_after(monkeypatch, name: str, calls: int) -> dict[str, int]:
    """Make attack ``name`` raise on call ``calls + 1``; count the calls."""
    real = ATTACKS._items[name]
    real = getattr(real, "__wrapped__", real)
    seen = {"n": 0}

    def attack(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] > calls:
            raise _Interrupt
        return real(*args, **kwargs)

    attack.__wrapped__ = real  # type: ignore[attr-defined]
    monkeypatch.setitem(ATTACKS._items, name, attack)
    return seen


# --------------------------------------------------------------------------- the cache itself
def test_run_batches_resumes_per_batch_and_ignores_other_fingerprints(tmp_path):
    path = tmp_path / "state.safetensors"
    fresh = lambda: {"v": torch.zeros(10, dtype=torch.long)}
    done = []

    def step(b, start, stop, st):
        if b == 2:
            raise _Interrupt
        done.append(b)
        st["v"][start:stop] = b + 1

    with pytest.raises(_Interrupt):
        run_batches(10, 3, EvalCache(path, "fp"), fresh=fresh, step=step)
    assert done == [0, 1]
    tensors, n_done = EvalCache(path, "fp").load()
    assert n_done == 6 and tensors["v"].tolist() == [1, 1, 1, 2, 2, 2, 0, 0, 0, 0]

    def step2(b, start, stop, st):
        done.append(b)
        st["v"][start:stop] = b + 1

    st = run_batches(10, 3, EvalCache(path, "fp"), fresh=fresh, step=step2)
    assert done == [0, 1, 2, 3], "the finished batches are not run again"
    assert st["v"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert EvalCache(path, "other").load() is None, "another fingerprint is never used"
    done.clear()
    run_batches(10, 3, EvalCache(path, "other"), fresh=fresh, step=step2)
    assert done == [0, 1, 2, 3], "a fingerprint mismatch recomputes everything"
    path.write_bytes(b"not a safetensors file")
    assert EvalCache(path, "other").load() is None
    assert EvalCache(None, "fp").load() is None


def test_a_complete_file_without_done_reads_as_complete(tmp_path):
    """The transfer matrix's stored examples before the cache existed: metadata ``n``, no ``done``."""
    path = tmp_path / "old.safetensors"
    save_file({"x_adv": torch.zeros(4, 2)}, str(path), metadata={"fingerprint": "f", "n": "4"})
    tensors, done = EvalCache(path, "f").load()
    assert done == 4 and tensors["x_adv"].shape == (4, 2)


def test_fingerprint_is_order_sensitive_and_covers_weights(trained_model, source):
    a = Fingerprint().json({"seed": 0}).raw_weights(trained_model).hexdigest()
    assert a == Fingerprint().json({"seed": 0}).raw_weights(trained_model).hexdigest()
    assert a != Fingerprint().json({"seed": 1}).raw_weights(trained_model).hexdigest()
    assert a != Fingerprint().json({"seed": 0}).raw_weights(source).hexdigest()


# --------------------------------------------------------------------------- user 1: the protocol
def test_protocol_resumes_per_batch_through_the_cache(trained_model, tiny_data, tmp_path, monkeypatch):
    x, y = _points(tiny_data)
    kw = {"threat": THREAT, "seed": 1, "batch_size": 16}
    attacks = [pgd_spec(2, 1)]
    full = run_protocol(trained_model, x, y, attacks, **kw)
    state = tmp_path / "wb.safetensors"
    _dying_after(monkeypatch, "pgd", 1)
    with pytest.raises(_Interrupt):
        run_protocol(trained_model, x, y, attacks, state_path=state, **kw)
    assert EvalCache(state, "?").load() is None  # keyed: only the right fingerprint reads it
    seen = _dying_after(monkeypatch, "pgd", 100)
    resumed = run_protocol(trained_model, x, y, attacks, state_path=state, **kw)
    assert seen["n"] == 2, "batches 2 and 3 only"
    for f in ("clean_correct", "robust", "broken_by"):
        assert torch.equal(getattr(full, f), getattr(resumed, f)), f


def test_protocol_state_with_another_fingerprint_is_recomputed(trained_model, tiny_data, tmp_path):
    x, y = _points(tiny_data)
    state = tmp_path / "wb.safetensors"
    kw = {"threat": THREAT, "seed": 1, "batch_size": 16, "state_path": state}
    n = len(x)
    garbage = {"clean1": torch.ones(n, dtype=torch.bool), "robust1": torch.ones(n, dtype=torch.bool),
               "broken_by": torch.full((n,), -1), "attacked": torch.zeros(1, dtype=torch.long)}  # fmt: skip
    EvalCache(state, "written by other settings").save(garbage, n)
    res = run_protocol(trained_model, x, y, [pgd_spec(2, 1)], **kw)
    fresh = run_protocol(trained_model, x, y, [pgd_spec(2, 1)], threat=THREAT, seed=1, batch_size=16)
    assert torch.equal(res.robust, fresh.robust) and not res.robust.all()


# --------------------------------------------------------------------------- user 2: the transfer matrix
def test_transfer_crafting_resumes_per_batch_through_the_cache(trained_model, source, tiny_data, tmp_path, monkeypatch):
    x, y = _points(tiny_data)
    models = {"a": trained_model, "b": source}
    kw = {"attack": pgd_spec(2, 1), "threat": THREAT, "seed": 2, "batch_size": 16}
    full = transfer_matrix(models, x, y, **kw)
    _dying_after(monkeypatch, "pgd", 1)  # crafting on "a" dies in its second batch
    with pytest.raises(_Interrupt):
        transfer_matrix(models, x, y, **kw, state_dir=tmp_path)
    partial = list(tmp_path.glob("*.partial.safetensors"))
    assert len(partial) == 1
    fp = craft_fingerprint(trained_model, kw["attack"], THREAT, x, y, 2, 16)
    assert partial[0].name == f"{fp[:24]}.partial.safetensors"
    seen = _dying_after(monkeypatch, "pgd", 1000)
    res = transfer_matrix(models, x, y, **kw, state_dir=tmp_path)
    clean_wrong_a = int((~full.clean["a"]).sum() > 0)
    assert seen["n"] <= 2 + clean_wrong_a + 3 + int((~full.clean["b"]).sum() > 0), "a's first batch not crafted again"
    for s in models:
        assert torch.equal(res.adversarial[s], full.adversarial[s]), s
        for t in models:
            assert torch.equal(res.robust[s][t], full.robust[s][t])
    assert not list(tmp_path.glob("*.partial.safetensors")), "the partial state is removed once complete"


def test_transfer_store_with_another_fingerprint_is_recrafted(trained_model, tiny_data, tmp_path, monkeypatch):
    x, y = _points(tiny_data)
    kw = {"attack": pgd_spec(2, 1), "threat": THREAT, "seed": 2, "batch_size": 16, "state_dir": tmp_path}
    first = transfer_matrix({"a": trained_model}, x, y, **kw)
    (stored,) = tmp_path.glob("*.safetensors")
    save_file({"x_adv": torch.zeros_like(x)}, str(stored), metadata={"fingerprint": "stale", "done": str(len(x))})
    seen = _dying_after(monkeypatch, "pgd", 1000)
    again = transfer_matrix({"a": trained_model}, x, y, **kw)
    assert seen["n"] > 0 and not again.crafted["a"]["reused"]
    assert torch.equal(again.adversarial["a"], first.adversarial["a"]), "never the stale examples"


# --------------------------------------------------------------------------- one black-box evaluation
def test_black_box_per_target_equals_the_protocols_transfer_attack(trained_model, source, tiny_data):
    """What ``evaluate`` and ``reproduce``'s targeted tables computed before: run_protocol with a transfer attack."""
    x, y = _points(tiny_data)
    for targeted, top5 in ((False, False), (True, True)):
        kw = {"threat": THREAT, "seed": 3, "batch_size": 16, "targeted": targeted, "top5": top5}
        before = run_protocol(trained_model, x, y, [pgd_spec(2, 1, transfer=True)], source=source, **kw)
        bb = black_box(trained_model, x, y, source=source, attack=pgd_spec(2, 1, transfer=True), **kw)
        assert torch.equal(bb.robust, before.robust) and torch.equal(bb.clean, before.clean_correct)
        assert bb.summary() == before.summary()
        if targeted:
            assert torch.equal(bb.protocol.target, before.target)
            assert torch.equal(bb.protocol.target_hit, before.target_hit)


def test_black_box_on_crafted_examples_equals_the_old_computations(trained_model, source, tiny_data):
    """``transfer``/``reproduce`` (topk_correct on the crafted examples, clean & that) and the demo (argmax)."""
    x, y = _points(tiny_data)
    x_adv, _ = craft(source, x, y, pgd_spec(2, 1), threat=THREAT, seed=0, batch_size=16)
    bb = black_box(trained_model, x, y, crafted=x_adv)
    clean = topk_correct(predict(trained_model, x), y, 1).cpu()
    plain = topk_correct(predict(trained_model, x_adv), y, 1).cpu()
    assert torch.equal(bb.clean, clean) and torch.equal(bb.plain, plain) and torch.equal(bb.robust, clean & plain)
    demo = (predict(trained_model, x).argmax(1) == y) & (predict(trained_model, x_adv).argmax(1) == y)
    assert torch.equal(bb.robust, demo)
    given = torch.zeros_like(clean)
    assert not black_box(trained_model, x, y, crafted=x_adv, clean=given).robust.any(), "given clean flags are used"
    assert bb.summary()["robust"]["value"] <= bb.summary()["plain"]["value"]
    with pytest.raises(ValueError, match="either"):
        black_box(trained_model, x, y)
    with pytest.raises(ValueError, match="either"):
        black_box(trained_model, x, y, crafted=x_adv, source=source)


# --------------------------------------------------------------------------- reproduce's parts
def _preset(**kw):
    t1 = PRESETS.get("table1")
    return dataclasses.replace(t1, name="test-preset", **kw)


def test_presets_are_checked_against_their_protocols_metrics():
    _preset()  # table1 as it is: valid
    with pytest.raises(ConfigError, match="column metric 'whitebox' is not measured by protocol untargeted"):
        _preset(columns=(Column("whitebox", "White box"),), rows=tuple(
            dataclasses.replace(r, paper={}) for r in PRESETS.get("table1").rows))  # fmt: skip
    with pytest.raises(ConfigError, match="comparison metric 'strongest'"):
        _preset(compare=(Comparison("alp", "mpgd", "strongest"),))
    with pytest.raises(ConfigError, match="comparison metric 'wb_top1'"):
        _preset(compare=(Comparison("alp", "mpgd", "white_box", "wb_top1"),))
    no_source = tuple(dataclasses.replace(r, source="") if r.name == "alp" else r for r in PRESETS.get("table1").rows)
    with pytest.raises(ConfigError, match="'black_box' is not measured .* for row alp"):
        _preset(rows=no_source)
    with pytest.raises(ConfigError, match="not a table row"):
        _preset(compare=(Comparison("alp", "mpgd-source", "clean"),))
    with pytest.raises(ConfigError, match="protocol must be one of"):
        _preset(protocol="other")


def test_every_registered_preset_measures_its_columns():
    for name in PRESETS:
        p: Preset = PRESETS.get(name)
        protocol = PROTOCOLS.get(p.protocol)
        for r in p.table_rows:
            keys = [m.key for m in protocol.metrics(p, r)]
            assert {c.key for c in p.columns} <= set(keys), name
            assert all(protocol.label(k) != k for k in keys), "every metric has a label"


def test_small_scale_prose_is_written_from_its_configs():
    assert SmallScale.training_prose() == (
        "training as the demo: L∞ ε = 0.1, PGD 7 steps of 0.025 from a random start for M-PGD / ALP, "
        "Adam lr 1e-3, cosine schedule, batch 128, 2 epochs (black-box sources 1 epoch), the demo's λ "
        "(ALP / CLP 0.5, LSQ 0.05) (ours)"
    )
    for name in PRESETS:  # the λ the prose states is the one the small rows train with
        plan = make_plan(ReproduceOptions(name, scale="small"))
        for row in plan.preset.rows:
            if row.method in SMALL_LAMBDA:
                cfg = row_config(plan, row, seed_index=0, data_dir=None, device="cpu",
                                 static_dirs=["a", "b"][: len(row.static)])  # fmt: skip
                assert cfg.loss.lam == SMALL_LAMBDA[row.method], (name, row.name)


def test_smoke_prose_follows_the_smoke_settings():
    plan = make_plan(ReproduceOptions("table1", scale="smoke", n=3))
    assert "one training step of batch 2, one attack step, 3 test points, a two-attack suite" in plan.substitutions[-1]
