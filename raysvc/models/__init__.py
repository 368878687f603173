"""Models: PTv3 (ptv3.py) and its segmentation heads (heads.py), Panda (panda.py), PoLAr-MAE (polarmae.py); the
registry of segmenter backbones (archs.py)."""
