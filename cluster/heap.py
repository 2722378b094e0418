"""The master's heap, kept shareable with the workers it forks.

After a fork every page is shared between master and worker until one of them writes to it;
then the writer gets a private copy. CPython's cyclic garbage collector writes to every object
it examines (its ``gc_refs``), so a collection in the master after a fork, or in a worker, would
copy every page holding a container that the master made: each worker's private memory would
grow toward the master's whole heap. ``gc.freeze()`` moves everything alive into a permanent
generation that collections skip, so neither side touches those pages for the collector's
sake; only what each process really writes becomes its own.

The price: cyclic garbage frozen in the master is never collected. The master makes little
(a retired generation's objects, a reload's parsed config), so each time a generation is gone
the master thaws, collects once and refreezes at its next fork. Workers never thaw: they exit.
"""

from __future__ import annotations

import gc


def freeze() -> None:
    """Right before a fork: what is alive now stays out of every later collection."""
    gc.freeze()


def thaw() -> None:
    """A generation is gone: collect the cycles frozen with it (the next fork refreezes)."""
    gc.unfreeze()
    gc.collect()
