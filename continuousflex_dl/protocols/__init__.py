from .protocol_nma import FlexDLProtNMA  # noqa: F401
