# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Ready-made applications: whole-volume segmentation and evaluation (what the bundles' inference and evaluate
configs call), method selection by name, input listing, weight loading, reports and overlays."""

from monai_wsss.apps.inputs import (
    INTENSITY_PROFILE_NAME,
    check_component_size,
    intensity_profile_beside,
    list_volumes,
    load_weights,
    locate_bundle_root,
)
from monai_wsss.apps.methods import (
    CLASSIFIER_METHODS,
    METHODS,
    NETWORK_METHODS,
    SEGMENTER_METHODS,
    build_method_inferer,
    default_map_mode,
    default_min_component_size,
    default_normalize_per,
    default_threshold,
    method_defaults,
)
from monai_wsss.apps.pipeline import THRESHOLD_MODES, VolumeSegmentationPipeline
from monai_wsss.apps.pseudo_masks import PseudoMaskGenerator, write_target_masks
from monai_wsss.apps.run_folder import (
    MANIFEST_NAME,
    RunFolder,
    FailedVolumesError,
    RunFolderError,
    component_settings,
    name_run_items,
    run_settings,
    unique_output_stems,
)
from monai_wsss.apps.reports import (
    VolumeEvaluation,
    format_summary_table,
    save_overlay,
    select_overlay_slices,
    write_csv,
    write_summary_markdown,
)

__all__ = [
    "INTENSITY_PROFILE_NAME",
    "check_component_size",
    "intensity_profile_beside",
    "CLASSIFIER_METHODS",
    "MANIFEST_NAME",
    "METHODS",
    "NETWORK_METHODS",
    "PseudoMaskGenerator",
    "SEGMENTER_METHODS",
    "THRESHOLD_MODES",
    "RunFolder",
    "FailedVolumesError",
    "RunFolderError",
    "VolumeEvaluation",
    "VolumeSegmentationPipeline",
    "build_method_inferer",
    "component_settings",
    "default_map_mode",
    "default_min_component_size",
    "default_normalize_per",
    "default_threshold",
    "format_summary_table",
    "list_volumes",
    "load_weights",
    "locate_bundle_root",
    "method_defaults",
    "name_run_items",
    "run_settings",
    "save_overlay",
    "select_overlay_slices",
    "unique_output_stems",
    "write_target_masks",
    "write_csv",
    "write_summary_markdown",
]
