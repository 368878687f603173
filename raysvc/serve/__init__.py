"""Ray Serve segmentation endpoint (`raysvc serve`): app (FastAPI ingress, batching, auth) and protocol
(request bodies)."""
