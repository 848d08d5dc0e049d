"""`intercept_calls`: linen's ``nn.intercept_methods`` for the ``__call__`` of Flax NNX layers.

NNX has no interceptors: a layer is a Python object called directly. While
`intercept_calls` is active, the ``__call__`` of the given classes (as
defined in each class, so that subclasses calling ``super().__call__`` are
seen too) goes through an interceptor, as linen's do. Meant for tracing one
call (`jaxbn.precise`, `jaxbn._fold_pairs`); it patches the classes, so other
threads calling those layers meanwhile are intercepted as well.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

Interceptor = Callable[[Callable[..., Any], Any, tuple, dict], Any]


@contextlib.contextmanager
def intercept_calls(classes: tuple[type, ...], interceptor: Interceptor) -> Iterator[None]:
  """Routes each ``layer(*args, **kwargs)`` of ``classes`` through ``interceptor``.

  ``interceptor(call, layer, args, kwargs)`` is called instead; ``call(*args,
  **kwargs)`` runs the layer's own ``__call__`` (possibly with other
  arguments).
  """
  owners = {next(c for c in cls.__mro__ if '__call__' in vars(c)) for cls in classes}
  originals = {owner: vars(owner)['__call__'] for owner in owners}

  def wrap(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
      return interceptor(functools.partial(original, self), self, args, kwargs)

    return call

  try:
    for owner, original in originals.items():
      owner.__call__ = wrap(original)
    yield
  finally:
    for owner, original in originals.items():
      owner.__call__ = original
