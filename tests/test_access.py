"""Model access as a contract: levels, refusals, per-sample counts and budgets."""

from __future__ import annotations

import pytest
import torch
from toys import random_batch, toy_cnn

from advkit import ThreatModel, attacks, models
from advkit.attacks import PGD, Square, Taxonomy
from advkit.models.access import (
    AccessError,
    Oracle,
    QueryBudgetExceeded,
    allows,
)

#: A small configuration of every registered attack (norm, eps, parameters).
CONFIGS = {
    "fgsm": ("linf", 0.1, {}),
    "bim": ("linf", 0.1, {"steps": 3}),
    "illc": ("linf", 0.1, {"steps": 3}),
    "pgd": ("linf", 0.1, {"steps": 3, "restarts": 2}),
    "mifgsm": ("linf", 0.1, {"steps": 3}),
    "apgd": ("linf", 0.1, {"steps": 5, "restarts": 2}),
    "apgdt": ("linf", 0.1, {"steps": 5, "n_target_classes": 2}),
    "malt": ("linf", 0.1, {"steps": 5, "n_target_classes": 2}),
    "a3": ("linf", 0.1, {"budget": 10, "min_steps": 2, "keep_min": 2}),
    "square": ("linf", 0.1, {"n_queries": 20}),
    "deepfool": ("l2", float("inf"), {"steps": 5}),
    "fab": ("linf", float("inf"), {"steps": 5, "restarts": 2}),
    "carliniwagnerl2": ("l2", float("inf"), {"steps": 5, "search_steps": 2}),
    "carliniwagnerlinf": ("linf", float("inf"), {"steps": 10}),
    "ead": ("l1", float("inf"), {"steps": 5, "search_steps": 2}),
    "jsma": ("l1", float("inf"), {"gamma": 0.05}),
    "hotcold": ("l2", float("inf"), {"hot": 2}),
    "featureadversary": ("linf", 0.1, {"steps": 3, "layer": 1}),
    "universalperturbation": ("linf", 0.1, {"max_epochs": 1, "batch_size": 4}),
    "orthogonalpgd": ("linf", 0.1, {"steps": 3}),
    "hopskipjump": ("l2", float("inf"), {"max_queries": 200}),
    "boundary": ("l2", float("inf"), {"max_queries": 100}),
    "genattack": ("linf", 0.1, {"max_queries": 40}),
    "onepixel": ("linf", 1.0, {"max_queries": 40, "population": 8}),
    "simba": ("l2", 1.0, {"max_queries": 40}),
    "nes": ("linf", 0.1, {"max_queries": 40, "samples": 10}),
    "zoo": ("l2", float("inf"), {"max_queries": 40, "coordinates": 8}),
    "bandits": ("linf", 0.1, {"max_queries": 40}),
    "groundtruth": ("linf", float("inf"), {"cap": 0.1, "time_limit": 2}),
    "transfer": ("linf", 0.1, {"surrogates": [toy_cnn(1), toy_cnn(2)], "steps": 3}),
    "mea": ("linf", 0.1, {"surrogates": [toy_cnn(1), toy_cnn(2)], "steps": 3}),
    "substitute": ("linf", 0.1, {"substitute": toy_cnn(3), "rounds": 2, "epochs": 1}),
    "eot": ("linf", 0.1, {"steps": 2, "samples": 2, "eval_transforms": 3}),
    "rp2": ("l2", float("inf"), {"steps": 2, "l1_steps": 2, "samples": 2,
                                 "eval_transforms": 3}),
}


def build(name: str) -> attacks.Attack:
    norm, eps, params = CONFIGS[name]
    attack = attacks.get(name)(ThreatModel(norm, eps), **params)
    if name == "featureadversary":
        attack = attack.with_guides(random_batch(8, seed=5)[0])
    return attack


def run(name: str, model, x: torch.Tensor, y: torch.Tensor) -> attacks.AttackResult:
    targets = (y + 1) % 10 if attacks.get(name).targeted_only else None
    return build(name)(model, x, y, targets=targets)


def test_the_configurations_cover_every_registered_attack():
    assert set(CONFIGS) == set(attacks.REGISTRY)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_per_sample_cost_adds_up_to_the_passes_for_every_attack(name):
    """One definition everywhere: forward + backward passes per sample, checks included."""
    model = toy_cnn()
    x, y = random_batch(8)
    result = run(name, model, x, y)
    assert result.queries.shape == (8,) and result.queries.dtype == torch.int64
    assert int(result.queries.sum()) == result.forward_passes + result.backward_passes
    # Every sample was looked at, at least by the final success pass.
    assert int(result.queries.min()) >= 1


