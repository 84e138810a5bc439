"""Specification of NaturalGAN (Zhao, Dua & Singh 2018): the generator, critic and inverter
train through the one trainer and resume bit for bit; the latent search returns images the
classifier labels otherwise, the closest adversarial code it drew, never closer than the
true boundary; its queries are the classifier's counted forward passes; bad input is refused
with a clear message."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.attacks import NaturalGAN
from advkit.models import QueryBudgetExceeded, checkpoint, create, labels_only
from advkit.models.gan import GANInverter
from advkit.threat import ThreatModel
from advkit.training import NaturalGANTraining, TrainConfig, train, train_gan

L2 = ThreatModel("l2", math.inf)
#: Tiny: 2 epochs of 2 generator steps (20 images each, 5 critic steps of 4).
TINY = {"epochs": 2, "batch_size": 20, "train_limit": 40, "val_limit": 20, "z_dim": 8,
        "width": 4, "seed": 0}
STEPS_PER_EPOCH = 2


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


class Killable(NaturalGANTraining):
    """The recipe, 'killed' before its step number ``kill_after`` (counted from 0)."""

    def __init__(self, kill_after: int | None = None) -> None:
        super().__init__()
        self.kill_after, self.steps_run = kill_after, 0

    def step(self, model, x, y, update):
        if self.kill_after is not None and self.steps_run >= self.kill_after:
            raise Killed
        self.steps_run += 1
        return super().step(model, x, y, update)


def quiet_train(out_dir: Path, recipe: NaturalGANTraining | None = None, **kwargs):
    return train_gan(out_dir, recipe=recipe, progress=False, log=lambda _: None,
                     **{**TINY, **kwargs})


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(autouse=True)
def _model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVKIT_MODEL_DIR", str(tmp_path / "model-dir"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """TINY trained in one go (shared: read it, never train into its folder)."""
    return quiet_train(tmp_path_factory.mktemp("reference"))


# ---------------------------------------------------------------- training


def test_the_trainer_trains_generator_critic_and_inverter_and_counts_the_steps(reference):
    fresh = create("ngan", z_dim=8, width=4)
    trained = reference.model
    assert int(trained.steps) == TINY["epochs"] * STEPS_PER_EPOCH
    for part in ("generator", "critic", "inverter"):
        before, after = getattr(fresh, part).state_dict(), getattr(trained, part).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), part
    assert [set(h) for h in reference.history] == [{"epoch", "loss", "val_mse", "seconds"}] * 2


def test_the_checkpoint_loads_as_the_trained_gan(reference):
    loaded = checkpoint.load_checkpoint(reference.checkpoint)
    assert isinstance(loaded, GANInverter)
    assert same_state(loaded, reference.model)
    assert loaded.advkit_metadata["recipe"] == "natural_gan"


def test_the_state_file_holds_an_optimizer_per_part(reference):
    state = torch.load(reference.checkpoint.parent / "state.pt", weights_only=True)
    assert set(state["optimizer"]) == {"critic", "inverter", "generator"}
    assert set(state["scheduler"]) == {"critic", "inverter", "generator"}


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_run_bit_for_bit(reference,
                                                                           tmp_path):
    with pytest.raises(Killed):  # killed in the second step of epoch 2
        quiet_train(tmp_path, Killable(kill_after=STEPS_PER_EPOCH + 1))
    messages: list[str] = []
    recipe = Killable()
    resumed = train_gan(tmp_path, recipe=recipe, progress=False, log=messages.append, **TINY)
    assert any("resuming" in m for m in messages)
    assert recipe.steps_run == STEPS_PER_EPOCH  # only epoch 2 ran again
    assert same_state(resumed.model, reference.model)
    assert without_seconds(resumed.history) == without_seconds(reference.history)
    ours = torch.load(tmp_path / "state.pt", weights_only=True)
    theirs = torch.load(reference.checkpoint.parent / "state.pt", weights_only=True)
    for part in ("critic", "inverter", "generator"):
        a, b = ours["optimizer"][part]["state"], theirs["optimizer"][part]["state"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_the_recipe_trains_only_the_ngan_architecture(tmp_path):
    config = TrainConfig(arch="magnet_ae", recipe="natural_gan", epochs=1, batch_size=20,
                         train_limit=20, val_limit=20)
    with pytest.raises(ValueError, match="arch='ngan'"):
        train(config, tmp_path, recipe=NaturalGANTraining(), progress=False,
              log=lambda _: None)


@pytest.mark.parametrize("options, match", [({"critic_steps": 0}, "critic_steps"),
                                            ({"gradient_penalty": -1.0}, "gradient_penalty"),
                                            ({"latent_weight": math.nan}, "latent_weight")])
def test_bad_recipe_settings_are_refused_naming_them(options, match):
    with pytest.raises(ValueError, match=match):
        NaturalGANTraining(**options)


def test_the_ngan_forward_pass_is_the_reconstruction_in_the_unit_range(reference):
    gan = reference.model
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = gan(x)
        assert torch.equal(out, gan.generate(gan.invert(x)))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


# ------------------------------------------------ a latent space with a known boundary


class Generator(nn.Module):
    """z (N, 2) -> 1x28x28: the top half sigmoid(z0), the bottom half sigmoid(z1)."""

    def __init__(self, log: list[Tensor] | None = None) -> None:
        super().__init__()
        self.log = log

    def forward(self, z: Tensor) -> Tensor:
        if self.log is not None:
            self.log.append(z.clone())
        top = torch.sigmoid(z[:, 0]).view(-1, 1, 1, 1).expand(-1, 1, 14, 28)
        bottom = torch.sigmoid(z[:, 1]).view(-1, 1, 1, 1).expand(-1, 1, 14, 28)
        return torch.cat([top, bottom], dim=2)


class Inverter(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        halves = [x[:, :, :14].mean((1, 2, 3)), x[:, :, 14:].mean((1, 2, 3))]
        return torch.logit(torch.stack(halves, dim=1), eps=1e-6)


class Thresholds(nn.Module):
    """Labels the top half's brightness: class i where z0 = logit(brightness) is past i of
    the ``cuts``, so that in the latent space the classes are slabs of z0."""

    def __init__(self, cuts: tuple[float, ...] = (0.0,), log: list[Tensor] | None = None):
        super().__init__()
        self.cuts, self.log, self.images = torch.tensor(cuts), log, 0
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        z0 = torch.logit(x[:, :, :14].mean((1, 2, 3)), eps=1e-6)
        label = (z0[:, None] >= self.cuts[None, :]).sum(1)
        if self.log is not None:
            self.log.append(label)
        return F.one_hot(label, len(self.cuts) + 1) * 10.0 - 5.0


def images_at(*codes: tuple[float, float]) -> Tensor:
    return Generator()(torch.tensor(codes))


def toy(**options) -> NaturalGAN:
    options = {"samples": 64, "step": 0.05, **options}
    return NaturalGAN(L2, (Generator(), Inverter()), **options)


@pytest.mark.parametrize("search", ["iterative", "hybrid"])
def test_the_search_returns_images_the_classifier_labels_otherwise(search):
    model = Thresholds()
    x = images_at((-1.0, 0.3), (-2.0, -1.0), (-0.5, 2.0))
    y = torch.zeros(3, dtype=torch.long)
    result = toy(search=search)(labels_only(model), x, y)
    assert result.success.all()
    with torch.no_grad():
        assert (model(result.x_adv).argmax(1) != y).all()


@pytest.mark.parametrize("search", ["iterative", "hybrid"])
def test_no_latent_distance_is_below_the_boundarys_and_none_far_past_it(search):
    # The boundary z0 = 0 lies at latent distance |z0'| from each code.
    x = images_at((-1.0, 0.3), (-2.0, -1.0), (-0.5, 2.0))
    result = toy(search=search)(labels_only(Thresholds()), x, torch.zeros(3, dtype=torch.long))
    truth = torch.tensor([1.0, 2.0, 0.5])
    found = result.extras["latent_distance"]
    assert (found >= truth - 1e-4).all()  # a guarantee: nothing nearer is adversarial
    # Not a guarantee: a shell just past the boundary may draw no adversarial code (over
    # seeds 0-3 the iterative search went up to 1.3 steps past, the hybrid 0.3).
    assert (found < truth + 2 * 0.05).all()


@pytest.mark.parametrize("search", ["iterative", "hybrid"])
def test_the_returned_code_is_the_closest_adversarial_candidate_drawn(search):
    codes: list[Tensor] = []
    labels: list[Tensor] = []
    attack = NaturalGAN(L2, (Generator(codes), Inverter()), search=search, samples=32,
                        step=0.5)
    x = images_at((-1.0, 0.5))
    result = attack(labels_only(Thresholds(log=labels)), x, torch.zeros(1, dtype=torch.long))
    start = codes[0]  # G(I(x)) first; then the candidates in the order they were asked
    drawn, answered = torch.cat(codes[1:]), torch.cat(labels[:-1])  # the last: success pass
    assert drawn.shape[0] == answered.shape[0]
    distances = (drawn - start).norm(dim=1)
    adversarial = distances[answered != 0]
    assert adversarial.numel() > 1
    best = result.extras["latent_distance"][0]
    assert torch.isclose(best, adversarial.min(), atol=1e-5)
    z = result.extras["latent"][0]
    assert torch.isclose((z - start[0]).norm(), best, atol=1e-5)
    assert torch.equal(result.x_adv, Generator()(z[None]))


def test_the_hybrid_search_spends_fewer_queries_than_the_iterative_at_a_far_boundary():
    """The paper's claim for the hybrid shrinking search: far faster, about as close."""
    x = images_at((-3.0, 0.0))
    y = torch.zeros(1, dtype=torch.long)
    iterative = toy(search="iterative", step=0.01)(labels_only(Thresholds()), x, y)
    hybrid = toy(search="hybrid", step=0.01)(labels_only(Thresholds()), x, y)
    assert iterative.success.all() and hybrid.success.all()
    # 300 shells of 64 draws against 27-52 rounds (seeds 0-3): 5.8-11x fewer queries.
    assert int(hybrid.queries[0]) * 4 < int(iterative.queries[0])
    d_iterative = iterative.extras["latent_distance"][0]
    d_hybrid = hybrid.extras["latent_distance"][0]
    assert d_hybrid <= d_iterative + 0.01


