"""Detectors defined outside raysvc, for the plug-in tests (RAYSVC_PLUGINS=tests.plugins.<module>)."""
