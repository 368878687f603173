"""Models: PTv3 backbone (ptv3.py) and segmentation heads (heads.py)."""
