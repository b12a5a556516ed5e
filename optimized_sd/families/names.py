"""The built-in families' ids: what configs, metadata, reports and benchmark results carry (never renamed)."""

SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
SDXL_REFINER = "sdxl_refiner"
SD1_INPAINTING = "sd1_inpainting"  # a record of family SD1 (its files and metadata say "sd1")
