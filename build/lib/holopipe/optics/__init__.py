"""Wave optics: propagation (the public API, :mod:`holopipe.optics.propagation`, re-exported here so that
``holopipe.optics.propagate`` keeps working), simulated holograms, reconstruction of model inputs, focus
metrics."""

from holopipe.optics.propagation import *  # noqa: F403 -- the public API, listed in propagation.__all__
from holopipe.optics.propagation import __all__  # noqa: F401