def test_a_targeted_search_reaches_the_target_class_past_the_nearer_one():
    # Classes: z0 < 0, 0 <= z0 < 1.5, z0 >= 1.5; from z0' = -1 class 1 is 1 away, class 2 2.5.
    model = Thresholds(cuts=(0.0, 1.5))
    x = images_at((-1.0, 0.0))
    result = toy()(labels_only(model), x, torch.zeros(1, dtype=torch.long),
                   targets=torch.tensor([2]))
    assert result.success.all()
    assert model(result.x_adv).argmax(1).tolist() == [2]
    assert result.extras["latent_distance"][0] >= 2.5 - 1e-4


def test_the_query_count_is_the_classifiers_counted_forward_passes():
    model = Thresholds()
    x = images_at((-1.0, 0.3), (-0.3, 1.0))
    result = toy()(labels_only(model), x, torch.zeros(2, dtype=torch.long))
    assert result.forward_passes == model.images
    assert int(result.queries.sum()) == model.images
    assert result.backward_passes == 0


def test_each_image_stops_on_its_own_and_pays_only_its_rounds():
    # Shells of 0.05: the near boundary (0.1) is reached in the 3rd, the far one (1.0) in
    # the 21st; each image pays 64 queries a round until its own find.
    x = images_at((-0.101, 0.0), (-1.001, 0.0))
    result = toy(search="iterative")(labels_only(Thresholds()), x,
                                     torch.zeros(2, dtype=torch.long))
    rounds = [(q - 1) / 64 for q in result.queries.tolist()]
    assert rounds[0] in (3, 4) and rounds[1] in (21, 22)


