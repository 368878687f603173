"""Where events come from: the synthetic generators (LArTPC, water Cherenkov) and the PILArNet-M and WAND readers."""
