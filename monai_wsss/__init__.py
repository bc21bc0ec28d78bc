"""monai_wsss: weakly supervised medical image segmentation with conditional diffusion models, as a MONAI plugin."""

import warnings as _warnings

__version__ = "0.1.0"
__all__ = ["__version__"]

# MONAI 1.6's RemoveSmallObjects (the bundles' 3D component filter) still calls scikit-image >= 0.26 with the
# deprecated `min_size`, which removes objects smaller than the size, as intended here: without this every
# component-filtered run prints the same FutureWarning. Only that message is silenced.
_warnings.filterwarnings("ignore", message=r"Parameter `min_size` is deprecated", category=FutureWarning)