def test_nothing_found_within_the_radius_returns_x_at_infinite_distance():
    x = images_at((-3.0, 0.0))
    result = toy(search="iterative", max_radius=0.2)(labels_only(Thresholds()), x,
                                                     torch.zeros(1, dtype=torch.long))
    assert not result.success.any()
    assert torch.equal(result.x_adv, x)
    assert math.isinf(result.extras["latent_distance"][0]) and math.isinf(result.norms[0])
    assert int(result.queries[0]) == 4 * 64 + 1  # shells up to 0.2, then the success pass


def test_the_query_budget_caps_each_image():
    x = images_at((-3.0, 0.0))
    result = toy(search="iterative", max_queries=200)(labels_only(Thresholds(), budget=201),
                                                      x, torch.zeros(1, dtype=torch.long))
    assert int(result.queries[0]) == 3 * 64 + 1


def test_an_access_budget_below_max_queries_is_refused_before_any_query():
    model = Thresholds()
    with pytest.raises(QueryBudgetExceeded, match="max_queries=499"):
        toy(max_queries=1000)(labels_only(model, budget=500), images_at((-1.0, 0.0)),
                              torch.zeros(1, dtype=torch.long))
    assert model.images == 0


def test_the_same_seed_gives_the_same_result():
    x = images_at((-1.0, 0.3), (-0.5, 2.0))
    y = torch.zeros(2, dtype=torch.long)
    a = toy(seed=3)(labels_only(Thresholds()), x, y)
    b = toy(seed=3)(labels_only(Thresholds()), x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)


