"""The embedded demo: synthetic scenes the shipped tiny model was trained on (see `scenes`)."""
