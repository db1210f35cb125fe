from .viewer_nma import FlexDLNMAViewer  # noqa: F401
from .viewer_train import FlexDLTrainingViewer  # noqa: F401
from .viewer_flex import FlexDLFlexViewer  # noqa: F401
from .viewer_reconstruct import FlexDLReconstructViewer  # noqa: F401
