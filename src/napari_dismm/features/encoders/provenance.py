"""Provenance that prevents mixing features of different encoders.

A feature file records the recipe name, the weights hash and the pixel pipeline of the
encoder that made it; a trained model records the same three (taken from its training
features by `model_record`). `check_same_encoder` is the one rule both `dismm predict`
paths apply: another recipe, other weights or another pipeline is refused in one line.
Records written before a field existed (older feature files and models carry no
pipeline, the shipped demo model no weights hash) are not held against the input.
"""

from __future__ import annotations

from typing import Any

from napari_dismm.errors import ModelConfigError

from .recipes import canonical_name

#: keys of a model's config.json (beside ``encoder``) and of a feature file's root attributes
WEIGHTS_HASH_KEY = "encoder_weights_hash"
PREPROCESSING_KEY = "encoder_preprocessing"


def model_record(features: Any) -> dict[str, Any]:
    """What a model trained on ``features`` (a FeatureFile) records about their encoder."""
    return {
        "encoder": canonical_name(features.encoder) if features.encoder else None,
        WEIGHTS_HASH_KEY: getattr(features, "encoder_weights_hash", None),
        PREPROCESSING_KEY: getattr(features, "encoder_preprocessing", None),
    }


def check_same_encoder(
    *,
    expected: str,
    got: str | None,
    where: str,
    expected_hash: str | None = None,
    got_hash: str | None = None,
    expected_preprocessing: str | None = None,
    got_preprocessing: str | None = None,
    expects: str | None = None,
) -> None:
    """Raise ModelConfigError (one line) unless ``got`` comes from the expected encoder.

    ``where`` is the subject of the sentence, e.g. ``"feature file a.h5 has"``. Old names
    (``vit-large-16``) count as their recipe (``uni``). ``expects`` replaces the
    sentence's opening ("model expects uni features")."""
    want = canonical_name(expected)
    expects = expects or f"model expects {want} features"
    if got and canonical_name(got) != want:
        raise ModelConfigError(f"{expects} but {where} {got} features")
    if expected_hash and got_hash and got_hash != expected_hash:
        raise ModelConfigError(
            f"{expects} from weights {expected_hash[:12]} but {where} features of weights {got_hash[:12]}"
        )
    if expected_preprocessing and got_preprocessing and got_preprocessing != expected_preprocessing:
        raise ModelConfigError(
            f"{expects} preprocessed as {expected_preprocessing} but {where} features preprocessed as "
            f"{got_preprocessing}"
        )
