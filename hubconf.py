"""torch.hub entry points of the model zoo, one per entry: ``torch.hub.load("<owner>/reprozoo", "<entry>")`` or,
from a checkout, ``torch.hub.load(".", "<entry>", source="local")``. They live in ``reprozoo/zoo/hubconf.py`` (also
in the installed package: ``reprozoo.zoo.HUB_DIR``); this file re-exports them."""

from reprozoo.zoo import hubconf as _hubconf

dependencies = _hubconf.dependencies
globals().update({name: getattr(_hubconf, name) for name in _hubconf._list_weights()})
