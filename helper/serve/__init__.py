"""The helper's serving loop and its parts: ``daemon`` (the loop: drain a
ring, batch, answer, fall back to the CPU), ``batch`` (validation,
grouping, key cache, CQEs), ``fastpath`` (the same bookkeeping in C),
``engine_cpu`` and ``engine_gpu`` (running a batch), ``calibrate`` (the
crossovers), ``sdnotify`` (readiness for systemd) and ``resident`` (the
GPU-resident XTS path: a persistent kernel polling the ring).

May import rings, services, cuda and native; not bench or cli.
"""
