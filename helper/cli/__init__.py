"""The ``kgpu`` command line: one click group (main.py) and a module per
command family: ``commands`` (``kgpu helper``, ``kgpu status``),
``crypt`` (``kgpu crypt``: LUKS takeover and release), ``raid6``
(``kgpu raid6``: arrays from mdadm, status, replace, assemble), ``doctor``
(``kgpu doctor``).

The top of the import order: it may import every other subpackage (and
kgpu_testbed for ``kgpu testbed``/``kgpu demo``); nothing imports it.
"""
