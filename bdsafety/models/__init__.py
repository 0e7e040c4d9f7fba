"""Model registry: BackdoorBench-compatible architectures with a features()/head() split.

``build_model(name, num_classes, img_size, input_size=None, pretrained=None)`` builds one of ``MODEL_NAMES``
(every architecture BackdoorBench v2.2 can build, with its exact state_dict keys, plus this project's small
models); every model satisfies ``model(x) == model.head(model.features(x))``, where ``features`` is the input of
the pooling before the classifier (see bdsafety.models.zoo for what it is per family, e.g. the class token for
ViTs). ``classifier_layer(model)`` is the final classification layer (an ``nn.Linear``, or squeezenet's 1x1
conv); ``model.feature_channels`` is the channel count of the feature map. ``load_state_dict_compat`` loads a
record's state_dict strictly after :func:`normalize_state_dict` (DataParallel prefix, fine-pruning masks, old
ViT names) and names the closest architecture when nothing fits.
"""
from .registry import (
    MODEL_NAMES,
    build_model,
    check_input_size,
    classifier_layer,
    describe_match,
    identify_model,
    infer_num_classes,
    load_state_dict_compat,
    normalize_state_dict,
)

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "check_input_size",
    "classifier_layer",
    "describe_match",
    "identify_model",
    "infer_num_classes",
    "load_state_dict_compat",
    "normalize_state_dict",
]
