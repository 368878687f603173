"""Tools over datasets: statistics against the published ones, verification, event displays."""
