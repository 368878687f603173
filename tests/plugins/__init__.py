"""Plug-ins that tests register through RAYSVC_PLUGINS: a head and a detector defined outside raysvc/."""
