from ccp.models.null_text_unet import (
    DEFAULT_NULL_TEXT_DEFINITION,
    NULL_TEXT_DEFINITIONS,
    NullTextCalibration,
    NullTextCrossAttention,
    NullTextFeaturesMissingError,
    NullTextUNet2DConditionModel,
    UnsupportedPriorError,
    calibrated_features,
    empty_prompt_embedding,
    value_mean_features,
)

__all__ = [
    "DEFAULT_NULL_TEXT_DEFINITION",
    "NULL_TEXT_DEFINITIONS",
    "NullTextCalibration",
    "NullTextCrossAttention",
    "NullTextFeaturesMissingError",
    "NullTextUNet2DConditionModel",
    "UnsupportedPriorError",
    "calibrated_features",
    "empty_prompt_embedding",
    "value_mean_features",
]
