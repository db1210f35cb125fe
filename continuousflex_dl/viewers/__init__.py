from .viewer_nma import FlexDLNMAViewer  # noqa: F401
