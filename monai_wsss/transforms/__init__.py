"""Array and dictionary transforms: volume preprocessing, training augmentation, slicing, weak labels, model space, map
post-processing."""

# --- preprocessing (data helper) ---
from monai_wsss.transforms.augmentation import RandBrightDistractor, RandBrightDistractord
from monai_wsss.transforms.intensity import (
    ScaleIntensityNonzeroPercentiles,
    ScaleIntensityNonzeroPercentilesd,
)
from monai_wsss.transforms.io import LoadVolumed, SaveVolumed, axis_codes, in_source_orientation, reoriented
from monai_wsss.transforms.model_space import (
    IMAGE_INTERPOLATION,
    MODEL_INTENSITY_RANGE,
    invert_model_space,
    model_space_transform,
    resize_slices,
    slices_to_model_space,
)
from monai_wsss.transforms.slicing import SliceVolumed, slice_foreground_fraction, stack_neighbour_slices
from monai_wsss.transforms.validation import CheckIntensityProfile, CheckIntensityProfiled, ValidateVolumed
from monai_wsss.transforms.weak_label import MapTargetLabels, MapTargetLabelsd, WeakSliceLabel, WeakSliceLabeld

# --- map post-processing (eval helper) ---
from monai_wsss.transforms.slice_gate import SliceGated
from monai_wsss.transforms.postprocess import (
    CopyMetaFromd,
    MapSliceScore,
    MapSliceScored,
    NormalizeMap,
    oriented_map,
    NormalizeMapd,
    OtsuThreshold,
    OtsuThresholdd,
    dataset_otsu_threshold,
    keep_largest_component,
    mask_of_map,
    map_writer,
    otsu_thresholds,
)

__all__ = [
    # preprocessing
    "RandBrightDistractor",
    "RandBrightDistractord",
    "LoadVolumed",
    "SaveVolumed",
    "axis_codes",
    "in_source_orientation",
    "reoriented",
    "MapTargetLabels",
    "MapTargetLabelsd",
    "ScaleIntensityNonzeroPercentiles",
    "ScaleIntensityNonzeroPercentilesd",
    "SliceVolumed",
    "stack_neighbour_slices",
    "CheckIntensityProfile",
    "CheckIntensityProfiled",
    "ValidateVolumed",
    "WeakSliceLabel",
    "WeakSliceLabeld",
    "IMAGE_INTERPOLATION",
    "MODEL_INTENSITY_RANGE",
    "invert_model_space",
    "model_space_transform",
    "resize_slices",
    "slices_to_model_space",
    "slice_foreground_fraction",
    # map post-processing
    "CopyMetaFromd",
    "SliceGated",
    "MapSliceScore",
    "MapSliceScored",
    "NormalizeMap",
    "oriented_map",
    "NormalizeMapd",
    "OtsuThreshold",
    "OtsuThresholdd",
    "dataset_otsu_threshold",
    "keep_largest_component",
    "mask_of_map",
    "map_writer",
    "otsu_thresholds",
]
