"""The evaluation engine: suites, per-sample worst case, masking checks, the store."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from torch import nn
from toys import Saturated, toy_cnn

import advkit
from advkit import attacks
from advkit.evaluation import SUITES, Stage, Store, Suite, get_suite, read_report
from advkit.threat import ThreatModel

LINF = ThreatModel("linf", 0.1)


def quick_suite() -> Suite:
    """The standard suite's four attacks with small budgets (tests stay in seconds)."""
    return Suite("quick", (
        Stage("apgd-ce", "apgd", {"steps": 20, "loss": "ce"}),
        Stage("apgd-t", "apgdt", {"steps": 20, "n_target_classes": 3}),
        Stage("fab-t", "fab", {"steps": 20, "target_classes": 2}),
        Stage("square", "square", {"n_queries": 100}),
    ))


class Noisy(nn.Module):
    """A randomised model: Gaussian noise on the input at every forward pass."""

    def __init__(self, model: nn.Module, sigma: float = 0.1) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


class Softmaxed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(1)


@pytest.fixture(scope="module")
def data(mnist_test):
    x, y = mnist_test
    return x[:200], y[:200]


# --- suites ------------------------------------------------------------------------------------


def test_standard_suite_is_autoattacks_published_configuration():
    stages = {s.name: s for s in SUITES["standard"].stages}
    assert [s.name for s in SUITES["standard"].stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert stages["apgd-ce"].params == {"steps": 100, "loss": "ce"}
    assert stages["apgd-t"].params == {"steps": 100, "n_target_classes": 9}
    assert stages["fab-t"].params == {"steps": 100, "target_classes": 9}
    assert stages["square"].params == {"n_queries": 5000}
    assert SUITES["minimal"].kind == "minimal"
    assert all(s.eot > 1 for s in SUITES["rand"].stages)
    # thorough = standard + more, with every black-box stage after every white-box one (the
    # black-box check counts images a black-box stage broke after all white-box stages failed)
    thorough = SUITES["thorough"].stages
    assert {s.name: s.params for s in thorough if s.name in stages} == \
        {name: s.params for name, s in stages.items()}
    kinds = [s.attack_class.taxonomy.black_box for s in thorough]
    assert kinds == sorted(kinds) and kinds[-1]
    # and a decision-based stage (labels only) among them
    assert any(s.attack_class.access == "labels" for s in thorough)


class _Plateau(torch.nn.Module):
    """A model whose scores say nothing but the decision: a one-hot of its argmax (the
    scores are flat around every input, so gradients and Square's score search see no
    slope), while its decisions are a real classifier's."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return 10.0 * torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).to(z.dtype) + 0 * z


def test_thoroughs_decision_based_stage_breaks_what_square_cannot_on_flat_scores(
        mnist_model, data):
    x, y = data[0][:10], data[1][:10]
    model = _Plateau(mnist_model).eval()
    threat = ThreatModel("linf", 0.3)
    stage = next(s for s in SUITES["thorough"].stages if s.attack == "hopskipjump")
    square = next(s for s in SUITES["thorough"].stages if s.attack == "square")
    # Budgets cut to keep the test short; the stages' configurations otherwise.
    hsj = attacks.get(stage.attack)(threat, **{**stage.params, "max_queries": 1000})
    sq = attacks.get(square.attack)(threat, **{**square.params, "n_queries": 200})
    decided = hsj(model, x, y)
    scored = sq(model, x, y)
    # A flat score gives Square no direction: it breaks only what its first random
    # stripes happen to break; the decision-based search follows the boundary.
    assert int(decided.success.sum()) >= int(scored.success.sum()) + 3


def test_suite_from_toml_and_json(tmp_path):
    (tmp_path / "s.toml").write_text(
        'kind = "budgeted"\n[[stage]]\nname = "a"\nattack = "apgd"\nparams = { steps = 5 }\n'
        '[[stage]]\nattack = "square"\nparams = { n_queries = 10 }\n')
    suite = get_suite(tmp_path / "s.toml")
    assert [s.name for s in suite.stages] == ["a", "square"]
    assert suite.stages[0].params == {"steps": 5}
    (tmp_path / "s.json").write_text(json.dumps(suite.to_dict()))
    assert get_suite(tmp_path / "s.json").to_dict() == {**suite.to_dict(), "name": "s"}


@pytest.mark.parametrize("text, message", [
    ('[[stage]]\nattack = "nope"\n', "unknown attack"),
    ('[[stage]]\nname = "x"\n', "needs at least `attack"),
    ('kind = "budgeted"\n', "non-empty list of stages"),
    ('[[stage]]\nattack = "apgd"\n[[stage]]\nattack = "apgd"\n', "unique"),
    ('[[stage]]\nattack = "apgd"\nspeed = 3\n', "unknown keys"),
    ('[[stage]]\nattack = "apgd"\neot = 0\n', "eot must be"),
    ('[[stage\n', "not valid"),
    ('[[stage]]\nattack = "apgd"\nparams = { stesp = 10 }\n',
     r"stage 'apgd' \(apgd\): unknown option 'stesp' \(did you mean 'steps'\?\)"),
    ('knd = "minimal"\n[[stage]]\nattack = "fab"\n',
     r"unknown key 'knd' \(did you mean 'kind'\?\)"),
])
def test_bad_suite_files_are_refused(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        get_suite(tmp_path / "bad.toml")


def test_suite_composed_inline():
    suite = get_suite("apgd:steps=50,loss=dlr+square:n_queries=1000+apgd")
    assert [(s.name, s.attack, s.params) for s in suite.stages] == [
        ("apgd", "apgd", {"steps": 50, "loss": "dlr"}), ("square", "square", {"n_queries": 1000}),
        ("apgd-3", "apgd", {})]
    assert get_suite("fab").stages[0].attack == "fab"
    with pytest.raises(ValueError, match="key=value"):
        get_suite("apgd:steps")
    with pytest.raises(ValueError, match="unknown attack"):
        get_suite("apgd+nope")


def test_a_bad_suite_fails_before_any_work_and_names_the_stage(tmp_path):
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    store = tmp_path / "runs.sqlite"
    for suite, message in (("apgd:stesp=5", r"stage 'apgd' \(apgd\): unknown option 'stesp'"),
                           ("apgd:steps=-5", r"stage 'apgd' \(apgd\): steps must be >= 1")):
        with pytest.raises(ValueError, match=message):
            advkit.evaluate(model, x, y, LINF, suite, store=store, progress=False)
    assert not store.exists()  # nothing was started, so nothing was stored


def test_a_targeted_only_stage_is_refused_before_a_run_is_stored(tmp_path, batch):
    """The engine attacks without targets: JSMA (targeted only) cannot be a stage (it
    used to fail at its first chunk, the clean pass stored)."""
    x, y = batch  # all classified as labelled: the stage would have images to attack
    suite = Suite("jsma", (Stage("jsma", "jsma", {"gamma": 0.05}),), kind="minimal")
    with pytest.raises(ValueError, match=r"stage 'jsma' \(jsma\) cannot run in an evaluation, "
                                         r"which attacks without targets=: JSMA is targeted"):
        advkit.evaluate(toy_cnn(), x, y, ThreatModel("l1", 10.0), suite=suite,
                        store=tmp_path / "runs.db", progress=False)
    assert not (tmp_path / "runs.db").exists()


def test_out_of_range_labels_are_refused_before_a_run_is_stored(tmp_path):
    x = torch.rand(4, 1, 8, 8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    store = tmp_path / "runs.sqlite"
    for bad in (10, 1000, -1):
        y = torch.tensor([0, 1, bad, 3])
        with pytest.raises(ValueError, match=r"y must be in \[0, 9\] for a model with 10"):
            advkit.evaluate(model, x, y, LINF, "fast", store=store, progress=False)
    assert not store.exists()


def test_unknown_suite_and_missing_file():
    with pytest.raises(ValueError, match="unknown suite 'strong'"):
        get_suite("strong")
    with pytest.raises(FileNotFoundError):
        get_suite("missing.toml")


def test_suite_keeps_only_stages_for_the_norm():
    assert [s.name for s in SUITES["minimal"].for_norm("l1").stages] == ["fab", "fab-t", "ead"]
    with pytest.raises(ValueError, match="supports the l1 norm"):
        Suite("x", (Stage("sq", "square"),)).for_norm("l1")


# --- the engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(mnist_model, data):
    """One run of the quick suite, its report and its store, shared by several tests."""
    x, y = data
    store = Store(":memory:")
    # 100 check samples, not 30: two APGD-CE seeds disagree on about 1% of a healthy model's
    # images (0-5 of 200) and the restarts check warns above 5%, on 30 images at 2 of them
    # (it warned on one of the 7 retrainings, conftest); of 100 they disagreed on 0-3.
    report = advkit.evaluate(mnist_model, x[:120], y[:120], LINF, quick_suite(), batch_size=50,
                             progress=False, check_samples=100, store=store)
    return report, store


def test_per_sample_worst_case_and_each_stage_only_attacks_survivors(quick_run):
    report, _ = quick_run
    rows = report.per_sample
    n = len(rows)
    clean_correct = [r for r in rows if r["clean_pred"] == r["label"]]
    assert report.clean_accuracy == pytest.approx(len(clean_correct) / n)
    assert report.robust_accuracy == pytest.approx(sum(r["broken_by"] is None for r in rows) / n)
    # each stage attacked exactly the samples still standing after the previous ones
    standing = len(clean_correct)
    for stage in report.stages:
        assert stage["attacked"] == standing
        standing -= stage["broken"]
    assert standing == round(report.robust_accuracy * n)
    assert 0.3 < report.robust_accuracy < 0.9  # eps 0.1 breaks some, not all: 55-66% left
    # the first stage found most; the per-sample record says which and with what norm
    assert report.stages[0]["broken"] > 0
    for r in rows:
        if r["broken_by"] not in (None, "clean"):
            assert 0 < r["norm"] <= 0.1 + 1e-6 and r["prediction"] != r["label"]
    # every attack reports its exact per-sample cost (forward + backward passes)
    assert all(r["passes"] > 0 and r["passes_exact"] for r in clean_correct)


def test_healthy_model_passes_every_check(quick_run):
    report, _ = quick_run
    status = {c.name: c.status for c in report.checks}
    assert status == {"randomness": "pass", "logits": "pass", "gradients": "pass",
                      "black_box": "pass", "eps_monotone": "pass", "unbounded": "pass",
                      "restarts": "pass"}
    assert report.reliable


def test_success_flags_agree_with_a_fresh_forward_pass_on_stored_examples(quick_run,
                                                                          mnist_model, data):
    report, store = quick_run
    x, y = data
    images = store.images(report.run_id)
    assert images
    for _, idx, info, clean, adv in images:
        adv = torch.from_numpy(adv.copy())[None]
        assert torch.equal(torch.from_numpy(clean.copy()), x[idx])
        assert (adv - x[idx]).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            pred = mnist_model(adv).argmax(1).item()
        assert pred == info["adv_pred"] != y[idx].item()


def test_robust_accuracy_matches_the_closed_form_on_an_affine_classifier(mnist_test):
    """For z = Wx + b under Linf eps inside the box [0, 1], min over the ball of the margin
    z_y - z_j is separable per pixel: each pixel moves by the most it may, against the sign
    of (w_y - w_j). A sample is robust iff every margin stays positive: APGD-T's targeted
    runs (one per other class) must find exactly the breakable samples."""
    x, y = mnist_test
    x, y, x_fit, y_fit = x[:300], y[:300], x[300:2300], y[300:2300]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):  # logistic regression, about 92% accurate
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_fit), y_fit).backward()
        opt.step()
    model.eval()
    eps = 0.02
    w, b = model[1].weight.detach().double(), model[1].bias.detach().double()
    xf = x.reshape(len(x), -1).double()
    robust = []
    for i in range(len(x)):
        c = w[y[i]] - w                     # (10, 784): margin gradients, per other class
        lo, hi = (-xf[i]).clamp(min=-eps), (1 - xf[i]).clamp(max=eps)
        worst = torch.where(c > 0, lo, hi)  # move each pixel to shrink the margin most
        margins = (c * (xf[i] + worst)).sum(1) + (b[y[i]] - b)
        margins[y[i]] = float("inf")
        robust.append(bool((margins > 0).all()))
    expected = sum(robust) / len(x)
    suite = Suite("t", (Stage("apgd-t", "apgdt", {"steps": 10, "n_target_classes": 9}),))
    report = advkit.evaluate(model, x, y, ThreatModel("linf", eps), suite, progress=False,
                             checks=False)
    assert 0.2 < expected < 0.95
    assert report.robust_accuracy == pytest.approx(expected, abs=1 / 300)
    assert [r["robust"] for r in report.per_sample].count(True) >= sum(robust) - 1


def test_minimal_suite_gives_a_monotone_curve_and_accuracy_at_eps(mnist_model, data):
    x, y = data
    x, y = x[:60], y[:60]
    suite = Suite("m", (Stage("deepfool", "deepfool", {}), Stage("fab", "fab", {"steps": 20})),
                  kind="minimal")
    store = Store(":memory:")
    report = advkit.evaluate(mnist_model, x, y, ThreatModel("l2", 1.5), suite, progress=False,
                             checks=False, store=store)
    curve = next(iter(report.curves.values()))
    accs = [a for _, a in curve]
    assert accs == sorted(accs, reverse=True) and accs[0] == report.clean_accuracy
    # every stage ran on every correctly classified sample; each keeps its smallest norm
    found: dict[int, list[float]] = {}
    for _, o in store.outcomes(report.run_id):
        if o.success:
            found.setdefault(o.idx, []).append(o.norm)
    assert len(store.outcomes(report.run_id)) == 2 * round(report.clean_accuracy * 60)
    for r in report.per_sample:
        if r["broken_by"] not in (None, "clean"):
            assert r["norm"] == min(found[r["idx"]])
    expected = sum(r["broken_by"] is None or r["norm"] > 1.5 for r in report.per_sample) / 60
    assert report.robust_accuracy == pytest.approx(expected)
    assert 0 < report.robust_accuracy < report.clean_accuracy  # 47-60% < 100% (7 retrainings)


# --- checks --------------------------------------------------------------------------------------


def test_masked_model_is_flagged_and_a_margin_attack_recovers_the_true_figure(mnist_model,
                                                                               data):
    x, y = data
    x, y = x[:100], y[:100]
    masked = Saturated(mnist_model).eval()
    ce = Suite("ce", (Stage("apgd-ce", "apgd", {"steps": 20, "loss": "ce"}),))
    fast = advkit.evaluate(masked, x, y, LINF, ce, progress=False, check_samples=20)
    status = {c.name: c.status for c in fast.checks}
    assert status["gradients"] == "fail" and status["unbounded"] == "fail"
    assert not fast.reliable
    honest = advkit.evaluate(mnist_model, x, y, LINF, ce, progress=False, checks=False)
    # the masked figure is inflated: 99-100% against 54-69% over the 7 retrainings (conftest)
    assert fast.robust_accuracy > honest.robust_accuracy + 0.2
    dlr = Suite("dlr", (Stage("apgd-dlr", "apgd", {"steps": 20, "loss": "dlr"}),))
    recovered = advkit.evaluate(masked, x, y, LINF, dlr, progress=False, checks=False)
    # The DLR loss ignores the logits' scale, so on the masked model it sees what it sees on
    # the honest one: per sample the same verdicts on each of the 7 retrainings x run seeds
    # 0-2 (one image of slack for float rounding).
    plain = advkit.evaluate(mnist_model, x, y, LINF, dlr, progress=False, checks=False)
    assert recovered.robust_accuracy == pytest.approx(plain.robust_accuracy, abs=0.01)
    # APGD-DLR against APGD-CE on the honest model is two attacks compared, no guarantee:
    # -1 to +6 points over the same runs (the bound of 3 this test had broke on one model).
    assert recovered.robust_accuracy <= honest.robust_accuracy + 0.1


def test_randomised_model_is_flagged_unless_the_suite_uses_eot(mnist_model, data):
    x, y = data
    noisy = Noisy(mnist_model).eval()
    plain = Suite("plain", (Stage("apgd", "apgd", {"steps": 5}),))
    report = advkit.evaluate(noisy, x[:30], y[:30], LINF, plain, progress=False,
                             check_samples=10)
    assert {c.name: c.status for c in report.checks}["randomness"] == "fail"
    rand = Suite("rand", (Stage("apgd-eot", "apgd", {"steps": 5}, eot=4),))
    report = advkit.evaluate(noisy, x[:30], y[:30], LINF, rand, progress=False,
                             check_samples=10)
    # fail without EOT, pass with it, on each of the 7 retrainings (conftest)
    assert {c.name: c.status for c in report.checks}["randomness"] == "pass"
    assert report.stages[0]["forward_passes"] % 4 == 0   # EOT draws are counted


def test_probability_outputs_fail_the_logits_check(mnist_model, data):
    x, y = data
    with pytest.warns(UserWarning, match="probabilities"):
        report = advkit.evaluate(Softmaxed(mnist_model).eval(), x[:30], y[:30], LINF,
                                 Suite("q", (Stage("a", "apgd", {"steps": 5}),)),
                                 progress=False, check_samples=10)
    assert {c.name: c.status for c in report.checks}["logits"] == "fail"


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors(mnist_model, data, tmp_path):
    x, y = data
    with pytest.raises(ValueError, match="NaN"):
        bad = x[:10].clone()
        bad[0, 0, 0, 0] = float("nan")
        advkit.evaluate(mnist_model, bad, y[:10], LINF, "fast", progress=False)
    with pytest.raises(ValueError, match="outside the bounds"):
        advkit.evaluate(mnist_model, x[:10] * 2, y[:10], LINF, "fast", progress=False)
    with pytest.raises(ValueError, match="shape"):
        advkit.evaluate(mnist_model, x[0], y[:1], LINF, "fast", progress=False)
    with pytest.raises(ValueError, match="eps"):
        advkit.evaluate(mnist_model, x[:10], y[:10], ThreatModel("linf", 2.0), "fast",
                        progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        advkit.evaluate(mnist_model, x[:10], y[:10], LINF, "fast", batch_size=0, progress=False)
    with pytest.raises(ValueError, match="is a directory"):
        Store(tmp_path)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="not an advkit result store"):
        Store(tmp_path / "junk.sqlite")


def test_resume_refuses_other_data_or_settings(mnist_model, data, tmp_path):
    x, y = data
    suite = Suite("q", (Stage("a", "apgd", {"steps": 3}),))
    path = tmp_path / "runs.sqlite"
    first = advkit.evaluate(mnist_model, x[:20], y[:20], LINF, suite, store=path,
                            progress=False, checks=False)
    with pytest.raises(ValueError, match="data digest"):
        advkit.evaluate(mnist_model, x[20:40], y[20:40], LINF, suite, store=path,
                        resume=first.run_id, progress=False, checks=False)
    with pytest.raises(ValueError, match="different threat"):
        advkit.evaluate(mnist_model, x[:20], y[:20], ThreatModel("linf", 0.2), suite, store=path,
                        resume=first.run_id, progress=False, checks=False)
    with pytest.raises(ValueError, match="no run 99"):
        advkit.evaluate(mnist_model, x[:20], y[:20], LINF, suite, store=path, resume=99,
                        progress=False, checks=False)
    # resuming a finished run computes nothing and gives the same numbers
    again = advkit.evaluate(mnist_model, x[:20], y[:20], LINF, suite, store=path,
                            resume=first.run_id, progress=False, checks=False)
    assert again.chunks_run == 0 and again.per_sample == first.per_sample


def test_store_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "runs.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(ValueError, match="newer advkit"):
        Store(path)


def test_store_round_trip_and_export(mnist_model, data, tmp_path):
    x, y = data
    path = tmp_path / "runs.sqlite"
    suite = Suite("q", (Stage("a", "apgd", {"steps": 5}),))
    report = advkit.evaluate(mnist_model, x[:50], y[:50], LINF, suite, store=path,
                             progress=False, check_samples=10)
    with Store(path) as db:
        again = read_report(db, report.run_id)
        assert db.run(report.run_id)["status"] == "done"
        csv_text = db.export(report.run_id, "csv")
        doc = json.loads(db.export(report.run_id, "json"))
        with pytest.raises(ValueError, match="unknown export format"):
            db.export(report.run_id, "xml")
    assert again.per_sample == report.per_sample and again.robust_accuracy == report.robust_accuracy
    assert csv_text.splitlines()[0].startswith("idx,label,clean_pred")
    assert len(csv_text.splitlines()) == 51
    assert len(doc["per_sample"]) == 50 and doc["summary"]["robust_accuracy"] == pytest.approx(
        report.robust_accuracy)
    assert {c["name"] for c in doc["checks"]} >= {"gradients", "unbounded"}


def test_lean_is_apgd_and_a3_with_its_polish_and_never_weaker_than_standard_on_the_test_model(
        mnist_model, data):
    """Seeded and small: 40 MNIST images at Linf 0.08 (the test CNN is not robust there:
    some images stand, some fall), ``lean`` against ``standard``."""
    first, stage = SUITES["lean"].stages
    assert first.attack == "apgd" and stage.attack == "a3"
    assert stage.params["polish_queries"] > 0
    x, y = data[0][:40], data[1][:40]
    threat = ThreatModel("linf", 0.08)
    lean = advkit.evaluate(mnist_model, x, y, threat, "lean", progress=False, checks=False)
    standard = advkit.evaluate(mnist_model, x, y, threat, "standard", progress=False,
                               checks=False)
    assert 0 < standard.robust_accuracy < standard.clean_accuracy
    assert lean.robust_accuracy <= standard.robust_accuracy
    # and for fewer gradient passes
    assert sum(s["backward_passes"] for s in lean.stages) < sum(
        s["backward_passes"] for s in standard.stages)


def test_an_evaluation_without_a_named_suite_runs_lean(mnist_model, data):
    """``lean`` is the default since its figures held on every adversarially trained
    preset (RESULTS.md): a call that names no suite runs its stages, with the same
    verdicts as naming it."""
    x, y = data[0][:12], data[1][:12]
    threat = ThreatModel("linf", 0.08)
    default = advkit.evaluate(mnist_model, x, y, threat, progress=False, checks=False)
    named = advkit.evaluate(mnist_model, x, y, threat, "lean", progress=False, checks=False)
    assert [s["stage"] for s in default.stages] == [s.name for s in SUITES["lean"].stages]
    assert [r["robust"] for r in default.per_sample] == [r["robust"] for r in named.per_sample]
