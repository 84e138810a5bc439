"""Pipeline files (advkit.defenses.spec): every kind builds and fits from data alone; bad
files are refused before anything is fitted."""

from __future__ import annotations

import json

import pytest
from detection import one_thread

from advkit.defenses import (
    LID,
    BinaryDetector,
    FeatureSqueezing,
    MagNetDetector,
    Mahalanobis,
    Reformer,
)
from advkit.defenses.spec import DETECTORS, TRANSFORMS, PipelineSpec, build_pipeline, load_spec


def test_every_kind_builds_from_a_file_and_the_detectors_are_fitted(
        tmp_path, mnist_model, mnist_test, mnist_autoencoder_run):
    path = str(mnist_autoencoder_run.checkpoint)
    spec_file = tmp_path / "pipeline.json"
    spec_file.write_text(json.dumps({
        "fpr": 0.1, "fit_images": 600, "fit_attack_steps": 5,
        "transform": [{"kind": "reformer", "autoencoder": path}],
        "detector": [{"kind": "feature_squeezing"}, {"kind": "magnet", "autoencoder": path},
                     {"kind": "binary", "epochs": 2}, {"kind": "lid", "batch": 100,
                                                        "references": 1},
                     {"kind": "mahalanobis", "layers": [3, 6]}],
    }))
    spec = load_spec(spec_file)
    assert spec.needs_adversarial
    x, y = mnist_test
    with one_thread():
        pipe = build_pipeline(spec, mnist_model, x[:600], y[:600], eps=0.3)
    assert [type(t) for t in pipe.transforms] == [Reformer]
    assert [type(d) for d in pipe.detectors] == [FeatureSqueezing, MagNetDetector,
                                                 BinaryDetector, LID, Mahalanobis]
    assert all(d.threshold is not None and d.fpr == 0.1 for d in pipe.detectors)
    # The spec round-trips: what a run records rebuilds the same pipeline.
    assert PipelineSpec.from_dict(spec.to_dict()) == spec
    assert set(TRANSFORMS) == {"bit_depth", "median", "jpeg", "tvm", "reformer"}
    assert set(DETECTORS) == {"feature_squeezing", "mahalanobis", "lid", "magnet", "binary"}


def test_only_detectors_that_learn_from_attacks_get_adversarial_examples():
    assert not PipelineSpec.from_dict({"detector": [{"kind": "feature_squeezing"},
                                                    {"kind": "mahalanobis"}]}).needs_adversarial
    assert PipelineSpec.from_dict({"detector": [{"kind": "mahalanobis", "layers": [3, 6]}]}
                                  ).needs_adversarial
    assert PipelineSpec.from_dict({"detector": [{"kind": "lid"}]}).needs_adversarial


@pytest.mark.parametrize(("data", "message"), [
    ({"detector": [{"kind": "lid"}], "fit_images": 0}, "fit_images must be an integer >= 1"),
    ({"detector": [{"kind": "lid"}], "threshold": 3}, "unknown keys ['threshold']"),
    ({"detector": {"kind": "lid"}}, "detector must be a list of tables"),
    ({"transform": [{"kind": "bit_depth", "bitz": 3}]}, "unknown option .bitz."),
])
def test_bad_specs_are_refused(data, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PipelineSpec.from_dict(data)


def test_a_missing_or_foreign_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")
    (tmp_path / "p.yaml").write_text("x: 1")
    with pytest.raises(ValueError, match="use .toml or .json"):
        load_spec(tmp_path / "p.yaml")
    (tmp_path / "p.toml").write_text("[[detector]\nkind=")
    with pytest.raises(ValueError, match="is not valid"):
        load_spec(tmp_path / "p.toml")