def test_every_attack_declares_an_access_level_derived_from_its_knowledge():
    for name, cls in attacks.REGISTRY.items():
        assert cls.name.lower() == name and cls.name == cls.__name__
        assert cls.access == cls.taxonomy.access
    assert PGD.access == "gradients" and Square.access == "scores"


def test_a_taxonomy_value_outside_the_axis_is_refused():
    with pytest.raises(ValueError, match="knowledge must be one of"):
        Taxonomy(knowledge="grey box")
    with pytest.raises(ValueError, match="frequency"):
        Taxonomy(frequency="often")


BLACK_BOX = sorted(n for n in CONFIGS if attacks.get(n).access != "gradients")


@pytest.mark.parametrize("name", BLACK_BOX)
def test_a_black_box_attack_needs_nothing_but_its_access(name):
    """Every score- or decision-based attack, given a plain function that answers scores
    (no module, no gradient can pass) behind the access it needs, does exactly what it does
    on the module itself, with no backward pass."""
    model = toy_cnn()
    x, y = random_batch(8)

    def scorer(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images)

    view = models.scores_only if attacks.get(name).access == "scores" else models.labels_only
    direct, boxed = run(name, model, x, y), run(name, view(scorer), x, y)
    assert torch.equal(direct.x_adv, boxed.x_adv)
    assert torch.equal(direct.queries, boxed.queries)
    assert boxed.backward_passes == 0


def test_pgd_refuses_a_scores_only_model_with_a_clear_message():
    model = toy_cnn()
    x, y = random_batch(4)
    counted = models.scores_only(model)
    with pytest.raises(AccessError, match=r"PGD is a white box attack: it needs gradients "
                                          r"access.*scores access only.*score-based attack"):
        PGD(ThreatModel("linf", 0.1), steps=2)(counted, x, y)
    assert counted.queries == 0  # refused before any query


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_attack_of_today_runs_on_labels_only(name):
    # The configured attack decides: NES (label_only=None) makes do with labels.
    if allows("labels", build(name).access):
        pytest.skip("a decision-based attack, or a configuration that needs only labels")
    x, y = random_batch(4)
    with pytest.raises(AccessError, match="labels access only"):
        build(name)(models.labels_only(toy_cnn()), x, y)


def test_a_white_box_door_is_shut_on_a_score_only_oracle():
    x, _ = random_batch(4)
    oracle = Oracle(models.scores_only(toy_cnn()), 4)
    oracle.logits(x)
    with pytest.raises(AccessError, match="gradient"):
        oracle.gradient(x, lambda z: z.sum(1))
    with pytest.raises(AccessError, match="Jacobian"):
        oracle.jacobian(x, torch.ones(4, 1, 10))
    assert oracle.queries.tolist() == [1, 1, 1, 1]


def test_views_and_rows_charge_the_samples_they_name():
    x, _ = random_batch(6)
    oracle = Oracle(toy_cnn(), 6)
    view = oracle.view(torch.tensor([1, 3, 5]))
    view.gradient(x[[1, 3, 5]], lambda z: z.sum(1))           # 2 each (forward + backward)
    view.logits(x[[3, 5]], rows=torch.tensor([1, 2]))          # samples 3 and 5
    oracle.labels(torch.cat([x[:1], x[:1]]), rows=torch.tensor([0, 0]))  # repeats add up
    assert oracle.queries.tolist() == [2, 2, 0, 3, 0, 3]
    assert (oracle.forward_passes, oracle.backward_passes) == (7, 3)
    with pytest.raises(RuntimeError, match="without rows="):
        oracle.logits(x[:2])


def test_a_query_budget_is_enforced_per_sample_and_counts_the_checks():
    model = toy_cnn()
    x, y = random_batch(16)
    square = Square(ThreatModel("linf", 0.1), n_queries=48)
    result = square(models.scores_only(model, budget=50), x, y)  # 48 + entry + final
    assert int(result.queries.max()) <= 50
    with pytest.raises(QueryBudgetExceeded, match="budget of 50 queries per sample"):
        Square(ThreatModel("linf", 0.1), n_queries=49)(models.scores_only(model, budget=50),
                                                          x, y)


def test_a_sample_misclassified_from_the_start_costs_square_two_queries():
    model = toy_cnn()
    x, y = random_batch(16)
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any()
    result = Square(ThreatModel("linf", 0.1), n_queries=30)(models.scores_only(model), x, y)
    assert result.queries[wrong].tolist() == [2] * int(wrong.sum())


def test_bad_budgets_and_models_are_refused():
    with pytest.raises(ValueError, match="budget must be"):
        models.scores_only(toy_cnn(), budget=0)
    with pytest.raises(TypeError, match="nn.Module or an access object"):
        PGD(ThreatModel("linf", 0.1))(object(), *random_batch(2))