def test_the_trained_gan_searches_against_a_real_classifier(reference):
    torch.manual_seed(0)
    classifier = create("small_cnn")
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = classifier(x).argmax(1)
    result = NaturalGAN(L2, reference.model, samples=16, step=0.5, max_radius=20)(
        labels_only(classifier), x, y)
    assert result.extras["reconstruction"].shape == x.shape
    with torch.no_grad():
        labels = classifier(result.x_adv).argmax(1)
    assert torch.equal(labels != y, result.success)
    assert result.success.any()


# ---------------------------------------------------------------- bad input


def test_an_untrained_gan_is_refused():
    with pytest.raises(ValueError, match="never been trained"):
        NaturalGAN(L2, create("ngan", z_dim=8, width=4))


def test_images_of_another_shape_are_refused_naming_both(reference):
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\).*\(1, 32, 32\)"):
        NaturalGAN(L2, reference.model)(labels_only(Thresholds()), x,
                                        torch.zeros(2, dtype=torch.long))


def test_a_generator_and_inverter_of_other_latent_dimensions_are_refused(reference, tmp_path):
    other = quiet_train(tmp_path, epochs=1, z_dim=4)
    attack = NaturalGAN(L2, (reference.model.generator, other.model.inverter))
    model = Thresholds()
    with pytest.raises(ValueError, match="dimension 4 but the generator takes 8"):
        attack(labels_only(model), torch.rand(1, 1, 28, 28), torch.zeros(1, dtype=torch.long))
    assert model.images == 0


def test_a_generator_leaving_the_bounds_is_refused():
    class Loud(Generator):
        def forward(self, z):
            return super().forward(z) * 2

    attack = NaturalGAN(L2, (Loud(), Inverter()))
    with pytest.raises(ValueError, match="sigmoid"):
        attack(labels_only(Thresholds()), images_at((-1.0, 0.0)), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("options, match", [
    ({"search": "binary"}, "search must be one of"), ({"samples": 0}, "samples"),
    ({"step": 0.0}, "step"), ({"max_radius": 0.01}, "max_radius"),
    ({"patience": 0}, "patience"), ({"max_queries": 10}, "max_queries"),
])
def test_bad_settings_are_refused_naming_them(options, match):
    with pytest.raises(ValueError, match=match):
        toy(**options)


@pytest.mark.parametrize("gan", [nn.Linear(2, 2), (nn.Linear(2, 2),), "not a gan"])
def test_something_other_than_a_gan_is_refused(gan, tmp_path):
    if isinstance(gan, str):
        gan = tmp_path / "missing.safetensors"
        with pytest.raises((ValueError, OSError)):
            NaturalGAN(L2, gan)
        return
    with pytest.raises(TypeError, match="GANInverter"):
        NaturalGAN(L2, gan)
