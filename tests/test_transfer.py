"""Transfer attacks (Transfer, MEA, Substitute) and the transferability matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import affine, random_batch, toy_cnn

from advkit import ThreatModel, models
from advkit.attacks import FGSM, MEA, PGD, Ensemble, Substitute, Transfer
from advkit.attacks.substitute import (
    augmentation_sizes,
    jacobian_augmentation,
    reservoir_sample,
)
from advkit.evaluation.transferability import transferability_matrix
from advkit.models.access import REJECT, QueryBudgetExceeded

LINF = ThreatModel("linf", 0.1)


def _surrogates() -> list[nn.Module]:
    return [toy_cnn(1), toy_cnn(2)]


def test_transfer_asks_the_target_two_label_queries_per_sample_and_no_more():
    x, y = random_batch(8)
    target = models.labels_only(toy_cnn(0), budget=Transfer.target_queries)
    result = Transfer(LINF, _surrogates(), "pgd", steps=5)(target, x, y)
    assert result.queries.tolist() == [2] * 8
    assert target.queries == 16 and result.backward_passes == 0
    # The crafting ran on the surrogates: 5 gradients (2 passes each) + the success pass.
    assert result.extras["surrogate_queries"].tolist() == [11] * 8


def test_a_budget_below_the_stated_queries_is_refused():
    x, y = random_batch(4)
    with pytest.raises(QueryBudgetExceeded):
        Transfer(LINF, _surrogates(), "fgsm")(models.labels_only(toy_cnn(0), budget=1), x, y)


def test_transfer_is_judged_on_the_target_by_a_fresh_pass():
    x, y = random_batch(16)
    target = toy_cnn(0)
    result = Transfer(LINF, _surrogates(), "pgd", steps=5)(target, x, y)
    with torch.no_grad():
        predictions = target(result.x_adv).argmax(1)
    assert torch.equal(result.predictions, predictions)
    assert torch.equal(result.success, predictions != y)
    assert (result.x_adv - x).abs().amax() <= LINF.eps + 1e-6


def test_transfer_from_the_target_itself_is_the_white_box_attack():
    x, y = random_batch(16)
    model = toy_cnn(0)
    pgd = PGD(LINF, steps=5, early_exit=False)
    assert torch.equal(Transfer(pgd, surrogates=[model])(model, x, y).x_adv,
                       pgd(model, x, y).x_adv)


def test_mea_fused_loss_equals_the_hand_computation_on_two_models():
    x, y = random_batch(6)
    f1, f2 = affine(seed=1), affine(seed=2)
    mea = MEA(LINF, [f1, f2], weights=[3.0, 1.0])
    with torch.no_grad():
        p = 0.75 * F.softmax(f1(x), 1) + 0.25 * F.softmax(f2(x), 1)
        targets = (y + 3) % 10
        torch.testing.assert_close(mea.loss(x, y), -p[torch.arange(6), y].log())
        torch.testing.assert_close(mea.loss(x, y, targets), -p[torch.arange(6), targets].log())


def test_mea_ascends_the_fused_loss_untargeted_and_descends_it_targeted():
    x, y = random_batch(16)
    mea = MEA(LINF, _surrogates(), steps=10)
    targets = (y + 1) % 10
    with torch.no_grad():
        untargeted = mea(toy_cnn(0), x, y).x_adv
        targeted = mea(toy_cnn(0), x, y, targets=targets).x_adv
        assert (mea.loss(untargeted, y) > mea.loss(x, y)).all()
        assert (mea.loss(targeted, y, targets) < mea.loss(x, y, targets)).all()


def test_a_logit_ensemble_averages_its_members():
    x, _ = random_batch(4)
    f1, f2 = toy_cnn(1), toy_cnn(2)
    with torch.no_grad():
        torch.testing.assert_close(Ensemble([f1, f2], [1, 3])(x), 0.25 * f1(x) + 0.75 * f2(x))


def test_an_empty_surrogate_list_is_refused():
    with pytest.raises(ValueError, match="surrogates is empty"):
        Transfer(LINF, [], "fgsm")
    with pytest.raises(ValueError, match="surrogates is empty"):
        MEA(LINF, [])


def test_a_surrogate_with_other_classes_than_the_target_is_refused():
    x, y = random_batch(4)
    with pytest.raises(ValueError, match="target has 10 classes but the surrogates have 5"):
        Transfer(LINF, [affine(classes=5)], "fgsm")(affine(classes=10), x, y % 5)
    # Label-only access shows no number of classes: the labels are checked against it.
    with pytest.raises(ValueError, match="labels go up to 9 but the surrogates have 5"):
        Transfer(LINF, [affine(classes=5)], "fgsm")(models.labels_only(affine()), x,
                                                    torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        Transfer(LINF, [affine(classes=5), affine()], "fgsm")(affine(), x, y)


def test_a_surrogate_in_train_mode_is_refused():
    with pytest.raises(ValueError, match=r"surrogates\[1\].*train mode.*\.eval\(\)"):
        Transfer(LINF, [toy_cnn(1), toy_cnn(2).train()], "fgsm")


def test_options_for_a_configured_attack_are_refused():
    with pytest.raises(TypeError, match="configure the FGSM instance"):
        Transfer(LINF, _surrogates(), FGSM(LINF), steps=3)


def test_the_augmentation_step_is_the_papers_formula_on_a_toy_model():
    model = affine(seed=4)
    x, _ = random_batch(5, seed=1)
    labels = torch.tensor([0, 3, 3, 7, 9])
    jacobian = torch.autograd.functional.jacobian(
        lambda z: F.softmax(model(z), 1).sum(0), x)            # (classes, N, 1, 8, 8)
    row = jacobian[labels, torch.arange(5)]                     # J_F(x)[O(x)] per image
    expected = (x + 0.1 * row.sign()).clamp(0, 1)
    assert torch.equal(jacobian_augmentation(model, x, labels, 0.1), expected)


def test_reservoir_sampling_draws_distinct_indices_uniformly():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(2000):
        chosen = reservoir_sample(10, 3, g)
        assert len(set(chosen.tolist())) == 3
        counts[chosen] += 1
    # Each index is kept with probability 3/10: 600 of 2000 draws, within 5 sigma.
    assert ((counts - 600).abs() < 5 * (2000 * 0.3 * 0.7) ** 0.5).all()
    assert reservoir_sample(4, 9).tolist() == [0, 1, 2, 3]


def test_reservoir_sampling_bounds_the_label_queries():
    assert augmentation_sizes(150, 6, None, 400) == [150, 150, 300, 600, 1200, 2400]
    # sigma doubling epochs, then kappa per epoch: n * 2^sigma + kappa * (rounds - 1 - sigma).
    assert sum(augmentation_sizes(150, 6, 3, 400)) == 150 * 2 ** 3 + 400 * 2


def test_substitute_spends_exactly_its_stated_label_queries():
    x, y = random_batch(8)
    seeds, _ = random_batch(6, seed=3)
    attack = Substitute(LINF, toy_cnn(5), seed_images=seeds, rounds=3, epochs=2, sigma=1,
                        kappa=4)
    target = models.labels_only(toy_cnn(0))
    result = attack(target, x, y)
    stated = attack.label_queries(6)
    assert stated == 6 + 6 + 4
    assert int(result.queries.sum()) == 2 * 8 + stated == target.queries
    assert int(result.queries.max() - result.queries.min()) <= 1  # shared round robin
    assert result.backward_passes == 0


def test_substitute_training_is_seeded():
    x, y = random_batch(8)
    attack = Substitute(LINF, toy_cnn(5), rounds=2, epochs=2)
    first, second = attack(toy_cnn(0), x, y), attack(toy_cnn(0), x, y)
    assert torch.equal(first.x_adv, second.x_adv)


def test_the_substitute_learns_the_targets_labels():
    """On a linear target (8x8 inputs, 10 classes), a linear substitute trained on 40 seed
    images and their Jacobian augmentations agrees with the target on most fresh images,
    far above chance (10%)."""
    target = affine(seed=0)
    seeds, _ = random_batch(40, seed=1)
    x, _ = random_batch(200, seed=2)
    with torch.no_grad():
        y = target(x).argmax(1)
    attack = Substitute(LINF, affine(seed=9), seed_images=seeds, rounds=4, epochs=30, lr=0.05)
    result = attack(models.labels_only(target), x, y)
    agreement = (result.extras["substitute_labels"] == y).float().mean().item()
    assert agreement > 0.5


def test_labels_the_target_rejects_are_not_learned_but_their_queries_count():
    """A target behind a detector answers REJECT (-1) for the images it flags: those teach
    the substitute no class (cross-entropy on -1 would fail), so they are dropped; their
    queries were still spent."""
    seeds, _ = random_batch(10, seed=1)
    asked = []

    def oracle(images: torch.Tensor) -> torch.Tensor:
        asked.append(len(images))
        with torch.no_grad():
            labels = toy_cnn(0)(images).argmax(1)
        labels[::2] = REJECT  # every other image flagged
        return labels

    attack = Substitute(LINF, toy_cnn(5), rounds=3, epochs=1)
    substitute = attack.train_substitute(oracle, seeds)
    assert not substitute.training
    # Only the 5 accepted seeds are augmented (5 queries, of which 3 are rejected), then
    # the 5 + 2 accepted points (7 queries).
    assert asked == [10, 5, 7]
    with pytest.raises(ValueError, match="rejected every seed image"):
        attack.train_substitute(lambda images: torch.full((len(images),), REJECT), seeds)


def test_the_matrix_diagonal_is_the_white_box_success():
    x, y = random_batch(24)
    zoo = {"a": toy_cnn(0), "b": toy_cnn(1), "c": toy_cnn(2)}
    def pgd(threat: ThreatModel) -> PGD:
        return PGD(threat, steps=5, random_start=False, early_exit=False)

    matrix = transferability_matrix(zoo, x, y, LINF, sources={"PGD": pgd})
    for name, model in zoo.items():
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        white = pgd(LINF)(model, x[correct], y[correct])
        assert matrix.rate("PGD", name, name) == pytest.approx(white.success_rate)
    assert set(matrix.rows()[0]) >= {"attack", "source", "a", "b", "c"}


def test_the_transfer_command_writes_the_matrix_and_its_heat_map(tmp_path):
    import json

    from typer.testing import CliRunner

    from advkit.cli import app
    from advkit.models import zoo
    from advkit.models.checkpoint import save

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(save(zoo.create("mlp"), tmp_path / f"mlp{seed}.safetensors",
                              architecture="mlp")))
    html = tmp_path / "transfer.html"
    result = CliRunner().invoke(app, ["transfer", "-m", paths[0], "-m", paths[1], "--attacks",
                                      "fgsm", "--no-mea", "--limit", "40", "--device", "cpu",
                                      "--json", "--html", str(html)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(r["attack"], r["source"]) for r in report["rows"]] == [("FGSM", "mlp0"),
                                                                    ("FGSM", "mlp1")]
    page = html.read_text()
    assert "Transferability heat map" in page and "<svg" in page


def test_the_transfer_command_needs_two_models():
    from typer.testing import CliRunner

    from advkit.cli import app

    result = CliRunner().invoke(app, ["transfer", "-m", "mlp"])
    assert result.exit_code != 0 and "at least two models" in result.output
