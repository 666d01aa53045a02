import dataclasses

import pytest

from mnist_pipeline.hyperparameters import (
    RECIPE_NAMES,
    RECIPES,
    Hyperparameters,
    InvalidRunRequestError,
    from_metadata,
    resolve,
)


def test_every_recipe_is_complete_and_named_after_itself():
    assert set(RECIPES) == set(RECIPE_NAMES)
    for name, recipe in RECIPES.items():
        assert recipe.recipe == name
        assert Hyperparameters.from_dict(recipe.to_dict()) == recipe


def test_seed_recipe_is_the_original_design():
    seed = RECIPES["seed"]

    assert (seed.epochs, seed.batch_size, seed.learning_rate) == (5, 64, 0.001)
    assert seed.validation_size == 6000  # 10% of MNIST's 60,000
    assert seed.augment_pixels == 0
    assert seed.target_accuracy is None


def test_resolve_overrides_epochs_only():
    chosen = resolve("fast", epochs=9)

    assert chosen == dataclasses.replace(RECIPES["fast"], epochs=9)
    assert resolve("fast", None) == RECIPES["fast"]


def test_metadata_overrides_single_values_and_ignores_other_tools():
    chosen = from_metadata(
        {
            "train-epochs": "3",
            "train-seed": "7",
            "train-learning-rate": "0.01",
            "train-target-accuracy": "none",
            "mtime": "1700000000",  # written by other S3 tools
        },
        RECIPES["default"],
    )

    assert chosen == dataclasses.replace(
        RECIPES["default"], epochs=3, seed=7, learning_rate=0.01, target_accuracy=None
    )


def test_metadata_recipe_switches_before_overrides():
    chosen = from_metadata(
        {"train-batch-size": "512", "train-recipe": "fast"}, RECIPES["default"]
    )

    assert chosen == dataclasses.replace(RECIPES["fast"], batch_size=512)


def test_no_training_metadata_keeps_the_base():
    assert from_metadata({}, RECIPES["seed"]) == RECIPES["seed"]


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"train-epochs": "0"}, "train-epochs='0'"),
        ({"train-epochs": "five"}, "train-epochs='five'"),
        ({"train-epochs": "1000"}, "between 1 and 200"),
        ({"train-batch-size": "3"}, "train-batch-size"),
        ({"train-learning-rate": "-1"}, "train-learning-rate"),
        ({"train-learning-rate": "nan"}, "train-learning-rate"),
        ({"train-seed": "-5"}, "train-seed"),
        ({"train-target-accuracy": "1.5"}, "train-target-accuracy"),
        ({"train-recipe": "turbo"}, "Unknown recipe 'turbo'"),
        ({"train-epoch": "3"}, "Unknown training metadata train-epoch"),
    ],
)
def test_bad_metadata_names_the_key_and_the_fix(metadata, named):
    with pytest.raises(InvalidRunRequestError) as caught:
        from_metadata(metadata, RECIPES["default"])

    message = str(caught.value)
    assert named in message
    assert "upload again" in message


def test_every_bad_value_is_named_at_once():
    metadata = {"train-recipe": "turbo", "train-epochs": "abc", "train-seed": "-1"}

    with pytest.raises(InvalidRunRequestError) as caught:
        from_metadata(metadata, RECIPES["default"])

    message = str(caught.value)
    assert "Unknown recipe 'turbo'" in message
    assert "train-epochs='abc'" in message
    assert "train-seed='-1'" in message


def test_messages_can_name_cli_options():
    with pytest.raises(InvalidRunRequestError, match="--epochs='0' is invalid"):
        from_metadata({"train-epochs": "0"}, RECIPES["default"], "--")
