"""One module per schema revision; each names its predecessor in `down_revision`."""
