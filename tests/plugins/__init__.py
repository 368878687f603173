"""Plug-ins that tests register through RAYSVC_PLUGINS=tests.plugins.<module>: a head and a detector defined
outside raysvc/."""
