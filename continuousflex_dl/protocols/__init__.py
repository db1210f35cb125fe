from .protocol_nma import FlexDLProtNMA  # noqa: F401
from .protocol_synthesize import FlexDLProtSynthesize  # noqa: F401
from .protocol_align import FlexDLProtAlign  # noqa: F401
from .protocol_outliers import FlexDLProtOutliers  # noqa: F401
from .protocol_train import FlexDLProtTrain  # noqa: F401
from .protocol_predict import FlexDLProtPredict  # noqa: F401
from .protocol_trajectory import FlexDLProtTrajectory  # noqa: F401
from .protocol_cluster import FlexDLProtCluster  # noqa: F401
