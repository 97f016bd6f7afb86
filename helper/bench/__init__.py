"""Benchmarks, commands that print what they measured and write JSON:
``services`` (``kgpu bench``: each compute service through its backend,
with the size sweep and the crossover), ``ring`` (``kgpu bench ring``: the
whole ring, a submitter against a running helper) and ``anchor`` (the
native CPU baseline, ``openssl speed``, printed beside them).

May import rings, services, cuda and native; not serve or cli.
"""
