from .protocol_nma import FlexDLProtNMA  # noqa: F401
from .protocol_synthesize import FlexDLProtSynthesize  # noqa: F401
